"""Project errors: user mistakes surface as one-line messages and exit code 2 in every CLI."""

from __future__ import annotations


class SegclipError(Exception):
    """Base class of every error a user can cause (bad file, bad option, bad label)."""


class ConfigError(SegclipError, ValueError):
    """A configuration value is outside its allowed range."""


class CheckpointError(SegclipError, ValueError):
    """A checkpoint file is missing, corrupt, unsafe or of another format."""


class ConversionError(SegclipError, ValueError):
    """Foreign weights (official SegCLIP, OpenAI/open_clip CLIP) do not map onto the model."""


class DataError(SegclipError, ValueError):
    """A dataset, pairs file or image is missing or malformed."""


class MissingDependencyError(SegclipError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""


class WriteError(SegclipError, OSError):
    """An output file cannot be written (the path is a directory, a parent is a file, no
    permission, disk full); the message names the path."""


def one_line(error: BaseException) -> str:
    """The CLI form of a user error: `error: ...` on a single line (docs/architecture.md, exit code
    2)."""
    return "error: " + " ".join(str(error).split())

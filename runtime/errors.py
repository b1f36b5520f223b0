"""Runtime errors (docs/architecture.md "Command contracts"): every user mistake the runtime can
detect.

Each class subclasses `segclip.errors.SegclipError`, so `segclip-run` prints the message on one
line and exits with code 2, and the builtin exception a caller would expect (`ValueError`,
`FileNotFoundError`, `ImportError`). Messages name what was wrong, the offending value or path,
and the fix.
"""

from __future__ import annotations

from segclip.errors import SegclipError


class RuntimeSegclipError(SegclipError):
    """Base class of the errors raised by `segclip.runtime`."""


class BundleError(RuntimeSegclipError, ValueError):
    """A bundle directory or one of its files is missing, corrupt or of another format/version."""


class TokenizerError(RuntimeSegclipError, ValueError):
    """`tokenizer.json` is unreadable or not a CLIP BPE tokenizer, or a text cannot be encoded."""


class LabelFileError(RuntimeSegclipError, ValueError):
    """A labels file or list is missing, empty, not UTF-8, or holds a duplicate or bad label."""


class ImageError(RuntimeSegclipError, ValueError):
    """An image is missing, empty, truncated, not an image, of an unsupported layout or too big."""


class EngineError(RuntimeSegclipError, ValueError):
    """An engine cannot run here (TensorRT/GPU mismatch) or returned outputs off the contract."""


class NonFiniteOutputError(EngineError):
    """An engine returned NaN or inf: a broken engine or a precision the model does not survive."""


class BackendUnavailableError(RuntimeSegclipError, ImportError):
    """The requested backend or device needs a package or a GPU that is not present."""


class OutputError(RuntimeSegclipError, OSError):
    """A result file (label map, overlay, JSON) cannot be written."""

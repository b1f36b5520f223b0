"""Export errors (docs/architecture.md "Command contracts"): every user-visible failure of
`segclip-export`.

Each class subclasses `segclip.errors.SegclipError`, so the CLI prints its message on one line and
exits with code 2, and the builtin exception a caller would expect.
"""

from __future__ import annotations

from segclip.errors import SegclipError


class ExportError(SegclipError, ValueError):
    """An export cannot be done as asked: bad option, bad target directory, invalid graph."""


class ParityError(ExportError):
    """The exported graphs disagree with PyTorch eager beyond the thresholds (message has the
    numbers); the bundle is not written (or, for `verify`, is reported as failing)."""


class EngineBuildError(SegclipError, RuntimeError):
    """TensorRT could not parse a graph or build an engine (message lists the parser errors)."""

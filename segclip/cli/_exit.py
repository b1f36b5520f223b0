"""The exit of every segclip command on a user error: one line on stderr, exit code 2."""

from __future__ import annotations

import typer

from segclip.errors import SegclipError, one_line

USER_ERROR_EXIT = 2


def fail(error: SegclipError) -> typer.Exit:
    """Print `error` as one line on stderr; return the Exit to raise (`raise fail(e) from None`)."""
    typer.echo(one_line(error), err=True)
    return typer.Exit(code=USER_ERROR_EXIT)

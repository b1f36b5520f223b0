"""The exit of every segclip command on a user error: one line on stderr, exit code 2.

`new_app` builds every command's typer app the same way (docs/architecture.md "Command
contracts"): plain help text, so "[default: …]" and bracketed words survive (rich markup would eat
them); no completion installer; no pretty tracebacks (a traceback means a bug, and stays plain);
and a missing optional dependency (torch in a runtime-only install, OpenVINO, Ray, the service's
libraries) becomes one line naming the extra to install, with exit code 2.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import typer

from segclip.errors import SegclipError, one_line

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # older typer uses click itself
    from click.exceptions import NoArgsIsHelpError, UsageError

USER_ERROR_EXIT = 2

# top-level module -> the extra that installs it
EXTRA_OF_MODULE = {
    "torch": "train", "torchvision": "train", "open_clip": "train", "onnx": "train",
    "onnxscript": "train", "skimage": "train",
    "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "multipart": "serve",
    "python_multipart": "serve", "pycocotools": "serve",
    "openvino": "openvino", "nncf": "openvino",
    "ray": "ray",
    "tensorrt": "gpu", "cuda": "gpu", "pycuda": "gpu",
}
EXTRA_PURPOSE = {"train": "the training extra", "serve": "the serving extra",
                 "openvino": "the OpenVINO extra", "ray": "the Ray extra", "gpu": "the GPU extra"}


def fail(error: SegclipError) -> typer.Exit:
    """Print `error` as one line on stderr; return the Exit to raise (`raise fail(e) from None`)."""
    typer.echo(one_line(error), err=True)
    return typer.Exit(code=USER_ERROR_EXIT)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show each distinct warning once, as `warning: ...` on one stderr line (no source path or
    source line, as Python's default format would print)."""
    seen: set[str] = set()

    def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        text = "warning: " + " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            print(text, file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def missing_extra_message(error: ModuleNotFoundError) -> str | None:
    """The one-line hint for a missing optional module, or None when `error` is no such module."""
    top = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (f"error: this command needs {EXTRA_PURPOSE[extra]} ({top} is not installed): "
            f"pip install 'segclip[{extra}]'")


class SegclipApp(typer.Typer):
    """A typer app whose commands print warnings as single lines and turn a missing optional
    dependency into a one-line error."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", PlainUsageCommand)
        return super().command(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with one_line_warnings():
                return super().__call__(*args, **kwargs)
        except ModuleNotFoundError as error:
            message = missing_extra_message(error)
            if message is None:
                raise
            print(message, file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)


class OneLineUsageError(UsageError):
    """A usage error (missing or malformed option, unknown command) shown as one line."""

    def show(self, file: Any = None) -> None:
        typer.echo(f"error: {self.message}", err=True)


def _one_line_usage(error: UsageError) -> UsageError:
    """`error` as one line naming the help ("(see 'segclip-run --help')"), exit code 2; the help
    printed for a bare group command stays as it is."""
    if isinstance(error, (NoArgsIsHelpError, OneLineUsageError)):
        return error
    message = " ".join(error.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    where = error.ctx.command_path if error.ctx is not None else "the command"
    return OneLineUsageError(f"{message} (see '{where} --help')", ctx=error.ctx)


class PlainUsageCommand(typer.core.TyperCommand):
    """A command whose usage line names required arguments plainly (`MODEL`, not typer's
    `{MODEL}`, which reads like a placeholder); optional ones keep their `[...]`, and a metavar
    that already ends in "..." gets no second one. Its usage errors are one line."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [(p[1:].replace("}", "", 1) if p.startswith("{") else p).replace("......", "...")
                for p in pieces]

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as error:
            raise _one_line_usage(error) from None


class PlainGroup(typer.core.TyperGroup):
    """A command with subcommands whose usage errors (an unknown subcommand too) are one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as error:
            raise _one_line_usage(error) from None

    def resolve_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().resolve_command(*args, **kwargs)
        except UsageError as error:
            raise _one_line_usage(error) from None


def new_app(**kwargs: Any) -> SegclipApp:
    """A command's typer app: plain help with its defaults shown, no pretty tracebacks."""
    options: dict[str, Any] = {"add_completion": False, "pretty_exceptions_enable": False,
                               "rich_markup_mode": None, "cls": PlainGroup}
    options.update(kwargs)
    return SegclipApp(**options)

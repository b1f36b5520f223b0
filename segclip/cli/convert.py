"""`segclip-convert`: official SegCLIP / CLIP weights to and from segclip checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from segclip.cli._exit import fail, new_app
from segclip.errors import SegclipError

app = new_app(no_args_is_help=True,
                  help="Convert official SegCLIP / CLIP weights to and from segclip checkpoints.")


@app.command()
def official(
    source: Annotated[Path, typer.Argument(metavar="SOURCE",
        help="The official segclip.bin (a state dict).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The segclip checkpoint to write.")],
    text_heads: Annotated[
        Optional[int], typer.Option("--text-heads", help="Text heads [default: width/64].")
    ] = None,
    decoder_heads: Annotated[
        Optional[int], typer.Option("--decoder-heads", help="MAE decoder heads [default: 8].")
    ] = None,
    inference_only: Annotated[
        bool, typer.Option("--inference-only", help="Drop the reconstruction branch.")
    ] = False,
) -> None:
    """Convert the released official checkpoint; the model config is read off its shapes."""
    try:
        from segclip.convert import convert_official

        report = convert_official(source, out, text_heads=text_heads,
                                  decoder_heads=decoder_heads, inference_only=inference_only)
    except SegclipError as e:
        raise fail(e) from None
    typer.echo(report.summary())
    typer.echo(f"wrote {out}")


@app.command()
def clip(
    source: Annotated[Path, typer.Argument(metavar="SOURCE",
        help="OpenAI CLIP (.pt, TorchScript or state dict) "
                                                "or open_clip state dict.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The segclip checkpoint to write.")],
    config: Annotated[str, typer.Option("--config", help="Model preset.")] = "vit-b16",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the new modules' init.")] = 0,
) -> None:
    """Initialise a fresh SegCLIP from CLIP weights (new modules keep their initialisation)."""
    try:
        from segclip.convert import convert_clip

        report = convert_clip(source, out, config=config, seed=seed)
    except SegclipError as e:
        raise fail(e) from None
    typer.echo(report.summary())
    typer.echo(f"wrote {out}")


@app.command("to-official")
def to_official(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT",
        help="A segclip checkpoint (ckpt.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The official-layout file to write.")],
) -> None:
    """Write a checkpoint as a plain state dict with the official SegCLIP names."""
    try:
        from segclip.convert import export_official

        export_official(checkpoint, out)
    except SegclipError as e:
        raise fail(e) from None
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()

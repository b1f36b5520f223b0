"""`segclip-data`: build the synthetic shapes world and superpixel caches (docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from segclip.cli._exit import fail, new_app
from segclip.errors import SegclipError

app = new_app(no_args_is_help=True,
                  help="Prepare training and evaluation data.")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="New (or empty) output folder.")],
    num: Annotated[int, typer.Option("--num", help="Training image-caption pairs.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed: same seed, same bytes.")] = 0,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 64,
    val_num: Annotated[int, typer.Option("--val-num", help="Validation images.")] = 100,
    eval_num: Annotated[
        Optional[int], typer.Option("--eval-num", help="Evaluation images [default: --val-num].")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--quiet")] = True,
) -> None:
    """Write the synthetic shapes world: OUT/train/pairs.jsonl and VOC sets OUT/val, OUT/eval."""
    try:
        from segclip.data.synth import SynthConfig, generate

        config = SynthConfig(num=num, val_num=val_num,
                             eval_num=val_num if eval_num is None else eval_num,
                             seed=seed, size=size)
        generate(config, out, progress=progress)
    except SegclipError as e:
        raise fail(e) from None
    typer.echo(f"wrote {config.num} training pairs, {config.val_num} val and "
               f"{config.eval_num} eval images to {out}")


@app.command()
def superpixels(
    data: Annotated[Path, typer.Argument(metavar="DATA",
        help="pairs.jsonl, CSV/TSV, COCO JSON, .tar or folder.")],
    image_root: Annotated[
        Optional[Path], typer.Option("--image-root", help="Folder relative image paths start at.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Processes.")] = 1,
    max_short_side: Annotated[
        int, typer.Option("--max-short-side", help="Downscale larger images first (0: never).")
    ] = 224,
    progress: Annotated[bool, typer.Option("--progress/--quiet")] = True,
) -> None:
    """Compute and cache Felzenszwalb superpixels for every image of DATA (resumable)."""
    try:
        from segclip.data.superpixels import build_cache

        report = build_cache(data, image_root=image_root, workers=workers,
                             max_short_side=max_short_side or None, progress=progress)
    except SegclipError as e:
        raise fail(e) from None
    typer.echo(f"superpixels in {report.folder}: {report.computed} computed, "
               f"{report.skipped} already present")


if __name__ == "__main__":
    app()

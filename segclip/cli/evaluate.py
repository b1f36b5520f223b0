"""`segclip-eval`: zero-shot mIoU of a checkpoint or bundle on a VOC-layout set
(docs/architecture.md).

    segclip-eval RUN/ckpt.pt --data VOC2012 --classes voc
    segclip-eval bundle/ --data synth/eval --classes synth/eval/classes.txt --out eval.json
    segclip-eval RUN/ckpt.pt --data synth/val --diagnostics

`--classes` is a file (one class per line, classes 1..K) or a preset: voc (threshold 0.80),
context (0.25), coco-object (0.65); default DATA/classes.txt. mIoU and IoUs are printed in
percent and written as fractions to `--out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from segclip.cli._exit import fail, new_app
from segclip.errors import DataError, SegclipError

app = new_app(help="Evaluate zero-shot segmentation (mIoU).")


@app.command()
def main(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="ckpt.pt or a bundle directory.")],
    data: Annotated[Path, typer.Option("--data", help="VOC-layout folder.")],
    classes: Annotated[Optional[str], typer.Option(
        "--classes", help="classes.txt or a preset (voc, context, coco-object) [default: "
        "DATA/classes.txt].")] = None,
    label: Annotated[Optional[list[str]], typer.Option(
        "--label", help="A class name instead of --classes; repeatable, class i = the i-th "
        "--label (the mask value).")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Background threshold [default: the preset's, else the "
        "checkpoint's, else 0.80].")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the result JSON here.")
                   ] = None,
    split: Annotated[str, typer.Option("--split", help="ImageSets/Segmentation/SPLIT.txt")
                     ] = "val",
    diagnostics: Annotated[bool, typer.Option(
        "--diagnostics", help="Synthetic-world diagnostics (oracle, naming, centers).")] = False,
    device: Annotated[str, typer.Option(
        "--device", help="auto|cpu|cuda|cuda:N (a checkpoint runs in PyTorch, a bundle in the "
        "runtime).")] = "cpu",
    limit: Annotated[Optional[int], typer.Option("--limit", help="First N images only.")
                     ] = None,
    progress: Annotated[bool, typer.Option("--progress/--quiet")] = True,
) -> None:
    """Print the per-class IoU table and mIoU; optionally write them as JSON."""
    try:
        from segclip.evaluation.evaluate import evaluate
        from segclip.evaluation.metrics import format_table

        if label and classes is not None:
            raise DataError("pass either --classes or --label, not both")
        result = evaluate(model, data, list(label) if label else classes, threshold, out,
                          diagnostics, split, device, limit, progress)
    except SegclipError as e:
        raise fail(e) from None
    import numpy as np

    iou = np.array([np.nan if v is None else v for v in result.per_class.values()])
    typer.echo(format_table(list(result.per_class), iou, result.miou))
    typer.echo(f"{result.num_images} images, background threshold {result.threshold:.2f}")
    if result.diagnostics:
        for key, value in result.diagnostics.items():
            if value is None:
                shown = "n/a"
            elif key.startswith("centers"):
                shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            else:
                shown = f"{100 * value:.2f}%"
            typer.echo(f"{key}: {shown}")


if __name__ == "__main__":
    app()

"""`segclip-export`: checkpoint -> ONNX bundle, parity re-check, TensorRT engines
(docs/architecture.md
"Command contracts").

Thin typer commands over `export_bundle`, `verify_bundle` and `build_engines`. Progress goes to
stderr, the summary table to stdout. A `SegclipError` becomes one line on stderr and exit code 2;
any other exception keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segclip.cli._exit import fail, new_app
from segclip.errors import SegclipError

app = new_app(help="Export SegCLIP checkpoints as bundles (ONNX, TensorRT).",
                  no_args_is_help=True)


def _progress(message: str) -> None:
    typer.echo(message, err=True)


def _say(progress: bool):
    """The progress callback of a command: one line per step on stderr, or None (--quiet)."""
    return _progress if progress else None


ProgressFlag = Annotated[bool, typer.Option("--progress/--quiet",
                                            help="One line per step on stderr.")]


@app.command("onnx")
def onnx_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT",
        help="segclip checkpoint (ckpt.pt)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="bundle directory "
                                             "[default: 'bundle' beside the checkpoint]")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 17..20")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16", help="also write image.fp16.onnx")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="also write image.int8.onnx "
                                       "(dynamic int8, CPU)")] = False,
    progress: ProgressFlag = True,
) -> None:
    """Export CHECKPOINT as a bundle verified against PyTorch (image/text ONNX, tokenizer)."""
    try:
        from segclip.export.bundle import export_bundle
        from segclip.export.manifest import summary_table

        out_dir = out if out is not None else checkpoint.parent / "bundle"
        bundle = export_bundle(checkpoint, out_dir, opset=opset, fp16=fp16, int8=int8,
                               progress=_say(progress))
        typer.echo(summary_table(bundle))
    except SegclipError as e:
        raise fail(e) from None


@app.command("dense")
def dense_command(
    clip_weights: Annotated[Path, typer.Argument(metavar="CLIP_WEIGHTS",
        help="OpenAI CLIP ViT file (ViT-B-16.pt) or open_clip state dict")],
    mode: Annotated[str, typer.Option(help="naclip | sclip | clearclip | maskclip | scclip")]
    = "naclip",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="bundle directory "
                                             "[default: 'dense-MODE' beside CLIP_WEIGHTS]")]
    = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 17..20")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16", help="also write image.fp16.onnx")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="also write image.int8.onnx "
                                       "(dynamic int8, CPU)")] = False,
    progress: ProgressFlag = True,
) -> None:
    """Export a training-free dense CLIP (edited last block) as a bundle of kind "dense"
    (docs/dense.md)."""
    try:
        from segclip.export.dense import export_dense_bundle

        out_dir = out if out is not None else clip_weights.parent / f"dense-{mode}"
        bundle = export_dense_bundle(clip_weights, out_dir, mode=mode, opset=opset,
                                     fp16=fp16, int8=int8, progress=_say(progress))
        typer.echo(f"dense bundle ({mode}): {bundle}")
    except SegclipError as e:
        raise fail(e) from None


@app.command("verify")
def verify_command(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="bundle directory")],
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT",
        help="the checkpoint it was exported from")],
    progress: ProgressFlag = True,
) -> None:
    """Re-run the ONNX Runtime vs PyTorch parity check of every graph in BUNDLE."""
    try:
        from segclip.export.bundle import verify_bundle

        report = verify_bundle(bundle, checkpoint, progress=_say(progress))
        for item in report.image:
            figures = ", ".join(f"{k} {v:.1e}" for k, v in item.max_abs.items())
            typer.echo(f"{item.file}: max|diff| {figures}; region argmax agreement "
                       f"{item.argmax_agreement:.3%}")
        typer.echo(f"{report.text_file}: max|diff| text {report.text_max_abs:.1e}")
        typer.echo("parity: passed")
    except SegclipError as e:
        raise fail(e) from None


@app.command("openvino")
def openvino_command(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE",
        help="bundle directory (from segclip-export onnx)")],
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT",
        help="the checkpoint it was exported from")],
    int8: Annotated[bool, typer.Option("--int8", help="also write image.ov-int8.xml/.bin "
                                       "(NNCF post-training int8)")] = False,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="folder of calibration images for --int8 [default: generated "
        "shapes scenes]")] = None,
    samples: Annotated[int, typer.Option(help="calibration windows for --int8")] = 64,
    progress: ProgressFlag = True,
) -> None:
    """Add the OpenVINO variants (ov-f32, ov-bf16, ov-int8) to BUNDLE, each checked against
    PyTorch, with its parity figures in segclip.json."""
    try:
        from segclip.export.openvino import export_openvino, summary_lines

        section = export_openvino(bundle, checkpoint, int8=int8, calibration=calibration,
                                  samples=samples, progress=_say(progress))
        for line in summary_lines(section):
            typer.echo(line)
    except SegclipError as e:
        raise fail(e) from None


@app.command("trt")
def trt_command(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE",
        help="bundle directory (from segclip-export onnx)")],
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 image engine")] = False,
    batch: Annotated[str, typer.Option(help="image batch profile MIN:OPT:MAX")] = "1:4:16",
    labels: Annotated[str, typer.Option(help="text label-count profile MIN:OPT:MAX")]
    = "1:32:256",
    workspace: Annotated[float, typer.Option(help="builder workspace, GiB")] = 4.0,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache",
                                                      help="timing cache file to load/save")]
    = None,
    progress: ProgressFlag = True,
) -> None:
    """Build TensorRT engines image.plan and text.plan in BUNDLE for this GPU."""
    try:
        from segclip.export.manifest import summary_table
        from segclip.export.tensorrt_build import Profile, build_engines

        build_engines(bundle, fp16=fp16, batch=Profile.parse(batch, "--batch"),
                      labels=Profile.parse(labels, "--labels"), workspace_gib=workspace,
                      timing_cache=timing_cache, progress=_say(progress))
        typer.echo(summary_table(bundle))
    except SegclipError as e:
        raise fail(e) from None

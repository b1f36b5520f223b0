"""`segclip-run`: segment images with a bundle (docs/architecture.md "Command contracts").

    segclip-run --engine bundle/ --labels labels.txt photos/ extra.jpg
    segclip-run --engine bundle/image.plan --labels labels.txt --out out/run --device cuda img.png

Writes OUT/NAME.png, OUT/NAME_overlay.jpg and OUT/NAME.json per image (see
`segclip.runtime.runner`), a progress bar on stderr, and a summary table on stdout. A user error
(missing or corrupt file, empty labels, unusable device, engine/GPU mismatch) before the first
image prints one line on stderr and exits with code 2, writing nothing. An unreadable image
among several is reported on one line and skipped; the others are processed and the command
exits with code 2 after the summary. Thin typer wrapper over `runner.run_images`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from segclip.cli._exit import fail, new_app
from segclip.errors import SegclipError
from segclip.runtime.dense_cli import AreaThd, BackgroundNames, LogitScale, PamrSteps, dense_options
from segclip.runtime.variants import VARIANTS

DEFAULT_MAX_PIXELS = 100_000_000  # = segclip.runtime.images.DEFAULT_MAX_PIXELS (kept import-free)
app = new_app(help="Segment images with a segclip bundle (ONNX Runtime or TensorRT).")


@app.command()
def main(
    images: Annotated[list[str], typer.Argument(
        metavar="IMAGE|DIR...", help="Image files, or folders of images (one level deep); "
        "with --ray also URIs (s3://bucket/dir).")],
    engine: Annotated[Path, typer.Option(
        "--engine", help="Bundle directory, or its image.onnx / image.fp16.onnx / image.plan.")],
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", help="Labels file: one label per line (# comments); label i is value i.")
    ] = None,
    label: Annotated[Optional[list[str]], typer.Option(
        "--label", help="A label; repeatable, after those of --labels.")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Background threshold in 0..1 (default: the bundle's).")] = None,
    out: Annotated[str, typer.Option(
        "--out", "-o", help="Output folder (with --ray also a URI).")] = "out/run",
    variant: Annotated[Optional[str], typer.Option(
        "--variant", help=f"Image graph: {'|'.join(VARIANTS)} [default: the file --engine "
        "names, else fp32]; auto: the fastest that passed its parity check.")] = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="Intra-op threads of ONNX Runtime / OpenVINO [default: all "
        "cores].")] = None,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", min=1, help="Labels kept per window by the global similarity [default: the "
        "bundle's].")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", help="Also cache label embeddings on disk here.")] = None,
    confidence: Annotated[bool, typer.Option(
        "--confidence", help="Also write NAME_conf.png: 8-bit max label probability per "
        "pixel.")] = False,
    device: Annotated[str, typer.Option(
        "--device", help="auto|cpu|cuda|cuda:N; auto: TensorRT, else ONNX Runtime CUDA, "
        "else CPU.")] = "auto",
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="Skip images whose results exist and were made with the same "
        "bundle, labels, threshold and variant (others are redone).")] = False,
    max_pixels: Annotated[int, typer.Option(
        "--max-pixels", help="Refuse images with more pixels.")] = DEFAULT_MAX_PIXELS,
    progress: Annotated[bool, typer.Option("--progress/--quiet", help="Progress bar.")] = True,
    background_names: BackgroundNames = None,
    pamr: PamrSteps = 0,
    area_thd: AreaThd = None,
    logit_scale: LogitScale = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Run on Ray Data: a pool of actors, one Segmenter each (docs/ray.md).",
        rich_help_panel="Ray")] = False,
    address: Annotated[Optional[str], typer.Option(
        "--address", help="With --ray: the Ray cluster to join (default: a local Ray on "
        "127.0.0.1).", rich_help_panel="Ray")] = None,
    actors: Annotated[int, typer.Option(
        "--actors", help="With --ray: actors in the pool.", rich_help_panel="Ray")] = 1,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, help="Windows per image-engine call [default: 16]; with --ray also "
        "the images per actor call [default: 4].")] = None,
    num_cpus: Annotated[float, typer.Option(
        "--num-cpus", help="With --ray: CPUs per actor.", rich_help_panel="Ray")] = 1.0,
    num_gpus: Annotated[Optional[float], typer.Option(
        "--num-gpus", help="With --ray: GPUs per actor (default 1 with a GPU device, else 0).",
        rich_help_panel="Ray")] = None,
) -> None:
    """Segment IMAGE|DIR... into the labels of --labels; write label maps, overlays and JSON."""
    try:
        from segclip.runtime.runner import run_images

        names = _label_list(labels, label)
        options = {"variant": variant, "threads": threads, "top_k": top_k,
                   "cache_dir": cache_dir, "batch_size": batch_size, "confidence": confidence,
                   **dense_options(engine, background_names, pamr, area_thd, logit_scale)}
        common = {"threshold": threshold, "device": device,
                  "skip_existing": skip_existing, "max_pixels": max_pixels, "progress": progress,
                  **{k: v for k, v in options.items() if v is not None and v is not False}}
        ray_only = {"--address": address is not None, "--actors": actors != 1,
                    "--num-cpus": num_cpus != 1.0, "--num-gpus": num_gpus is not None}
        if not ray and any(ray_only.values()):
            from segclip.errors import ConfigError

            given = ", ".join(name for name, set_ in ray_only.items() if set_)
            raise ConfigError(f"{given} only apply with --ray; add --ray or drop them")
        if ray:
            from segclip.runtime.ray_run import run_images_ray

            report = run_images_ray(engine, names, images, out, address=address, actors=actors,
                                    batch_images=batch_size or 4, num_cpus=num_cpus,
                                    num_gpus=num_gpus, **common)
        else:
            report = run_images(engine, names, images, out, **common)
    except SegclipError as e:
        raise fail(e) from None
    if not (report.failed and report.total == 1):  # a lone failed image: its line is all
        typer.echo(report.table())
    if report.failed:
        if report.total > 1:  # one image: its own error line is the one line
            typer.echo(f"error: {len(report.failed)} of {report.total} images failed (listed "
                       f"above)", err=True)
        raise typer.Exit(code=2)


def _label_list(labels_file: Path | None, extra: list[str] | None) -> list[str]:
    """The labels of --labels FILE, then each --label, as one validated list."""
    from segclip.runtime.errors import LabelFileError
    from segclip.runtime.labels import load_labels

    if labels_file is None and not extra:
        raise LabelFileError("no labels given; pass --labels FILE (one label per line) or "
                             "--label NAME (repeatable)")
    names = list(load_labels(labels_file)) if labels_file is not None else []
    return list(load_labels([*names, *(extra or [])]))


if __name__ == "__main__":
    app()

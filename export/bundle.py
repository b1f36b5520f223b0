"""The bundle writer (docs/architecture.md "Bundle contract"): checkpoint -> verified bundle
directory.

Steps: image.onnx and text.onnx (pinned TorchScript exporter, graph checks), optional
image.fp16.onnx / image.int8.onnx, tokenizer.json, parity against PyTorch eager, segclip.json last.
Everything is written into a hidden staging directory beside the target and swapped in only after
the parity check passed, so an interrupted or failing export never leaves a complete-looking
bundle and an existing bundle survives until its replacement is verified.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from segclip.checkpoint import file_sha256, model_from_payload, read_checkpoint
from segclip.export import onnx_graph, precision
from segclip.export._files import atomic_write_json, make_staging_dir, swap_directory
from segclip.export.errors import ExportError
from segclip.export.manifest import build_manifest, read_manifest
from segclip.export.parity import ParityReport, measure_parity, require_parity
from segclip.model import SegCLIP
from segclip.runtime import contract

Progress = Callable[[str], None]
DEFAULT_OPSET = 17
# precision -> (manifest "files" key, file name) of the image graphs
IMAGE_VARIANTS = {"fp32": ("image", contract.IMAGE_ONNX),
                  "fp16": ("image_fp16", contract.IMAGE_FP16_ONNX),
                  "int8": ("image_int8", contract.IMAGE_INT8_ONNX)}


def _quiet(_: str) -> None:
    pass


def check_target(out_dir: Path) -> None:
    """Refuse a target that is a file, or a non-empty directory that is not a segclip bundle."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a directory; choose another path")
    parent = next((p for p in out_dir.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ExportError(f"--out {out_dir}: {parent} is a file, not a directory; choose another "
                          f"path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / contract.MANIFEST_FILE).is_file():
            raise ExportError(f"--out {out_dir} is a non-empty directory without "
                              f"{contract.MANIFEST_FILE}; refusing to replace it. Choose a new "
                              f"or empty directory, or an existing bundle to overwrite")


@contextmanager
def _export_copy(model: SegCLIP) -> Iterator[SegCLIP]:
    """The model in eval mode, float32 on CPU, without touching the caller's module state."""
    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype == torch.float32:
        was_training = model.training
        try:
            yield model.eval()
        finally:
            model.train(was_training)
    else:
        yield copy.deepcopy(model).float().cpu().eval()


def export_model(model: SegCLIP, out_dir: str | Path, opset: int = DEFAULT_OPSET,
                 fp16: bool = False, int8: bool = False, verify: bool = True,
                 source: dict[str, Any] | None = None, progress: Progress | None = None) -> Path:
    """Export an in-memory model as a bundle at `out_dir` (see the module docstring).

    Args:
        source: recorded as the manifest's "source" (export_bundle passes the checkpoint's name
            and sha256).
        progress: called with one line per step (None: silent).
    Returns:
        The bundle directory.
    Raises:
        ExportError: bad option or target, a graph failing the checks.
        ParityError: the graphs disagree with PyTorch beyond the thresholds (nothing replaced).
    """
    say = progress or _quiet
    out_dir = Path(out_dir)
    onnx_graph.check_opset(opset)
    check_target(out_dir)
    start = time.perf_counter()
    try:
        staging = make_staging_dir(out_dir)
    except OSError as e:  # e.g. a parent of --out is a file, or no permission
        raise ExportError(f"cannot create the bundle directory {out_dir}: {e}; choose another "
                          f"--out") from e
    try:
        with _export_copy(model) as eval_model:
            files, parity = _write_graphs(eval_model, staging, opset, fp16, int8, verify, say)
            manifest = build_manifest(eval_model.config, float(eval_model.scale().detach()), files,
                                      source or {}, opset, parity,
                                      seconds=time.perf_counter() - start,
                                      file_bytes={name: (staging / name).stat().st_size
                                                  for name in files.values()})
        atomic_write_json(staging / contract.MANIFEST_FILE, manifest)  # last: marks completion
        swap_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"bundle written to {out_dir} in {time.perf_counter() - start:.1f} s")
    return out_dir


def _write_graphs(model: SegCLIP, staging: Path, opset: int, fp16: bool, int8: bool,
                  verify: bool, say: Progress) -> tuple[dict[str, str], ParityReport | None]:
    from segclip.export.tokenizer_file import write_tokenizer_file

    image_path = staging / contract.IMAGE_ONNX
    say(f"exporting image tower -> {image_path.name} (opset {opset}, dynamic batch)")
    onnx_graph.export_image_onnx(model, image_path, opset)
    onnx_graph.check_graph(image_path, opset, *onnx_graph.image_specs(model))
    say(f"exporting text tower -> {contract.TEXT_ONNX} (dynamic label count)")
    onnx_graph.export_text_onnx(model, staging / contract.TEXT_ONNX, opset)
    onnx_graph.check_graph(staging / contract.TEXT_ONNX, opset, *onnx_graph.text_specs(model))
    images = {"fp32": contract.IMAGE_ONNX}
    if fp16:
        say(f"converting -> {contract.IMAGE_FP16_ONNX} (float32 I/O, norms/softmax/reductions "
            f"float32)")
        precision.convert_fp16(image_path, staging / contract.IMAGE_FP16_ONNX)
        images["fp16"] = contract.IMAGE_FP16_ONNX
    if int8:
        say(f"quantising -> {contract.IMAGE_INT8_ONNX} (dynamic int8 MatMul/Gemm weights; "
            f"the group and later blocks stay float32)")
        precision.quantize_int8(image_path, staging / contract.IMAGE_INT8_ONNX,
                                model.config.group_layer)
        images["int8"] = contract.IMAGE_INT8_ONNX
    for variant in ("fp16", "int8"):
        if variant in images:
            onnx_graph.check_graph(staging / images[variant], opset,
                                   *onnx_graph.image_specs(model))
    say(f"writing {contract.TOKENIZER_FILE}")
    write_tokenizer_file(staging / contract.TOKENIZER_FILE)
    parity = None
    if verify:
        say("checking parity with PyTorch (ONNX Runtime CPU; batch 1 and 3; 1 and 5 labels)")
        parity = require_parity(measure_parity(model, staging, images))
    files = {IMAGE_VARIANTS[p][0]: name for p, name in images.items()}
    files.update(text=contract.TEXT_ONNX, tokenizer=contract.TOKENIZER_FILE)
    return files, parity


def export_bundle(checkpoint: str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET,
                  fp16: bool = False, int8: bool = False, verify: bool = True,
                  progress: Progress | None = None) -> Path:
    """Export the checkpoint at `checkpoint` as a verified bundle at `out_dir` (see
    `export_model`); the manifest records the checkpoint's sha256."""
    checkpoint = Path(checkpoint)
    onnx_graph.check_opset(opset)
    check_target(Path(out_dir))
    payload = read_checkpoint(checkpoint)
    model = model_from_payload(payload, checkpoint).eval()
    source = {"checkpoint": checkpoint.name, "checkpoint_sha256": file_sha256(checkpoint)}
    (progress or _quiet)(f"loaded {checkpoint} (sha256 {source['checkpoint_sha256'][:12]}...)")
    return export_model(model, out_dir, opset=opset, fp16=fp16, int8=int8, verify=verify,
                        source=source, progress=progress)


def _check_bundle_graphs(bundle_dir: Path, manifest: dict[str, Any], model: SegCLIP,
                         images: dict[str, str]) -> None:
    """The export-time graph checks on the bundle's files, so that a damaged or foreign graph
    is an ExportError naming the file, not an ONNX Runtime failure inside the parity run."""
    opset = manifest.get("export", {}).get("opset")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"{bundle_dir / contract.MANIFEST_FILE} does not record the export "
                          f"opset (export.opset = {opset!r}); re-export the bundle")
    graphs = [(name, onnx_graph.image_specs(model)) for name in images.values()]
    graphs.append((manifest["files"]["text"], onnx_graph.text_specs(model)))
    for name, (inputs, outputs) in graphs:
        try:
            onnx_graph.check_graph(bundle_dir / name, opset, inputs, outputs)
        except ExportError as e:
            raise ExportError(f"{bundle_dir / name} does not match the checkpoint's graph "
                              f"contract: {e}; re-export the bundle") from e
        except Exception as e:  # onnx raises protobuf/IO errors of its own on damaged files
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ExportError(f"{bundle_dir / name} is not a readable ONNX graph ({first}); "
                              f"the bundle is damaged: re-export it") from e


def source_model(bundle_dir: Path, manifest: dict[str, Any], checkpoint: Path) -> Any:
    """The checkpoint's model (eval mode), refused if the bundle records another checkpoint."""
    payload = read_checkpoint(checkpoint)
    recorded = manifest.get("source", {}).get("checkpoint_sha256")
    actual = file_sha256(checkpoint)
    if recorded and recorded != actual:
        raise ExportError(f"{bundle_dir} was exported from a checkpoint with sha256 "
                          f"{recorded[:12]}..., but {checkpoint} has {actual[:12]}...; pass the "
                          f"checkpoint it was exported from, or re-export")
    return model_from_payload(payload, checkpoint).eval()


def verify_bundle(bundle_dir: str | Path, checkpoint: str | Path,
                  progress: Progress | None = None) -> ParityReport:
    """Re-run the parity check of every image graph and the text graph of a bundle against the
    checkpoint it was exported from. Read-only.

    Raises:
        BundleError-like ExportError: not a bundle, or exported from another checkpoint.
        ParityError: a figure is outside its threshold (the message lists them).
    """
    bundle_dir, checkpoint = Path(bundle_dir), Path(checkpoint)
    say = progress or _quiet
    manifest = read_manifest(bundle_dir)
    model = source_model(bundle_dir, manifest, checkpoint)
    files = manifest["files"]
    images = {p: files[key] for p, (key, _) in IMAGE_VARIANTS.items() if key in files}
    missing = [name for name in files.values() if not (bundle_dir / name).is_file()]
    if missing:
        raise ExportError(f"{bundle_dir} lacks {missing} listed in {contract.MANIFEST_FILE}; "
                          f"re-export it with segclip-export onnx")
    _check_bundle_graphs(bundle_dir, manifest, model, images)
    say(f"checking parity of {sorted(images.values())} and {files['text']} with PyTorch")
    return require_parity(measure_parity(model, bundle_dir, images, files["text"]))

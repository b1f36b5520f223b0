"""`segclip.json`, the bundle manifest (docs/architecture.md "Bundle contract"), and its summary
table.

Layout (version 1):
    format, version
    model:          image_size, patch_size, grid_size, num_centers, embed_dim, context_length,
                    vocab_size, logit_scale (the multiplier: exp(param) clamped <= max)
    preprocessing:  mean, std, color ("RGB"), resize_short_side, resize_interpolation,
                    window, stride (all S: the official protocol, non-overlapping windows)
    inference:      template, top_k, threshold
    files:          image, text, tokenizer [, image_fp16, image_int8] -> file names
    file_bytes:     file name -> size
    tensors:        graph I/O names and symbolic dims
    source:         checkpoint (name), checkpoint_sha256
    export:         exporter, segclip, torch, onnx, onnxruntime versions, opset, seconds, created
    parity:         ParityReport.to_dict() or null (exported with verify=False)
    engines:        [] here; `segclip-export trt` appends one entry per TensorRT engine
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segclip._version import __version__
from segclip.config import ModelConfig
from segclip.export._files import file_size_text
from segclip.export.errors import ExportError
from segclip.runtime import contract

if TYPE_CHECKING:
    from segclip.export.parity import ParityReport


def build_manifest(config: ModelConfig, logit_scale: float, files: dict[str, str],
                   source: dict[str, Any], opset: int, parity: ParityReport | None,
                   seconds: float, file_bytes: dict[str, int]) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    from segclip.export.onnx_graph import EXPORTER

    s = config.image_size
    return {
        "format": contract.BUNDLE_FORMAT,
        "version": contract.BUNDLE_VERSION,
        "model": {"image_size": s, "patch_size": config.patch_size,
                  "grid_size": config.grid_size, "num_centers": config.num_centers,
                  "embed_dim": config.embed_dim, "context_length": config.context_length,
                  "vocab_size": config.vocab_size, "logit_scale": logit_scale},
        "preprocessing": {"mean": list(contract.CLIP_MEAN), "std": list(contract.CLIP_STD),
                          "color": "RGB", "resize_short_side": s,
                          "resize_interpolation": "bilinear", "window": s, "stride": s},
        "inference": {"template": contract.DEFAULT_TEMPLATE, "top_k": contract.DEFAULT_TOP_K,
                      "threshold": contract.DEFAULT_THRESHOLD},
        "files": dict(files),
        "file_bytes": dict(file_bytes),
        "tensors": {
            "image": {"input": contract.IMAGE_INPUT, "outputs": list(contract.IMAGE_OUTPUTS),
                      "dynamic": {contract.BATCH_DIM: 0}},
            "text": {"input": contract.TEXT_INPUT, "outputs": [contract.TEXT_OUTPUT],
                     "dynamic": {contract.LABELS_DIM: 0}},
        },
        "source": dict(source),
        "export": {"exporter": EXPORTER, "segclip": __version__, "torch": torch.__version__,
                   "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                   "opset": opset, "seconds": round(seconds, 2),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "parity": parity.to_dict() if parity is not None else None,
        "engines": [],
    }


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    """Load and check `segclip.json` of `bundle_dir` (format, version, files)."""
    path = bundle_dir / contract.MANIFEST_FILE
    if bundle_dir.is_file():
        raise ExportError(f"{bundle_dir} is a file, not a segclip bundle: pass the bundle "
                          f"directory made by segclip-export onnx")
    if not bundle_dir.is_dir():
        raise ExportError(f"bundle directory not found: {bundle_dir}")
    if not path.is_file():
        raise ExportError(f"{bundle_dir} is not a segclip bundle: no {contract.MANIFEST_FILE}; "
                          f"create one with segclip-export onnx CKPT --out {bundle_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != contract.BUNDLE_FORMAT:
        raise ExportError(f"{path} is not a segclip bundle manifest (format "
                          f"{contract.BUNDLE_FORMAT!r} expected)")
    if manifest.get("version") != contract.BUNDLE_VERSION:
        raise ExportError(f"{path}: bundle version {manifest.get('version')!r} is not supported "
                          f"(expected {contract.BUNDLE_VERSION}); re-export with this segclip")
    if not isinstance(manifest.get("files"), dict) or "text" not in manifest["files"]:
        raise ExportError(f"{path} lacks its 'files' table; re-export the bundle")
    for key, name in manifest["files"].items():  # never read or write outside the bundle
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise ExportError(f"{path}: files.{key} must be a plain file name inside the bundle, "
                              f"got {name!r}; re-export the bundle")
    return manifest


def _parity_cells(report: dict[str, Any] | None, name: str) -> list[str]:
    if not report:
        return ["-"] * 5
    if name == report["text_file"]:
        return ["-", "-", "-", f"text {report['text_max_abs']:.1e}", "-"]
    for item in report["image"]:
        if item["file"] == name:
            values = [f"{item['max_abs'][key]:.1e}" for key in contract.IMAGE_OUTPUTS]
            return [*values, "-", f"{item['argmax_agreement']:.3%}"]
    return [""] * 5


def summary_table(bundle_dir: Path) -> str:
    """A plain-text table of the bundle's files, sizes and parity figures (max |ONNX - torch|)."""
    manifest = read_manifest(bundle_dir)
    header = ["file", "size", "global", "regions", "assign", "text", "argmax agree"]
    rows = []
    names = [*manifest["files"].values(), contract.MANIFEST_FILE,
             *(engine["file"] for engine in manifest.get("engines", []))]
    for name in names:
        path = bundle_dir / name
        size = file_size_text(path.stat().st_size) if path.is_file() else "missing"
        rows.append([name, size, *_parity_cells(manifest.get("parity"), name)])
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    parity = manifest.get("parity")
    verdict = "parity: not checked"
    if parity:
        verdict = (f"parity vs PyTorch: {'passed' if parity['passed'] else 'FAILED'} (max |diff|; "
                   f"{parity['argmax_at'].split(':')[0]} argmax; cases "
                   f"{', '.join(parity['image_cases'])})")
    return "\n".join([*lines, verdict])

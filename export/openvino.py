"""OpenVINO variants of a bundle (docs/architecture.md "Bundle contract"; docs/openvino.md): NNCF
int8 IR and per-variant parity.

`export_openvino(BUNDLE, CKPT, int8=..., calibration=...)` (`segclip-export openvino`):
- with `int8`: NNCF post-training quantisation of `image.onnx` -> `image.ov-int8.xml/.bin`,
  calibrated on generated shapes scenes (or a user folder, export/calibration.py). Only the
  linear layers of the ViT blocks on the patch tokens before the semantic group are quantised;
  the rest stays float (`OV_INT8_KEEP_FLOAT32`: the rule of the ONNX Runtime int8 graph,
  export/precision.py, and the attention products), SmoothQuant off;
- parity against PyTorch eager of every OpenVINO variant the bundle can run, measured through
  the runtime's own `OpenVinoBackend` on export/parity.py's cases: ov-f32 with the fp32
  thresholds (max |diff| <= 1e-4, region argmax >= 99.9 %), ov-bf16 and ov-int8 with the reduced
  one (>= 99 %); ov-bf16 only where this CPU has bf16 (else recorded as not measured);
- `segclip.json` gains the IR files and an "openvino" section with each variant's figures.
A variant that fails is kept but recorded as failed, so `variant="auto"` never picks it.
Files are written under temporary names and renamed; the manifest is written last, atomically.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segclip.errors import MissingDependencyError
from segclip.export._files import atomic_write_json
from segclip.export.calibration import DEFAULT_SAMPLES, calibration_windows
from segclip.export.errors import ExportError
from segclip.runtime import contract
from segclip.runtime.variants import (
    OPENVINO_SECTION,
    OV_INT8_BIN,
    OV_INT8_KEY,
    OV_INT8_WEIGHTS_KEY,
    OV_INT8_XML,
)

INSTALL = "pip install 'segclip[openvino]'"
# Kept out of int8 in image.ov-int8.xml (float in the IR; bf16 at run time where the CPU has it,
# else f32): scope (node names) -> why. The rule of the ONNX Runtime int8
# graph (export/precision.py INT8_KEEP_FLOAT32), re-measured for NNCF: region-argmax agreement
# with PyTorch on the export parity cases, OpenVINO 2026.4 / NNCF 3.4, 64 calibration scenes,
# AMD EPYC development machine (docs/openvino.md "ov-int8"). Quantising everything instead: demo
# model (segclip/assets/demo_tiny.pt) 98.47 % (fails the 99 % bar) vs 99.68 % with this rule;
# vit-b16 random weights 63.48 % vs 90.81 %.
OV_INT8_KEEP_FLOAT32 = {
    "patch embedding (/conv1/...)":
        "the first layer sees raw pixels; kept f32 as in the ONNX Runtime rule (0.4 % of the "
        "vit-b16 FLOPs)",
    "semantic group (/group/...)":
        "its mapping logits decide the patch -> center assignment: int8 noise there flips "
        "near-tied patches (the bulk of the 98.47 -> 99.68 % and 63.48 -> 90.81 % above); 4 % "
        "of the vit-b16 FLOPs",
    "blocks on the region tokens (/resblocks.{i}/, i >= group_layer), ln_post/proj (/MatMul)":
        "they decide each region's label, not the assignment; 8 tokens, 0.8 % of the FLOPs",
    "attention products q k^T and attn v (/resblocks.{i}/MatMul, MatMul_1), and SmoothQuant off":
        "on the shipped demo model (Intel Xeon with AMX, bf16 outside the int8 nodes) NNCF's "
        "defaults gave 98.73 % (fails the 99 % bar), without the products 98.56 %, without "
        "SmoothQuant 99.63 %, without both 99.82 %; vit-b16 random weights 91.65 / 96.29 / "
        "96.62 % (ov-bf16 alone: 96.62 %); 4 % of the vit-b16 FLOPs",
}
_SUBGRAPH_INT8 = r"^(?!/resblocks\.({blocks})/)"  # ignored: every node outside those blocks
# the attention products inside those blocks (their linear layers are Gemms, these un-named
# MatMuls are q k^T and attn v); kept float, with SmoothQuant off, see OV_INT8_KEEP_FLOAT32
_ATTENTION_PRODUCTS = r"^/resblocks\.\d+/MatMul(_\d+)?$"


def import_openvino_tools() -> tuple[Any, Any]:
    """(openvino, nncf), or a MissingDependencyError with the install command."""
    try:
        import nncf
        import openvino
    except ImportError as e:
        raise MissingDependencyError(f"OpenVINO export needs openvino and nncf ({e}); install "
                                     f"them with {INSTALL}") from e
    return openvino, nncf


def quantize_int8(onnx_path: Path, xml_path: Path, group_layer: int, windows: np.ndarray,
                  ) -> dict[str, Any]:
    """Write `xml_path` (+ .bin): NNCF PTQ of `onnx_path`, ViT blocks [0, group_layer) only.

    Args:
        windows: (N, 3, S, S) float32 calibration windows.
    Returns:
        Facts for the manifest (method, ignored scopes, how many weights were quantised).
    """
    ov, nncf = import_openvino_tools()
    import logging

    logging.getLogger("nncf").setLevel(logging.ERROR)
    model = ov.Core().read_model(str(onnx_path))
    blocks = "|".join(str(i) for i in range(group_layer))
    pattern = _SUBGRAPH_INT8.format(blocks=blocks)
    dataset = nncf.Dataset([windows[i:i + 1] for i in range(windows.shape[0])])
    no_smooth_quant = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    quantised = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=windows.shape[0],
                              ignored_scope=nncf.IgnoredScope(
                                  patterns=[pattern, _ATTENTION_PRODUCTS]),
                              advanced_parameters=no_smooth_quant)
    names = [op.get_friendly_name() for op in quantised.get_ops()
             if op.get_type_name() == "FakeQuantize"]  # activation quantisers
    weights = sum(1 for op in quantised.get_ops() if op.get_type_name() == "Constant"
                  and op.get_output_element_type(0).get_type_name() == "i8")  # int8 weights
    if not names or not weights:
        raise ExportError(f"NNCF quantised nothing in {onnx_path.name} ({len(names)} activation "
                          f"quantisers, {weights} int8 weights): no /resblocks.<i>/ node with "
                          f"i < {group_layer}? The exporter's node naming changed, so "
                          f"export/openvino.py's int8 rule needs updating")
    inside = tuple(f"/resblocks.{i}/" for i in range(group_layer))
    leaked = [n for n in names if not n.startswith(inside)]
    if leaked:
        raise ExportError(f"NNCF quantised {leaked[:3]} outside the ViT blocks [0, "
                          f"{group_layer}), which must stay float; this nncf ignores the scope")
    ov.save_model(quantised, str(xml_path), compress_to_fp16=False)
    return {"method": f"NNCF {nncf.__version__} post-training quantisation (model_type "
                      f"TRANSFORMER, 8-bit weights and activations, SmoothQuant off)",
            "ignored_scope": [pattern, _ATTENTION_PRODUCTS],
            "kept_float32": sorted(OV_INT8_KEEP_FLOAT32),
            "activation_quantisers": len(names), "int8_weights": weights}


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _load_model(bundle_dir: Path, manifest: dict[str, Any], checkpoint: Path) -> Any:
    """The checkpoint's model, refused if the bundle records another checkpoint."""
    from segclip.export.bundle import source_model

    return source_model(bundle_dir, manifest, checkpoint)


def _staged_names(bundle_dir: Path) -> tuple[Path, Path]:
    """Hidden .xml/.bin names beside the bundle's files (same stem: the .xml finds its .bin)."""
    stem = tempfile.mktemp(prefix=".image.ov-int8.partial-", dir=bundle_dir)
    return Path(f"{stem}.xml"), Path(f"{stem}.bin")


def export_openvino(bundle_dir: str | Path, checkpoint: str | Path, int8: bool = False,
                    calibration: str | Path | None = None, samples: int = DEFAULT_SAMPLES,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Add the OpenVINO variants to the bundle at `bundle_dir` (module docstring).

    Args:
        checkpoint: the checkpoint the bundle was exported from (PyTorch reference of parity).
        int8: quantise (NNCF) and write image.ov-int8.xml/.bin.
        calibration: folder of calibration images (None: generated shapes scenes).
        samples: calibration windows.
    Returns:
        The manifest's "openvino" section.
    Raises:
        ExportError: not a bundle, another checkpoint, bad calibration folder or option.
        MissingDependencyError: openvino or nncf not installed.
    """
    from segclip.export.manifest import read_manifest
    from segclip.export.openvino_parity import measure_variants
    from segclip.runtime.backends.openvino import cpu_capabilities

    say = progress or _quiet
    bundle_dir, checkpoint = Path(bundle_dir), Path(checkpoint)
    if calibration is not None and not int8:
        raise ExportError("--calibration is for --int8 (the calibration of the int8 graph); add "
                          "--int8 or leave --calibration out")
    ov, _ = import_openvino_tools()
    manifest = read_manifest(bundle_dir)
    model = _load_model(bundle_dir, manifest, checkpoint)
    files = dict(manifest["files"])
    previous = manifest.get(OPENVINO_SECTION) or {}
    cpu, capabilities = cpu_capabilities(ov.Core())
    staged: tuple[Path, Path] | None = None
    quantisation = (previous.get("variants", {}).get("ov-int8") or {}).get("quantisation")
    try:
        if int8:
            windows, described = calibration_windows(
                Path(calibration) if calibration is not None else None, samples,
                model.config.image_size, manifest["preprocessing"]["mean"],
                manifest["preprocessing"]["std"])
            staged = _staged_names(bundle_dir)
            say(f"quantising {files['image']} -> {OV_INT8_XML} (NNCF, calibration: {described}; "
                f"int8 in the linear layers of the blocks before the group only)")
            quantisation = {**quantize_int8(bundle_dir / files["image"], staged[0],
                                            model.config.group_layer, windows),
                            "calibration": described}
            files[OV_INT8_KEY], files[OV_INT8_WEIGHTS_KEY] = staged[0].name, staged[1].name
        variants = ["ov-f32", *(["ov-bf16"] if "BF16" in capabilities else []),
                    *(["ov-int8"] if OV_INT8_KEY in files else [])]
        say(f"checking parity of {', '.join(variants)} with PyTorch (OpenVINO on {cpu})")
        records, text = measure_variants(model, bundle_dir, variants, files)
        if staged is not None:
            for path, name, key in ((staged[1], OV_INT8_BIN, OV_INT8_WEIGHTS_KEY),
                                    (staged[0], OV_INT8_XML, OV_INT8_KEY)):
                path.replace(bundle_dir / name)
                files[key] = name
            records["ov-int8"]["file"] = OV_INT8_XML  # it was measured under its staged name
            records["ov-int8"]["failures"] = [f.replace(staged[0].name, OV_INT8_XML)
                                              for f in records["ov-int8"]["failures"]]
    finally:
        for path in staged or ():
            path.unlink(missing_ok=True)
    entries = _variant_entries(records, files, quantisation, cpu)
    section = {"openvino": ov.get_version(), "nncf": _nncf_version(), "cpu": cpu,
               "capabilities": list(capabilities), "text": text, "variants": entries,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest["files"] = files
    manifest["file_bytes"] = {**manifest.get("file_bytes", {}),
                              **{name: (bundle_dir / name).stat().st_size
                                 for name in files.values()}}
    manifest[OPENVINO_SECTION] = section
    atomic_write_json(bundle_dir / contract.MANIFEST_FILE, manifest)
    return section


def _variant_entries(records: dict[str, dict[str, Any]], files: dict[str, str],
                     quantisation: dict[str, Any] | None, cpu: str) -> dict[str, Any]:
    entries: dict[str, Any] = {
        "ov-f32": {"file": files["image"], "precision": "f32", "parity": records["ov-f32"]},
        "ov-bf16": {"file": files["image"], "precision": "bf16", "parity": records.get(
            "ov-bf16", {"passed": None, "reason": f"not measured: OpenVINO reports no bf16 on "
                                                  f"the exporting CPU ({cpu})"})}}
    if "ov-int8" in records:
        entries["ov-int8"] = {"file": files[OV_INT8_KEY], "weights": files[OV_INT8_WEIGHTS_KEY],
                              "precision": f"int8 (ViT blocks before the group), "
                                           f"{records['ov-int8']['precision_used']} elsewhere",
                              "quantisation": quantisation, "parity": records["ov-int8"]}
    return entries


def _nncf_version() -> str:
    import nncf

    return nncf.__version__


def summary_lines(section: dict[str, Any]) -> list[str]:
    """One line per variant: file, precision, figures, verdict."""
    lines = []
    for name, entry in section["variants"].items():
        parity = entry["parity"]
        if parity.get("passed") is None:
            lines.append(f"{name}: {entry['file']} ({entry['precision']}): {parity['reason']}")
            continue
        figures = ", ".join(f"{k} {v:.1e}" for k, v in parity["max_abs"].items())
        verdict = "passed" if parity["passed"] else (
            "FAILED (kept; variant 'auto' will not pick it): " + "; ".join(parity["failures"]))
        lines.append(f"{name}: {entry['file']} ({entry['precision']}): max|diff| {figures}; "
                     f"region argmax agreement {parity['argmax_agreement']:.3%} (>= "
                     f"{parity['min_agreement']:.1%}): {verdict}")
    text = section["text"]
    lines.append(f"text: {text['file']} (OpenVINO f32): max|diff| {text['max_abs']:.1e}")
    return lines

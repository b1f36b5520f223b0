"""The image-graph variants a bundle may hold, and which of them passed parity
(docs/architecture.md "Bundle contract"; docs/openvino.md).

The one list of variant names in segclip: `Segmenter(variant=...)`, `create_backend`, the
`--variant` option of the commands and the benchmarks read it from here.

- ONNX Runtime: "fp32" (image.onnx), "fp16" (image.fp16.onnx), "int8" (image.int8.onnx).
- OpenVINO (CPU, extra `openvino`): "ov-f32" and "ov-bf16" (image.onnx compiled with that
  inference precision; bf16 only on CPUs that offer it), "ov-int8" (image.ov-int8.xml/.bin,
  NNCF post-training quantisation, written by `segclip-export openvino BUNDLE CKPT --int8`; its
  unquantised nodes run in bf16 on CPUs that offer it, in f32 elsewhere).
- "auto": on the CPU, the fastest variant whose parity passed on this bundle, measured by a short
  probe at load (runtime/backends/_auto.py); elsewhere the device's default engine.

Parity records: ONNX Runtime variants in `segclip.json` "parity" (an export that fails them
writes no bundle, so a recorded one passed); OpenVINO variants in "openvino" -> "variants" ->
NAME -> "parity" -> "passed" (written by `segclip-export openvino`, which keeps a failing variant
but marks it, so that `auto` never picks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

AUTO = "auto"
ORT_VARIANTS = ("fp32", "fp16", "int8")
OPENVINO_VARIANTS = ("ov-f32", "ov-bf16", "ov-int8")
VARIANTS = (AUTO, *ORT_VARIANTS, *OPENVINO_VARIANTS)  # every accepted `variant` value
CPU_VARIANTS = (*ORT_VARIANTS, *OPENVINO_VARIANTS)  # what `auto` chooses among on the CPU

# OpenVINO variant -> inference precision hint (OpenVINO's names) on a CPU with bf16; ov-int8
# falls back to f32 on one without (its int8 nodes are int8 either way), ov-bf16 is refused
OPENVINO_PRECISION = {"ov-f32": "f32", "ov-bf16": "bf16", "ov-int8": "bf16"}
# manifest "files" keys of the OpenVINO int8 IR (the .bin holds its weights)
OV_INT8_KEY, OV_INT8_WEIGHTS_KEY = "image_ov_int8", "image_ov_int8_weights"
OV_INT8_XML, OV_INT8_BIN = "image.ov-int8.xml", "image.ov-int8.bin"
OPENVINO_SECTION = "openvino"  # manifest section written by segclip-export openvino


def check_variant(variant: str) -> str:
    """`variant` if it is one of `VARIANTS`, else a ValueError listing them."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def is_openvino(variant: str | None) -> bool:
    return variant in OPENVINO_VARIANTS


def parity_status(manifest: Mapping[str, Any], variant: str) -> tuple[bool | None, str]:
    """(passed, why) of `variant`'s recorded parity: True, False, or None when not recorded."""
    if variant in ORT_VARIANTS:
        parity = manifest.get("parity")
        if not isinstance(parity, dict):
            return None, "exported without a parity check"
        precisions = {item.get("precision") for item in parity.get("image", [])
                      if isinstance(item, dict)}
        if variant not in precisions:
            return None, f"no {variant} parity record"
        return bool(parity.get("passed")), "segclip.json parity"
    section = manifest.get(OPENVINO_SECTION)
    record = (section or {}).get("variants", {}).get(variant) if isinstance(section, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("parity"), dict):
        return None, (f"no {variant} parity record: run segclip-export openvino BUNDLE CKPT"
                      + (" --int8" if variant == "ov-int8" else ""))
    passed = record["parity"].get("passed")
    if passed is None:
        return None, str(record["parity"].get("reason", "not measured"))
    return bool(passed), "; ".join(record["parity"].get("failures", [])) or "passed"

"""Parity of the OpenVINO variants with PyTorch eager (docs/architecture.md "Bundle contract";
docs/openvino.md "Parity"; the cases and thresholds of export/parity.py).

Each variant runs through the runtime's own `OpenVinoBackend` (so the figures are those of what
`Segmenter(variant=...)` runs) on export/parity.py's image cases: max |OpenVINO - torch| of
`global`, `regions`, `assign`, and the per-pixel region-argmax agreement. ov-f32 must meet the
fp32 thresholds (<= 1e-4, >= 99.9 %), ov-bf16 and ov-int8 the reduced one (>= 99 %). The text
graph (OpenVINO f32, shared by every variant) must meet max |diff| <= 1e-4.
Legend: B batch, S window side, L regions, T labels, D embedding width.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segclip.export.parity import (
    FP32_MAX_ABS,
    FP32_MIN_AGREEMENT,
    REDUCED_MIN_AGREEMENT,
    TEXT_PROMPTS,
    ImageParity,
    image_cases,
    max_abs_diff,
    prompt_tokens,
    region_argmax,
)
from segclip.runtime import contract
from segclip.runtime.errors import NonFiniteOutputError

Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # global (B, D), regions (B, L, D), assign


def image_parity(run: Callable[[np.ndarray], Outputs], file: str, variant: str,
                 cases: list[np.ndarray], references: list[Outputs], size: int) -> ImageParity:
    """Worst case over `cases` of `run` against the PyTorch `references`."""
    worst = dict.fromkeys(contract.IMAGE_OUTPUTS, 0.0)
    agreement = 1.0
    for images, reference in zip(cases, references):
        try:
            outputs = run(images)
        except NonFiniteOutputError:  # recorded as a failure: every value differs
            worst = dict.fromkeys(contract.IMAGE_OUTPUTS, math.inf)
            agreement = 0.0
            break
        for name, got, want in zip(contract.IMAGE_OUTPUTS, outputs, reference):
            worst[name] = max(worst[name], max_abs_diff(got, want))
        same = region_argmax(outputs[2], size) == region_argmax(reference[2], size)  # (B, S, S)
        agreement = min(agreement, float(same.mean()))
    full = variant == "ov-f32"
    return ImageParity(file=file, precision=variant, max_abs=worst, argmax_agreement=agreement,
                       min_agreement=FP32_MIN_AGREEMENT if full else REDUCED_MIN_AGREEMENT,
                       max_abs_limit=FP32_MAX_ABS if full else None)


def _text_record(backend: Any, model: Any) -> dict[str, Any]:
    import torch

    worst = 0.0
    for count in (1, len(TEXT_PROMPTS)):
        tokens = prompt_tokens(TEXT_PROMPTS[:count], model.config.context_length)  # (T, C)
        with torch.no_grad():
            want = model.encode_text(torch.from_numpy(tokens)).numpy()  # (T, D)
        worst = max(worst, max_abs_diff(backend.run_text(tokens), want))
    return {"file": backend.info()["text"], "precision": "f32", "max_abs": worst,
            "max_abs_limit": FP32_MAX_ABS, "passed": worst <= FP32_MAX_ABS}


def measure_variants(model: Any, bundle_dir: Path, variants: list[str], files: dict[str, str],
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({variant: parity record}, text record) of the OpenVINO `variants`, run on the bundle at
    `bundle_dir` with manifest files `files` (key -> name, which may name files not yet listed
    in its segclip.json). Compiles in a throw-away cache folder."""
    import torch

    from segclip.runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions
    from segclip.runtime.bundle import Bundle

    bundle = dataclasses.replace(Bundle.open(bundle_dir),
                                 files={k: bundle_dir / v for k, v in files.items()})
    size = model.config.image_size
    cases = image_cases(size)
    with torch.no_grad():
        references = [tuple(t.numpy() for t in (o.global_embedding, o.regions, o.assign))
                      for o in (model.eval().encode_image(torch.from_numpy(c)) for c in cases)]
    records: dict[str, dict[str, Any]] = {}
    text: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="segclip-ov-parity-") as cache:
        for variant in variants:
            backend = OpenVinoBackend(bundle, variant, OpenVinoOptions(cache_dir=cache))
            try:
                text = text or _text_record(backend, model)

                def run(images: np.ndarray, backend: Any = backend) -> Outputs:
                    out = backend.run_image(images)
                    return out.global_, out.regions, out.assign

                item = image_parity(run, backend.info()["image"], variant, cases, references,
                                    size)
                precision = backend.info()["precision"]
            finally:
                backend.close()
            failures = list(item.failures)
            if not text["passed"]:
                failures.append(f"{text['file']} (OpenVINO f32) text max|diff| "
                                f"{text['max_abs']:.2e} > {FP32_MAX_ABS:.0e}")
            records[variant] = {**dataclasses.asdict(item), "precision_used": precision,
                                "failures": failures, "passed": not failures}
    return records, text

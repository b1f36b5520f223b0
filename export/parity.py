"""Parity of the exported graphs with PyTorch eager (docs/architecture.md "Bundle contract": a
bundle is moved into place only once its parity check passed; a stated tolerance against a literal
reference).

ONNX Runtime (CPU) runs every graph of the bundle on random images and on generated "real-looking"
ones (smooth coloured shapes on a gradient, like the synthetic world) at batch 1 and 3, and text
prompts at 1 and 5 labels. Figures: max |ONNX - torch| of `global`, `regions`, `assign`, `text`,
and the agreement of the per-pixel region argmax, i.e. argmax over L of `assign` upsampled
bilinearly (align_corners=False) to S x S, as the runtime's label assignment does.

Legend: B batch, L regions, h x w patch grid, S window side, T labels, E embedding width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segclip.export.errors import ParityError
from segclip.model import SegCLIP
from segclip.runtime import contract

FP32_MAX_ABS = 1e-4  # values: global, regions, assign, text
FP32_MIN_AGREEMENT = 0.999  # per-pixel region argmax
REDUCED_MIN_AGREEMENT = 0.99  # fp16 / int8: values are reported, argmax must hold
IMAGE_CASES = (("random", 1), ("random", 3), ("synthetic", 1), ("synthetic", 3))
TEXT_PROMPTS = ("cat", "a red circle", "sky", "the big green triangle next to a blue square",
                "background")
ARGMAX_AT = "pixel: argmax over L of assign upsampled bilinearly (align_corners=False) to S x S"


@dataclass(frozen=True)
class ImageParity:
    """Worst case over the image cases for one graph file."""

    file: str
    precision: str  # "fp32" | "fp16" | "int8"
    max_abs: dict[str, float]  # output name -> max |onnx - torch|
    argmax_agreement: float  # lowest per-case fraction of pixels whose region argmax agrees
    min_agreement: float  # threshold on argmax_agreement
    max_abs_limit: float | None  # threshold on every max_abs value (None: reported only)

    @property
    def failures(self) -> list[str]:
        out = [f"{self.file} {name} has non-finite values (NaN or inf)"
               for name, value in self.max_abs.items() if not math.isfinite(value)]
        if self.max_abs_limit is not None:
            out += [f"{self.file} {name} max|diff| {value:.2e} > {self.max_abs_limit:.0e}"
                    for name, value in self.max_abs.items()
                    if math.isfinite(value) and not value <= self.max_abs_limit]
        if not self.argmax_agreement >= self.min_agreement:
            out.append(f"{self.file} region-argmax agreement {self.argmax_agreement:.4%} < "
                       f"{self.min_agreement:.1%}")
        return out


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs PyTorch eager figures for every graph of a bundle."""

    image: tuple[ImageParity, ...]
    text_file: str
    text_max_abs: float
    text_max_abs_limit: float = FP32_MAX_ABS
    image_cases: tuple[str, ...] = tuple(f"{kind} x{batch}" for kind, batch in IMAGE_CASES)
    text_cases: tuple[int, ...] = (1, len(TEXT_PROMPTS))
    argmax_at: str = ARGMAX_AT
    backend: str = "onnxruntime CPUExecutionProvider"
    failures: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth coloured shapes (discs, ellipses, rectangles) on a colour gradient, slightly noisy.

    Returns:
        (n, 3, size, size) float32, CLIP-normalised.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (S, S) each
    images = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        top, bottom = rng.uniform(0, 1, (2, 3, 1, 1)).astype(np.float32)
        angle = rng.uniform(0, np.pi)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy  # (S, S)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        image = top * (1 - ramp) + bottom * ramp  # (3, S, S)
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0.15, 0.85, 2)
            ry, rx = rng.uniform(0.08, 0.3, 2)
            if rng.random() < 0.6:  # ellipse: signed distance ~ normalised radius - 1
                dist = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) - 1
            else:  # axis-aligned rectangle
                dist = np.maximum(np.abs(yy - cy) / ry, np.abs(xx - cx) / rx) - 1
            alpha = 1 / (1 + np.exp(np.clip(dist * 12.0, -50, 50)))  # soft edge, (S, S)
            colour = rng.uniform(0, 1, (3, 1, 1)).astype(np.float32)
            image = image * (1 - alpha) + colour * alpha
        image = image + rng.normal(0, 0.02, image.shape)
        images[i] = np.clip(image, 0, 1)
    mean = np.asarray(contract.CLIP_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(contract.CLIP_STD, np.float32).reshape(1, 3, 1, 1)
    return (images - mean) / std


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) float32 standard normal (the range of CLIP-normalised pixels)."""
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def prompt_tokens(prompts: tuple[str, ...], context_length: int) -> np.ndarray:
    """(T, C) int64 token ids of `contract.DEFAULT_TEMPLATE` prompts (open_clip tokenizer)."""
    from segclip.text import tokenize

    texts = [contract.DEFAULT_TEMPLATE.format(p) for p in prompts]
    return tokenize(texts, context_length=context_length).numpy().astype(np.int64)


def max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want|, or inf where `got` holds a NaN or an inf (`max` would skip a NaN)."""
    diff = np.abs(got - want)
    return float(diff.max()) if np.isfinite(diff).all() else math.inf


def region_argmax(assign: np.ndarray, size: int) -> np.ndarray:
    """(B, L, h, w) soft assignment -> (B, S, S) region index of the bilinear upsampling."""
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(assign, np.float32)),
                       size=(size, size), mode="bilinear", align_corners=False)  # (B, L, S, S)
    return up.argmax(dim=1).numpy()  # (B, S, S)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def image_cases(size: int) -> list[np.ndarray]:
    """The image cases of every parity check: random and synthetic windows at batch 1 and 3."""
    return [(random_images if kind == "random" else synthetic_images)(batch, size, seed=index)
            for index, (kind, batch) in enumerate(IMAGE_CASES)]


def _image_parity(path: Path, precision: str, cases: list[np.ndarray],
                  references: list[tuple[np.ndarray, ...]], size: int) -> ImageParity:
    session = _session(path)
    worst = dict.fromkeys(contract.IMAGE_OUTPUTS, 0.0)
    agreement = 1.0
    for images, reference in zip(cases, references):
        outputs = session.run(list(contract.IMAGE_OUTPUTS), {contract.IMAGE_INPUT: images})
        for name, got, want in zip(contract.IMAGE_OUTPUTS, outputs, reference):
            if got.shape != want.shape:
                raise ParityError(f"{path.name}: output {name!r} has shape {got.shape}, "
                                  f"PyTorch gives {want.shape}")
            worst[name] = max(worst[name], max_abs_diff(got, want))
        same = region_argmax(outputs[2], size) == region_argmax(reference[2], size)  # (B, S, S)
        agreement = min(agreement, float(same.mean()))
    fp32 = precision == "fp32"
    return ImageParity(file=path.name, precision=precision, max_abs=worst,
                       argmax_agreement=agreement,
                       min_agreement=FP32_MIN_AGREEMENT if fp32 else REDUCED_MIN_AGREEMENT,
                       max_abs_limit=FP32_MAX_ABS if fp32 else None)


@torch.no_grad()
def measure_parity(model: SegCLIP, bundle_dir: Path, image_files: dict[str, str],
                   text_file: str = contract.TEXT_ONNX) -> ParityReport:
    """Run the bundle's graphs and the eager `model` on the same inputs; never raises on bad
    figures (see `ParityReport.failures`).

    Args:
        model: the eager reference on CPU, float32 (run in eval mode; its mode is restored).
        image_files: precision ("fp32", "fp16", "int8") -> image graph file name in `bundle_dir`.
    """
    was_training = model.training
    model.eval()
    try:
        return _measure(model, bundle_dir, image_files, text_file)
    finally:
        model.train(was_training)


def _measure(model: SegCLIP, bundle_dir: Path, image_files: dict[str, str],
             text_file: str) -> ParityReport:
    size = model.config.image_size
    cases = image_cases(size)
    references = []
    for images in cases:
        out = model.encode_image(torch.from_numpy(images))
        references.append((out.global_embedding.numpy(), out.regions.numpy(),
                           out.assign.numpy()))
    image = tuple(_image_parity(bundle_dir / name, precision, cases, references, size)
                  for precision, name in image_files.items())
    session = _session(bundle_dir / text_file)
    text_max_abs = 0.0
    for count in (1, len(TEXT_PROMPTS)):
        tokens = prompt_tokens(TEXT_PROMPTS[:count], model.config.context_length)  # (T, C)
        got = session.run([contract.TEXT_OUTPUT], {contract.TEXT_INPUT: tokens})[0]
        want = model.encode_text(torch.from_numpy(tokens)).numpy()  # (T, E)
        text_max_abs = max(text_max_abs, max_abs_diff(got, want))
    failures = [f for item in image for f in item.failures]
    if not text_max_abs <= FP32_MAX_ABS:
        failures.append(f"{text_file} text max|diff| {text_max_abs:.2e} > {FP32_MAX_ABS:.0e}")
    return ParityReport(image=image, text_file=text_file, text_max_abs=text_max_abs,
                        failures=tuple(failures))


def require_parity(report: ParityReport) -> ParityReport:
    """Raise `ParityError` listing every failed figure; return the report when all pass."""
    if not report.passed:
        reduced = {item.precision for item in report.image if item.failures}
        hint = ""
        if reduced and "fp32" not in reduced and report.text_max_abs <= report.text_max_abs_limit:
            flags = " and ".join(f"--{p}" for p in sorted(reduced))
            hint = f" (the fp32 graphs pass: export without {flags} to keep them)"
        raise ParityError("parity check against PyTorch failed: " + "; ".join(report.failures)
                          + hint)
    return report

"""Benchmark inputs made at run time (nothing downloaded): scenes, windows, label names, tokens.

Scenes are smooth coloured shapes on a gradient (like the synthetic world), so that the
soft assignment has regions and label borders rather than noise. Torch-free.
Legend: B images, S window side, T labels, C context length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segclip.runtime import contract

_CLASS_FILES = ("voc.txt", "context.txt", "coco_object.txt")  # shipped with segclip.evaluation


def synthetic_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a colour gradient with 2-4 soft-edged ellipses / rectangles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    yy, xx = yy / height, xx / width
    top, bottom = rng.uniform(0, 1, (2, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy  # (H, W)
    ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]  # (H, W, 1)
    image = top * (1 - ramp) + bottom * ramp  # (H, W, 3)
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        ry, rx = rng.uniform(0.08, 0.3, 2)
        if rng.random() < 0.6:
            dist = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) - 1
        else:
            dist = np.maximum(np.abs(yy - cy) / ry, np.abs(xx - cx) / rx) - 1
        alpha = (1 / (1 + np.exp(np.clip(dist * 12.0, -50, 50))))[..., None]  # (H, W, 1)
        image = image * (1 - alpha) + rng.uniform(0, 1, 3).astype(np.float32) * alpha
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def normalise(images: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, CLIP-normalised (the image graph's input)."""
    mean = np.asarray(contract.CLIP_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(contract.CLIP_STD, np.float32).reshape(1, 3, 1, 1)
    pixels = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # (B, 3, S, S)
    return (pixels - mean) / std


def windows(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """(B, 3, S, S) float32 normalised synthetic windows, one scene each."""
    return normalise(np.stack([synthetic_scene(size, size, seed + i) for i in range(batch)]))


def label_names(count: int) -> list[str]:
    """`count` distinct class names: VOC, Context and COCO-Object names, then numbered ones."""
    names: list[str] = []
    try:
        import segclip

        folder = Path(segclip.__file__).parent / "evaluation" / "classes"
        for file in _CLASS_FILES:
            if (folder / file).is_file():
                names += [n.strip() for n in (folder / file).read_text().splitlines()]
    except ImportError:
        pass
    unique = list(dict.fromkeys(n for n in names if n))
    unique += [f"object {i}" for i in range(max(0, count - len(unique)))]
    return unique[:count]


def prompt_tokens(bundle: Path, labels: list[str], context_length: int) -> np.ndarray:
    """(T, C) int64 token ids of the default prompts, by the bundle's torch-free tokenizer."""
    from segclip.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(bundle / contract.TOKENIZER_FILE)
    return tokenizer([contract.DEFAULT_TEMPLATE.format(name) for name in labels], context_length)

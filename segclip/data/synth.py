"""The synthetic shapes world: image–caption pairs and VOC-layout evaluation sets.

Images hold 1–3 shapes, colours {red, green, blue, yellow, purple, orange} × shapes {circle,
square, triangle, star} (24 classes, ids 1..24 in `CLASSES` order), of varied size, position and
rotation with mild colour jitter, on textured backgrounds whose colours are outside the
vocabulary. Later shapes are drawn over earlier ones; every shape keeps a minimum visible area.

Rendering: each shape's coverage is drawn at 4× and box-averaged (16 samples per pixel), the image
is composited from the coverages, and the mask is exact for the same coverages: a pixel whose
coverage is entirely one class (or entirely background) gets that label, a mixed border pixel 255.

`HELD_OUT` combinations never appear in training images or captions; val/eval use all 24 classes.
Every file is a function of (seed, split, index): the same seed gives the same bytes.

Layout written by `generate(config, OUT)`:
    OUT/classes.txt, OUT/held_out.txt, OUT/synth.json
    OUT/train/pairs.jsonl ({"image": "images/000001.png", "caption": ...}), meta.jsonl, images/
    OUT/{val,eval}/JPEGImages/ID.png, SegmentationClass/ID.png (palette PNG),
                   ImageSets/Segmentation/val.txt, classes.txt, meta.jsonl
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from segclip.data.captions import Mention, describe, position_words
from segclip.errors import ConfigError, DataError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 45),
    "purple": (145, 60, 185),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)  # id = index + 1
# one per shape and four different colours: each held-out word is seen in training, the pair not
HELD_OUT = ("red triangle", "green star", "blue circle", "purple square")
TRAIN_CLASSES = tuple(name for name in CLASSES if name not in HELD_OUT)
# greys, browns, teals, slate: none of them reads as a vocabulary colour
BACKGROUND_COLOURS = (
    (128, 128, 128), (72, 72, 72), (188, 188, 188), (120, 82, 52), (176, 148, 112),
    (40, 118, 118), (88, 100, 112), (214, 202, 176), (94, 70, 58), (150, 160, 150),
)
IGNORE = 255
SUPERSAMPLE = 4
SHAPE_SCALE = {"circle": 0.9, "square": 1.0, "triangle": 1.25, "star": 1.3}  # similar areas
SPLITS = {"train": 0, "val": 1, "eval": 2}  # split code in the per-image seed


@dataclass(frozen=True)
class SynthConfig:
    num: int = 1000  # training pairs
    val_num: int = 100  # VOC-layout images for choices and tuning
    eval_num: int = 100  # VOC-layout images for the final evaluation
    seed: int = 0
    size: int = 64  # image side in pixels (the tiny preset's input)
    max_shapes: int = 3  # 1..3: captions count with "two"/"three"
    min_visible: float = 0.4  # each shape keeps this fraction of its own pure pixels visible

    def __post_init__(self) -> None:
        for name in ("num", "val_num", "eval_num"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 32 <= self.size <= 1024:
            raise ConfigError(f"size must be in 32..1024 pixels, got {self.size}")
        if not 1 <= self.max_shapes <= 3:
            raise ConfigError(f"max_shapes must be in 1..3, got {self.max_shapes}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ConfigError(f"min_visible must be in (0, 1], got {self.min_visible}")


@dataclass(frozen=True)
class Scene:
    """One rendered image: `image` (H, W, 3) uint8, `mask` (H, W) uint8 (0, class ids, 255)."""

    image: np.ndarray
    mask: np.ndarray
    mentions: tuple[Mention, ...]  # visible instances in drawing order
    pixels: tuple[int, ...]  # pure visible pixels per instance
    caption: str


def class_id(name: str) -> int:
    """Class id (1..24) of a name such as 'red circle'."""
    if name not in CLASSES:
        raise DataError(f"unknown class {name!r}; classes are {', '.join(CLASSES)}")
    return CLASSES.index(name) + 1


def _polygon(shape: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
    if shape == "square":
        angles = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, r)
    elif shape == "triangle":
        angles = theta + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, r)
    else:  # star: 5 points, inner radius 0.45 r
        angles = theta + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return list(zip((cx + radii * np.sin(angles)).tolist(), (cy - radii * np.cos(angles)).tolist()))


def _coverage(shape: str, cx: float, cy: float, r: float, theta: float, size: int) -> np.ndarray:
    """Fraction of each pixel inside the shape, in 1/16 steps: (H, W) float32 in [0, 1]."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([k * (cx - r), k * (cy - r), k * (cx + r), k * (cy + r)], fill=255)
    else:
        draw.polygon([(k * x, k * y) for x, y in _polygon(shape, cx, cy, r, theta)], fill=255)
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0  # (H, W)


def _visible(coverages: list[np.ndarray]) -> list[np.ndarray]:
    """Visible fraction per shape: own coverage times what later shapes leave uncovered."""
    uncovered = np.ones_like(coverages[0])
    visible = [np.empty(0)] * len(coverages)
    for i in range(len(coverages) - 1, -1, -1):
        visible[i] = coverages[i] * uncovered  # (H, W)
        uncovered = uncovered * (1.0 - coverages[i])
    return visible


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured background, (H, W, 3) float32: base colour, pattern in a second colour, noise."""
    picks = rng.choice(len(BACKGROUND_COLOURS), size=2, replace=False)
    base, second = (np.array(BACKGROUND_COLOURS[int(i)], np.float32) for i in picks)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size * 64.0  # in 64-px units
    phi = rng.uniform(0, np.pi)
    along = xx * np.cos(phi) + yy * np.sin(phi)
    kind = int(rng.integers(4))
    if kind == 0:  # stripes
        period = rng.uniform(4.0, 14.0)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi))
    elif kind == 1:  # checker
        cell = int(rng.integers(4, 13))
        pattern = ((xx // cell + yy // cell) % 2).astype(np.float32)
    elif kind == 2:  # gradient
        pattern = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    else:  # blotches: coarse noise, bilinearly upsampled
        coarse = Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8))
        pattern = np.asarray(coarse.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    weight = rng.uniform(0.3, 1.0) * pattern[..., None]  # (H, W, 1)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(2.0, 10.0)
    return base * (1 - weight) + second * weight + noise  # (H, W, 3) float32


def _pick_classes(rng: np.random.Generator, first: str, allowed: tuple[str, ...], max_shapes: int):
    count = min(int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3])), max_shapes)
    names = [first]
    while len(names) < count:
        repeat = rng.random() < 0.3
        names.append(names[int(rng.integers(len(names)))] if repeat else
                     allowed[int(rng.integers(len(allowed)))])
    return names


def _place(rng, size, names, min_visible):
    """Sequential placement with rejection: shapes stay inside, keep `min_visible`, and two
    instances of one class never touch (so counts stay readable). Returns coverages, names."""
    placed: list[tuple[str, float, float, float]] = []  # name, cx, cy, r
    coverages: list[np.ndarray] = []
    for name in names:
        shape = name.split()[1]
        for _ in range(30):
            r = rng.uniform(0.12, 0.22) * size * SHAPE_SCALE[shape]
            cx, cy = rng.uniform(r, size - r, size=2)
            theta = rng.uniform(0, 2 * np.pi)
            if any(n == name and np.hypot(cx - x, cy - y) < r + pr + 2 for n, x, y, pr in placed):
                continue
            cover = _coverage(shape, cx, cy, r, theta, size)
            trial = coverages + [cover]
            alone = [int((c >= 1.0).sum()) for c in trial]
            pure = [int((v >= 1.0).sum()) for v in _visible(trial)]
            if all(p >= max(min_visible * a, 8) for p, a in zip(pure, alone)):
                placed.append((name, cx, cy, r))
                coverages.append(cover)
                break
    return coverages, [p[0] for p in placed]


def render_scene(rng: np.random.Generator, size: int, first: str, allowed: tuple[str, ...],
                 max_shapes: int = 3, min_visible: float = 0.4) -> Scene:
    """Draw one scene whose first shape is of class `first`, the others from `allowed`."""
    names = _pick_classes(rng, first, allowed, max_shapes)
    coverages, names = _place(rng, size, names, min_visible)
    image = _background(rng, size)  # (H, W, 3)
    for name, cover in zip(names, coverages):
        jitter = rng.integers(-18, 19, size=3)
        colour = np.clip(np.array(COLOURS[name.split()[0]]) + jitter, 0, 255).astype(np.float32)
        image = image * (1 - cover[..., None]) + colour * cover[..., None]  # (H, W, 3)
    image = image + 2.0 * rng.standard_normal(image.shape, dtype=np.float32)
    visible = _visible(coverages)
    per_class: dict[str, np.ndarray] = {}
    for name, vis in zip(names, visible):
        per_class[name] = per_class.get(name, 0.0) + vis
    background = 1.0 - sum(visible)  # (H, W): visible background fraction
    mask = np.full((size, size), IGNORE, np.uint8)
    mask[background >= 1.0 - 1e-6] = 0
    for name, fraction in per_class.items():
        mask[fraction >= 1.0 - 1e-6] = class_id(name)
    mentions, pixels = [], []
    for name, vis in zip(names, visible):
        ys, xs = np.nonzero(vis >= 1.0)
        mentions.append(Mention(name, (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size))
        pixels.append(len(xs))
    return Scene(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        mask=mask,
        mentions=tuple(mentions),
        pixels=tuple(pixels),
        caption=describe(mentions, rng),
    )


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (768 ints), index 255 = (224, 224, 192)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _meta(image_rel: str, scene: Scene) -> dict:
    objects = [
        {"class": m.name, "id": class_id(m.name), "pixels": n, "centroid": [round(m.x, 4),
         round(m.y, 4)], "position": " ".join(position_words(m.x, m.y))}
        for m, n in zip(scene.mentions, scene.pixels)
    ]
    return {"image": image_rel, "caption": scene.caption, "objects": objects}


def make_scene(config: SynthConfig, split: str, index: int) -> Scene:
    """Image `index` (0-based; file ID index + 1) of a split, exactly as `generate` writes it."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    code = SPLITS[split]
    allowed = TRAIN_CLASSES if split == "train" else CLASSES
    order = np.random.default_rng([config.seed, code]).permutation(len(allowed))
    first = allowed[int(order[index % len(allowed)])]  # balanced: every class in turn
    rng = np.random.default_rng([config.seed, code, index])
    return render_scene(rng, config.size, first, allowed, config.max_shapes, config.min_visible)


def _write_split(root: Path, split: str, count: int, config: SynthConfig, bar: tqdm) -> None:
    voc = split != "train"
    image_dir = root / ("JPEGImages" if voc else "images")
    image_dir.mkdir(parents=True)
    if voc:
        (root / "SegmentationClass").mkdir()
        (root / "ImageSets" / "Segmentation").mkdir(parents=True)
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    palette = voc_palette()
    ids, pairs, metas = [], [], []
    for index in range(count):
        drawn = make_scene(config, split, index)
        image_id = f"{index + 1:06d}"
        Image.fromarray(drawn.image, "RGB").save(image_dir / f"{image_id}.png", format="PNG",
                                                compress_level=1)
        rel = f"{image_dir.name}/{image_id}.png"
        if voc:
            mask = Image.fromarray(drawn.mask, "L").convert("P")
            mask.putpalette(palette)
            mask.save(root / "SegmentationClass" / f"{image_id}.png", format="PNG",
                      compress_level=1)
        ids.append(image_id)
        pairs.append(json.dumps({"image": rel, "caption": drawn.caption}))
        metas.append(json.dumps(_meta(rel, drawn)))
        bar.update(1)
    if voc:
        (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    else:
        (root / "pairs.jsonl").write_text("".join(f"{line}\n" for line in pairs))
    (root / "meta.jsonl").write_text("".join(f"{line}\n" for line in metas))


def generate(config: SynthConfig, out: str | Path, progress: bool = False) -> Path:
    """Write the shapes world to `out` (a new or empty folder), atomically: all or nothing."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output {out} already exists and is not an empty folder; "
                        "choose a new path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    total = config.num + config.val_num + config.eval_num
    try:
        (staging / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        (staging / "held_out.txt").write_text("\n".join(HELD_OUT) + "\n")
        info = {"format": "segclip-synth", "version": 1, "config": asdict(config)}
        (staging / "synth.json").write_text(json.dumps(info, indent=2) + "\n")
        with tqdm(total=total, desc="synth", unit="img", disable=not progress) as bar:
            _write_split(staging / "train", "train", config.num, config, bar)
            _write_split(staging / "val", "val", config.val_num, config, bar)
            _write_split(staging / "eval", "eval", config.eval_num, config, bar)
        os.chmod(staging, 0o755)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out

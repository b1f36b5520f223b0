"""Presets of the dense protocol (docs/dense.md): background names and per-dataset settings.

`VOC_BACKGROUND` are the stuff names the SCLIP-family code gives PASCAL VOC's background line;
Context-60 and COCO-Object score a "background" query instead. The settings (logit scale,
`prob_thd`, `area_thd`) are this package's defaults modelled on those methods' configuration
files; docs/dense.md says which were checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass

from segclip.runtime.errors import LabelFileError

VOC_BACKGROUND = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
    "bed", "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf",
    "curtain", "stair", "floor", "hill", "rail", "fence",
)
BACKGROUND_PRESETS = {"voc": VOC_BACKGROUND, "background": ("background",)}


@dataclass(frozen=True)
class DensePreset:
    """One dataset's dense protocol: background names and decision settings."""

    background: tuple[str, ...]
    logit_scale: float
    prob_thd: float
    area_thd: float


# class preset (segclip/evaluation/datasets.py PRESETS) -> dense settings
DENSE_PRESETS = {
    "voc": DensePreset(VOC_BACKGROUND, logit_scale=50.0, prob_thd=0.1, area_thd=0.1),
    "context": DensePreset(("background",), logit_scale=50.0, prob_thd=0.1, area_thd=0.0),
    "coco-object": DensePreset(("background",), logit_scale=50.0, prob_thd=0.1, area_thd=0.0),
}


def background_names(spec: str) -> tuple[str, ...]:
    """`--background-names`: a preset (voc, background) or comma-separated names."""
    key = spec.strip()
    if key in BACKGROUND_PRESETS:
        return BACKGROUND_PRESETS[key]
    names = tuple(n.strip() for n in key.split(",") if n.strip())
    if not names:
        raise LabelFileError(f"--background-names {spec!r} holds no name; give comma-separated "
                             f"names or a preset ({', '.join(BACKGROUND_PRESETS)})")
    return names

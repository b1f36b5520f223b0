"""Analytic FLOP counts of the SegCLIP towers (paper §2.1-2.2; docs/architecture.md "The model").

Only matrix products are counted (FLOP = 2 x multiply-accumulate), which is what
`torch.utils.flop_counter.FlopCounterMode` counts (conv, mm/addmm/bmm, attention kernels);
layer norms, softmaxes, GELUs and additions are left out (a few % of the total).

Image tower, per image: patch embedding (a p x p stride-p convolution, 3 -> D) on N = (S/p)^2
patches; `group_layer` transformer blocks on the N patches; the semantic group module (cross-
attention layers: L queries over L + N keys, grouped 1x1 key/value projections, the L x N mapping
logits, the mean pool as a product with the hard assignment, the region MLP); the remaining
blocks on the L region tokens; `proj` of the global token and the L regions. Text tower, per
label: the transformer on C tokens and the projection of the EOT feature.

Legend: S image side, p patch, N patches, L regions (centers), D vision width, F MLP hidden
width, E embedding width, C context length, W text width. Torch-free: reads the config fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TowerShape:
    """The ModelConfig fields that fix the tower FLOPs."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_ratio: float
    group_layer: int
    num_centers: int
    cross_layers: int
    embed_dim: int
    context_length: int
    text_width: int
    text_layers: int
    text_mlp_ratio: float = 4.0  # open_clip's text tower default

    @classmethod
    def from_config(cls, config: Any) -> TowerShape:
        """From a `segclip.ModelConfig` (or any object / dict with the same fields)."""
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
        names = [f for f in cls.__dataclass_fields__ if f != "text_mlp_ratio"]
        return cls(**{name: get(name) for name in names})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def block_flops(tokens: int, width: int, hidden: int) -> int:
    """One pre-LN transformer block on `tokens` tokens: QKV, scores, attention x V, output
    projection, 2-layer MLP."""
    projections = 2 * tokens * width * (3 * width + width)  # in_proj (3D) + out_proj (D)
    attention = 2 * 2 * tokens * tokens * width  # Q K^T and A V over all heads
    mlp = 2 * 2 * tokens * width * hidden
    return projections + attention + mlp


def cross_block_flops(queries: int, keys: int, width: int, hidden: int) -> int:
    """A cross-attention block: `queries` tokens attend to `keys` tokens, MLP on the queries."""
    projections = 2 * queries * width * 2 * width + 2 * keys * width * 2 * width  # q,o ; k,v
    attention = 2 * 2 * queries * keys * width
    mlp = 2 * 2 * queries * width * hidden
    return projections + attention + mlp


def image_tower_flops(shape: TowerShape) -> dict[str, int]:
    """FLOPs of one image through the image tower, by component (and "total")."""
    n, lr, d = shape.num_patches, shape.num_centers, shape.vision_width
    hidden = int(d * shape.vision_mlp_ratio)
    head_width = d // shape.vision_heads  # grouped 1x1 projections: one D/heads block per head
    parts = {
        "patch_embed": 2 * n * d * 3 * shape.patch_size ** 2,
        "blocks_before_group": shape.group_layer * block_flops(n, d, hidden),
        "group_cross_attention": shape.cross_layers * cross_block_flops(lr, lr + n, d, hidden),
        "group_mapping_logits": 2 * n * d * head_width + 2 * lr * n * d,  # key_proj; C K^T
        "group_value_pool": 2 * n * d * head_width + 2 * lr * n * d,  # value_proj; hard @ V
        "group_region_mlp": 2 * 2 * lr * d * hidden,
        "blocks_after_group": (shape.vision_layers - shape.group_layer)
        * block_flops(lr, d, hidden),
        "proj": 2 * (1 + lr) * d * shape.embed_dim,  # global token and regions
    }
    parts["total"] = sum(parts.values())
    return parts


def text_tower_flops(shape: TowerShape) -> dict[str, int]:
    """FLOPs of one label prompt (C tokens) through the text tower, by component."""
    c, w = shape.context_length, shape.text_width
    parts = {
        "blocks": shape.text_layers * block_flops(c, w, int(w * shape.text_mlp_ratio)),
        "proj": 2 * w * shape.embed_dim,  # the EOT feature only
    }
    parts["total"] = sum(parts.values())
    return parts


def count_with_torch(config: Any, images: int = 1, labels: int = 0) -> int:
    """FLOPs that `FlopCounterMode` counts for `encode_image` on `images` images plus
    `encode_text` on `labels` prompts of a SegCLIP built from `config` (needs torch).

    The model lives on the meta device: nothing is computed or allocated, and attention runs
    the decomposed math path, whose products the counter sees (it has no formula for the fused
    CPU attention kernel). Grad mode stays on so that nn.MultiheadAttention keeps off its fused
    inference path for the same reason.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from segclip.model import SegCLIP

    with torch.device("meta"):
        model = SegCLIP(config).eval()
        pixels = torch.empty(images, 3, config.image_size, config.image_size)
        tokens = torch.zeros(labels, config.context_length, dtype=torch.int64)
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        if images:
            model.encode_image(pixels)
        if labels:
            model.encode_text(tokens)
    return int(counter.get_total_flops())

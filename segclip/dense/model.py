"""DenseCLIP: a plain CLIP ViT image tower with one of the training-free last-block edits.

Image path: conv1 patches -> [CLS; patches] + positions -> ln_pre -> blocks [0, L-1) unchanged
-> `last_block(mode)` (segclip/dense/attention.py; scclip: the whole token path of
segclip/dense/scclip.py from the first block) -> ln_post -> proj -> patch tokens
L2-normalised, (B, N, E) row-major on the h x w grid. Weights are CLIP's `visual.*` tensors
(OpenAI TorchScript or open_clip state dict, read safely as for `segclip-convert clip`).

Legend: B batch, N = h*w patches, D width, E embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from torch import nn

from segclip.dense.attention import MODES, gaussian_bias, last_block
from segclip.dense.outliers import LOF_NEIGHBOURS, AnomalyMask, neighbour_matrix
from segclip.dense.scclip import ScclipLayers, scclip_tokens
from segclip.errors import ConversionError


@dataclass(frozen=True)
class DenseConfig:
    """A CLIP ViT image tower (ViT-B/16 by default) and the dense mode."""

    mode: str = "naclip"
    width: int = 768
    layers: int = 12
    head_width: int = 64
    patch_size: int = 16
    image_size: int = 224
    embed_dim: int = 512
    sigma: float = 5.0  # NACLIP Gaussian, in patches

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConversionError(f"unknown dense mode {self.mode!r}; expected one of "
                                  f"{', '.join(MODES)}")
        if self.mode == "scclip" and (self.layers < 4 or self.grid ** 2 <= LOF_NEIGHBOURS):
            raise ConversionError(f"scclip needs a tower of at least 4 blocks and more than "
                                  f"{LOF_NEIGHBOURS} patches; this one has {self.layers} blocks "
                                  f"and {self.grid ** 2} patches")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def patch_embed(images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) images, (D, 3, P, P) conv1 weight -> (B, N, D) row-major patch tokens.

    CLIP's stride-P convolution as one MatMul over flattened patches: the same values, and
    no Conv in the exported graph (ONNX Runtime 1.32's NchwcTransformer crashes the process
    on the fp16 graph's Conv)."""
    b, c, size, _ = images.shape
    d, _, p, _ = weight.shape
    g = size // p
    patches = images.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, 3, P, P)
    return patches.reshape(b, g * g, c * p * p) @ weight.reshape(d, c * p * p).T  # (B, N, D)


class DenseCLIP(nn.Module):
    """(B, 3, S, S) images at the tower's size -> (B, N, E) L2-normalised patch embeddings."""

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        cfg = CLIPVisionCfg(layers=c.layers, width=c.width, head_width=c.head_width,
                            patch_size=c.patch_size, image_size=c.image_size)
        self.visual = _build_vision_tower(c.embed_dim, cfg, quick_gelu=True)
        self.register_buffer("bias", gaussian_bias(c.grid, c.grid, c.sigma), persistent=False)
        if c.mode == "scclip":
            self.scclip_layers = ScclipLayers.for_depth(c.layers)
            self.outliers = AnomalyMask()
            self.register_buffer("neighbours", neighbour_matrix(c.grid, c.grid),
                                 persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = patch_embed(images, v.conv1.weight)  # (B, N, D)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1+N, D)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        if self.config.mode == "scclip":
            x = scclip_tokens(blocks, x, self.scclip_layers, self.neighbours,
                              self.outliers)  # (B, 1+N, D)
        else:
            for block in blocks[:-1]:
                x = block(x)
            x = last_block(blocks[-1], x, self.config.mode, self.bias)  # (B, 1+N, D)
        x = v.ln_post(x[:, 1:]) @ v.proj  # (B, N, E)
        return F.normalize(x, dim=-1)


def config_from_state(state: dict[str, torch.Tensor], mode: str) -> DenseConfig:
    """The tower's shape read from CLIP `visual.*` tensors (head width 64, as all CLIP ViTs)."""
    try:
        conv = state["visual.conv1.weight"]  # (D, 3, P, P)
        pos = state["visual.positional_embedding"]  # (1+N, D)
        proj = state["visual.proj"]  # (D, E)
    except KeyError as err:
        raise ConversionError(f"not CLIP ViT weights: no tensor {err.args[0]}") from None
    layers = len({n.split(".")[3] for n in state if n.startswith("visual.transformer.resblocks.")})
    grid = round((pos.shape[0] - 1) ** 0.5)
    return DenseConfig(mode=mode, width=conv.shape[0], layers=layers, head_width=64,
                       patch_size=conv.shape[-1], image_size=grid * conv.shape[-1],
                       embed_dim=proj.shape[1])


def dense_from_state(state: dict[str, torch.Tensor], mode: str,
                     source: str = "<state dict>") -> DenseCLIP:
    """A DenseCLIP in eval mode holding the `visual.*` tensors of `state`."""
    model = DenseCLIP(config_from_state(state, mode))
    expected = model.visual.state_dict()
    visual = {n[len("visual."):]: t for n, t in state.items() if n.startswith("visual.")}
    missing = [n for n in expected if n not in visual]
    shapes = [n for n in expected if n in visual and visual[n].shape != expected[n].shape]
    if missing or shapes:
        raise ConversionError(f"{source} does not fit a CLIP ViT image tower: "
                              f"{len(missing)} tensors missing (e.g. {missing[:3]}), "
                              f"{len(shapes)} shapes differ (e.g. {shapes[:3]})")
    model.visual.load_state_dict({n: visual[n] for n in expected})
    return model.eval()


def load_dense(path: str | Path, mode: str = "naclip") -> DenseCLIP:
    """DenseCLIP from an OpenAI or open_clip CLIP file, read without unpickling code."""
    from segclip.convert._io import read_state_dict

    return dense_from_state(read_state_dict(path, "CLIP"), mode, str(path))

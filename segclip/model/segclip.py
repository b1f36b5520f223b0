"""SegCLIP: a CLIP dual encoder whose image tower groups patches into regions (paper §2.1).

The towers are open_clip's (`VisionTransformer`, text transformer), with OpenAI/open_clip
parameter names, so CLIP weights load directly. Image path (docs/official-implementation.md §1.1):
patches (CLS
dropped) -> blocks [0, group_layer) -> semantic group -> remaining blocks on the L region tokens
-> global token = max over regions -> `ln_post` -> `proj`.

Legend: B batch, N patches (h x w grid), L regions, D width, E embedding width, T texts,
C context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from torch import nn

from segclip.config import ModelConfig
from segclip.losses import (
    contrastive_loss,
    names_flat_loss,
    names_loss,
    reconstruction_loss,
    superpixel_kl_loss,
)
from segclip.model.grouping import GroupOutput, SemanticGroup
from segclip.model.reconstruction import Reconstruction, patchify, random_patch_mask
from segclip.model.stem import ConvStem, HybridStem


@dataclass(frozen=True)
class ImageOutput:
    global_embedding: torch.Tensor  # (B, E) L2-normalised
    regions: torch.Tensor  # (B, L, E) L2-normalised
    assign: torch.Tensor  # (B, L, h, w) soft assignment (softmax over L)
    hard: torch.Tensor  # (B, L, h, w) hard assignment (one-hot over L)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the training losses; 0 switches a loss off (the paper uses 1, 1, 1)."""

    contrastive: float = 1.0
    reconstruction: float = 1.0
    superpixel_kl: float = 1.0
    names: float = 0.0  # the names loss (segclip/training/names.py); needs `names` in forward
    names_flat: float = 0.0  # flat names on the regions no mentioned name picks; needs `names`


class SegCLIP(nn.Module):
    """The SegCLIP model (see module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        vision_cfg = CLIPVisionCfg(layers=c.vision_layers, width=c.vision_width,
                                   head_width=c.vision_width // c.vision_heads,
                                   mlp_ratio=c.vision_mlp_ratio, patch_size=c.patch_size,
                                   image_size=c.image_size)
        text_cfg = CLIPTextCfg(context_length=c.context_length, vocab_size=c.vocab_size,
                               width=c.text_width, heads=c.text_heads, layers=c.text_layers)
        self.visual = _build_vision_tower(c.embed_dim, vision_cfg, quick_gelu=True)
        if c.patch_stem == "conv":  # segclip/model/stem.py
            self.visual.conv1 = ConvStem(c.vision_width, c.patch_size)
        elif c.patch_stem == "hybrid":
            self.visual.conv1 = HybridStem(self.visual.conv1, c.vision_width, c.patch_size)
        text = _build_text_tower(c.embed_dim, text_cfg, quick_gelu=True)
        self.transformer = text.transformer
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.init_logit_scale)))
        self.group = SemanticGroup(c.vision_width, c.vision_heads, c.num_centers, c.cross_layers,
                                   c.vision_mlp_ratio, c.gumbel_tau, c.mapping_scale)
        self.reconstruction = Reconstruction(
            c.vision_width, c.vision_heads, c.num_centers, c.recon_layers, c.decoder_width,
            c.decoder_layers, c.decoder_heads, c.grid_size, c.patch_size,
        ) if c.with_reconstruction else None

    # ---- image tower -------------------------------------------------------------------------
    def patch_positions(self, h: int, w: int) -> torch.Tensor:
        """(h*w, D) patch position embeddings (CLS row dropped), bicubic-resized if needed."""
        pos = self.visual.positional_embedding[1:]  # (N0, D)
        g = self.config.grid_size
        if (h, w) == (g, g):
            return pos
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(h * w, -1)  # (h*w, D)

    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, 3, H, W) -> ((B, N, D) patch tokens after `ln_pre`, h, w)."""
        x = self.visual.conv1(images)  # (B, D, h, w)
        h, w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        return self.visual.ln_pre(x + self.patch_positions(h, w).to(x.dtype)), h, w

    def forward_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Blocks [0, group_layer) on (B, N, D) patch tokens (no CLS)."""
        return self.forward_patches_and_keys(tokens)[0]

    def forward_patches_and_keys(self, tokens: torch.Tensor,
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks [0, group_layer) on (B, N, D) patch tokens; also the tokens after
        `assign_layer` blocks that the mapping logits read (None: the last ones)."""
        keys = tokens if self.config.assign_layer == 0 else None
        for index, block in enumerate(self.visual.transformer.resblocks[: self.config.group_layer]):
            tokens = block(tokens)
            if index + 1 == self.config.assign_layer < self.config.group_layer:
                keys = tokens
        return tokens, keys

    def group_patches(self, tokens: torch.Tensor, sample: bool | None = None) -> GroupOutput:
        """Blocks before the group, then the semantic group on (B, N, D) patch tokens."""
        patches, keys = self.forward_patches_and_keys(tokens)
        return self.group(patches, sample=sample, keys=keys)

    def forward_regions(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks after the group on (B, L, D) regions -> ((B, E) global, (B, L, E) regions),
        both unnormalised."""
        for block in self.visual.transformer.resblocks[self.config.group_layer:]:
            regions = block(regions)
        global_token = regions.amax(dim=1, keepdim=True)  # (B, 1, D)
        tokens = self.visual.ln_post(torch.cat([global_token, regions], dim=1))  # (B, 1+L, D)
        tokens = tokens @ self.visual.proj  # (B, 1+L, E)
        return tokens[:, 0], tokens[:, 1:]

    def forward_group(self, images: torch.Tensor, sample: bool | None = None,
                      ) -> tuple[GroupOutput, torch.Tensor, torch.Tensor, int, int]:
        """Run the image tower; returns (group output, global, regions, h, w), unnormalised."""
        patches, h, w = self.embed_patches(images)
        grouped = self.group_patches(patches, sample=sample)
        global_embedding, regions = self.forward_regions(grouped.regions)
        return grouped, global_embedding, regions, h, w

    def encode_image(self, images: torch.Tensor) -> ImageOutput:
        """(B, 3, S, S) CLIP-normalised images -> embeddings and assignments (see ImageOutput)."""
        grouped, global_embedding, regions, h, w = self.forward_group(images)
        b, n_centers = grouped.soft.shape[:2]
        return ImageOutput(
            global_embedding=F.normalize(global_embedding, dim=-1),
            regions=F.normalize(regions, dim=-1),
            assign=grouped.soft.reshape(b, n_centers, h, w),
            hard=grouped.hard.reshape(b, n_centers, h, w),
        )

    # ---- text tower --------------------------------------------------------------------------
    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(T, C) token ids, C <= context_length -> (T, E) features taken at the EOT token."""
        c = tokens.shape[1]
        x = self.token_embedding(tokens)  # (T, C, W)
        x = x + self.positional_embedding[:c]
        x = self.transformer(x, attn_mask=self.attn_mask[:c, :c])  # (T, C, W)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (T, W)
        x = x @ self.text_projection  # (T, E)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """The contrastive multiplier: exp(logit_scale) clamped to `max_logit_scale`."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def clamp_logit_scale(self) -> None:
        """Keep the parameter at or below log(max_logit_scale) (done after each step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    # ---- training ----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                superpixels: torch.Tensor | None = None,
                weights: LossWeights = LossWeights(),
                names: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> dict[str, torch.Tensor]:
        """Training forward: the loss terms (already weighted) and their sum under "loss".

        Args:
            images: (B, 3, S, S) CLIP-normalised images.
            tokens: (B, C) caption token ids.
            superpixels: (B, N) super-patch labels; needed when the KL weight is > 0.
            weights: loss weights; a zero weight skips that loss's computation.
            names: ((C, C') prompt token ids of the names, (B, C) multi-hot mentions); needed
                when the names or names_flat weight is > 0.
        """
        grouped, global_embedding, regions, _, _ = self.forward_group(images)
        terms: dict[str, torch.Tensor] = {}
        if weights.contrastive:
            text = self.encode_text(tokens)
            image = F.normalize(global_embedding, dim=-1)
            terms["contrastive"] = weights.contrastive * contrastive_loss(image, text,
                                                                          self.scale())
        if weights.superpixel_kl:
            if superpixels is None:
                raise ValueError("superpixel_kl weight > 0 needs `superpixels` (B, N) labels")
            terms["superpixel_kl"] = weights.superpixel_kl * superpixel_kl_loss(
                grouped.hard.transpose(1, 2), superpixels)
        if weights.names or weights.names_flat:
            if names is None:
                raise ValueError("names weights > 0 need `names` (prompt tokens, mentions)")
            prompts, mentions = names
            present = grouped.hard.detach().sum(dim=-1) > 0  # (B, L)
            args = (F.normalize(regions, dim=-1), present, self.encode_text(prompts), mentions,
                    self.scale())
            if weights.names:
                terms["names"] = weights.names * names_loss(*args)
            if weights.names_flat:
                terms["names_flat"] = weights.names_flat * names_flat_loss(*args)
        if weights.reconstruction:
            if self.reconstruction is None:
                raise ValueError("reconstruction weight > 0 but the model was built with "
                                 "with_reconstruction=False")
            terms["reconstruction"] = weights.reconstruction * self.reconstruction_term(images)
        terms["loss"] = sum(terms.values())
        return terms

    def reconstruction_term(self, images: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """The masked second pass and its MSE on the hidden patches (paper §2.3)."""
        patches, _, _ = self.embed_patches(images)  # (B, N, D)
        b, n, d = patches.shape
        mask = random_patch_mask(b, n, self.config.num_visible_patches, images.device, generator)
        visible = patches.gather(1, mask.keep.unsqueeze(-1).expand(-1, -1, d))  # (B, n, D)
        grouped = self.group_patches(visible, sample=True)
        pred = self.reconstruction(grouped.regions, grouped.hard, mask.restore)  # (B, N, P)
        target = patchify(images, self.config.patch_size)  # (B, N, P)
        return reconstruction_loss(pred, target, mask.masked)

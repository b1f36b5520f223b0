"""SegCLIP composition (segclip/model/segclip.py, reconstruction.py) and the vit-b16 preset.

The image path is checked against a per-sample composition written from
docs/official-implementation.md §1.1 (CLS
dropped, blocks [0, g) on patches, the group, blocks [g, end) on the L region tokens only, global
= max over regions, ln_post, proj). The vit-b16 preset is checked against open_clip's ViT-B-16
(QuickGELU): same parameter names and shapes, and the same text features once its weights load.

Legend: B batch, N patches (h x w), L regions, D width, E embedding width, P pixels per patch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from segclip.config import ModelConfig
from segclip.losses import contrastive_loss, superpixel_kl_loss
from segclip.model import LossWeights, SegCLIP
from segclip.model.reconstruction import patchify, random_patch_mask


def fields(out) -> dict[str, torch.Tensor]:
    return {"global_embedding": out.global_embedding, "regions": out.regions,
            "assign": out.assign, "hard": out.hard}


# ---- encode_image -----------------------------------------------------------------------------
def test_encode_image_contract(tiny_model: SegCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        out = tiny_model.encode_image(images)
    assert out.global_embedding.shape == (4, 64)
    assert out.regions.shape == (4, 8, 64)
    assert out.assign.shape == out.hard.shape == (4, 8, 8, 8)
    assert all(t.dtype == torch.float32 for t in fields(out).values())
    ones = torch.ones(4)
    torch.testing.assert_close(out.global_embedding.norm(dim=-1), ones)
    torch.testing.assert_close(out.regions.norm(dim=-1), ones.unsqueeze(1).expand(4, 8))
    torch.testing.assert_close(out.assign.sum(dim=1), torch.ones(4, 8, 8))  # softmax over L
    assert set(out.hard.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out.hard.sum(dim=1), torch.ones(4, 8, 8))  # one center per patch
    assert torch.equal(out.hard.argmax(dim=1), out.assign.argmax(dim=1))


def test_eval_encode_image_is_deterministic(tiny_model: SegCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        a, b = tiny_model.encode_image(images), tiny_model.encode_image(images)
    for name, value in fields(a).items():
        assert torch.equal(value, fields(b)[name]), name


def test_batch_independence(tiny_model: SegCLIP, images: torch.Tensor) -> None:
    # The official cross-attention mixes samples when B > 1 (docs/official-implementation.md §6);
    # ours must not.
    with torch.no_grad():
        batched = fields(tiny_model.encode_image(images))
        for i in range(images.shape[0]):
            alone = fields(tiny_model.encode_image(images[i:i + 1]))
            for name, value in alone.items():
                diff = (batched[name][i] - value[0]).abs().max().item()
                assert diff <= 1e-5, f"sample {i} {name}: max abs diff {diff}"


def reference_encode_image(model: SegCLIP, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One (3, S, S) image through the tower as docs/official-implementation.md §1.1 describes
    it."""
    visual, c = model.visual, model.config
    blocks = visual.transformer.resblocks
    grid = F.conv2d(image.unsqueeze(0), visual.conv1.weight, stride=c.patch_size)  # (1, D, h, w)
    tokens = grid[0].flatten(1).T  # (N, D), row-major patches, no CLS token
    tokens = visual.ln_pre(tokens + visual.positional_embedding[1:])  # CLS row 0 unused
    for block in blocks[: c.group_layer]:
        tokens = block(tokens.unsqueeze(0))[0]
    grouped = model.group(tokens.unsqueeze(0))
    regions = grouped.regions[0]  # (L, D)
    for block in blocks[c.group_layer:]:  # only the L region tokens, no CLS, no positions
        regions = block(regions.unsqueeze(0))[0]
    global_token = regions.max(dim=0).values  # element-wise max over regions, before ln_post
    out = visual.ln_post(torch.cat([global_token.unsqueeze(0), regions])) @ visual.proj
    h = w = c.grid_size
    return (F.normalize(out[0], dim=-1), F.normalize(out[1:], dim=-1),
            grouped.soft[0].reshape(-1, h, w))


def test_encode_image_matches_reference_composition(tiny_model: SegCLIP,
                                                    images: torch.Tensor) -> None:
    with torch.no_grad():
        out = tiny_model.encode_image(images)
        for i in range(images.shape[0]):
            glob, regions, assign = reference_encode_image(tiny_model, images[i])
            torch.testing.assert_close(out.global_embedding[i], glob, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.regions[i], regions, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.assign[i], assign, rtol=1e-5, atol=1e-6)


def test_cls_token_is_dead(tiny_model: SegCLIP, images: torch.Tensor) -> None:
    # docs/official-implementation.md §1.1: CLS is dropped, so class_embedding and positional row 0
    # never matter.
    with torch.no_grad():
        before = fields(tiny_model.encode_image(images))
        tiny_model.visual.class_embedding.add_(5.0)
        tiny_model.visual.positional_embedding[0].add_(5.0)
        after = fields(tiny_model.encode_image(images))
        tiny_model.visual.positional_embedding[1].add_(5.0)  # a real patch position does
        moved = fields(tiny_model.encode_image(images))
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["global_embedding"], moved["global_embedding"])


def test_other_input_sizes_interpolate_positions(tiny_model: SegCLIP,
                                                 make_images: Callable) -> None:
    assert torch.equal(tiny_model.patch_positions(8, 8),
                       tiny_model.visual.positional_embedding[1:])
    with torch.no_grad():
        out = tiny_model.encode_image(make_images(2, size=48))  # 6x6 grid
    assert out.assign.shape == (2, 8, 6, 6) and out.regions.shape == (2, 8, 64)
    assert torch.equal(out.hard.sum(dim=1), torch.ones(2, 6, 6))


# ---- encode_text ------------------------------------------------------------------------------
def test_encode_text_is_padding_invariant(tiny_model: SegCLIP, make_tokens: Callable) -> None:
    # docs/official-implementation.md §1.3: causal mask + EOT pooling, so context 32 (training) and
    # 77 (eval) agree.
    with torch.no_grad():
        short = tiny_model.encode_text(make_tokens(5, 32))
        long = tiny_model.encode_text(make_tokens(5, 77))
        raw = tiny_model.encode_text(make_tokens(5, 77), normalize=False)
    assert short.shape == (5, 64)
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(F.normalize(raw, dim=-1), long, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(5))
    assert not torch.allclose(short[0], short[1])  # different captions, different features


def test_logit_scale_is_clamped(tiny_model: SegCLIP) -> None:
    assert tiny_model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        tiny_model.logit_scale.fill_(math.log(1000.0))
    assert tiny_model.scale().item() == pytest.approx(100.0)
    tiny_model.clamp_logit_scale()
    assert tiny_model.logit_scale.item() == pytest.approx(math.log(100.0))


# ---- training forward -------------------------------------------------------------------------
def test_training_forward_backward(tiny_model: SegCLIP, make_images: Callable,
                                   make_tokens: Callable, make_superpixels: Callable) -> None:
    tiny_model.train()
    torch.manual_seed(0)  # Gumbel noise and the reconstruction mask use the global RNG
    terms = tiny_model(make_images(8), make_tokens(8), make_superpixels(8))
    assert set(terms) == {"contrastive", "superpixel_kl", "reconstruction", "loss"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    torch.testing.assert_close(terms["loss"], terms["contrastive"] + terms["superpixel_kl"]
                               + terms["reconstruction"])
    terms["loss"].backward()
    for name in ("group.centers", "group.key_proj.conv.weight", "visual.conv1.weight",
                 "visual.proj", "logit_scale", "transformer.resblocks.0.attn.in_proj_weight",
                 "reconstruction.mix.weight", "reconstruction.decoder.pred.weight"):
        grad = tiny_model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_forward_terms_equal_the_losses_of_encode(tiny_model: SegCLIP, images: torch.Tensor,
                                                  make_tokens: Callable,
                                                  make_superpixels: Callable) -> None:
    # eval mode: no Gumbel noise, so forward and encode_image see the same assignment
    tokens, labels = make_tokens(4), make_superpixels(4)
    weights = LossWeights(contrastive=1.0, reconstruction=0.0, superpixel_kl=2.0)
    with torch.no_grad():
        terms = tiny_model(images, tokens, labels, weights=weights)
        out = tiny_model.encode_image(images)
        text = tiny_model.encode_text(tokens)
    assert set(terms) == {"contrastive", "superpixel_kl", "loss"}  # weight 0: not computed
    expected_con = contrastive_loss(out.global_embedding, text, tiny_model.scale())
    hard = out.hard.flatten(2).transpose(1, 2)  # (B, N, L)
    expected_kl = 2.0 * superpixel_kl_loss(hard, labels)
    torch.testing.assert_close(terms["contrastive"], expected_con, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["superpixel_kl"], expected_kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["loss"], expected_con + expected_kl, rtol=1e-5, atol=1e-6)


def test_forward_errors(tiny_model: SegCLIP, make_tiny_model: Callable, images: torch.Tensor,
                        make_tokens: Callable, make_superpixels: Callable) -> None:
    with pytest.raises(ValueError, match=r"superpixel_kl weight > 0 needs `superpixels`"):
        tiny_model(images, make_tokens(4))
    no_recon = make_tiny_model(with_reconstruction=False)
    assert no_recon.reconstruction is None
    assert not any(k.startswith("reconstruction.") for k in no_recon.state_dict())
    with pytest.raises(ValueError, match=r"reconstruction weight > 0 but the model was built "
                                         r"with with_reconstruction=False"):
        no_recon(images, make_tokens(4), make_superpixels(4))


# ---- reconstruction branch (paper §2.3) -------------------------------------------------------
def test_random_patch_mask(tiny_config: ModelConfig, generator: torch.Generator) -> None:
    n, keep = tiny_config.num_patches, tiny_config.num_visible_patches
    mask = random_patch_mask(3, n, keep, torch.device("cpu"), generator)
    assert mask.keep.shape == (3, keep) and mask.masked.shape == mask.restore.shape == (3, n)
    for b in range(3):
        assert len(set(mask.keep[b].tolist())) == keep  # distinct visible patches
        assert mask.masked[b].sum().item() == n - keep
        assert torch.equal(mask.masked[b, mask.keep[b]], torch.zeros(keep))
        shuffle = mask.restore[b].argsort()
        assert torch.equal(shuffle[:keep], mask.keep[b])  # restore inverts the shuffle
    again = random_patch_mask(3, n, keep, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(again.keep, mask.keep)  # the generator fixture is seeded with 0


def test_patchify_order(generator: torch.Generator) -> None:
    images = torch.randn(2, 3, 12, 8, generator=generator)
    p = 4
    patches = patchify(images, p)  # (B, N, p*p*3)
    assert patches.shape == (2, 6, 48)
    for b in range(2):
        for gi in range(3):
            for gj in range(2):
                for r in range(p):
                    for c in range(p):
                        for ch in range(3):  # within a patch: row, column, then channel
                            got = patches[b, gi * 2 + gj, (r * p + c) * 3 + ch]
                            assert got == images[b, ch, gi * p + r, gj * p + c]


def test_reconstruction_term(tiny_model: SegCLIP, images: torch.Tensor) -> None:
    tiny_model.train()
    torch.manual_seed(1)
    loss = tiny_model.reconstruction_term(images, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert tiny_model.reconstruction.mix.weight.grad.abs().sum() > 0
    assert tiny_model.group.centers.grad.abs().sum() > 0  # the masked pass shares the group
    torch.manual_seed(1)
    again = tiny_model.reconstruction_term(images, torch.Generator().manual_seed(0))
    assert again.item() == loss.item()


# ---- the paper preset against open_clip ViT-B-16 ----------------------------------------------
@pytest.fixture(scope="module")
def vit_b16_pair() -> tuple[SegCLIP, torch.nn.Module, object]:
    """Our vit-b16 model with open_clip ViT-B-16 (QuickGELU) weights loaded, and that model."""
    open_clip = pytest.importorskip("open_clip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ours = SegCLIP(ModelConfig.preset("vit-b16")).eval()
        ref = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    ref_keys = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_keys = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    return ours, ref, (ref_keys, our_keys, result)


def test_vit_b16_names_and_shapes_equal_open_clip(vit_b16_pair) -> None:
    _, _, (ref_keys, our_keys, result) = vit_b16_pair
    assert any(k.startswith("visual.") for k in ref_keys)
    assert any(k.startswith("transformer.resblocks.") for k in ref_keys)  # text tower
    assert len([k for k in ref_keys if k.startswith("visual.transformer.resblocks.")]) == 12 * 12
    mismatched = {k: (v, our_keys.get(k)) for k, v in ref_keys.items() if our_keys.get(k) != v}
    assert mismatched == {}
    extra = sorted(set(our_keys) - set(ref_keys))
    assert extra and all(k.startswith(("group.", "reconstruction.")) for k in extra), extra
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == extra  # zero missing trunk keys
    assert our_keys["group.centers"] == (8, 768)
    assert our_keys["group.key_proj.conv.weight"] == (768, 64, 1)


def test_vit_b16_text_tower_equals_open_clip(vit_b16_pair, make_tokens: Callable) -> None:
    ours, ref, _ = vit_b16_pair
    tokens = make_tokens(2, 77)
    with torch.no_grad():
        ours_text = ours.encode_text(tokens)
        ref_text = ref.encode_text(tokens, normalize=True)
    torch.testing.assert_close(ours_text, ref_text, rtol=1e-5, atol=1e-5)
    assert ours.logit_scale.item() == pytest.approx(ref.logit_scale.item())


def test_vit_b16_encode_image_shapes(vit_b16_pair, make_images: Callable) -> None:
    ours, _, _ = vit_b16_pair
    with torch.no_grad():
        out = ours.encode_image(make_images(2, size=224))
    assert out.global_embedding.shape == (2, 512)
    assert out.regions.shape == (2, 8, 512)
    assert out.assign.shape == out.hard.shape == (2, 8, 14, 14)
    assert torch.isfinite(out.regions).all()
    torch.testing.assert_close(out.assign.sum(dim=1), torch.ones(2, 14, 14))

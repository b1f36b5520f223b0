"""Semantic group module (segclip/model/grouping.py) against a literal per-sample reference.

The reference below is written from the paper (§2.2, eqs. 1-3) and docs/official-implementation.md
§1.2 with plain
matmuls and loops: per-head attention from the block's `in_proj` weights, hand-written LayerNorm,
the grouped 1x1 convs as block-diagonal matrices, softmax over centers, argmax, the exact mean over
assigned patches, LN -> Linear -> exact GELU -> Linear -> QuickGELU. Parity is checked in float64
(values and gradients, atol 1e-10) and in float32 (values, atol 1e-4).

Legend: B batch, N patches, L centers, D width, G heads.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from segclip.model.grouping import (
    SemanticGroup,
    gumbel_assign,
    hard_assign,
    mean_pool,
    straight_through_argmax,
)

WIDTH, HEADS, CENTERS, CROSS_LAYERS, PATCHES = 32, 4, 5, 2, 24


# ---- the literal reference -------------------------------------------------------------------
def ref_layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as LayerNorm
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = torch.exp(x - x.amax(dim=dim, keepdim=True).detach())  # shift-invariant
    return e / e.sum(dim=dim, keepdim=True)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_attention(attn: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor,
                  heads: int) -> torch.Tensor:
    """Multi-head attention of one sample, (Lq, D) queries over (Lk, D) keys = values."""
    d = q.shape[-1]
    hd = d // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias  # (3D, D), (3D,)
    qp = q @ w[:d].T + b[:d]  # (Lq, D)
    kp = kv @ w[d:2 * d].T + b[d:2 * d]  # (Lk, D)
    vp = kv @ w[2 * d:].T + b[2 * d:]  # (Lk, D)
    outs = []
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        scores = qp[:, cols] @ kp[:, cols].T / math.sqrt(hd)  # (Lq, Lk)
        outs.append(ref_softmax(scores, dim=1) @ vp[:, cols])  # (Lq, hd)
    return torch.cat(outs, dim=1) @ attn.out_proj.weight.T + attn.out_proj.bias  # (Lq, D)


def block_diagonal(conv_weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(D, D/G, 1) grouped-conv weight -> the equivalent (D, D) bias-free Linear weight."""
    c = conv_weight.shape[0] // groups
    return torch.block_diag(*[conv_weight[g * c:(g + 1) * c, :, 0] for g in range(groups)])


def ref_semantic_group(group: SemanticGroup, patches: torch.Tensor, heads: int,
                       ) -> dict[str, torch.Tensor]:
    """Eval-mode semantic group of ONE sample: (N, D) raw patches -> regions (L, D), etc."""
    q = group.centers  # (L, D)
    for block in group.cross_blocks:  # eq. 1, pre-norm, keys = values = [centers; raw patches]
        kv = torch.cat([q, patches], dim=0)  # (L+N, D)
        q = q + ref_attention(block.attn, ref_layer_norm(q, block.ln_1),
                              ref_layer_norm(kv, block.ln_1_kv), heads)
        hidden = ref_layer_norm(q, block.ln_2) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
        q = q + quick_gelu(hidden) @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    qf = ref_layer_norm(q, group.ln_query)  # (L, D) contextual centers
    xn = ref_layer_norm(patches, group.norm)  # (N, D)
    keys = ref_layer_norm(xn @ block_diagonal(group.key_proj.conv.weight, heads).T,
                          group.key_ln)  # (N, D)
    values = xn @ block_diagonal(group.value_proj.conv.weight, heads).T  # (N, D), no LN on V
    logits = qf @ keys.T  # (L, N): full-width dot products, no 1/sqrt(d)
    soft = ref_softmax(logits, dim=0)  # over centers
    n_centers, n_patches = logits.shape
    onehot = torch.zeros_like(soft)
    for j in range(n_patches):
        onehot[int(soft[:, j].argmax()), j] = 1.0
    hard = onehot + soft - soft.detach()  # straight-through: value one-hot, gradient of soft
    means = []
    for k in range(n_centers):  # eq. 3 MEAN, written with the ST weights so gradients match
        total = torch.zeros_like(values[0])
        count = torch.zeros_like(soft[0, 0])
        for j in range(n_patches):
            total = total + hard[k, j] * values[j]
            count = count + hard[k, j]
        means.append(total / count if count.item() >= 1 else total)  # empty center -> 0
    region_in = qf + torch.stack(means)  # (L, D)
    mlp = group.out_mlp
    hidden = exact_gelu(ref_layer_norm(region_in, mlp.ln) @ mlp.fc1.weight.T + mlp.fc1.bias)
    regions = quick_gelu(hidden @ mlp.fc2.weight.T + mlp.fc2.bias)  # no residual
    return {"regions": regions, "hard": hard, "soft": soft, "logits": logits, "values": values,
            "onehot": onehot}


# ---- fixtures --------------------------------------------------------------------------------
def build_group(seed: int = 0) -> SemanticGroup:
    """A SemanticGroup whose every parameter (LN affines and zero-initialised biases included)
    is perturbed, so that no term of the reference is trivially 0 or 1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        group = SemanticGroup(WIDTH, HEADS, CENTERS, CROSS_LAYERS)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in group.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        group.centers.mul_(20.0)  # centers at the scale of the patches, not std 0.02
    return group.eval()


@pytest.fixture
def group() -> SemanticGroup:
    return build_group()


@pytest.fixture
def patches(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(2, PATCHES, WIDTH, generator=generator)  # (B, N, D)


def assert_no_ties(soft: torch.Tensor, margin: float) -> None:
    """The argmax is unambiguous (a precondition of comparing two argmax implementations)."""
    top2 = soft.topk(2, dim=-2).values  # (..., 2, N)
    assert (top2[..., 0, :] - top2[..., 1, :]).min() > margin


# ---- parity ----------------------------------------------------------------------------------
def test_semantic_group_matches_reference_float64(group: SemanticGroup,
                                                  patches: torch.Tensor,
                                                  generator: torch.Generator) -> None:
    group = group.double()
    x = patches.double().requires_grad_(True)
    out = group(x)
    weights = {k: torch.randn(out.regions.shape if k == "regions" else out.hard.shape,
                              generator=generator, dtype=torch.float64)
               for k in ("regions", "hard", "soft")}
    inputs = [x, *group.parameters()]
    lib_loss = sum((getattr(out, k) * w).sum() for k, w in weights.items())
    lib_grads = torch.autograd.grad(lib_loss, inputs)

    ref_loss = torch.zeros((), dtype=torch.float64)
    for b in range(x.shape[0]):  # per sample: attention never mixes samples
        ref = ref_semantic_group(group, x[b], HEADS)
        assert_no_ties(ref["soft"], 1e-6)
        torch.testing.assert_close(out.logits[b], ref["logits"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.soft[b], ref["soft"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.hard[b], ref["onehot"], rtol=0, atol=0)
        torch.testing.assert_close(out.regions[b], ref["regions"], rtol=1e-10, atol=1e-10)
        ref_loss = ref_loss + sum((ref[k] * w[b]).sum() for k, w in weights.items())
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    for lib_g, ref_g in zip(lib_grads, ref_grads, strict=True):
        torch.testing.assert_close(lib_g, ref_g, rtol=1e-8, atol=1e-10)
    assert lib_grads[0].abs().sum() > 0 and group.centers.shape == lib_grads[1].shape


def test_semantic_group_matches_reference_float32(group: SemanticGroup,
                                                  patches: torch.Tensor) -> None:
    with torch.no_grad():
        out = group(patches)  # float32, the library's dtype
        ref_group = build_group().double()
        for b in range(patches.shape[0]):
            ref = ref_semantic_group(ref_group, patches[b].double(), HEADS)
            assert_no_ties(ref["soft"], 1e-4)
            torch.testing.assert_close(out.hard[b], ref["onehot"].float(), rtol=0, atol=0)
            torch.testing.assert_close(out.regions[b], ref["regions"].float(),
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.soft[b], ref["soft"].float(), rtol=1e-4, atol=1e-5)


def test_grouped_projection_is_block_diagonal_linear(group: SemanticGroup,
                                                     patches: torch.Tensor) -> None:
    # docs/official-implementation.md §5: k_conv/v_conv == a bias-free block-diagonal Linear with G
    # diagonal blocks.
    weight = block_diagonal(group.key_proj.conv.weight, HEADS)  # (D, D)
    assert (weight.reshape(HEADS, WIDTH // HEADS, HEADS, WIDTH // HEADS)
            .permute(0, 2, 1, 3)[~torch.eye(HEADS, dtype=torch.bool)] == 0).all()
    torch.testing.assert_close(group.key_proj(patches), patches @ weight.T,
                               rtol=1e-5, atol=1e-5)


def test_mapping_scale_multiplies_the_logits(patches: torch.Tensor) -> None:
    group = build_group()
    scaled = build_group()
    scaled.mapping_scale = 2.5
    with torch.no_grad():
        torch.testing.assert_close(scaled(patches).logits, 2.5 * group(patches).logits)


# ---- assignment: eval vs training ------------------------------------------------------------
def test_eval_is_deterministic_and_one_hot(group: SemanticGroup, patches: torch.Tensor) -> None:
    with torch.no_grad():
        a, b = group(patches), group(patches)
    assert torch.equal(a.hard, b.hard) and torch.equal(a.regions, b.regions)
    assert set(a.hard.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a.hard.sum(dim=1), torch.ones(2, PATCHES))  # each patch: one center
    assert torch.equal(a.hard.argmax(dim=1), a.soft.argmax(dim=1))
    torch.testing.assert_close(a.soft.sum(dim=1), torch.ones(2, PATCHES))


def test_training_samples_with_the_generator(group: SemanticGroup,
                                             patches: torch.Tensor) -> None:
    group.train()
    with torch.no_grad():
        a = group(patches, generator=torch.Generator().manual_seed(1))
        b = group(patches, generator=torch.Generator().manual_seed(2))
        a_again = group(patches, generator=torch.Generator().manual_seed(1))
        plain = group(patches, sample=False)
    assert not torch.equal(a.hard, b.hard)  # different noise, different assignment
    assert torch.equal(a.hard, a_again.hard) and torch.equal(a.regions, a_again.regions)
    assert not torch.equal(a.hard, plain.hard)  # the noise changes some assignments
    for out in (a, b):
        assert torch.equal(out.hard.sum(dim=1), torch.ones(2, PATCHES))
        torch.testing.assert_close(out.soft, plain.soft)  # soft_attn: no noise, no tau
    group.eval()
    with torch.no_grad():
        assert torch.equal(group(patches).hard, plain.hard)  # sample=False == eval


def test_gumbel_assign_follows_the_softmax_distribution() -> None:
    # Gumbel-max: argmax(logits + g) ~ Categorical(softmax(logits)), whatever tau.
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    draws = 40_000
    batch = logits.reshape(1, 4, 1).expand(1, 4, draws).contiguous()  # (1, L, draws)
    hard = gumbel_assign(batch, tau=0.9, dim=1, generator=torch.Generator().manual_seed(0))
    frequency = hard.mean(dim=-1)[0]  # (L,)
    # binomial std <= 0.0025 at 40k draws; 0.012 is ~5 std
    torch.testing.assert_close(frequency, torch.softmax(logits, 0), rtol=0, atol=0.012)


def test_gumbel_assign_value_and_straight_through_gradient(generator: torch.Generator) -> None:
    tau = 0.9
    logits = torch.randn(3, 6, 10, generator=generator, dtype=torch.float64,
                         requires_grad=True)  # (B, L, N)
    w = torch.randn(3, 6, 10, generator=generator, dtype=torch.float64)
    hard = gumbel_assign(logits, tau, dim=1, generator=torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad((hard * w).sum(), logits)

    exp1 = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(7))
    noisy = (logits.detach() - exp1.log()) / tau  # + Gumbel(0, 1) noise, / tau
    y = torch.softmax(noisy, dim=1)
    expected_hard = torch.zeros_like(y)
    for b in range(3):
        for j in range(10):
            expected_hard[b, int(noisy[b, :, j].argmax()), j] = 1.0
    assert torch.equal(hard.detach(), expected_hard)
    # d/dlogits sum(w * softmax((l + g) / tau)) = (1/tau) y (w - <y, w>)
    expected_grad = y * (w - (y * w).sum(dim=1, keepdim=True)) / tau
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_straight_through_argmax_value_and_gradient(generator: torch.Generator) -> None:
    logits = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    hard = straight_through_argmax(logits, dim=1)
    (grad,) = torch.autograd.grad((hard * w).sum(), logits)
    y = torch.softmax(logits.detach(), dim=1)  # eval: no noise, no tau
    assert torch.equal(hard.detach().argmax(dim=1), logits.detach().argmax(dim=1))
    assert torch.equal(hard.detach().sum(dim=1), torch.ones(2, 7, dtype=torch.float64))
    torch.testing.assert_close(grad, y * (w - (y * w).sum(dim=1, keepdim=True)),
                               rtol=1e-10, atol=1e-12)


def test_hard_assign_has_no_gradient_of_its_own() -> None:
    # Without the straight-through term the centers could not learn from the assignment.
    logits = torch.randn(1, 3, 4, requires_grad=True)
    assert not hard_assign(logits).requires_grad
    assert straight_through_argmax(logits).requires_grad


@pytest.mark.parametrize("training", [True, False])
def test_gradients_reach_centers_through_the_assignment(group: SemanticGroup,
                                                        patches: torch.Tensor,
                                                        generator: torch.Generator,
                                                        training: bool) -> None:
    group.train(training)
    out = group(patches, generator=torch.Generator().manual_seed(3))
    w = torch.randn(out.hard.shape, generator=generator)
    # a loss on the one-hot assignment alone: its only path to the centers is the ST estimator
    (grad,) = torch.autograd.grad((out.hard * w).sum(), group.centers)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-6


# ---- MEAN aggregation (eq. 3) ----------------------------------------------------------------
def test_mean_pool_exact_means_and_empty_center() -> None:
    values = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3) ** 1.5  # (B, N, D)
    assignment = [[0, 0, 1, 0, 1], [3, 3, 3, 3, 0]]  # center 2 empty in both, 1 in sample 1
    hard = torch.zeros(2, 4, 5)  # (B, L, N)
    for b, row in enumerate(assignment):
        for j, k in enumerate(row):
            hard[b, k, j] = 1.0
    values.requires_grad_(True)
    regions = mean_pool(hard, values)  # (B, L, D)
    assert regions.shape == (2, 4, 3)
    for b, row in enumerate(assignment):
        for k in range(4):
            members = [j for j, c in enumerate(row) if c == k]
            expected = (values[b, members].mean(dim=0) if members
                        else torch.zeros(3))
            torch.testing.assert_close(regions[b, k], expected, rtol=1e-6, atol=0)
    assert torch.equal(regions[:, 2], torch.zeros(2, 3))
    assert torch.equal(regions[1, 1], torch.zeros(3))
    # d sum(region_k) / d value_j = 1 / |members of j's center|
    (grad,) = torch.autograd.grad(regions.sum(), values)
    for b, row in enumerate(assignment):
        for j, k in enumerate(row):
            assert torch.equal(grad[b, j], torch.full((3,), 1.0 / row.count(k)))


def test_mean_pool_float64_random(generator: torch.Generator) -> None:
    logits = torch.randn(3, 6, 40, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 40, 8, generator=generator, dtype=torch.float64)
    hard = hard_assign(logits)
    regions = mean_pool(hard, values)
    labels = logits.argmax(dim=1)  # (B, N)
    for b in range(3):
        for k in range(6):
            members = values[b, labels[b] == k]
            expected = members.mean(dim=0) if len(members) else torch.zeros(8, dtype=torch.float64)
            torch.testing.assert_close(regions[b, k], expected, rtol=1e-12, atol=1e-12)

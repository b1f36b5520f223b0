"""Training losses (segclip/losses.py) against literal loop references, values and gradients.

References: contrastive loss = paper eqs. 8-10 (docs/official-implementation.md §2.1);
reconstruction = MSE
averaged per patch, then over masked patches only (docs/official-implementation.md §2.3 step 8);
superpixel KL = paper
eqs. 5-6 with the official normalisation (docs/official-implementation.md §2.2: softmax of the
one-hot / averaged rows
as logits, symmetric, halved, divided by B*N*L, nothing detached). All checks run in float64 with
rtol 1e-10.

Legend: B batch, N patches, L regions, D embedding width, P pixels per patch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segclip.losses import (
    contrastive_loss,
    reconstruction_loss,
    superpixel_kl_loss,
    superpixel_mean_assignment,
)

TOL = dict(rtol=1e-10, atol=1e-12)


# ---- contrastive (eqs. 8-10) -----------------------------------------------------------------
def ref_contrastive(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1/2)(L_t2i + L_i2t), L = -(1/B) sum_i log(exp(s z_i.t_i) / sum_j exp(s z_i.t_j))."""
    b = image.shape[0]

    def sim(i: int, j: int, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return scale * (a[i] * c[j]).sum()  # cosine similarity of unit vectors, times s

    loss_i2t = torch.zeros((), dtype=image.dtype)
    loss_t2i = torch.zeros((), dtype=image.dtype)
    for i in range(b):
        den_i2t = sum(torch.exp(sim(i, j, image, text)) for j in range(b))
        den_t2i = sum(torch.exp(sim(i, j, text, image)) for j in range(b))
        loss_i2t = loss_i2t - torch.log(torch.exp(sim(i, i, image, text)) / den_i2t) / b
        loss_t2i = loss_t2i - torch.log(torch.exp(sim(i, i, text, image)) / den_t2i) / b
    return (loss_i2t + loss_t2i) / 2


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_contrastive_matches_reference(generator: torch.Generator, batch: int) -> None:
    image = F.normalize(torch.randn(batch, 16, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, 16, generator=generator, dtype=torch.float64), dim=-1)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    lib = contrastive_loss(image, text, scale)
    ref = ref_contrastive(image, text, scale)
    torch.testing.assert_close(lib, ref, **TOL)
    lib_grads = torch.autograd.grad(lib, [image, text, scale])
    ref_grads = torch.autograd.grad(ref, [image, text, scale])
    for lib_g, ref_g in zip(lib_grads, ref_grads, strict=True):
        torch.testing.assert_close(lib_g, ref_g, **TOL)
    if batch == 1:  # one pair: nothing to contrast with
        assert lib.item() == pytest.approx(0.0, abs=1e-12)
    else:
        assert lib.item() > 0 and lib_grads[0].abs().sum() > 0


def test_contrastive_is_symmetric_and_small_when_aligned(generator: torch.Generator) -> None:
    image = F.normalize(torch.randn(6, 32, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(6, 32, generator=generator, dtype=torch.float64), dim=-1)
    scale = torch.tensor(100.0, dtype=torch.float64)
    torch.testing.assert_close(contrastive_loss(image, text, scale),
                               contrastive_loss(text, image, scale), **TOL)
    assert contrastive_loss(image, image, scale) < 1e-6 < contrastive_loss(image, text, scale)


# ---- reconstruction MSE ------------------------------------------------------------------------
def ref_reconstruction(pred: torch.Tensor, target: torch.Tensor,
                       masked: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=pred.dtype)
    count = 0
    for b in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            if masked[b, j] == 1:
                total = total + ((pred[b, j] - target[b, j]) ** 2).sum() / pred.shape[2]
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("masked_fraction", [0.0, 0.75, 1.0])
def test_reconstruction_loss_matches_reference(generator: torch.Generator,
                                               masked_fraction: float) -> None:
    pred = torch.randn(3, 10, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 10, 12, generator=generator, dtype=torch.float64)
    masked = torch.zeros(3, 10, dtype=torch.float64)
    masked[:, : int(10 * masked_fraction)] = 1.0
    masked = masked[:, torch.randperm(10, generator=generator)]
    lib = reconstruction_loss(pred, target, masked)
    ref = ref_reconstruction(pred, target, masked)
    torch.testing.assert_close(lib, ref, **TOL)
    (lib_g,) = torch.autograd.grad(lib, pred)
    if masked_fraction == 0.0:  # nothing hidden: no loss, no gradient (no division by zero)
        assert lib.item() == 0.0 and torch.equal(lib_g, torch.zeros_like(pred))
        return
    (ref_g,) = torch.autograd.grad(ref, pred)
    torch.testing.assert_close(lib_g, ref_g, **TOL)
    assert torch.equal(lib_g[masked == 0], torch.zeros_like(lib_g[masked == 0]))  # visible: 0
    if masked_fraction == 1.0:
        torch.testing.assert_close(lib, F.mse_loss(pred, target), **TOL)


# ---- superpixel KL (eqs. 5-6) ------------------------------------------------------------------
def ref_superpixel_kl(hard: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_j KL(Pbar_j || P_j) + KL(P_j || Pbar_j), halved and divided by B*N*L, with
    P_j = softmax(M_j) and Pbar_j = softmax(mean_{i in G_j} M_i) (eq. 5)."""
    b_size, n, n_regions = hard.shape
    total = torch.zeros((), dtype=hard.dtype)
    for b in range(b_size):
        for j in range(n):
            group = [i for i in range(n) if labels[b, i] == labels[b, j]]  # G_j, includes j
            mean_row = sum(hard[b, i] for i in group) / len(group)
            p_bar = torch.softmax(mean_row, dim=0)
            p = torch.softmax(hard[b, j], dim=0)
            for k in range(n_regions):
                total = total + p_bar[k] * torch.log(p_bar[k] / p[k])
                total = total + p[k] * torch.log(p[k] / p_bar[k])
    return total / 2 / (b_size * n * n_regions)


def random_one_hot(generator: torch.Generator, shape: tuple[int, int, int]) -> torch.Tensor:
    index = torch.randint(0, shape[2], shape[:2], generator=generator)
    return F.one_hot(index, shape[2]).to(torch.float64)  # (B, N, L)


@pytest.mark.parametrize("case", ["one_hot", "continuous"])
def test_superpixel_kl_matches_reference(generator: torch.Generator, case: str) -> None:
    shape = (2, 12, 4)  # (B, N, L)
    if case == "one_hot":
        hard = random_one_hot(generator, shape)
    else:  # straight-through values are one-hot, but the loss is defined for any rows
        hard = torch.rand(shape, generator=generator, dtype=torch.float64)
    hard.requires_grad_(True)
    labels = torch.randint(0, 4, shape[:2], generator=generator)
    lib = superpixel_kl_loss(hard, labels)
    ref = ref_superpixel_kl(hard, labels)
    torch.testing.assert_close(lib, ref, **TOL)
    (lib_g,) = torch.autograd.grad(lib, hard)
    (ref_g,) = torch.autograd.grad(ref, hard)
    torch.testing.assert_close(lib_g, ref_g, **TOL)
    assert lib.item() > 0 and lib_g.abs().sum() > 0  # neither side is detached


def test_superpixel_mean_assignment_matches_loops(generator: torch.Generator) -> None:
    hard = random_one_hot(generator, (3, 9, 5))
    labels = torch.randint(0, 3, (3, 9), generator=generator)
    mean = superpixel_mean_assignment(hard, labels)
    for b in range(3):
        for j in range(9):
            members = labels[b] == labels[b, j]
            torch.testing.assert_close(mean[b, j], hard[b, members].mean(dim=0), **TOL)


def test_superpixel_kl_edge_cases(generator: torch.Generator) -> None:
    hard = random_one_hot(generator, (2, 10, 4))
    # every patch its own super-patch: the mean is the row itself, the loss 0
    assert superpixel_kl_loss(hard, torch.arange(10).repeat(2, 1)).item() == 0.0
    # one super-patch per image (K=1): everything is compared to the image's mean row
    one = torch.zeros(2, 10, dtype=torch.long)
    torch.testing.assert_close(superpixel_kl_loss(hard, one), ref_superpixel_kl(hard, one), **TOL)
    # consistent assignment within each super-patch: 0
    labels = torch.tensor([[0] * 5 + [1] * 5] * 2)
    consistent = F.one_hot(labels, 4).to(torch.float64)
    assert superpixel_kl_loss(consistent, labels).item() == pytest.approx(0.0, abs=1e-15)
    # a single region (L=1): both distributions are [1]
    assert superpixel_kl_loss(torch.ones(2, 10, 1), one).item() == pytest.approx(0.0, abs=1e-7)


def test_superpixel_kl_value_for_a_two_patch_example() -> None:
    # Two patches, one super-patch, rows [1, 0] and [0, 1]: mean [.5, .5] -> uniform Pbar;
    # P = softmax([1, 0]) = (e, 1)/(e+1) for one and the mirror for the other.
    hard = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    labels = torch.tensor([[3, 3]])
    p = torch.tensor([math.e, 1.0], dtype=torch.float64) / (math.e + 1)
    u = torch.full((2,), 0.5, dtype=torch.float64)
    per_patch = (u * (u / p).log()).sum() + (p * (p / u).log()).sum()  # same for both
    expected = 2 * per_patch / 2 / (1 * 2 * 2)
    torch.testing.assert_close(superpixel_kl_loss(hard, labels), expected, **TOL)

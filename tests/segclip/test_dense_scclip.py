"""SC-CLIP (segclip/dense/scclip.py and its parts) against literal references: LOF (loops and
scikit-learn), the TopK mask, the neighbour repair and the fusion alone, then the whole mode per
head and per token in float64 on a small random 12-block ViT with QuickGELU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segclip.dense import DenseCLIP, DenseConfig
from segclip.dense.fusion import fuse_levels
from segclip.dense.outliers import local_outlier_factor, neighbour_matrix, repair, top_mask
from segclip.dense.scclip import ScclipLayers

SIZE, PATCH, GRID = 96, 16, 6  # 36 patches: more than LOF's 20 neighbours
CFG = dict(mode="scclip", width=64, layers=12, head_width=16, patch_size=PATCH,
           image_size=SIZE, embed_dim=32)


def _model() -> DenseCLIP:
    torch.manual_seed(0)
    model = DenseCLIP(DenseConfig(**CFG)).eval()
    with torch.no_grad():  # non-trivial norms and biases (open_clip initialises them to 1 / 0)
        for name, p in model.named_parameters():
            if name.endswith(("bias", "ln_pre.weight", "ln_post.weight", "ln_1.weight",
                              "ln_2.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model


# ---- literal references -----------------------------------------------------------------------
def _lof_loops(t: torch.Tensor, k: int) -> list[float]:
    n = len(t)
    dist = [[float((t[i] - t[j]).norm()) for j in range(n)] for i in range(n)]
    knn = [sorted((dist[i][j], j) for j in range(n) if j != i)[:k] for i in range(n)]
    k_dist = [knn[i][-1][0] for i in range(n)]
    lrd = [1.0 / (sum(max(k_dist[j], d) for d, j in knn[i]) / k + 1e-10) for i in range(n)]
    return [sum(lrd[j] for _, j in knn[i]) / k / lrd[i] for i in range(n)]


def _repair_loops(t: torch.Tensor, flagged: set[int], h: int, w: int) -> torch.Tensor:
    out = t.clone()
    for i in flagged:
        r, c = divmod(i, w)
        near = [(r + dr) * w + (c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (dr or dc) and 0 <= r + dr < h and 0 <= c + dc < w]
        good = [j for j in near if j not in flagged]
        if good:
            out[i] = sum(t[j] for j in good) / len(good)
    return out


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _softmax_rows(a):
    e = torch.exp(a - a.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _reference(model: DenseCLIP, image: torch.Tensor) -> torch.Tensor:
    """One image (3, S, S) -> (N, E), float64, from the equations of segclip/dense/scclip.py."""
    sd = {k: v.double() for k, v in model.visual.state_dict().items()}
    c = model.config
    heads, d = c.width // c.head_width, c.head_width
    patches = []
    for r in range(GRID):
        for col in range(GRID):
            crop = image[:, r * PATCH:(r + 1) * PATCH, col * PATCH:(col + 1) * PATCH].double()
            patches.append((sd["conv1.weight"] * crop).sum((1, 2, 3)))
    x = torch.stack([sd["class_embedding"], *patches]) + sd["positional_embedding"]  # (L, D)
    x = _ln(x, sd["ln_pre.weight"], sd["ln_pre.bias"])

    def qkv(li, tokens):
        p = f"transformer.resblocks.{li}."
        w, b = sd[p + "attn.in_proj_weight"].chunk(3), sd[p + "attn.in_proj_bias"].chunk(3)
        y = _ln(tokens, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        return [y @ w[i].T + b[i] for i in range(3)]

    outputs = {}
    for li in range(c.layers - 1):  # blocks 1..11, unchanged
        p = f"transformer.resblocks.{li}."
        q, k, v = qkv(li, x)
        outs = [_softmax_rows(q[:, s] @ k[:, s].T / math.sqrt(d)) @ v[:, s]
                for s in (slice(h * d, (h + 1) * d) for h in range(heads))]
        x = x + torch.cat(outs, -1) @ sd[p + "attn.out_proj.weight"].T + sd[
            p + "attn.out_proj.bias"]
        z = _ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        z = z @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        z = z * torch.sigmoid(1.702 * z)  # QuickGELU
        x = x + z @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        outputs[li + 1] = x
    lof = _lof_loops(outputs[11][1:], 20)
    flagged = set(sorted(range(len(lof)), key=lambda i: -lof[i])[:10])

    def fixed(tokens):
        return torch.cat([tokens[:1], _repair_loops(tokens[1:], flagged, GRID, GRID)])

    last = c.layers - 1
    p = f"transformer.resblocks.{last}."
    _, g, _ = qkv(last, fixed(outputs[9]))

    def block(tokens):
        q, k, v = qkv(last, tokens)
        outs = []
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            a = 0.5 * (_softmax_rows(k[:, s] @ k[:, s].T / math.sqrt(d))
                       + _softmax_rows(g[:, s] @ g[:, s].T / math.sqrt(d)))
            outs.append(a @ v[:, s])
        return torch.cat(outs, -1) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]

    y = block(fixed(outputs[11])) + sum(block(fixed(outputs[b])) for b in range(4, 11)) / 7
    out = _ln(y[1:], sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["proj"]
    return out / out.norm(dim=-1, keepdim=True)


# ---- the parts alone --------------------------------------------------------------------------
def test_lof_matches_loops_and_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 40, 5))
    x[0, 3] += 6.0  # two clear outliers in image 0, one in image 1
    x[0, 17] -= 5.0
    x[1, 30] += 8.0
    got = local_outlier_factor(torch.from_numpy(x), k=20).numpy()  # (2, 40)
    for b in range(2):
        assert np.allclose(got[b], _lof_loops(torch.from_numpy(x[b]), 20), rtol=1e-9)
    sklearn = pytest.importorskip("sklearn.neighbors")
    for b in range(2):
        lof = sklearn.LocalOutlierFactor(n_neighbors=20).fit(x[b])
        assert np.allclose(got[b], -lof.negative_outlier_factor_, rtol=1e-6)
    assert set(np.argsort(-got[0])[:2]) == {3, 17} and np.argmax(got[1]) == 30


def test_top_mask_takes_the_count_highest_per_image():
    scores = torch.tensor([[0.1, 5.0, 0.3, 4.0, 0.2], [9.0, 0.0, 8.0, 7.0, 1.0]])
    mask = top_mask(scores, 2)
    assert mask.tolist() == [[0, 1, 0, 1, 0], [1, 0, 1, 0, 0]]


def test_repair_alone_matches_loops():
    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.standard_normal((2, 20, 3)))  # a 4 x 5 grid
    flagged = [{0, 1, 5, 6, 13}, {19}]
    mask = torch.zeros(2, 20, dtype=torch.float64)
    for b, f in enumerate(flagged):
        mask[b, list(f)] = 1.0
    got = repair(t, mask, neighbour_matrix(4, 5))
    for b in range(2):
        assert torch.allclose(got[b], _repair_loops(t[b], flagged[b], 4, 5))
    assert torch.equal(got[0, 2], t[0, 2])  # unflagged tokens untouched
    everything = repair(t, torch.ones(2, 20, dtype=torch.float64), neighbour_matrix(4, 5))
    assert torch.equal(everything, t)  # no unflagged neighbour: kept
    nb = neighbour_matrix(4, 5)
    assert nb.sum().item() == 2 * (4 * 4 + 3 * 5) + 2 * 2 * 3 * 4 and torch.equal(nb, nb.T)


def test_fusion_alone():
    main = torch.randn(2, 5, 3)
    levels = [torch.randn(2, 5, 3) for _ in range(3)]
    want = main + (levels[0] + levels[1] + levels[2]) / 3
    assert torch.allclose(fuse_levels(main, levels), want)
    with pytest.raises(ValueError):
        fuse_levels(main, [])


def test_layers_for_depth():
    assert ScclipLayers.for_depth(12) == ScclipLayers(11, 9, (4, 5, 6, 7, 8, 9, 10))
    assert ScclipLayers.for_depth(24) == ScclipLayers(23, 18, tuple(range(8, 21)))
    from segclip.errors import ConversionError

    with pytest.raises(ConversionError, match="at least 4 blocks"):
        DenseConfig(**{**CFG, "layers": 3})
    with pytest.raises(ConversionError, match="more than 20 patches"):
        DenseConfig(**{**CFG, "image_size": 64})  # 16 patches


# ---- the whole mode ---------------------------------------------------------------------------
def test_scclip_matches_literal_reference():
    model = _model()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.double()(images.double())  # (2, N, E)
    assert got.shape == (2, 36, 32)
    for b in range(2):
        want = _reference(model, images[b])
        assert torch.allclose(got[b], want, atol=1e-5), (got[b] - want).abs().max()


def test_scclip_batch_independent_and_repairs():
    model = _model()
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batch = model(images)
        single = torch.cat([model(images[i:i + 1]) for i in range(3)])
        naclip = DenseCLIP(DenseConfig(**{**CFG, "mode": "naclip"}))
        naclip.load_state_dict(model.state_dict())
        other = naclip.eval()(images)
    assert torch.allclose(batch, single, atol=1e-6)
    assert (batch - other).abs().max() > 1e-3


def test_scclip_onnx_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from segclip.export.dense import export_dense_image_onnx

    model = _model()
    path = tmp_path / "image.onnx"
    ops = export_dense_image_onnx(model, path)
    assert ops["TopK"] >= 2  # the LOF neighbours and the anomaly TopK are in the graph
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(images).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["patch_emb"], {"image": images.numpy()})
    assert got.shape == (3, 36, 32)
    assert np.abs(got - want).max() <= 1e-4

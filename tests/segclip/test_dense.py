"""Dense CLIP modes (segclip/dense) against literal references written from the equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segclip.dense import MODES, DenseCLIP, DenseConfig, gaussian_bias
from segclip.dense.model import config_from_state, dense_from_state
from segclip.errors import ConversionError

SIZE, PATCH = 96, 16  # 6 x 6 grid
CFG = dict(width=64, layers=3, head_width=16, patch_size=PATCH, image_size=SIZE, embed_dim=32)
LAST_BLOCK_MODES = [m for m in MODES if m != "scclip"]  # scclip: test_dense_scclip.py


def _model(mode: str) -> DenseCLIP:
    torch.manual_seed(0)
    model = DenseCLIP(DenseConfig(mode=mode, **CFG)).eval()
    with torch.no_grad():  # non-trivial norms and biases (open_clip initialises them to 1 / 0)
        for name, p in model.named_parameters():
            if name.endswith(("bias", "ln_pre.weight", "ln_post.weight", "ln_1.weight",
                              "ln_2.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model


# ---- literal reference ------------------------------------------------------------------------
def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _softmax_rows(a):
    e = torch.exp(a - a.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _bias_loops(h, w, sigma=5.0):
    n = h * w
    g = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            d2 = (i // w - j // w) ** 2 + (i % w - j % w) ** 2
            g[1 + i, 1 + j] = math.exp(-d2 / (2 * sigma ** 2))
    return g


def _reference(model: DenseCLIP, image: torch.Tensor) -> torch.Tensor:
    """One image (3, S, S) -> (N, E), float64, per head and per token."""
    sd = {k: v.double() for k, v in model.visual.state_dict().items()}
    c = model.config
    g = c.grid
    patches = []
    for r in range(g):  # the conv as a matrix product per patch
        for col in range(g):
            crop = image[:, r * PATCH:(r + 1) * PATCH, col * PATCH:(col + 1) * PATCH].double()
            patches.append((sd["conv1.weight"] * crop).sum((1, 2, 3)))
    x = torch.stack([sd["class_embedding"], *patches]) + sd["positional_embedding"]  # (L, D)
    x = _ln(x, sd["ln_pre.weight"], sd["ln_pre.bias"])
    heads, d = c.width // c.head_width, c.head_width
    for li in range(c.layers):
        p = f"transformer.resblocks.{li}."
        wq, wk, wv = sd[p + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[p + "attn.in_proj_bias"].chunk(3)
        wo, bo = sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"]
        y = _ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
        last = li == c.layers - 1
        outs = []
        for hd in range(heads):
            s = slice(hd * d, (hd + 1) * d)
            qh, kh, vh = q[:, s], k[:, s], v[:, s]
            if not last:
                a = _softmax_rows(qh @ kh.T / math.sqrt(d))
            elif c.mode == "maskclip":
                a = torch.eye(len(x), dtype=torch.float64)
            elif c.mode == "clearclip":
                a = _softmax_rows(qh @ qh.T / math.sqrt(d))
            elif c.mode == "sclip":
                a = (_softmax_rows(qh @ qh.T / math.sqrt(d))
                     + _softmax_rows(kh @ kh.T / math.sqrt(d)))
            else:  # naclip
                a = _softmax_rows(kh @ kh.T / math.sqrt(d) + _bias_loops(g, g, c.sigma))
            outs.append(a @ vh)
        attn = torch.cat(outs, -1) @ wo.T + bo
        if not last:
            x = x + attn
            z = _ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
            z = z @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
            z = z * torch.sigmoid(1.702 * z)  # QuickGELU
            x = x + z @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        else:
            x = x + attn if c.mode == "sclip" else attn  # only SCLIP keeps the residual
    out = _ln(x[1:], sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["proj"]
    return out / out.norm(dim=-1, keepdim=True)


# ---- tests ------------------------------------------------------------------------------------
def test_gaussian_bias_alone():
    bias = gaussian_bias(3, 4, sigma=5.0)
    assert bias.shape == (13, 13)
    assert torch.all(bias[0] == 0) and torch.all(bias[:, 0] == 0)
    assert torch.allclose(torch.diagonal(bias)[1:], torch.ones(12))
    # patch (0,0) -> index 1; patch (2,3) -> index 1 + 2*4 + 3 = 12: distance^2 = 4 + 9
    assert bias[1, 12].item() == pytest.approx(math.exp(-13 / 50))
    assert torch.allclose(bias.double(), _bias_loops(3, 4), atol=1e-7)
    assert torch.allclose(bias, bias.T)


@pytest.mark.parametrize("mode", LAST_BLOCK_MODES)
def test_mode_matches_literal_reference(mode):
    model = _model(mode)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.double()(images.double())  # (2, N, E)
    assert got.shape == (2, 36, 32)
    for b in range(2):
        want = _reference(model, images[b])
        assert torch.allclose(got[b], want, atol=1e-5), (got[b] - want).abs().max()


def test_modes_differ():
    images = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    outs = []
    with torch.no_grad():
        for mode in LAST_BLOCK_MODES:
            outs.append(_model(mode)(images))
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert (outs[i] - outs[j]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", LAST_BLOCK_MODES)
def test_batch_independent(mode):
    model = _model(mode)
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batch = model(images)
        single = torch.cat([model(images[i:i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-6)
    assert torch.allclose(batch.norm(dim=-1), torch.ones(3, 36), atol=1e-5)


def test_load_from_open_clip_state_dict(tmp_path):
    model = _model("naclip")
    state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "clip.pt"
    torch.save(state, path)
    from segclip.dense import load_dense

    loaded = load_dense(path, "naclip")
    assert loaded.config == DenseConfig(mode="naclip", **{**CFG, "head_width": 64})
    # head width 64 -> 1 head; the weights still load and run
    assert config_from_state(state, "sclip").grid == 6
    with pytest.raises(ConversionError, match="unknown dense mode"):
        dense_from_state(state, "segment-anything")
    del state["visual.proj"]
    with pytest.raises(ConversionError, match="visual.proj"):
        dense_from_state(state, "naclip")


@pytest.mark.parametrize("mode", LAST_BLOCK_MODES)
def test_onnx_matches_pytorch(tmp_path, mode):
    ort = pytest.importorskip("onnxruntime")
    from segclip.export.dense import export_dense_image_onnx

    model = _model(mode)
    path = tmp_path / "image.onnx"
    export_dense_image_onnx(model, path)
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(images).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["patch_emb"], {"image": images.numpy()})
    assert got.shape == (3, 36, 32)
    assert np.abs(got - want).max() <= 1e-4

"""segclip.runtime._interp: 2-tap linear taps equal torch bilinear (align_corners=False)."""

from __future__ import annotations

import numpy as np
import pytest

from segclip.runtime._interp import blend, linear_taps


@pytest.mark.parametrize("in_size, out_size", [(1, 1), (1, 5), (5, 1), (7, 3), (3, 7), (14, 224),
                                               (224, 14), (10, 10), (13, 17)])
def test_blend_equals_torch_linear(in_size, out_size):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(in_size * 100 + out_size)
    signal = rng.normal(size=(2, in_size)).astype(np.float32)
    ours = blend(signal, linear_taps(out_size, in_size), axis=1)
    expected = torch.nn.functional.interpolate(torch.from_numpy(signal)[None], size=out_size,
                                               mode="linear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, 1])
def test_blend_is_the_two_tap_formula_exactly(dtype, axis):
    """Bit for bit float32 lower * (1 - frac) + upper * frac; the input is left untouched."""
    rng = np.random.default_rng(axis)
    array = (rng.random((37, 53, 3)) * 255).astype(dtype)
    before = array.copy()
    taps = linear_taps(20, array.shape[axis])
    shape = [1, 1, 1]
    shape[axis] = -1
    frac = taps.frac.reshape(shape)
    lower = np.take(array, taps.lo, axis=axis).astype(np.float32)
    upper = np.take(array, taps.hi, axis=axis).astype(np.float32)
    got = blend(array, taps, axis=axis)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, lower * (1.0 - frac) + upper * frac)
    np.testing.assert_array_equal(array, before)


def test_taps_clamp_at_both_edges():
    taps = linear_taps(8, 2)  # upscale x4: first and last samples clamp to the edge values
    assert taps.lo.min() == 0 and taps.hi.max() == 1
    assert taps.frac[0] == 0.0 and taps.lo[-1] == 1 and taps.hi[-1] == 1


def test_rejects_empty_sizes():
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        linear_taps(0, 3)

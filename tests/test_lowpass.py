"""Tests for models/lowpass.py: DR2's P_N = up_N(down_N(x)) with the MATLAB-style cubic resizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.lowpass import lowpass, lowpass_matrix, resize_matrix
from tests.vectors import VECTORS as SHARED_VECTORS

VECTORS = SHARED_VECTORS / "dr2_lowpass_256.npz"


# ---------------------------------------------------------------------------------------------
# Independent direct implementation: a loop over output pixels, explicit index reflection, no matrices.
# ---------------------------------------------------------------------------------------------
def _keys(t: float) -> float:
    t = abs(t)
    if t <= 1.0:
        return 1.5 * t**3 - 2.5 * t**2 + 1.0
    if t <= 2.0:
        return -0.5 * t**3 + 2.5 * t**2 - 4.0 * t + 2.0
    return 0.0


def _reflect(i: int, n: int) -> int:
    """0-based index folded into [0, n) with the edge sample repeated (half-sample symmetric)."""
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - 1 - i
    return i


def _direct_resize_1d(sig: np.ndarray, out_len: int) -> np.ndarray:
    """Resize along the last axis of ``sig`` pixel by pixel, following MATLAB's imresize definition."""
    n = sig.shape[-1]
    s = out_len / n
    aa = s < 1.0
    half = 2.0 / s if aa else 2.0  # kernel half-width in input pixels
    out = np.zeros(sig.shape[:-1] + (out_len,), dtype=np.float64)
    for o in range(1, out_len + 1):
        centre = o / s + 0.5 * (1.0 - 1.0 / s)  # 1-based input coordinate
        taps, weights = [], []
        # Every 1-based input position within the (possibly stretched) support.
        for j in range(math.ceil(centre - half), math.floor(centre + half) + 1):
            d = centre - j
            w = s * _keys(s * d) if aa else _keys(d)
            taps.append(_reflect(j - 1, n))
            weights.append(w)
        total = sum(weights)
        for j, w in zip(taps, weights):
            out[..., o - 1] += (w / total) * sig[..., j]
    return out


def _direct_lowpass(img: np.ndarray, factor: int) -> np.ndarray:
    """P_N on (..., H, W) via the direct resizer: down along H then W, then up along H then W."""
    h, w = img.shape[-2:]

    def along_h(a, m):
        return np.swapaxes(_direct_resize_1d(np.swapaxes(a, -1, -2), m), -1, -2)

    small = _direct_resize_1d(along_h(img, h // factor), w // factor)
    return _direct_resize_1d(along_h(small, h), w)


# ---------------------------------------------------------------------------------------------
# Reference outputs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vectors():
    with np.load(VECTORS) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("factor", [2, 4, 8, 16])
def test_matches_reference_vectors(vectors, factor):
    ref = vectors[f"P{factor}"].astype(np.float64)
    x32 = torch.from_numpy(vectors["x"])
    err64 = np.abs(lowpass(x32.double(), factor).numpy() - ref).max()
    err32 = np.abs(lowpass(x32, factor).double().numpy() - ref).max()
    # Measured: float64 <= 1.9e-7, float32 <= 2.4e-7 (the reference itself is float32).
    assert err64 < 1e-6, err64
    assert err32 < 1e-5, err32
    # The plain numpy matrix form gives the same answer.
    a = lowpass_matrix(256, factor)
    assert np.abs(a @ vectors["x"][0].astype(np.float64) @ a.T - ref[0]).max() < 1e-6


# ---------------------------------------------------------------------------------------------
# Against the independent direct computation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,factor",
    [(32, 2), (32, 4), (32, 8), (32, 16), (64, 2), (64, 8), (256, 4), (256, 16), (48, 3), (30, 5)],
)
def test_matches_direct_computation(size, factor):
    rng = np.random.default_rng(size * 100 + factor)
    img = rng.uniform(-1.0, 1.0, size=(2, size, size))
    a = lowpass_matrix(size, factor)
    direct = _direct_lowpass(img, factor)
    assert np.abs(a @ img @ a.T - direct).max() < 1e-12
    via_torch = lowpass(torch.from_numpy(img)[None], factor)[0].numpy()
    assert np.abs(via_torch - direct).max() < 1e-12


@pytest.mark.parametrize("in_len,out_len", [(64, 16), (16, 64), (48, 16), (16, 48), (20, 20), (7, 21)])
def test_resize_matrix_matches_direct_1d(in_len, out_len):
    m = resize_matrix(in_len, out_len)
    assert m.shape == (out_len, in_len) and m.dtype == np.float64
    assert np.abs(m - _direct_resize_1d(np.eye(in_len), out_len).T).max() < 1e-12


def test_same_size_resize_is_identity():
    assert np.array_equal(resize_matrix(17, 17), np.eye(17))


# ---------------------------------------------------------------------------------------------
# Why not torch's interpolate: border handling differs, interior agrees
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [4, 8])
def test_torch_interpolate_differs_only_at_borders(factor):
    size = 128
    g = torch.Generator().manual_seed(factor)
    x = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1
    # Smooth ramp: mirror vs renormalised-truncated borders give clearly different values on it.
    ramp = torch.linspace(-1, 1, size, dtype=torch.float64)
    x = x + 2 * ramp[None, None, :, None] + ramp[None, None, None, :]
    ours = lowpass(x, factor)
    down = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    theirs = F.interpolate(down, scale_factor=factor, mode="bicubic", antialias=True, align_corners=False)
    diff = (ours - theirs).abs()[0]
    # Border effects reach 2 low-res pixels (downscale support) plus 2 more (upscale support).
    margin = 4 * factor
    interior = diff[:, margin:-margin, margin:-margin]
    border = torch.cat([diff[:, :factor, :].flatten(), diff[:, -factor:, :].flatten()])
    # Measured: interior max ~2e-15 (at margin 3N it is still ~5e-4), border max 0.08-0.1.
    assert interior.max() < 1e-10, interior.max()
    assert border.max() > 0.02, border.max()


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,factor", [(256, 2), (256, 16), (32, 4), (32, 8), (48, 3)])
def test_rows_sum_to_one(size, factor):
    d = resize_matrix(size, size // factor)
    u = resize_matrix(size // factor, size)
    np.testing.assert_allclose(d.sum(axis=1), 1.0, rtol=0, atol=1e-13)
    np.testing.assert_allclose(u.sum(axis=1), 1.0, rtol=0, atol=1e-13)
    np.testing.assert_allclose(lowpass_matrix(size, factor).sum(axis=1), 1.0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16])
def test_constant_image_is_fixed(factor):
    x = torch.full((2, 3, 64, 64), -0.37)
    torch.testing.assert_close(lowpass(x, factor), x, rtol=0, atol=1e-6)


def test_factor_one_is_identity():
    assert np.array_equal(lowpass_matrix(256, 1), np.eye(256))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(lowpass(x, 1), x)
    assert torch.equal(lowpass(x, [1, 1]), x)


def test_removes_high_frequencies():
    x = torch.zeros(1, 1, 64, 64)
    x[..., ::2, :] = 1.0  # Nyquist stripes
    y = lowpass(x, 4)
    # Away from the mirrored borders the stripes average out to their mean exactly.
    inner = y[..., 16:-16, :]
    assert inner.std() < 1e-6 and abs(inner.mean().item() - 0.5) < 1e-6
    # At the borders the mirror (edge row repeated) leaves a bounded ripple.
    assert y.std() < 0.1 * x.std()


def test_mixed_factors_equal_per_sample_calls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 64, 64, generator=g)
    factors = [4, 1, 8, 4, 2]
    mixed = lowpass(x, torch.tensor(factors))
    assert mixed.dtype == x.dtype and mixed.shape == x.shape
    for b, f in enumerate(factors):
        single = lowpass(x[b : b + 1], f)
        torch.testing.assert_close(mixed[b : b + 1], single, rtol=0, atol=1e-7)
    # An int broadcasts to the whole batch; a uniform list takes the same path.
    assert torch.equal(lowpass(x, 4), lowpass(x, [4] * 5))


def test_half_precision_input_keeps_dtype():
    x = torch.randn(1, 3, 32, 32)
    out = lowpass(x.to(torch.bfloat16), 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), lowpass(x, 4), rtol=0, atol=0.05)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        lowpass_matrix(32, 3)
    with pytest.raises(ValueError):
        lowpass(torch.zeros(2, 3, 32, 32), [4])
    with pytest.raises(ValueError):
        lowpass(torch.zeros(1, 3, 32, 16), 2)


# ---------------------------------------------------------------------------------------------
# Sizes used by the DR2 loop test vectors: 32x32 images, N in {1, 4, 8}
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [1, 4, 8])
def test_loop_vector_sizes_well_formed(factor):
    a = lowpass_matrix(32, factor)
    assert a.shape == (32, 32) and a.dtype == np.float64
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=0, atol=1e-13)
    if factor > 1:
        assert np.linalg.matrix_rank(a) == 32 // factor
        assert resize_matrix(32, 32 // factor).shape == (32 // factor, 32)
        assert resize_matrix(32 // factor, 32).shape == (32, 32 // factor)
    # Cached: the same object comes back.
    assert lowpass_matrix(32, factor) is a

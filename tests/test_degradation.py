"""Synthetic degradation: seeded per-sample draws, the explicit Gaussian kernel, and the degradation chain."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.config import Sampled
from tasks.degradation import (
    IDENTITY,
    LEVELS,
    PRESETS,
    DegradationParams,
    degrade,
    draw_degradation,
    gaussian_kernel,
    jpeg_roundtrip,
    level,
    lq_size,
    preset_spec,
    severity,
)

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "data" / "samples").glob("*.png"))
IDS = [f"img_{i:05d}" for i in range(600)]


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    assert SAMPLES, "data/samples/*.png is missing"
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in SAMPLES]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def params(**kw) -> DegradationParams:
    return dataclasses.replace(IDENTITY, **kw)


# ---------------------------------------------------------------- draws


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_draw_is_a_pure_function_of_seed_and_id(preset):
    a = draw_degradation(preset, 7, "face_001")
    assert a == draw_degradation(preset, 7, "face_001")
    assert a != draw_degradation(preset, 7, "face_002")
    assert a != draw_degradation(preset, 8, "face_001")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_draws_stay_within_the_preset(preset):
    spec = PRESETS[preset]
    draws = [draw_degradation(preset, 10000, i) for i in IDS]
    for p in draws:
        assert p.kernel_size == 41
        if p.kernel == "iso":
            assert p.sigma_y == p.sigma_x and p.theta == 0.0
        for name in ("sigma_x", "sigma_y", "theta", "scale", "noise", "jpeg_quality"):
            s, v = spec[name], getattr(p, name)
            if name in ("sigma_y", "theta") and p.kernel == "iso":
                continue
            if s.values:
                assert v in s.values, (name, v)
            else:
                assert s.low <= v <= s.high, (name, v)
        assert isinstance(p.jpeg_quality, int)
    # sets are fully covered, integer ranges include both ends, ranges are spread out
    for name, s in spec.items():
        seen = [getattr(p, name) for p in draws if not (name in ("sigma_y", "theta") and p.kernel == "iso")]
        if s.values:
            assert set(seen) == set(s.values), name
        elif isinstance(s.low, int):
            assert set(seen) == set(range(s.low, s.high + 1)), name
        else:
            span = s.high - s.low
            assert min(seen) < s.low + 0.02 * span and max(seen) > s.high - 0.02 * span, name
    if len(spec["kernel"].values) == 2:
        assert 0.4 < np.mean([p.kernel == "iso" for p in draws]) < 0.6


def test_difface_preset_is_the_celeba_test_protocol():
    spec = PRESETS["difface-celeba-test"]
    assert spec["kernel"].values == ("aniso",)
    assert spec["sigma_x"].values == spec["sigma_y"].values == (4, 8, 12, 16)
    assert np.allclose(spec["theta"].values, [0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
    assert spec["scale"].values == tuple(range(4, 41, 4))
    assert spec["noise"].values == (1, 5, 10, 15, 20)  # DifFace's nf/255 on [0, 1] is nf on 0-255
    assert spec["jpeg_quality"].values == (30, 40, 50, 60, 70)


def test_each_field_has_its_own_stream():
    g = PRESETS["gfpgan"]
    for i in IDS[:50]:
        full = draw_degradation("gfpgan", 3, i)
        only_scale = draw_degradation({"scale": g["scale"]}, 3, i)
        assert only_scale.scale == full.scale
        assert only_scale.noise == 0.0 and only_scale.sigma_x == 0.0 and only_scale.jpeg_quality is None
        # overriding one field of a preset leaves the others as they were
        assert draw_degradation({"base": "gfpgan", "noise": 0}, 3, i) == dataclasses.replace(full, noise=0.0)


def test_custom_ranges_use_sampled_syntax():
    custom = {"kernel": "aniso", "sigma_x": "1:3", "theta": [0, 1.5], "scale": {"low": 2.0, "high": 4.0},
              "noise": 5, "jpeg_quality": "30,50"}
    draws = [draw_degradation(custom, 1, i) for i in IDS[:200]]
    assert all(1 <= p.sigma_x <= 3 and p.sigma_y == p.sigma_x for p in draws)  # sigma_y follows sigma_x
    assert {p.theta for p in draws} == {0.0, 1.5}
    assert all(2 <= p.scale <= 4 and p.noise == 5.0 for p in draws)
    assert {p.jpeg_quality for p in draws} == {30, 50}
    assert preset_spec({"scale": "2:4"})["scale"] == Sampled(low=2, high=4)
    with pytest.raises(ValueError, match="unknown degradation field"):
        draw_degradation({"sigma": 2}, 1, "a")
    with pytest.raises(ValueError, match="unknown degradation preset"):
        draw_degradation("realesrgan", 1, "a")
    with pytest.raises(ValueError, match="kernel_size"):
        draw_degradation({"kernel_size": 40}, 1, "a")
    with pytest.raises(ValueError, match="kernel must be"):
        DegradationParams(kernel="motion")


# ---------------------------------------------------------------- kernel


def test_kernel_sums_to_one_and_isotropic_is_separable():
    for sigma in (0.1, 1.0, 3.7, 10.0):
        k = gaussian_kernel(41, sigma, sigma, 0.3)  # theta does nothing to an isotropic kernel
        assert k.shape == (41, 41) and abs(k.sum() - 1) < 1e-12
        g = np.exp(-0.5 * (np.arange(-20, 21) / sigma) ** 2)
        g /= g.sum()
        np.testing.assert_allclose(k, np.outer(g, g), rtol=1e-9, atol=1e-15)


def test_anisotropic_kernel_rotates():
    k0 = gaussian_kernel(41, 2.0, 6.0, 0.0)
    assert abs(gaussian_kernel(41, 2.0, 6.0, 1.1).sum() - 1) < 1e-12
    np.testing.assert_allclose(gaussian_kernel(41, 2.0, 6.0, math.pi / 2), k0.T, atol=1e-15)
    np.testing.assert_allclose(gaussian_kernel(41, 2.0, 6.0, math.pi), k0, atol=1e-15)
    assert not np.allclose(k0, k0.T)
    # its second moments are R diag(sx^2, sy^2) R^T (x: columns, y: rows), here well inside the support
    sx, sy, th = 1.5, 3.0, math.pi / 6
    k = gaussian_kernel(41, sx, sy, th)
    y, x = np.mgrid[-20:21, -20:21]
    cov = np.array([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])
    r = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    np.testing.assert_allclose(cov, r @ np.diag([sx**2, sy**2]) @ r.T, atol=1e-3)


def test_zero_sigma_is_a_delta():
    k = gaussian_kernel(41, 0.0, 0.0, 0.7)
    assert k[20, 20] == 1.0 and k.sum() == 1.0


# ---------------------------------------------------------------- degradation


def test_identity_settings_return_the_input(faces):
    x = faces[0]
    assert np.array_equal(degrade(x, IDENTITY, 1, "a"), x)
    assert np.array_equal(degrade(x, params(sigma_x=1e-3, sigma_y=1e-3), 1, "a"), x)
    odd = np.ascontiguousarray(x[:101, :77])
    assert np.array_equal(degrade(odd, IDENTITY, 1, "a"), odd)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_degrade_is_reproducible_per_sample(faces, preset):
    x = faces[1]
    p = draw_degradation(preset, 5, "s1")
    y = degrade(x, p, 5, "s1")
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert y.tobytes() == degrade(x, p, 5, "s1").tobytes()
    assert not np.array_equal(y, degrade(x, draw_degradation(preset, 5, "s2"), 5, "s2"))
    if p.noise > 0:  # the same parameters with another sample's noise
        assert not np.array_equal(y, degrade(x, p, 5, "s2"))


def test_psnr_falls_monotonically_with_scale(faces):
    def curve(x, scales):
        return [psnr(x, degrade(x, params(sigma_x=1.5, sigma_y=1.5, scale=r), 0, "f")) for r in scales]

    # every sample face over factors of 2
    for x in faces:
        got = curve(x, (1.0, 2.0, 4.0, 8.0, 16.0, 32.0))
        assert all(a > b for a, b in zip(got, got[1:])), got
    # a fine grid on the natural photos: 20753.png and 256.png are themselves upscaled from a coarse grid,
    # so a factor landing on that grid (16, 8) reconstructs them better than the factor just below it
    for name in ("20595.png", "Julia_Roberts_crop.png"):
        x = faces[[p.name for p in SAMPLES].index(name)]
        got = curve(x, (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 40.0))
        assert all(a > b for a, b in zip(got, got[1:])), (name, got)
    # floor(H / r) as the sources' int(h // r), float floor division included: 512 // 0.8 == 639.0
    assert lq_size(512, 512, 40.0) == (12, 12) and lq_size(512, 384, 0.8) == (639, 479)
    assert lq_size(20, 20, 64.0) == (1, 1)


def test_jpeg_quality_is_applied(faces):
    x = faces[2]
    sizes, errors = [], []
    for q in (10, 30, 70, 95):
        y = degrade(x, params(jpeg_quality=q), 0, "j")
        dec, nbytes = jpeg_roundtrip(x, q)
        assert np.array_equal(y, dec)  # r = 1, no blur, no noise: the JPEG round trip alone
        sizes.append(nbytes)
        errors.append(psnr(x, y))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 4, sizes
    assert errors == sorted(errors), errors

    # 8x8 block artifacts: a smooth face at q=10 jumps across block boundaries more than inside blocks
    def blockiness(img: np.ndarray) -> float:
        d = np.abs(np.diff(img.astype(np.float64).mean(axis=2), axis=1))
        at_edge = (np.arange(d.shape[1]) % 8) == 7
        return float(d[:, at_edge].mean() / d[:, ~at_edge].mean())

    # (some sample faces carry faint block edges of their own: compare with the same face without JPEG)
    smooth = params(sigma_x=3.0, sigma_y=3.0)
    for face in faces:
        before = blockiness(degrade(face, smooth, 0, "j"))
        after = blockiness(degrade(face, dataclasses.replace(smooth, jpeg_quality=10), 0, "j"))
        assert before < 1.2 and after > 2.5 * before, (before, after)


def test_noise_std_matches_delta():
    flat = np.full((256, 256, 3), 128, np.uint8)
    for delta in (5.0, 20.0):
        y = degrade(flat, params(noise=delta), 9, "n").astype(np.float64) - 128
        assert abs(y.mean()) < 0.1
        assert abs(y.std() - delta) < 0.02 * delta, y.std()
        c = np.corrcoef(y.reshape(-1, 3).T)
        assert np.abs(c[np.triu_indices(3, 1)]).max() < 0.02  # independent per channel
    a = degrade(flat, params(noise=10.0), 9, "n")
    assert np.array_equal(a, degrade(flat, params(noise=10.0), 9, "n"))
    assert not np.array_equal(a, degrade(flat, params(noise=10.0), 9, "m"))


# ---------------------------------------------------------------- severity, levels, rows


def test_severity_and_levels():
    assert severity(IDENTITY) == 0.0
    assert severity(params(sigma_x=3.0, sigma_y=3.0)) == pytest.approx(3.0)
    assert severity(params(scale=9.0)) == pytest.approx(4.0)
    assert severity(params(sigma_x=3.0, sigma_y=3.0, scale=9.0)) == pytest.approx(5.0)
    assert [level(params(scale=r)) for r in (0.8, 1.99, 2.0, 4.0, 7.9, 8.0, 16.0, 40.0)] == \
        ["x<2", "x<2", "x2-4", "x4-8", "x4-8", "x8-16", "x>=16", "x>=16"]
    assert {level(draw_degradation("difface-celeba-test", 0, i)) for i in IDS[:200]} == set(LEVELS[2:])


def test_to_row_is_flat_scalars():
    row = draw_degradation("gfpgan", 1, "r").to_row()
    assert set(row) == {"deg_kernel", "deg_kernel_size", "deg_sigma_x", "deg_sigma_y", "deg_theta", "deg_scale",
                        "deg_noise", "deg_jpeg_quality", "deg_severity", "deg_level"}
    assert all(isinstance(v, (str, int, float)) for v in row.values())
    assert IDENTITY.to_row()["deg_jpeg_quality"] is None

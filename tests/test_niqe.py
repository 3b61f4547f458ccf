"""NIQE against an independent computation of the published algorithm written differently here (OpenCV
filtering, a continuous AGGD solve, explicit MATLAB-imresize loops, reshaped blocks, a linear solve), the
pristine-fit command, and no-reference plug-ins (pyiqa-shaped) with weights from configured paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import gamma

from tasks import metrics as M
from tasks import niqe as N
from workflows.niqe_params import main as niqe_params

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _faces(size: int) -> list[np.ndarray]:
    return [cv2.resize(cv2.imread(str(p)), (size, size), interpolation=cv2.INTER_AREA)[..., ::-1].copy()
            for p in sorted(SAMPLES.glob("*.png"))]


# ---------------------------------------------------------------- an independent NIQE, written from the paper


def _ref_cubic(t: float) -> float:
    a = abs(t)
    if a <= 1:
        return 1.5 * a**3 - 2.5 * a**2 + 1
    if a <= 2:
        return -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
    return 0.0


def _ref_half(line: np.ndarray) -> np.ndarray:
    """MATLAB imresize(., 0.5) of one 1-D signal, one output sample at a time, symmetric borders."""
    n, s = len(line), 0.5
    out = []
    for i in range(math.ceil(n * s)):
        centre = (i + 1) / s + 0.5 * (1 - 1 / s)  # 1-based input coordinate
        acc = wsum = 0.0
        for j in range(math.floor(centre - 4), math.ceil(centre + 4) + 1):
            w = s * _ref_cubic(s * (centre - j))
            k = j - 1
            while k < 0 or k >= n:  # reflect: ... 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...
                k = -k - 1 if k < 0 else 2 * n - 1 - k
            acc += w * line[k]
            wsum += w
        out.append(acc / wsum)
    return np.array(out)


_GRID = np.round(np.linspace(0.2, 10.0, 9801), 3)  # MATLAB's gam = 0.2:0.001:10


def _ratio(a):
    return gamma(2 / a) ** 2 / (gamma(1 / a) * gamma(3 / a))


_GRID_RATIO = _ratio(_GRID)  # increasing in a


def _ref_aggd(x: np.ndarray, continuous: bool = False) -> tuple[float, float, float]:
    """Moment matching: the grid point nearest in ratio found by bisection of the monotone ratio (the MATLAB
    release's definition), or (continuous=True) the exact root by brentq."""
    x = x.ravel()
    sl, sr = math.sqrt(np.mean(x[x < 0] ** 2)), math.sqrt(np.mean(x[x > 0] ** 2))
    g = sl / sr
    r = np.mean(np.abs(x)) ** 2 / np.mean(x**2) * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    if continuous:
        a = brentq(lambda t: _ratio(t) - r, 0.2, 10.0, xtol=1e-12)
    else:
        i = int(np.clip(np.searchsorted(_GRID_RATIO, r), 1, len(_GRID) - 1))
        a = float(_GRID[i] if abs(_GRID_RATIO[i] - r) < abs(_GRID_RATIO[i - 1] - r) else _GRID[i - 1])
    k = math.sqrt(gamma(1 / a) / gamma(3 / a))
    return a, sl * k, sr * k


def _ref_features(z: np.ndarray) -> list[float]:
    a, bl, br = _ref_aggd(z)
    f = [a, (bl + br) / 2]
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        prod = z * np.roll(np.roll(z, dy, axis=0), dx, axis=1)
        a, bl, br = _ref_aggd(prod)
        f += [a, (br - bl) * gamma(2 / a) / gamma(1 / a), bl, br]
    return f


def _ref_niqe(rgb: np.ndarray, mu_p: np.ndarray, cov_p: np.ndarray, window: np.ndarray) -> float:
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    y = np.round(16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0)  # MATLAB rgb2ycbcr on uint8
    nb = (y.shape[0] // 96, y.shape[1] // 96)
    img = y[: nb[0] * 96, : nb[1] * 96]
    feats = []
    for scale in (1, 2):
        mu = cv2.filter2D(img, cv2.CV_64F, window, borderType=cv2.BORDER_REPLICATE)
        var = cv2.filter2D(img * img, cv2.CV_64F, window, borderType=cv2.BORDER_REPLICATE) - mu * mu
        z = (img - mu) / (np.sqrt(np.abs(var)) + 1)
        b = 96 // scale
        blocks = z.reshape(nb[0], b, nb[1], b).transpose(2, 0, 1, 3).reshape(-1, b, b)  # column-major order
        feats.append(np.array([_ref_features(blk) for blk in blocks]))
        if scale == 1:
            half = np.array([_ref_half(row) for row in img / 255.0])
            img = np.array([_ref_half(col) for col in half.T]).T * 255.0
    f = np.hstack(feats)
    d = mu_p - f.mean(axis=0)
    s = (cov_p + np.cov(f.T)) / 2
    return float(math.sqrt(d @ np.linalg.lstsq(s, d, rcond=None)[0]))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Pristine parameters fitted by the command on the sample faces at 512 px (BasicSR's npz layout)."""
    path = tmp_path_factory.mktemp("niqe") / "pris.npz"
    assert niqe_params(["--input", str(SAMPLES), "--output", str(path), "--image.size", "512"]) == 0
    return path


def test_building_blocks_match_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 23)) * 40 + 100
    rows = N.imresize_half(x)
    assert rows.shape == (19, 12)
    expected = np.array([_ref_half(c) for c in np.array([_ref_half(r) for r in x]).T]).T
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(N.imresize_half(np.full((10, 8), 7.0)), 7.0, atol=1e-12)  # weights sum to 1
    # window: MATLAB fspecial('gaussian', 7, 7/6)
    w = N.gaussian_window()
    g = np.exp(-np.arange(-3, 4) ** 2 / (2 * (7 / 6) ** 2))
    np.testing.assert_allclose(w, np.outer(g, g) / np.outer(g, g).sum(), atol=1e-15)
    # AGGD shape of known distributions: Laplacian alpha = 1, Gaussian alpha = 2; the grid is 0.001 wide
    for sample, alpha in ((rng.laplace(size=200_000), 1.0), (rng.normal(size=200_000), 2.0)):
        a, bl, br = N.aggd_params(sample)
        assert a == pytest.approx(alpha, abs=0.03) and bl == pytest.approx(br, rel=0.02)
        assert a == pytest.approx(_ref_aggd(sample, continuous=True)[0], abs=6e-4)  # the grid's resolution
        assert a == pytest.approx(_ref_aggd(sample)[0], abs=1e-9)  # the same grid point


def test_niqe_equals_independent_computation(pristine):
    params = N.load_niqe_params(str(pristine))
    assert params.mu.shape == (36,) and params.cov.shape == (36, 36) and params.window.shape == (7, 7)
    with np.load(pristine) as z:  # BasicSR's layout, so BasicSR/pyiqa read it too
        assert z["mu_pris_param"].shape == (1, 36) and set(z.files) == {"mu_pris_param", "cov_pris_param",
                                                                         "gaussian_window"}
    face = _faces(512)[0][100:400, 90:420]  # at the fitted scale: 3 x 3 blocks of 96, the rest cropped
    blurred = cv2.GaussianBlur(face, (0, 0), 2.0)
    ours = N.niqe_batch([face, blurred], params)
    ref = [_ref_niqe(im, params.mu, params.cov, params.window) for im in (face, blurred)]
    np.testing.assert_allclose(ours, ref, rtol=1e-8)
    assert ours[1] > ours[0] + 1.0  # and the blurred copy is far less natural
    assert np.isnan(N.niqe_batch([face[:64, :64]], params)[0])  # smaller than one block: no number


def test_suite_niqe_and_no_reference_plugins(pristine, tmp_path):
    faces = np.stack(_faces(96)[:2])
    (tmp_path / "iqa.json").write_text(json.dumps({"scale": 10.0}))
    plugins = {"meanlevel": {"class": "tests.plugins:MeanLevelIQA", "weights": str(tmp_path / "iqa.json")},
               "nolevel": {"class": "tests.plugins:MeanLevelIQA"},
               "musiq": {"class": "tasks.iqa_plugins:PyIQAMetric", "kwargs": {"metric": "musiq"}}}
    suite = M.MetricSuite(["niqe", "meanlevel", "nolevel", "musiq", "psnr_y"], weights={"niqe": str(pristine)},
                          plugins=plugins)
    assert set(suite.unavailable) == {"nolevel", "musiq"}
    assert "no weights configured" in suite.unavailable["nolevel"]
    assert "pyiqa musiq: no weights configured" in suite.unavailable["musiq"]
    assert suite.plugin_info["meanlevel"][1] is True and "mean level" in suite.plugin_info["meanlevel"][3]
    out = suite(faces, None)  # real-world: no-reference metrics only
    np.testing.assert_allclose(out.values["niqe"], N.niqe_batch(list(faces), N.load_niqe_params(str(pristine))))
    np.testing.assert_allclose(out.values["meanlevel"], faces.reshape(2, -1).mean(axis=1) / 255 * 10.0)
    assert np.isnan(out.values["psnr_y"]).all() and "psnr_y" in out.not_applicable
    no_params = M.MetricSuite(["niqe"])
    assert "niqe_pris_params.npz" in no_params.unavailable["niqe"]
    missing = M.MetricSuite(["niqe"], weights={"niqe": str(tmp_path / "absent.npz")})
    assert "absent.npz" in missing.unavailable["niqe"]
    with pytest.raises(ValueError, match="kind"):
        M.MetricSuite(["x"], plugins={"x": {"class": "tests.plugins:BrightenEnhancer"}})
    with pytest.raises(ValueError, match="unknown"):
        M.MetricSuite(["meanlevel"])  # a plug-in name without its plug-in

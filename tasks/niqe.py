"""NIQE (Mittal, Soundararajan, Bovik 2013, "Making a 'completely blind' image quality analyzer"), from the paper
and its MATLAB release (niqe_release: computequality.m, computefeature.m, estimatemodelparam.m).

Per image, on the luma in [0, 255] (BT.601 Y, rounded as MATLAB's rgb2ycbcr on uint8 gives it), cropped to
whole 96x96 blocks:
1. MSCN coefficients: mu = w * I, sigma = sqrt(|w * I^2 - mu^2|) with the 7x7 Gaussian window w (replicate
   borders), MSCN = (I - mu) / (sigma + 1).
2. Per block, 18 features: an AGGD fit of the MSCN block (alpha, (beta_l + beta_r) / 2) and, for each of the four
   neighbour products (horizontal, vertical, two diagonals; circular shifts as the MATLAB circshift), an AGGD
   fit (alpha, mean, beta_l, beta_r). AGGD alpha by moment matching on MATLAB's grid 0.2:0.001:10.
3. The same at half scale (MATLAB imresize 0.5: bicubic with antialiasing, symmetric borders) on 48x48 blocks:
   36 features per block.
4. A multivariate Gaussian (mean, covariance of the blocks' features; NaN rows left out of the covariance) is
   compared with the pristine one: NIQE = sqrt((mu_p - mu)^T pinv((S_p + S) / 2) (mu_p - mu)). Lower is better.

Pristine parameters come from an .npz with BasicSR's `niqe_pris_params.npz` layout (`mu_pris_param` (1, 36),
`cov_pris_param` (36, 36), `gaussian_window` (7, 7)); BasicSR's file holds the published ones (fitted on the
125 pristine images of the MATLAB release). `fit_pristine` fits new ones from clean images as
estimatemodelparam.m does: blocks whose sharpness (mean sigma) exceeds 0.75 of the image's sharpest block.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import convolve
from scipy.special import gamma

__all__ = [
    "NIQEParams",
    "aggd_params",
    "fit_pristine",
    "gaussian_window",
    "imresize_half",
    "load_niqe_params",
    "luma",
    "mscn",
    "niqe",
    "niqe_features",
]

BLOCK = 96
SHARPNESS_THRESHOLD = 0.75  # estimatemodelparam.m's sh_th

# The AGGD shape grid of estimateaggdparam.m and its moment ratio r(a) = G(2/a)^2 / (G(1/a) G(3/a)).
_ALPHAS = np.arange(0.2, 10.001, 0.001)
_RATIOS = gamma(2 / _ALPHAS) ** 2 / (gamma(1 / _ALPHAS) * gamma(3 / _ALPHAS))


def gaussian_window(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    """MATLAB fspecial('gaussian', 7, 7/6): NIQE's window (sum 1)."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 studio-swing Y of an RGB uint8 image, rounded as MATLAB's rgb2ycbcr returns it for uint8: float64."""
    x = rgb.astype(np.float64) / 255.0
    return np.round(16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2])


def _cubic(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return ((1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1)
            + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2)))


def _resize_matrix(n: int, scale: float) -> np.ndarray:
    """(ceil(n * scale), n) matrix of MATLAB imresize's bicubic contributions with antialiasing (scale < 1)."""
    out = math.ceil(n * scale)
    width = 4.0 / scale  # the cubic kernel stretched by 1 / scale: the antialiasing filter
    x = np.arange(1, out + 1) / scale + 0.5 * (1 - 1 / scale)  # output centres in 1-based input coordinates
    left = np.floor(x - width / 2)
    taps = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]
    w = scale * _cubic(scale * (x[:, None] - taps))
    w /= w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n), np.arange(n)[::-1]])  # symmetric padding
    cols = mirror[(taps.astype(np.int64) - 1) % (2 * n)]
    m = np.zeros((out, n))
    np.add.at(m, (np.repeat(np.arange(out), taps.shape[1]), cols.ravel()), w.ravel())
    return m


def imresize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB imresize(img, 0.5) (bicubic, antialiased) of a 2-D float image, unrounded."""
    h, w = img.shape
    return _resize_matrix(h, 0.5) @ img @ _resize_matrix(w, 0.5).T


def mscn(img: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(MSCN coefficients, local sigma) with replicate borders."""
    mu = convolve(img, window, mode="nearest")
    sigma = np.sqrt(np.abs(convolve(img * img, window, mode="nearest") - mu * mu))
    return (img - mu) / (sigma + 1), sigma


def aggd_params(x: np.ndarray) -> tuple[float, float, float]:
    """(alpha, beta_left, beta_right) of an asymmetric generalised Gaussian by moment matching."""
    x = x.ravel()
    left, right = x[x < 0], x[x > 0]
    left_std = np.sqrt(np.mean(left * left)) if left.size else np.nan
    right_std = np.sqrt(np.mean(right * right)) if right.size else np.nan
    g = left_std / right_std
    rhat = np.mean(np.abs(x)) ** 2 / np.mean(x * x)
    rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    if not np.isfinite(rnorm):
        return np.nan, np.nan, np.nan
    alpha = float(_ALPHAS[np.argmin((_RATIOS - rnorm) ** 2)])
    k = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, float(left_std * k), float(right_std * k)


_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # computefeature.m's circshift offsets


def _block_features(block: np.ndarray) -> list[float]:
    alpha, bl, br = aggd_params(block)
    feat = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        alpha, bl, br = aggd_params(block * np.roll(block, shift, axis=(0, 1)))
        mean = (br - bl) * gamma(2 / alpha) / gamma(1 / alpha) if np.isfinite(alpha) else np.nan
        feat += [alpha, mean, bl, br]
    return feat


def niqe_features(y: np.ndarray, window: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(features (n_blocks, 36), sharpness (n_blocks,)) of a luma image in [0, 255], cropped to whole blocks.

    Blocks are ordered column-major (as the MATLAB im2col / BasicSR loops); sharpness is the block's mean sigma
    at full scale (estimatemodelparam.m's patch selection).
    """
    nh, nw = y.shape[0] // block, y.shape[1] // block
    if nh == 0 or nw == 0:
        raise ValueError(f"NIQE needs an image of at least {block}x{block}, got {y.shape}")
    img = np.asarray(y, np.float64)[: nh * block, : nw * block]
    per_scale, sharp = [], None
    for scale in (1, 2):
        z, sigma = mscn(img, window)
        b = block // scale
        cells = [(i, j) for j in range(nw) for i in range(nh)]
        per_scale.append(np.array([_block_features(z[i * b:(i + 1) * b, j * b:(j + 1) * b]) for i, j in cells]))
        if scale == 1:
            sharp = np.array([sigma[i * b:(i + 1) * b, j * b:(j + 1) * b].mean() for i, j in cells])
            img = imresize_half(img / 255.0) * 255.0
    return np.concatenate(per_scale, axis=1), sharp


@dataclass(frozen=True)
class NIQEParams:
    """Pristine MVG: mean (36,), covariance (36, 36), and the 7x7 window the features use."""

    mu: np.ndarray
    cov: np.ndarray
    window: np.ndarray
    source: str = ""

    def to_npz(self) -> bytes:
        """BasicSR's niqe_pris_params.npz layout."""
        buf = io.BytesIO()
        np.savez(buf, mu_pris_param=self.mu.reshape(1, -1), cov_pris_param=self.cov, gaussian_window=self.window)
        return buf.getvalue()


def load_niqe_params(uri: str, storage_options: dict | None = None) -> NIQEParams:
    """Read niqe_pris_params.npz (mu_pris_param, cov_pris_param, gaussian_window) from a path / fsspec URI."""
    from tasks.storage import get_fs

    fs, path = get_fs(uri, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"NIQE pristine parameters not found: {uri}") from None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        missing = [k for k in ("mu_pris_param", "cov_pris_param", "gaussian_window") if k not in z.files]
        if missing:
            raise ValueError(f"NIQE parameters {uri} lack {missing} (BasicSR niqe_pris_params.npz layout expected)")
        mu = np.asarray(z["mu_pris_param"], np.float64).ravel()
        cov = np.asarray(z["cov_pris_param"], np.float64)
        window = np.asarray(z["gaussian_window"], np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36) or window.ndim != 2:
        raise ValueError(f"NIQE parameters {uri}: expected mu (36,), cov (36, 36), a 2-D window; got "
                         f"{mu.shape}, {cov.shape}, {window.shape}")
    return NIQEParams(mu, cov, window, uri)


def niqe(y: np.ndarray, params: NIQEParams, block: int = BLOCK) -> float:
    """NIQE of a luma image in [0, 255] (see `luma`) against pristine parameters; lower is better."""
    feats, _ = niqe_features(y, params.window, block)
    mu = np.nanmean(feats, axis=0)
    clean = feats[~np.isnan(feats).any(axis=1)]
    cov = np.cov(clean, rowvar=False) if len(clean) > 1 else np.zeros((feats.shape[1],) * 2)
    d = params.mu - mu
    return float(np.sqrt(d @ np.linalg.pinv((params.cov + cov) / 2) @ d))


def fit_pristine(lumas: Iterable[np.ndarray], window: np.ndarray | None = None, block: int = BLOCK,
                 sharpness_threshold: float = SHARPNESS_THRESHOLD, source: str = "") -> NIQEParams:
    """Pristine MVG from clean images' luma (estimatemodelparam.m): each image's blocks sharper than
    `sharpness_threshold` x its sharpest block, features pooled; NaN rows dropped."""
    window = gaussian_window() if window is None else np.asarray(window, np.float64)
    kept = []
    for y in lumas:
        feats, sharp = niqe_features(y, window, block)
        kept.append(feats[sharp > sharpness_threshold * sharp.max()])
    if not kept:
        raise ValueError("no images to fit NIQE pristine parameters on")
    feats = np.concatenate(kept)
    feats = feats[~np.isnan(feats).any(axis=1)]
    if len(feats) <= feats.shape[1]:
        raise ValueError(f"{len(feats)} sharp blocks are too few for a 36-d covariance: give more clean images")
    return NIQEParams(feats.mean(axis=0), np.cov(feats, rowvar=False), window, source)


def niqe_batch(images: Sequence[np.ndarray], params: NIQEParams, block: int = BLOCK) -> np.ndarray:
    """NIQE of RGB uint8 (H, W, 3) images: float64 (B,); NaN for an image smaller than one block."""
    return np.array([niqe(luma(im), params, block) if min(im.shape[:2]) >= block else np.nan for im in images],
                    dtype=np.float64)

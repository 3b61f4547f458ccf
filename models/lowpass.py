"""DR2 low-pass filter: P_N(x) = up_N(down_N(x)) with the MATLAB-imresize-style cubic resizer.

The resizer (the "Resizer" used by ILVR and DR2) is Keys cubic (a = -0.5, width 4), antialiased on
downscaling only (kernel s*h(s*t), width 4/s), with per-output-pixel weights normalised to sum 1 and
symmetric mirror borders (edge pixel repeated). It is linear and separable, so for a square image

    P_N(x) = A x A^T,   A = U @ D,   D: (n/N, n) resize by 1/N,   U: (n, n/N) resize by N.

``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` matches it in the interior but not
at the borders (it renormalises truncated kernels instead of mirroring), hence this module.

Cost on GPU: two (n x n) matmuls per channel, ~0.2 GFLOP per 3x256x256 image, negligible next to
the UNet forward of a diffusion step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["resize_matrix", "lowpass_matrix", "lowpass"]

_KERNEL_WIDTH = 4.0


def _cubic(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB imresize 'bicubic')."""
    a = np.abs(t)
    a2, a3 = a * a, a * a * a
    inner = 1.5 * a3 - 2.5 * a2 + 1.0
    outer = -0.5 * a3 + 2.5 * a2 - 4.0 * a + 2.0
    return np.where(a <= 1.0, inner, np.where(a <= 2.0, outer, 0.0))


def resize_matrix(in_len: int, out_len: int) -> np.ndarray:
    """The 1-D resizer from ``in_len`` to ``out_len`` samples as a float64 (out_len, in_len) matrix.

    Scale is ``out_len / in_len``; the kernel is stretched (antialiased) only when downscaling.
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"lengths must be positive, got {in_len} -> {out_len}")
    scale = out_len / in_len
    if scale < 1.0:
        width = _KERNEL_WIDTH / scale

        def kernel(t):
            return scale * _cubic(scale * t)
    else:
        width = _KERNEL_WIDTH
        kernel = _cubic

    x = np.arange(1, out_len + 1, dtype=np.float64)  # 1-based output coordinates
    # The centring shift is zero when in_len * scale == out_len exactly, as here.
    u = (x - (out_len - in_len * scale) / 2.0) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input positions
    w = kernel(u[:, None] - idx)
    sums = w.sum(axis=1, keepdims=True)
    sums[sums == 0] = 1.0
    # Normalise over all taps (including out-of-range ones) before mirroring, as MATLAB does.
    w = w / sums

    # Symmetric borders: positions fold onto 0..n-1, n-1..0 (period 2n).
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]

    mat = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_len)[:, None], src.shape)
    np.add.at(mat, (rows, src), w)  # mirrored taps may hit the same input pixel twice
    return mat


@functools.lru_cache(maxsize=64)
def _lowpass_matrix_cached(size: int, factor: int) -> np.ndarray:
    if factor == 1:
        mat = np.eye(size)
    else:
        small = size // factor
        mat = resize_matrix(small, size) @ resize_matrix(size, small)
    mat.setflags(write=False)  # shared through the cache
    return mat


def lowpass_matrix(size: int, factor: int) -> np.ndarray:
    """A = U @ D (float64, (size, size), read-only) so that P_N(x) = A x A^T; factor 1 gives identity."""
    size, factor = int(size), int(factor)
    if factor < 1 or size < 1 or size % factor:
        raise ValueError(f"factor must be a positive divisor of size, got size={size}, factor={factor}")
    return _lowpass_matrix_cached(size, factor)


@functools.lru_cache(maxsize=128)
def _device_matrices(
    size: int, factor: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (size, factor, device, dtype): no rebuild or host->device copy per sampling step.
    a = torch.from_numpy(np.array(lowpass_matrix(size, factor))).to(device=device, dtype=dtype)
    return a, a.t().contiguous()


def _apply(x: torch.Tensor, factor: int, dtype: torch.dtype) -> torch.Tensor:
    if factor == 1:
        return x.clone()
    a, at = _device_matrices(x.shape[-1], factor, x.device, dtype)
    if x.device.type == "cpu" and x.shape[0] > 1:
        # CPU GEMM kernels round differently with the folded batch size (x @ at is one (B*C*n, n) product), so a
        # sample's low-pass would depend on how many batch mates share its factor: one sample at a time.
        return torch.cat([_apply(x[b:b + 1], factor, dtype) for b in range(x.shape[0])])
    return torch.matmul(torch.matmul(a, x.to(dtype)), at).to(x.dtype)


def lowpass(x: torch.Tensor, factors: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """P_N applied per sample: x (B, C, n, n), factors an int or one per sample (B,).

    Computed as A_b x_b A_b^T in x's dtype on x's device (float32 for half/bfloat16 inputs). Equal
    factors take one matmul pair over the whole batch; mixed factors are grouped by value.
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected (B, C, n, n), got {tuple(x.shape)}")
    if torch.is_tensor(factors):
        fs = [int(f) for f in factors.reshape(-1).tolist()]
    elif isinstance(factors, int | np.integer):
        fs = [int(factors)] * x.shape[0]
    else:
        fs = [int(f) for f in factors]
    if len(fs) != x.shape[0]:
        raise ValueError(f"got {len(fs)} factors for a batch of {x.shape[0]}")
    size = x.shape[-1]
    for f in set(fs):
        lowpass_matrix(size, f)  # validates f
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    unique = sorted(set(fs))
    if len(unique) == 1:
        return _apply(x, unique[0], dtype)
    out = torch.empty_like(x)
    for f in unique:
        idx = torch.tensor([i for i, g in enumerate(fs) if g == f], device=x.device)
        out[idx] = _apply(x.index_select(0, idx), f, dtype)
    return out

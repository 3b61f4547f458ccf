"""Closed-form Gaussian-blur guidance (DynFaceRestore-style) and the DGSA guidance scale map.

Guidance step (the paper's closed-form guidance). Given the diffusion model's clean estimate x0 and G
guidance images y_g that are x blurred with *known* Gaussian kernels k_g (DynFaceRestore's DBLM outputs,
sigma1 > sigma2 > sigma3), the guided estimate minimises

    0.5 ||x - x0||^2 + sum_g gamma_g / 2 ||k_g * x - y_g||^2 .

With circular convolution every k_g * . is diagonal in Fourier (K_g = psf2otf(k_g)), so the normal
equations (I + sum_g gamma_g K_g^T K_g) x = x0 + sum_g gamma_g K_g^T y_g are solved per frequency:

    X = (F(x0) + sum_g gamma_g conj(K_g) F(y_g)) / (1 + sum_g gamma_g |K_g|^2).

The circular model would wrap opposite face borders into each other, so x0 and the guides are reflect-padded
by P = ceil(3 max sigma) first and the solution is cropped back. This padded solve is EXACT ONLY FOR THE
CIRCULAR MODEL (of the padded image). Against the minimiser with reflect-boundary blur (what a blurred face
crop is) it differs near the borders: up to ~0.1 (in [-1, 1] units) at the edge, decaying within a band of
~3 sigma (< 3e-3 beyond it, < 1e-4 beyond 6 sigma; tests/test_guidance.py measures it against a dense solve).

A per-pixel scale map M then blends x0 + M (X - x0). DynFaceRestore's DGSA is a learned network of
(guide, x0_t, t) evaluated at every step; `guidance_scale_map` is a TRAINING-FREE SUBSTITUTE (structure-
tensor coherence, computed once per sample) resting on one assumption: guidance helps on coherent contours
and hurts in texture, so it is strong on edges and weak (floor) elsewhere. A learned map plugs in per step
(models.dynamic.dynamic_sample's step_scale_map).

Kernels. ``gaussian_kernel`` is the discrete Gaussian: exp(-(i^2 + j^2) / (2 sigma^2)) sampled at integer
offsets |i|, |j| <= r = ceil(3 sigma), normalised to sum 1 (exactly the outer product of the normalised 1-D
kernel). Its OTF is real (the kernel is symmetric), so the solvers use real multipliers on ``rfft2``
spectra, built separably from 1-D cosine sums (equal to ``psf2otf(gaussian_kernel(sigma), shape)`` to
rounding; a kernel wider than the image aliases circularly as a circular convolution should).

Precision: everything is computed in float64 for float64 inputs and in float32 otherwise (half/bfloat16
are upcast), and returned in the input's dtype. The system is well conditioned (denominator >= 1), so
float32 is accurate to ~1e-6 relative.

Pure torch; no I/O. Cost per step: one rfft2/irfft2 per channel of x0 and of each active guide at the padded
size, negligible next to a UNet forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PAD_MODES",
    "GuidanceSolver",
    "ScaleMapNet",
    "apply_scale_map",
    "blur",
    "closed_form_guidance",
    "gaussian_kernel",
    "gaussian_kernel1d",
    "guidance_scale_map",
    "kernel_radius",
    "psf2otf",
]

# reflect: mirror without repeating the edge (torch/numpy "reflect", d c b | a b c d | c b a), any width.
# symmetric: mirror repeating the edge (MATLAB "symmetric"); replicate: edge value; constant: zeros;
# circular: no padding (the plain circular-convolution model).
PAD_MODES = ("reflect", "symmetric", "replicate", "constant", "circular")


# ---------------------------------------------------------------------------------------------------------
# Kernels and OTFs
# ---------------------------------------------------------------------------------------------------------
def kernel_radius(sigma: float) -> int:
    """r = ceil(3 sigma) (0 for sigma 0); 3*sigma is rounded to 9 decimals first so 3 * (1/3) gives 1."""
    sigma = _check_sigma(sigma)
    return int(math.ceil(round(3.0 * sigma, 9)))


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    return sigma


def _check_size(sigma: float, size: int | None) -> int:
    if size is None:
        return 2 * kernel_radius(sigma) + 1
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1, got {size}")
    return size


def gaussian_kernel1d(sigma: float, size: int | None = None, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Normalised sampled 1-D Gaussian exp(-i^2 / (2 sigma^2)), i = -(size//2)..size//2; sigma 0 -> delta."""
    sigma = _check_sigma(sigma)
    size = _check_size(sigma, size)
    r = size // 2
    if sigma == 0.0:
        k = torch.zeros(size, dtype=torch.float64)
        k[r] = 1.0
    else:
        i = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-(i * i) / (2.0 * sigma * sigma))
        k = k / k.sum()
    return k.to(dtype=dtype, device=device)


def gaussian_kernel(sigma: float, size: int | None = None, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The discrete 2-D Gaussian (size, size): exp(-(x^2 + y^2) / (2 sigma^2)) on integer offsets, sum 1.

    Default size 2*ceil(3 sigma) + 1 (odd, >= 1); an explicit size must be odd. sigma 0 gives the delta.
    Built (in float64) as the outer product of the normalised 1-D kernel, which equals the normalised
    sampled 2-D Gaussian exactly in real arithmetic.
    """
    k1 = gaussian_kernel1d(sigma, size, dtype=torch.float64)
    return torch.outer(k1, k1).to(dtype=dtype, device=device)


def psf2otf(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """MATLAB psf2otf: zero-pad kernel (..., kh, kw) to shape (H, W), roll by (-(kh//2), -(kw//2)), fft2.

    Returns the complex (..., H, W) OTF; ifft2(fft2(x) * otf) is the circular convolution of x with the
    kernel centred at (kh//2, kw//2). The kernel must fit in shape.
    """
    if kernel.dim() < 2:
        raise ValueError(f"kernel must be at least 2-D, got shape {tuple(kernel.shape)}")
    H, W = int(shape[0]), int(shape[1])
    kh, kw = kernel.shape[-2:]
    if kh > H or kw > W:
        raise ValueError(f"kernel {kh}x{kw} does not fit in {H}x{W}")
    if not kernel.is_floating_point():
        kernel = kernel.to(torch.float64)
    padded = F.pad(kernel, (0, W - kw, 0, H - kh))
    padded = torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    return torch.fft.fft2(padded)


def _gaussian_otf1d(sigma: float, n: int, m: int, dtype: torch.dtype, device) -> Tensor:
    """First m entries of the real 1-D OTF of gaussian_kernel1d(sigma) on a circle of n samples.

    K(u) = sum_{|j| <= r} w_j cos(2 pi j u / n); the phase index j*u is reduced mod n in integers, so the
    value is exact to rounding for any r (a kernel longer than n aliases, as circular convolution does).
    """
    if sigma == 0.0:
        return torch.ones(m, dtype=dtype, device=device)
    w = gaussian_kernel1d(sigma, dtype=torch.float64)
    r = w.numel() // 2
    j = torch.arange(0, r + 1, dtype=torch.int64)
    u = torch.arange(m, dtype=torch.int64)
    phase = torch.remainder(u[:, None] * j[None, :], n).to(torch.float64) * (2.0 * math.pi / n)
    coef = w[r:].clone()
    coef[1:] *= 2.0  # w_j = w_-j
    return (torch.cos(phase) @ coef).to(dtype=dtype, device=device)


def _gaussian_otf_r(sigmas: Sequence[float], H: int, W: int, dtype: torch.dtype, device) -> Tensor:
    """Real rfft2-layout OTFs (len(sigmas), H, W//2 + 1) of gaussian_kernel(sigma) on an H x W circle."""
    wf = W // 2 + 1
    cache: dict[float, Tensor] = {}
    out = []
    for s in sigmas:
        if s not in cache:
            cache[s] = torch.outer(
                _gaussian_otf1d(s, H, H, torch.float64, None), _gaussian_otf1d(s, W, wf, torch.float64, None)
            ).to(dtype=dtype, device=device)
        out.append(cache[s])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------------------
def _pad_index(n: int, p: int, mode: str, device) -> Tensor:
    i = torch.arange(-p, n + p, device=device)
    if mode == "replicate" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "reflect":
        period = 2 * (n - 1)
        i = torch.remainder(i, period)
        return torch.where(i >= n, period - i, i)
    if mode == "symmetric":
        period = 2 * n
        i = torch.remainder(i, period)
        return torch.where(i >= n, period - 1 - i, i)
    raise ValueError(mode)


def _pad(x: Tensor, p: int, mode: str) -> Tensor:
    """Pad the last two dims by p on every side; reflect/symmetric fold repeatedly, so any p works."""
    if p == 0 or mode == "circular":
        return x
    if mode == "constant":
        return F.pad(x, (p, p, p, p))
    H, W = x.shape[-2:]
    if x.dim() == 4 and (mode == "replicate" or (mode == "reflect" and p < min(H, W))):
        return F.pad(x, (p, p, p, p), mode=mode)  # fast path, same values
    x = x.index_select(-2, _pad_index(H, p, mode, x.device))
    return x.index_select(-1, _pad_index(W, p, mode, x.device))


def _check_mode(pad: str) -> str:
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
    return pad


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Known blur
# ---------------------------------------------------------------------------------------------------------
def _per_sample(values, batch: int, name: str) -> list[float]:
    if torch.is_tensor(values):
        vals = [float(v) for v in values.detach().reshape(-1).cpu().tolist()]
        if len(vals) == 1:
            vals = vals * batch
    elif isinstance(values, int | float):
        vals = [float(values)] * batch
    else:
        vals = [float(v) for v in values]
    if len(vals) != batch:
        raise ValueError(f"got {len(vals)} {name} values for a batch of {batch}")
    return vals


def blur(x: Tensor, sigma: float | Tensor, pad: str = "reflect") -> Tensor:
    """k_sigma * x for x (B, C, H, W), sigma a float or one per sample (B,): the "known blur".

    Computed via FFT after padding by P = ceil(3 max sigma) (mode ``pad``, default reflect; "circular" = no
    padding, plain circular convolution), then cropped. Because the kernel radius is <= P the result equals
    the linear convolution of the padded image (no wrap-around). Samples with sigma 0 are returned unchanged
    (exactly). float64 in -> float64 compute, otherwise float32; returns x's dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
    mode = _check_mode(pad)
    B, C, H, W = x.shape
    sig = [_check_sigma(s) for s in _per_sample(sigma, B, "sigma")]
    if all(s == 0.0 for s in sig):
        return x.clone()
    cdt = _compute_dtype(x.dtype)
    p = 0 if mode == "circular" else max(kernel_radius(s) for s in sig)
    xp = _pad(x.to(cdt), p, mode)
    hp, wp = xp.shape[-2:]
    otf = _gaussian_otf_r(sig, hp, wp, cdt, x.device)[:, None]  # (B, 1, hp, wf)
    y = torch.fft.irfft2(torch.fft.rfft2(xp) * otf, s=(hp, wp))
    y = y[..., p : p + H, p : p + W].to(x.dtype)
    if any(s == 0.0 for s in sig):
        keep = torch.tensor([s == 0.0 for s in sig], device=x.device)[:, None, None, None]
        y = torch.where(keep, x, y)
    return y


# ---------------------------------------------------------------------------------------------------------
# Closed-form guidance
# ---------------------------------------------------------------------------------------------------------
def _table(v, B: int, G: int, name: str) -> list[list[float]]:
    """sigmas or gammas as a (B, G) table of floats, checked finite and >= 0."""
    t = torch.as_tensor(v.detach().cpu() if torch.is_tensor(v) else v, dtype=torch.float64)
    try:
        t = torch.broadcast_to(t, (B, G))
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to (B, G) = ({B}, {G})") from e
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    return t.tolist()


class GuidanceSolver:
    """closed_form_guidance for one fixed set of guides, with their side of the solve computed once.

    A sampler solves at every step with a new x0 but the same guides and sigmas; only which guides are
    active (gamma > 0) changes. The padded guides' spectra and the OTFs depend on the guides, the sigmas
    and the pad P alone, so they are computed on first use for each (sample, P) and kept: a step costs one
    rfft2/irfft2 of x0 and elementwise work.

    guides (B, G, C, H, W); sigmas (B, G) or broadcastable, >= 0. Call with x0 (R, C, H, W), the rows
    (sample indices into guides) x0 belongs to, and gamma (R, G) or broadcastable.
    rowwise (default: on CPU) solves every sample alone, so a result never depends on the rest of the
    batch (CPU FFTs may round differently with the batch); otherwise samples sharing P share one FFT.
    """

    def __init__(self, guides: Tensor, sigmas, *, pad: str = "reflect", rowwise: bool | None = None):
        if guides.dim() != 5:
            raise ValueError(f"guides must be (B, G, C, H, W), got {tuple(guides.shape)}")
        self.mode = _check_mode(pad)
        self.guides = guides
        self.B, self.G = guides.shape[:2]
        self.cdt = _compute_dtype(guides.dtype)
        self.sig = _table(sigmas, self.B, self.G, "sigmas")
        self.rowwise = guides.device.type == "cpu" if rowwise is None else rowwise
        # P -> (spectra (B, G, C, hp, wf), OTFs (B, G, 1, hp, wf), which samples are filled in)
        self._cache: dict[int, tuple[Tensor, Tensor, list[bool]]] = {}

    def _spectra(self, p: int, rows: list[int]) -> tuple[Tensor, Tensor]:
        """The guides' padded spectra and OTFs at pad p for `rows`, computed on first use."""
        B, G, C, H, W = self.guides.shape
        dev = self.guides.device
        if p not in self._cache:
            hp, wf = H + 2 * p, (W + 2 * p) // 2 + 1  # circular mode: p is 0
            cplx = torch.complex128 if self.cdt == torch.float64 else torch.complex64
            self._cache[p] = (torch.empty((B, G, C, hp, wf), dtype=cplx, device=dev),
                              torch.empty((B, G, 1, hp, wf), dtype=self.cdt, device=dev), [False] * B)
        fy, otf, filled = self._cache[p]
        for b in rows:  # once per sample and P, one sample at a time (batch-independent spectra)
            if not filled[b]:
                yp = _pad(self.guides[b].to(self.cdt), p, self.mode)
                fy[b] = torch.fft.rfft2(yp)
                otf[b] = _gaussian_otf_r(self.sig[b], yp.shape[-2], yp.shape[-1], self.cdt, dev)[:, None]
                filled[b] = True
        if rows == list(range(B)):
            return fy, otf
        it = torch.tensor(rows, device=dev)
        return fy.index_select(0, it), otf.index_select(0, it)

    def __call__(self, x0: Tensor, rows: Sequence[int], gamma) -> Tensor:
        """The guided estimate for x0 (R, C, H, W) of samples `rows`; a sample whose gammas are all 0 is
        returned as x0 bit-for-bit, and an inactive guide (gamma 0) is ignored, even NaN content."""
        rows = [int(b) for b in rows]
        if x0.dim() != 4 or x0.shape[0] != len(rows) or x0.shape[1:] != self.guides.shape[2:]:
            want = (len(rows), *self.guides.shape[2:])
            raise ValueError(f"x0 must be (len(rows), C, H, W) = {want}, got {tuple(x0.shape)}")
        gam = _table(gamma, len(rows), self.G, "gamma")
        by_pad: dict[int, list[int]] = {}
        for k, b in enumerate(rows):
            act = [s for s, g in zip(self.sig[b], gam[k]) if g > 0]
            if act:
                p = 0 if self.mode == "circular" else max(kernel_radius(s) for s in act)
                by_pad.setdefault(p, []).append(k)
        groups = [(p, [k]) for p, ks in by_pad.items() for k in ks] if self.rowwise else list(by_pad.items())
        out = x0.clone()
        for p, ks in groups:
            whole = len(ks) == len(rows)
            xs = x0 if whole else x0.index_select(0, torch.tensor(ks, device=x0.device))
            fy, otf = self._spectra(p, [rows[k] for k in ks])
            res = self._solve(xs.to(self.cdt), fy, otf, [gam[k] for k in ks], p).to(x0.dtype)
            if whole:
                out = res
            else:
                out[torch.tensor(ks, device=x0.device)] = res
        return out

    def _solve(self, x0: Tensor, fy: Tensor, otf: Tensor, gam: list[list[float]], p: int) -> Tensor:
        """X = (F(x0) + sum_g gamma_g K_g F(y_g)) / (1 + sum_g gamma_g K_g^2) on the padded grid, cropped."""
        H, W = x0.shape[-2:]
        xp = _pad(x0, p, self.mode)
        hp, wp = xp.shape[-2:]
        num = torch.fft.rfft2(xp)
        den = torch.ones((x0.shape[0], 1, hp, num.shape[-1]), dtype=self.cdt, device=x0.device)
        gamma = torch.tensor(gam, dtype=self.cdt, device=x0.device)
        for g in range(self.G):
            on = [row[g] > 0 for row in gam]
            if not any(on):
                continue
            gk = gamma[:, g, None, None, None] * otf[:, g]  # exactly 0 where gamma is 0
            fyg = fy[:, g]
            if not all(on):  # 0 * NaN would leak an inactive guide's content
                fyg = torch.where(torch.tensor(on, device=x0.device)[:, None, None, None], fyg, 0)
            num = num + gk * fyg
            den = den + gk * otf[:, g]
        return torch.fft.irfft2(num / den, s=(hp, wp))[..., p : p + H, p : p + W]


def closed_form_guidance(x0: Tensor, guides: Tensor, sigmas: Tensor, gamma: Tensor, *, pad: str = "reflect") -> Tensor:
    """argmin_x 0.5||x - x0||^2 + sum_g gamma_g/2 ||k_{sigma_g} * x - guide_g||^2, per sample.

    x0 (B, C, H, W); guides (B, G, C, H, W); sigmas, gamma (B, G) (anything broadcastable to it: floats,
    (G,), ...), all >= 0. gamma_g = 0 disables guide g exactly (its content, even NaN, and its sigma are
    ignored); a sample whose gammas are all 0 is returned as x0 bit-for-bit.

    Each sample is padded (mode ``pad``, default reflect; "circular" = no padding) by its own
    P = ceil(3 max active sigma), so a batched call equals per-sample calls; on CUDA samples sharing P are
    solved in one FFT batch. Compute in float64 for float64 x0, else float32; returns x0's dtype.
    A sampler that solves with the same guides at every step keeps a `GuidanceSolver` instead.
    """
    if x0.dim() != 4:
        raise ValueError(f"x0 must be (B, C, H, W), got {tuple(x0.shape)}")
    if guides.dim() != 5 or guides.shape[0] != x0.shape[0] or guides.shape[2:] != x0.shape[1:]:
        raise ValueError(f"guides must be (B, G, C, H, W) matching x0 {tuple(x0.shape)}, got {tuple(guides.shape)}")
    solver = GuidanceSolver(guides.to(_compute_dtype(x0.dtype)), sigmas, pad=pad)
    return solver(x0, range(x0.shape[0]), gamma)


# ---------------------------------------------------------------------------------------------------------
# DGSA: guidance scale map
# ---------------------------------------------------------------------------------------------------------
class ScaleMapNet(Protocol):
    """A map computed once can replace ``guidance_scale_map``: any callable image (B, C, H, W) in [-1, 1]
    -> (B, 1, H, W) in [0, 1], used with ``apply_scale_map``. A learned per-step DGSA (guides, x0_t, t) is
    models.dynamic.StepScaleMap instead."""

    def __call__(self, image: Tensor) -> Tensor: ...


def _luma(image: Tensor) -> Tensor:
    if image.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device)
        return (image * w[None, :, None, None]).sum(1, keepdim=True)
    return image.mean(1, keepdim=True)


def guidance_scale_map(image: Tensor, *, sigma: float = 1.5, floor: float = 0.1) -> Tensor:
    """Training-free substitute for the learned DGSA, (B, 1, H, W) in [floor, 1]: high on coherent contours,
    low in texture/flat areas (the assumption: guidance helps on edges, hurts in texture).

    For luma Y (BT.601 weights for RGB, channel mean otherwise) of the [-1, 1] image:
      1. gx, gy: central differences with replicated borders;
      2. structure tensor J = G_sigma * [[gx^2, gx gy], [gx gy, gy^2]] (reflect padding), eigenvalues
         l1 >= l2: l1 - l2 = sqrt((Jxx - Jyy)^2 + 4 Jxy^2), l1 + l2 = Jxx + Jyy;
      3. coherence c = ((l1 - l2) / (l1 + l2 + eps))^2 (1 on a straight edge, ~0 for isotropic texture),
         eps = 1e-12 + 1e-6 * mean(l1 + l2) per image;
      4. score s = G_sigma * (c * sqrt(l1 + l2)) (coherence weighted by RMS edge strength, smoothed so the
         map covers both sides of a contour);
      5. M = floor + (1 - floor) * s / max(s) per image (M = floor everywhere if s is identically 0).
    Deterministic, no learned weights; computed in float32 (float64 for float64 input).
    """
    if image.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(image.shape)}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    _check_sigma(sigma)
    x = _luma(image.to(_compute_dtype(image.dtype)))
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = 0.5 * (xp[..., 1:-1, 2:] - xp[..., 1:-1, :-2])
    gy = 0.5 * (xp[..., 2:, 1:-1] - xp[..., :-2, 1:-1])
    J = blur(torch.cat([gx * gx, gx * gy, gy * gy], dim=1), sigma)
    jxx, jxy, jyy = J[:, 0:1], J[:, 1:2], J[:, 2:3]
    tr = (jxx + jyy).clamp_min(0.0)
    diff = torch.sqrt((jxx - jyy) ** 2 + 4.0 * jxy**2)
    eps = 1e-12 + 1e-6 * tr.mean(dim=(1, 2, 3), keepdim=True)
    coherence = (diff / (tr + eps)).clamp(0.0, 1.0) ** 2
    s = blur(coherence * torch.sqrt(tr), sigma).clamp_min(0.0)
    smax = s.amax(dim=(1, 2, 3), keepdim=True)
    s = torch.where(smax > 0, s / torch.where(smax > 0, smax, torch.ones_like(smax)), torch.zeros_like(s))
    return (floor + (1.0 - floor) * s).clamp(floor, 1.0).to(image.dtype)


def apply_scale_map(x0: Tensor, X: Tensor, M: Tensor) -> Tensor:
    """x0 + M * (X - x0): M (B, 1, H, W) (or anything broadcastable) blends guided X into x0 per pixel."""
    return x0 + M * (X - x0)

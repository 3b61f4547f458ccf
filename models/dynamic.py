"""Dynamic diffusion restoration (DynFaceRestore-style): blur mapping -> DSST start step -> DDIM with
closed-form Gaussian-blur guidance at every step, on a pretrained unconditional face prior (the DR2 FFHQ-256
UNet or DifFace's FFHQ-512 UNet). Pure torch; no I/O except `DSSTTable.load` (YAML).

What is the paper's and what is a substitute (DynFaceRestore's code is not public):
- the paper's: diffusing a Gaussian-blurred, degradation-free image from a blur-dependent start step, the
  closed-form Gaussian guidance at every step (models/guidance.py), eta = std / 10 per sample, and the DDIM
  loop itself, which is DifFace's (its `ddim_sample`, reproduced sample for sample under
  convention="difface" on DifFace's recorded runs);
- TRAINING-FREE SUBSTITUTES: the DSST table (a criterion, RMS(x - k_sigma x) <= c * sqrt((1-abar)/abar), with
  c calibrated on ONE assumption: a 4 px blur at 512 starts at DifFace's t = 400; the paper's table is
  not published), the blur estimator (`SpectralBlurEstimator`, assuming a 1/f^2 face spectrum
  times a Gaussian plus a white floor) standing in for DBLM's known levels, DR2's x0-hat standing in for DBLM's
  blur-mapped image (assuming DR2's output is a smooth, degradation-free face whose residual blur the
  estimator can read), and the structure-tensor scale map standing in for the learned DGSA
  (models/guidance.py). A learned DBLM and a learned per-step DGSA plug in (tasks/dynamic_stage.py).

Sampler (`dynamic_sample`), per sample b with parameters `DynParams` (convention "call-at-start"):

    x = q_sample(x_init, start)                                   # noise ("init", start)
    for i = start .. 0 on the respaced grid:
        eps, (v ignored) = model(x, t_orig[i])
        x0 = clamp(predict_x0(x, i, eps), -1, 1)
        x0 = clamp(x0 + M * (X - x0), -1, 1),
             X = argmin 0.5||x - x0||^2 + sum_g gamma_g/2 ||k_sigma_g * x - guide_g||^2
             with gamma_g = gamma for the guides active at i (i <= starts[g]) and 0 otherwise
             M = the scale map: computed once per sample, or step_scale_map(guides, x0, t_orig[i])
        if i == 0: return x0
        x = ddim_step(x0, eps, i, eta)                             # noise ("z", i)

Guidance enters only through x0: the DDIM step keeps the RAW eps and the clipped, guided x0, exactly as
DifFace's `ddim_sample` (its regulariser edits `pred_xstart`, `pred_noise` stays the network's eps). At i = 0
abar_prev = 1, so DifFace's last "sample" is the guided x0 itself; it is returned without a draw.

Conventions (`START_CONVENTIONS`): "call-at-start" diffuses to `start` and calls the network at `start` first
(start + 1 calls), so the noise level of x always matches the timestep the network is told. "difface"
diffuses to `start` = N and calls from N - 1 (N calls; the state diffused to N is treated as the N - 1
state), DifFace's `q_sample(y, N)` + `ddim_sample_loop(start_timesteps=N)`: for ddim250 and N = 100, q_sample
at t = 400, calls at t = 396, ..., 0. Either way DSST's start for DifFace's t = 400 is index 100.

Guide schedule: guide g is active at respaced steps i <= starts[g], starts[g] = min(start, DSST(sigma_g)).
DSST is monotone (more blur -> later start), sigma_1 > sigma_2 > ..., so the blurriest guide is active from
the sample's start (start = DSST(sigma_1)) and sharper guides join at lower t, when the chain's x0-hat has
resolved detail at their scale.

Batching: one loop over steps; at step i only samples with i <= start_b go through the network (no forward
for a sample that has not started). Every random draw comes from `noise(kind, step, rows, like)`, and every
per-sample computation (network on CPU, guidance, scale map) is row-independent, so a batch with mixed
start steps gives bit-identical results to running each sample alone on CPU.

Blur estimator (training-free DBLM stand-in, `SpectralBlurEstimator`): the effective Gaussian blur of an
image is read off its radial power spectrum against the natural-image 1/f^2 prior,

    P(w) = A w^-2 exp(-s^2 w^2) + N0    (w in rad/px; a Gaussian of std s has power response exp(-s^2 w^2))

N0 = the white-noise floor (median power of the top band, at least the uint8 quantisation noise);
s^2 = minus the least-squares slope of log(P - N0) + 2 log w against w^2, over the contiguous band from
8 cycles per image up to the last frequency where the signal is 10x the floor. s is the TOTAL blur; the
estimate is the blur beyond a sharp face, sigma = sqrt(max(s^2 - s_ref^2, 0)), s_ref = 1.6 px at 512
(the sharpest face of data/samples). Guides: sigma_g = hypot(sigma, d_g) for configured extra blurs
d_1 > d_2 > ... >= 0, made by re-blurring the image by sqrt(sigma_g^2 - sigma^2) = d_g (known Gaussian).
The stage applies it to the image it diffuses (DR2's x0-hat by default), whose blur is then the only
unknown; on a raw degraded input the fit also sees noise and JPEG, which no Gaussian explains.
A learned DBLM is any callable images -> (guides (B,G,C,H,W), sigmas (B,G)) (see tasks/dynamic_stage.py).

Units: sigmas passed to the sampler and the guidance are in pixels of the image being sampled. Configured
blur values, the DSST table and the eta rule use pixels at a 512 face (`REF_SIZE`), the resolution at
which FFHQ/CelebA-HQ degradations are quoted; `DSSTTable.start_t(sigma, image_size)` converts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.diffusion import DiffusionSchedule
from models.guidance import GuidanceSolver, _luma, apply_scale_map, blur, guidance_scale_map
from models.noise import NoiseSource

# The network: x (B,C,H,W) and ORIGINAL integer timesteps (B,) -> (B, 2C, H, W) = [eps, v] (or (B, C) eps).
ModelFn = Callable[[Tensor, Tensor], Tensor]
# A per-step guidance scale map: (guides (B,G,C,H,W), clipped x0-hat (B,C,H,W), original t (B,)) -> (B,1,H,W).
StepScaleMap = Callable[[Tensor, Tensor, Tensor], Tensor]
# call-at-start: diffuse to start, first call at start; difface: diffuse to start, first call at start - 1.
START_CONVENTIONS = ("call-at-start", "difface")

REF_SIZE = 512  # configured blur levels, the DSST table and the eta rule are in pixels at a 512 face
QUANT_NOISE_POWER = (2.0 / 255.0) ** 2 / 12.0  # uint8 rounding noise variance in [-1, 1] units


# ---------------------------------------------------------------------------------------------------------
# Per-sample parameters
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DynParams:
    """One sample's dynamic-sampling parameters.

    start: respaced index the sample is diffused to (x = q_sample(x_init, start)); the first network call is
           at start (convention call-at-start) or start - 1 (difface).
    eta: DDIM eta (0 = deterministic given the init noise).
    sigmas: the G guide blur levels in pixels of the sampled image, strictly decreasing (sigma_1 blurriest).
    starts: per guide, the respaced index at/below which it is active (i <= starts[g]); non-increasing,
            starts[0] <= start (normally == start: the blurriest guide from the sample's start).
    gamma: guidance strength of each active guide.
    """

    start: int
    eta: float = 0.0
    sigmas: tuple[float, ...] = ()
    starts: tuple[int, ...] = ()
    gamma: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "starts", tuple(int(s) for s in self.starts))
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be finite and >= 0, got {self.eta}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0, got {self.gamma}")
        if len(self.sigmas) != len(self.starts):
            raise ValueError(f"one start per guide: {len(self.sigmas)} sigmas, {len(self.starts)} starts")
        if any(not math.isfinite(s) or s < 0 for s in self.sigmas):
            raise ValueError(f"guide sigmas must be finite and >= 0, got {self.sigmas}")
        if any(a <= b for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise ValueError(f"guide sigmas must be strictly decreasing (sigma1 > sigma2 > ...), got {self.sigmas}")
        if any(a < b for a, b in zip(self.starts, self.starts[1:])) or any(s > self.start for s in self.starts):
            raise ValueError(f"guide starts must be non-increasing and <= start={self.start}, got {self.starts}")

    def gammas_at(self, i: int) -> list[float]:
        """gamma for the guides active at respaced step i, 0 for the others."""
        return [self.gamma if i <= s else 0.0 for s in self.starts]

    @classmethod
    def of(cls, sigmas: Sequence[float], table: DSSTTable, schedule: DiffusionSchedule, image_size: int, *,
           gamma: float, eta: float | None = None, eta_scale: float = 0.1, sigma_est: float | None = None,
           max_start: int | None = None, min_start: int = 0) -> DynParams:
        """Parameters from guide sigmas (px of an image_size image) through the DSST table.

        start = DSST(sigma_1); starts[g] = min(start, DSST(sigma_g)); eta = min(1, eta_scale * sigma_est)
        with sigma_est in px at REF_SIZE (default: the sharpest guide's sigma) unless eta is given;
        max_start caps every start (cost control; None = no cap); min_start raises it (1 under the difface
        convention, whose first call is at start - 1).
        """
        sig = [float(s) for s in sigmas]
        steps = [table.start_index(s, image_size, schedule) for s in sig]
        cap = schedule.num_steps - 1 if max_start is None or max_start < 0 else min(max_start, schedule.num_steps - 1)
        start = max(min(steps[0] if steps else 0, cap), min(min_start, schedule.num_steps - 1))
        starts = tuple(min(start, s) for s in steps)
        if eta is None:
            est = sig[-1] if sigma_est is None else float(sigma_est)
            eta = eta_from_sigma(est * REF_SIZE / image_size, eta_scale)
        return cls(start=start, eta=float(eta), sigmas=tuple(sig), starts=starts, gamma=float(gamma))


def eta_from_sigma(sigma_ref: float, scale: float = 0.1) -> float:
    """DynFaceRestore's per-sample eta = std / 10 (scale 0.1), std = the blur estimate in px at 512; <= 1."""
    return float(min(1.0, max(0.0, scale * sigma_ref)))


# ---------------------------------------------------------------------------------------------------------
# DSST: sigma -> start step
# ---------------------------------------------------------------------------------------------------------
def noise_to_signal(schedule: DiffusionSchedule) -> np.ndarray:
    """sqrt((1 - abar) / abar) per step: the std of q_sample's noise in x0 units (x_t / sqrt(abar) = x0 + .)."""
    abar = schedule.alphas_cumprod
    return np.sqrt((1.0 - abar) / abar)


def dsst_start_t(rms: float, c: float, schedule: DiffusionSchedule) -> int:
    """Smallest original t with rms <= c * sqrt((1 - abar_t) / abar_t) (schedule: the un-respaced one);
    rms 0 -> 0; the last t if no step is noisy enough."""
    if rms <= 0:
        return 0
    ok = np.flatnonzero(c * noise_to_signal(schedule) >= rms)
    return int(ok[0]) if len(ok) else schedule.num_steps - 1


def respaced_index(t: float, schedule: DiffusionSchedule) -> int:
    """The first respaced step whose original timestep is >= t (at least as noisy), clamped to the last."""
    i = int(np.searchsorted(schedule.timestep_map, math.ceil(t - 1e-9), side="left"))
    return min(i, schedule.num_steps - 1)


@dataclass(frozen=True)
class DSSTTable:
    """The DSST lookup: blur sigma (px at `size`) -> start timestep, monotone (more blur -> later start).

    start_t is in ORIGINAL timesteps (valid for any respacing); respaced_start is the table's own
    respacing, kept to check that lookups reproduce it. Between rows start_t is linearly interpolated,
    outside the rows it is clamped to the first/last row.
    """

    sigma: tuple[float, ...]
    start_t: tuple[int, ...]
    respaced_start: tuple[int, ...] = ()
    respacing: str = "ddim250"
    size: int = REF_SIZE
    c: float = float("nan")
    num_timesteps: int = 1000

    def __post_init__(self):
        if len(self.sigma) < 2 or len(self.sigma) != len(self.start_t):
            raise ValueError("a DSST table needs >= 2 rows with one start_t per sigma")
        if any(a >= b for a, b in zip(self.sigma, self.sigma[1:])):
            raise ValueError("DSST sigmas must be strictly increasing")
        if any(a > b for a, b in zip(self.start_t, self.start_t[1:])):
            raise ValueError("DSST start_t must be non-decreasing in sigma (more blur -> later start)")

    @classmethod
    def from_dict(cls, d: dict) -> DSSTTable:
        return cls(sigma=tuple(float(s) for s in d["sigma"]), start_t=tuple(int(t) for t in d["start_t"]),
                   respaced_start=tuple(int(t) for t in d.get("respaced_start", ())),
                   respacing=str(d.get("respacing", "ddim250")), size=int(d.get("size", REF_SIZE)),
                   c=float(d.get("c", float("nan"))), num_timesteps=int(d.get("num_timesteps", 1000)))

    @classmethod
    def load(cls, path: str | Path) -> DSSTTable:
        import yaml

        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    def start_t_of(self, sigma: float, image_size: int | None = None) -> float:
        """Interpolated original start timestep for blur sigma in px of an image_size image (default: the
        table's size)."""
        s = float(sigma) * (self.size / image_size if image_size else 1.0)
        return float(np.interp(s, self.sigma, self.start_t))

    def start_index(self, sigma: float, image_size: int | None, schedule: DiffusionSchedule) -> int:
        """The respaced start step of `schedule` for blur sigma (px of an image_size image)."""
        return respaced_index(self.start_t_of(sigma, image_size), schedule)


# ---------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------
class _Index:
    """Row-index tensors on the device, made once per distinct row list (the lists repeat step after step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._made: dict[tuple[int, ...], Tensor] = {}

    def __call__(self, ks: Sequence[int]) -> Tensor:
        key = tuple(ks)
        if key not in self._made:
            self._made[key] = torch.tensor(key, dtype=torch.long, device=self.device)
        return self._made[key]

    def take(self, t: Tensor, ks: Sequence[int], n: int) -> Tensor:
        return t if len(ks) == n else t.index_select(0, self(ks))


def _rowwise(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """fn over the batch; one row at a time on CPU, where FFT/conv reductions may depend on the batch."""
    first = tensors[0]
    if first.device.type != "cpu" or first.shape[0] == 1:
        return fn(*tensors)
    return torch.cat([fn(*(t[b:b + 1] for t in tensors)) for b in range(first.shape[0])])


def dynamic_sample(
    model: ModelFn,
    schedule: DiffusionSchedule,
    x_init: Tensor,
    guides: Tensor,
    params: Sequence[DynParams],
    noise: NoiseSource,
    *,
    scale_map: Tensor | Callable[[Tensor], Tensor] | None = None,
    step_scale_map: StepScaleMap | None = None,
    convention: str = "call-at-start",
) -> Tensor:
    """Dynamic DDIM restoration of a batch; returns each sample's guided x0-hat at respaced step 0.

    x_init (B,C,H,W) in [-1,1]: what is diffused to each sample's start (the blur-mapped image or the input);
    guides (B,G,C,H,W): guide g of sample b is x blurred by params[b].sigmas[g] (G may be 0);
    scale_map: the DGSA map M (B,1,H,W), a callable image -> M, or None for guidance_scale_map(x_init);
    computed once per sample from x_init. Pass torch.ones(B,1,H,W) for plain closed-form guidance.
    step_scale_map: instead of scale_map, a map re-evaluated at every guided step, (guides (B',G,C,H,W),
    unguided clipped x0-hat (B',C,H,W), original timesteps (B',)) -> M (B',1,H,W) (DynFaceRestore's DGSA
    is such a learned network); called on the rows being guided at that step.
    convention: "call-at-start" diffuses to start and calls the network at start first (start + 1 calls);
    "difface" diffuses to start and calls it at start - 1 first (start calls; start >= 1), DifFace's
    `q_sample(y, N)` + `ddim_sample_loop(start_timesteps=N)`. The init draw is keyed by the diffused index.
    """
    if convention not in START_CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(START_CONVENTIONS)}, got {convention!r}")
    if scale_map is not None and step_scale_map is not None:
        raise ValueError("give scale_map (computed once) or step_scale_map (every step), not both")
    B, C = x_init.shape[:2]
    if len(params) != B:
        raise ValueError(f"one DynParams per sample: {len(params)} for a batch of {B}")
    if guides.dim() != 5 or guides.shape[0] != B or guides.shape[2:] != x_init.shape[1:]:
        raise ValueError(f"guides must be (B, G, C, H, W) matching x_init {tuple(x_init.shape)}, "
                         f"got {tuple(guides.shape)}")
    G = guides.shape[1]
    if any(len(p.sigmas) != G for p in params):
        raise ValueError(f"every sample needs {G} guide sigmas")
    if any(p.start >= schedule.num_steps for p in params):
        raise ValueError(f"start steps must be < {schedule.num_steps} (the respaced schedule's length)")
    # the diffused state at index `start` is handed to the first call at start - shift
    shift = 1 if convention == "difface" else 0
    if shift and any(p.start < 1 for p in params):
        raise ValueError("the difface convention needs start >= 1 (diffused to start, first call at start - 1)")
    device = x_init.device
    x_init, guides = x_init.float(), guides.float()
    guided = {b for b in range(B) if G and params[b].gamma > 0}
    fixed_map = None
    if guided and step_scale_map is None:
        if scale_map is None:
            fixed_map = _rowwise(guidance_scale_map, x_init).float()
        elif callable(scale_map):
            fixed_map = _rowwise(scale_map, x_init).float()
        else:
            fixed_map = scale_map.float().to(device)
    solver = GuidanceSolver(guides, [list(p.sigmas) for p in params]) if guided else None
    eta = torch.tensor([p.eta for p in params], dtype=torch.float32, device=device)
    first_call = [p.start - shift for p in params]
    x = torch.empty_like(x_init)
    out = torch.empty_like(x_init)
    index = _Index(device)

    for i in range(max(first_call), -1, -1):
        rows = [b for b in range(B) if i <= first_call[b]]
        new = [b for b in rows if first_call[b] == i]
        if new:
            x_new = index.take(x_init, new, B)
            diffused_to = torch.full((len(new),), i + shift, device=device)
            x.index_copy_(0, index(new), schedule.q_sample(x_new, diffused_to, noise("init", i + shift, new, x_new)))
        x_rows = index.take(x, rows, B)
        step = torch.full((len(rows),), i, device=device, dtype=torch.long)
        timesteps = schedule.original_timesteps(step)
        eps = model(x_rows, timesteps).float()[:, :C]  # a learned variance is ignored
        x0 = schedule.predict_x0(x_rows, step, eps).clamp(-1, 1)

        gammas = {k: params[b].gammas_at(i) for k, b in enumerate(rows) if b in guided}
        active = [k for k, g in gammas.items() if any(v > 0 for v in g)]
        if active:
            samples = [rows[k] for k in active]
            x0_active = index.take(x0, active, len(rows))
            solved = solver(x0_active, samples, [gammas[k] for k in active])
            if step_scale_map is not None:
                scale = _rowwise(step_scale_map, index.take(guides, samples, B), x0_active,
                                 index.take(timesteps, active, len(rows))).float()
            else:
                scale = index.take(fixed_map, samples, B) if fixed_map.shape[0] == B else fixed_map
            x0_guided = apply_scale_map(x0_active, solved, scale).clamp(-1, 1)
            x0 = x0_guided if len(active) == len(rows) else x0.index_copy(0, index(active), x0_guided)

        if i == 0:
            out.index_copy_(0, index(rows), x0)
            break
        etas = index.take(eta, rows, B)
        z = noise("z", i, rows, x_rows) if any(params[b].eta > 0 for b in rows) else torch.zeros_like(x_rows)
        x_prev = schedule.ddim_step(x0, eps, step, etas, z)
        if len(rows) == B:
            x = x_prev
        else:
            x.index_copy_(0, index(rows), x_prev)
    return out


def dynamic_model_calls(params: Sequence[DynParams], convention: str = "call-at-start") -> int:
    """Network evaluations of one dynamic_sample call: start + 1 per sample (start with "difface")."""
    return sum(p.start + (0 if convention == "difface" else 1) for p in params)


# ---------------------------------------------------------------------------------------------------------
# Training-free blur-level estimator (DBLM stand-in)
# ---------------------------------------------------------------------------------------------------------
def _luma64(images: Tensor) -> Tensor:
    return _luma(images.to(torch.float64))[:, 0]


def radial_power_spectrum(image: Tensor, bins: int | None = None) -> tuple[Tensor, Tensor]:
    """(w (nb,), P (nb,)): Hann-windowed, mean-removed luma power of one (C,H,W) image, averaged over annuli
    of radial frequency w in [0, pi] rad/px (float64, CPU). Empty annuli are dropped."""
    y = _luma64(image[None].cpu())[0]
    H, W = y.shape
    nb = bins or max(8, min(H, W) // 8)
    y = y - y.mean()
    win = torch.outer(torch.hann_window(H, periodic=False, dtype=torch.float64),
                      torch.hann_window(W, periodic=False, dtype=torch.float64))
    power = torch.fft.fft2(y * win).abs() ** 2 / (win**2).sum()
    fy = torch.fft.fftfreq(H, dtype=torch.float64) * 2 * math.pi
    fx = torch.fft.fftfreq(W, dtype=torch.float64) * 2 * math.pi
    w = torch.sqrt(fy[:, None] ** 2 + fx[None] ** 2).flatten()
    edges = torch.linspace(0, math.pi, nb + 1, dtype=torch.float64)
    idx = torch.bucketize(w, edges, right=True) - 1
    keep = (idx >= 0) & (idx < nb)
    total = torch.zeros(nb, dtype=torch.float64).index_add_(0, idx[keep], power.flatten()[keep])
    count = torch.zeros(nb, dtype=torch.float64).index_add_(0, idx[keep], torch.ones(int(keep.sum()),
                                                                                        dtype=torch.float64))
    centres = (edges[:-1] + edges[1:]) / 2
    ok = count > 0
    return centres[ok], total[ok] / count[ok]


def spectral_blur_sigma(image: Tensor, *, alpha: float = 2.0, snr: float = 10.0, min_cycles: float = 8.0,
                        max_sigma: float | None = None) -> float:
    """Total effective Gaussian blur (px) of one (C,H,W) image in [-1,1], from the fit described in the
    module docstring (P = A w^-alpha exp(-s^2 w^2) + N0). max_sigma caps it (default: size / 16)."""
    H, W = image.shape[-2:]
    cap = float(max_sigma if max_sigma is not None else min(H, W) / 16)
    w, p = radial_power_spectrum(image)
    top = p[w > 0.83 * math.pi]
    floor = max(QUANT_NOISE_POWER, float(top.median()) if len(top) else 0.0)
    sig = p - floor
    lo = 2 * math.pi * min_cycles / min(H, W)
    band = w >= lo
    good = band & (sig > snr * floor)
    bad = torch.nonzero(band & ~good)
    if len(bad):  # the contiguous band from lo up to the first frequency lost in the floor
        good[int(bad[0]):] = False
    n = int(good.sum())
    if n < 2:
        return cap
    ww, yy = w[good], torch.log(sig[good]) + alpha * torch.log(w[good])
    A = torch.stack([torch.ones_like(ww), -(ww**2)], 1)
    s2 = float(torch.linalg.lstsq(A, yy[:, None]).solution[1, 0])
    return float(min(cap, math.sqrt(max(s2, 0.0))))


class BlurEstimator:
    """Interface of a DBLM: images (B,C,H,W) in [-1,1] -> (guides (B,G,C,H,W), sigmas (B,G) px, decreasing)."""

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class SpectralBlurEstimator(BlurEstimator):
    """Training-free DBLM stand-in: spectral blur estimate, then guides re-blurred from the images.

    guide_blur: extra blur d_1 > d_2 > ... >= 0 in px at REF_SIZE; sigma_g = hypot(sigma_est, d_g).
    sharp_sigma: total blur (px at REF_SIZE) of a sharp face, subtracted in quadrature.
    """

    def __init__(self, guide_blur: Sequence[float] = (2.0, 1.0, 0.0), *, sharp_sigma: float = 1.6,
                 alpha: float = 2.0, snr: float = 10.0):
        d = [float(v) for v in guide_blur]
        if any(v < 0 for v in d) or any(a <= b for a, b in zip(d, d[1:])):
            raise ValueError(f"guide_blur must be strictly decreasing and >= 0, got {d}")
        self.guide_blur, self.sharp_sigma, self.alpha, self.snr = tuple(d), float(sharp_sigma), alpha, snr

    def estimate(self, images: Tensor) -> Tensor:
        """Blur beyond a sharp face, px of the images' size, (B,) float64 on CPU."""
        size = min(images.shape[-2:])
        ref = self.sharp_sigma * size / REF_SIZE
        out = []
        for b in range(images.shape[0]):
            s = spectral_blur_sigma(images[b], alpha=self.alpha, snr=self.snr)
            out.append(math.sqrt(max(s * s - ref * ref, 0.0)))
        return torch.tensor(out, dtype=torch.float64)

    def guides_for(self, images: Tensor, sigma_est: Tensor) -> tuple[Tensor, Tensor]:
        """Guides at sigma_g = hypot(sigma_est, d_g): the images re-blurred by d_g (px at their size)."""
        B = images.shape[0]
        scale = min(images.shape[-2:]) / REF_SIZE
        d = [v * scale for v in self.guide_blur]
        sig = torch.tensor([[math.hypot(float(s), dg) for dg in d] for s in sigma_est],
                           dtype=torch.float64).reshape(B, len(d))
        x = images.float()
        if not d:
            return x.new_zeros((B, 0) + tuple(x.shape[1:])), sig
        guides = torch.stack([_rowwise(lambda im, s=dg: blur(im, s), x) for dg in d], 1)
        return guides, sig

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.guides_for(images, self.estimate(images))


__all__ = [
    "REF_SIZE",
    "START_CONVENTIONS",
    "BlurEstimator",
    "DSSTTable",
    "DynParams",
    "SpectralBlurEstimator",
    "StepScaleMap",
    "dsst_start_t",
    "dynamic_model_calls",
    "dynamic_sample",
    "eta_from_sigma",
    "noise_to_signal",
    "radial_power_spectrum",
    "respaced_index",
    "spectral_blur_sigma",
]

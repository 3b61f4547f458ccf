"""Gaussian diffusion with guided-diffusion's conventions: the one schedule implementation of the project.

Tables are built in float64 (as the reference does with numpy) and indexed by *respaced* step i; a
coefficient is looked up in float64 and cast to float32 before it multiplies an image, which is exactly
what guided-diffusion's `_extract_into_tensor` does. All step functions take a per-sample index vector,
so one batch can hold samples at different steps.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """guided-diffusion's "linear" schedule, scaled so other T keep the same curve."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> list[int]:
    """Kept original timesteps, as guided-diffusion's `space_timesteps` (sorted).

    "100" gives 100 evenly spread steps with a fractional stride (NOT range(0,1000,10));
    "ddimK" gives range(0, T, stride) with exactly K steps; "a,b,c" splits T into sections.
    Within a section the position is ACCUMULATED in float (pos += stride) and rounded with Python's
    round (half to even), exactly as guided-diffusion. round(stride * j) is not the same near a tie:
    for "21", 10 * 49.95 = 499.5 rounds to 500 where ten additions give 499.49999999999994 -> 499; 278 of
    the single-section counts 1..1000 (and "25,25") would keep another step.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    section_counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for k, count in enumerate(section_counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class DiffusionSchedule:
    """A (possibly respaced) DDPM schedule; index i is the respaced step, `timestep_map[i]` the original t."""

    TABLES = (
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
        "posterior_mean_coef2", "log_betas",
    )

    def __init__(self, betas: np.ndarray, timestep_map: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_steps = len(betas)
        self.timestep_map = (np.arange(self.num_steps) if timestep_map is None
                             else np.asarray(timestep_map)).astype(np.int64)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at step 0: clip the log by repeating step 1's value.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self.log_betas = np.log(betas)
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def respaced(cls, base_betas: np.ndarray, use_timesteps: Iterable[int]) -> DiffusionSchedule:
        """Keep `use_timesteps` of a base schedule: beta_i = 1 - abar_i / abar_prev over the kept steps."""
        keep = set(use_timesteps)
        abar = np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))
        last, betas, tmap = 1.0, [], []
        for t, a in enumerate(abar):
            if t in keep:
                betas.append(1.0 - a / last)
                last = a
                tmap.append(t)
        return cls(np.array(betas), np.array(tmap))

    # -- per-sample coefficient lookup -------------------------------------------------------------
    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        tables = self._device_tables.get(device)
        if tables is None:
            tables = {name: torch.from_numpy(getattr(self, name)).to(device) for name in self.TABLES}
            tables["timestep_map"] = torch.from_numpy(self.timestep_map).to(device)
            self._device_tables[device] = tables
        return tables

    def coef(self, name: str, i: Tensor, ndim: int = 4) -> Tensor:
        """Float64 lookup at per-sample steps i, cast to float32, shaped to broadcast over images."""
        v = self._tables(i.device)[name][i].float()
        return v.reshape(v.shape + (1,) * (ndim - 1))

    def original_timesteps(self, i: Tensor) -> Tensor:
        """The integer timestep the network was trained with (the UNet's input) for respaced steps i."""
        return self._tables(i.device)["timestep_map"][i]

    # -- the step math -------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, i: Tensor, noise: Tensor) -> Tensor:
        return self.coef("sqrt_alphas_cumprod", i, x0.ndim) * x0 + \
            self.coef("sqrt_one_minus_alphas_cumprod", i, x0.ndim) * noise

    def predict_x0(self, x_t: Tensor, i: Tensor, eps: Tensor) -> Tensor:
        return self.coef("sqrt_recip_alphas_cumprod", i, x_t.ndim) * x_t - \
            self.coef("sqrt_recipm1_alphas_cumprod", i, x_t.ndim) * eps

    def posterior_mean(self, x0: Tensor, x_t: Tensor, i: Tensor) -> Tensor:
        return self.coef("posterior_mean_coef1", i, x_t.ndim) * x0 + \
            self.coef("posterior_mean_coef2", i, x_t.ndim) * x_t

    def learned_range_log_variance(self, v: Tensor, i: Tensor) -> Tensor:
        """log var = frac*log(beta_i) + (1-frac)*posterior_log_variance_clipped_i, frac = (v+1)/2."""
        frac = (v + 1) / 2
        return frac * self.coef("log_betas", i, v.ndim) + \
            (1 - frac) * self.coef("posterior_log_variance_clipped", i, v.ndim)

    def ancestral_step(self, x0: Tensor, x_t: Tensor, i: Tensor, v: Tensor, noise: Tensor) -> Tensor:
        """p_sample with learned-range variance; no noise at step 0 (as the reference)."""
        mean = self.posterior_mean(x0, x_t, i)
        std = torch.exp(0.5 * self.learned_range_log_variance(v, i))
        nonzero = (i != 0).float().reshape((-1,) + (1,) * (x_t.ndim - 1))
        return mean + nonzero * std * noise

    def ddim_step(self, x0: Tensor, eps: Tensor, i: Tensor, eta: Tensor | float, noise: Tensor) -> Tensor:
        """DDIM x_{i-1} from clipped x0 and raw eps (DifFace's form); eta may be per sample."""
        abar = self.coef("alphas_cumprod", i, x0.ndim)
        abar_prev = self.coef("alphas_cumprod_prev", i, x0.ndim)
        if not torch.is_tensor(eta):
            eta = torch.tensor(float(eta), device=x0.device)
        eta = eta.float().reshape((-1,) + (1,) * (x0.ndim - 1)) if eta.ndim else eta.float()
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        return abar_prev.sqrt() * x0 + torch.sqrt(1 - abar_prev - sigma**2) * eps + sigma * noise

    def __repr__(self) -> str:
        return f"DiffusionSchedule(steps={self.num_steps}, t={self.timestep_map[0]}..{self.timestep_map[-1]})"


@functools.cache
def respaced_linear_schedule(num_timesteps: int = 1000, respacing: str = "100") -> DiffusionSchedule:
    """Linear betas over T, respaced as guided-diffusion's `timestep_respacing` string."""
    base = linear_betas(num_timesteps)
    return DiffusionSchedule.respaced(base, space_timesteps(num_timesteps, respacing))


def dr2_schedule() -> DiffusionSchedule:
    """DR2's schedule: linear betas, T = 1000, respaced with space_timesteps(1000, [100])."""
    return respaced_linear_schedule(1000, "100")


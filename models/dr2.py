"""DR2's degradation remover: diffuse the degraded face to step omega, then denoise to tau while
replacing the low frequencies of each x_i with those of the diffused input (ILVR-style refinement).

One batched loop runs every sample through exactly its own steps omega_b .. tau_b: at respaced step i
only the samples with tau_b <= i <= omega_b go through the network. Every random draw comes from the
`noise` source, keyed by (kind, step, row), so the same code serves production (per-sample seeded
noise) and the parity tests (the reference's recorded draws):
  ("init", omega) starts the chain, ("z", i) is the ancestral noise after the call at i,
  ("qy", j) diffuses the guidance y to step j for the refinement that follows the call at j+1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.diffusion import DiffusionSchedule
from models.lowpass import lowpass
from models.noise import NoiseSource

# The network: x (B,C,H,W) and ORIGINAL integer timesteps (B,) -> (B, 2C, H, W) = [eps, v].
ModelFn = Callable[[Tensor, Tensor], Tensor]


def dr2_start_step(N: int, tau: int, num_steps: int = 100) -> int:
    """omega from (N, tau) by the reference's rule, clamped to the last valid step (the reference's
    clamp to 100 indexes past the end of a 100-step schedule)."""
    if N == 1:
        omega = tau + 5
    elif N <= 2:
        omega = tau + 10
    elif N <= 4:
        omega = tau + 20
    elif N <= 8:
        omega = tau + 25
    else:
        omega = tau + 30
    return min(omega, num_steps - 1)


def dr2_model_calls(N: int, tau: int, num_steps: int = 100) -> int:
    """Network evaluations for one sample: omega - tau + 1, or 1 for N = 1 (the rest would be overwritten)."""
    return 1 if N == 1 else dr2_start_step(N, tau, num_steps) - tau + 1


@dataclass(frozen=True)
class DR2Params:
    N: int
    tau: int
    omega: int

    @classmethod
    def of(cls, N: int, tau: int, num_steps: int = 100) -> DR2Params:
        if N < 1 or not 0 <= tau < num_steps:
            raise ValueError(f"invalid DR2 parameters N={N}, tau={tau} (need N >= 1, 0 <= tau < {num_steps})")
        return cls(int(N), int(tau), dr2_start_step(N, tau, num_steps))


def dr2_sample(
    model: ModelFn,
    schedule: DiffusionSchedule,
    y: Tensor,
    params: Sequence[DR2Params],
    noise: NoiseSource,
) -> Tensor:
    """Run DR2 on a batch y in [-1, 1] (float32, (B,C,H,W)); returns x0-hat of each sample's last call."""
    B, C = y.shape[:2]
    assert len(params) == B, "one DR2Params per sample"
    for p in params:
        if p.N > 1 and y.shape[-1] % p.N:
            raise ValueError(f"image size {y.shape[-1]} is not divisible by N={p.N}")
    y = y.float().contiguous()  # one layout for every batch: CPU kernels round differently per layout
    # N = 1: every refinement overwrites x with q_sample(y, i-1), so only the call at tau matters; start
    # there from the same draw the full loop would have used, ("qy", tau).
    start = [p.tau if p.N == 1 else p.omega for p in params]
    x = torch.empty_like(y)
    out = torch.empty_like(y)
    device = y.device

    def take(t: Tensor, ks: list[int], n: int) -> Tensor:
        return t if len(ks) == n else t.index_select(0, torch.tensor(ks, device=device))

    def put(dst: Tensor, bs: list[int], src: Tensor) -> None:
        dst.index_copy_(0, torch.tensor(bs, device=device), src)

    for i in range(max(start), min(p.tau for p in params) - 1, -1):
        rows = [b for b in range(B) if params[b].tau <= i <= start[b]]
        if not rows:  # a gap between the step ranges of the samples in this batch
            continue
        new = [b for b in rows if start[b] == i]
        if new:
            kinds = ["qy" if params[b].N == 1 else "init" for b in new]
            yn = take(y, new, B)
            if len(set(kinds)) == 1:
                eps0 = noise(kinds[0], i, new, yn)
            else:  # N = 1 and N > 1 samples starting at the same step use different draws
                eps0 = torch.cat([noise(k, i, [b], yn[j:j + 1]) for j, (k, b) in enumerate(zip(kinds, new))])
            put(x, new, schedule.q_sample(yn, torch.full((len(new),), i, device=device), eps0))

        xi = take(x, rows, B)
        step = torch.full((len(rows),), i, device=device, dtype=torch.long)
        model_out = model(xi, schedule.original_timesteps(step)).float()
        eps, v = model_out[:, :C], model_out[:, C:]
        x0 = schedule.predict_x0(xi, step, eps).clamp(-1, 1)

        done = [k for k, b in enumerate(rows) if params[b].tau == i]
        if done:
            put(out, [rows[k] for k in done], take(x0, done, len(rows)))
        # the samples that step on below i: their positions in `rows`, and their batch indices
        cont = [k for k, b in enumerate(rows) if params[b].tau < i]
        if not cont:
            continue
        cont_rows = [rows[k] for k in cont]
        x0_cont, x_cont, v_cont, step_cont = (take(t, cont, len(rows)) for t in (x0, xi, v, step))
        x_prev = schedule.ancestral_step(x0_cont, x_cont, step_cont, v_cont, noise("z", i, cont_rows, x_cont))
        y_cont = take(y, cont_rows, B)
        y_prev = schedule.q_sample(y_cont, step_cont - 1, noise("qy", i - 1, cont_rows, y_cont))
        factors = [params[b].N for b in cont_rows]  # N = 1 never gets here (it starts at tau)
        x_prev = x_prev - lowpass(x_prev, factors) + lowpass(y_prev, factors)
        if len(cont_rows) == B:
            x = x_prev
        else:
            put(x, cont_rows, x_prev)
    return out

"""The schedule and step math against the reference's tables and the published values."""

import numpy as np
import pytest
import torch

from models.diffusion import DiffusionSchedule, dr2_schedule, linear_betas, space_timesteps
from tests.vectors import vector


@pytest.fixture(scope="module")
def ref():
    return vector("dr2_schedule_100.npz")


def test_kept_steps_are_guided_diffusion_respacing_not_range():
    kept = space_timesteps(1000, [100])
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    assert kept[:8] == [0, 10, 20, 30, 40, 50, 61, 71]
    gaps = np.diff(kept)
    assert sorted(set(gaps.tolist())) == [10, 11] and (gaps == 11).sum() == 9
    assert kept != list(range(0, 1000, 10))
    assert space_timesteps(1000, "100") == kept


def test_ddim_respacing():
    assert space_timesteps(1000, "ddim250") == list(range(0, 1000, 4))
    assert space_timesteps(1000, "ddim100") == list(range(0, 1000, 10))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")


def test_sections_split_like_guided_diffusion():
    # Two sections of 500 steps: 10 from the first, 5 from the second.
    kept = space_timesteps(1000, "10,5")
    assert len(kept) == 15 and kept[0] == 0 and kept[9] == 499 and kept[10] == 500 and kept[-1] == 999


def _accumulated(num_timesteps: int, counts: list[int]) -> list[int]:
    """guided-diffusion's section walk, written out independently: an integer split into sections, then a
    float position advanced by the fractional stride and rounded half to even at every kept step."""
    kept, begin = [], 0
    for k, count in enumerate(counts):
        size = num_timesteps // len(counts) + (k < num_timesteps % len(counts))
        step = (size - 1) / (count - 1) if count > 1 else 1
        at = 0.0
        for _ in range(count):
            kept.append(begin + round(at))
            at = at + step
        begin += size
    return sorted(set(kept))


def test_every_single_section_count_matches_guided_diffusion_accumulation():
    multiplied = 0
    for count in range(1, 1001):
        want = _accumulated(1000, [count])
        got = space_timesteps(1000, str(count))
        assert got == want, count
        assert len(got) == count and got[0] == 0 and (count == 1 or got[-1] == 999)
        stride = (999 / (count - 1)) if count > 1 else 1
        multiplied += got != sorted({round(stride * j) for j in range(count)})
    # the accumulation is not round(stride * j): it keeps another step for 278 counts (e.g. 21, 23, 43, 61)
    assert multiplied == 278
    assert space_timesteps(1000, "21")[10] == 499  # 10 * 49.95 = 499.5 -> 500, but ten additions -> 499


@pytest.mark.parametrize("counts", ["25,25", "10,5", "7,13,29", "1,1,1", "333,333,333", "50,100,200,250"])
def test_multi_section_counts_match_guided_diffusion_accumulation(counts):
    want = _accumulated(1000, [int(c) for c in counts.split(",")])
    assert space_timesteps(1000, counts) == want
    assert space_timesteps(1000, [int(c) for c in counts.split(",")]) == want
    if counts == "25,25":  # the multiplied form keeps another step here (499 / 24 * 12 = 249.5 -> 250 vs 249)
        multiplied = sorted({b + round(499 / 24 * j) for b in (0, 500) for j in range(25)})
        assert multiplied != want


def test_tables_equal_reference(ref):
    s = dr2_schedule()
    np.testing.assert_array_equal(s.timestep_map, ref["timestep_map"])
    for name in ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"]:
        got, want = getattr(s, name), ref[name]
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("i,t,value",
                         [(22, 222, 0.7725), (35, 353, 0.5265), (42, 424, 0.3980), (60, 605, 0.1551)])
def test_published_sqrt_alphabar(i, t, value):
    s = dr2_schedule()
    assert s.timestep_map[i] == t
    assert abs(np.sqrt(s.alphas_cumprod[i]) - value) < 5e-5


def test_respaced_betas_compose_to_base_alphabar():
    base = linear_betas(1000)
    abar = np.cumprod(1 - base)
    s = dr2_schedule()
    np.testing.assert_allclose(s.alphas_cumprod, abar[s.timestep_map], rtol=1e-13)
    full = DiffusionSchedule(base)
    np.testing.assert_allclose(full.alphas_cumprod, abar, rtol=0)


def test_step_math_against_float64_formulas():
    s = dr2_schedule()
    g = torch.Generator().manual_seed(0)
    x0, xt, eps, v = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(4))
    v = v.clamp(-1, 1)
    i = torch.tensor([0, 22, 60, 99])
    ii = i.numpy()
    b = lambda a: torch.from_numpy(a[ii]).reshape(-1, 1, 1, 1)  # noqa: E731  float64 lookup
    X0, XT, EPS, V = (t.double() for t in (x0, xt, eps, v))
    checks = {
        "q_sample": (s.q_sample(x0, i, eps),
                     b(s.sqrt_alphas_cumprod) * X0 + b(s.sqrt_one_minus_alphas_cumprod) * EPS),
        "predict_x0": (s.predict_x0(xt, i, eps),
                       XT / b(s.alphas_cumprod).sqrt() - (1 / b(s.alphas_cumprod) - 1).sqrt() * EPS),
        "posterior_mean": (s.posterior_mean(x0, xt, i),
                           b(s.posterior_mean_coef1) * X0 + b(s.posterior_mean_coef2) * XT),
        "log_var": (s.learned_range_log_variance(v, i),
                    (V + 1) / 2 * np.log(b(s.betas)) + (1 - V) / 2 * b(s.posterior_log_variance_clipped)),
    }
    for name, (got, want) in checks.items():
        assert got.dtype == torch.float32
        # float32 coefficients: error relative to the largest term (1/sqrt(abar) ~ 157 at step 99)
        scale = want.abs().amax().item()
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6 * max(scale, 1.0), msg=name)


def test_learned_range_endpoints_and_step_zero_has_no_noise():
    s = dr2_schedule()
    i = torch.tensor([5, 40])
    one = torch.ones(2, 3, 4, 4)
    torch.testing.assert_close(s.learned_range_log_variance(one, i)[:, 0, 0, 0],
                               torch.tensor(np.log(s.betas[[5, 40]]), dtype=torch.float32))
    torch.testing.assert_close(s.learned_range_log_variance(-one, i)[:, 0, 0, 0],
                               torch.tensor(s.posterior_log_variance_clipped[[5, 40]], dtype=torch.float32))
    x0, xt, z = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.full((1, 3, 4, 4), 7.0)
    at0 = s.ancestral_step(x0, xt, torch.tensor([0]), torch.zeros_like(xt), z)
    torch.testing.assert_close(at0, s.posterior_mean(x0, xt, torch.tensor([0])))


def test_ddim_eta_zero_is_deterministic_and_consistent():
    s = DiffusionSchedule.respaced(linear_betas(1000), space_timesteps(1000, "ddim250"))
    g = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    i = torch.tensor([100, 10])
    a = s.ddim_step(x0, eps, i, 0.0, z)
    b = s.ddim_step(x0, eps, i, 0.0, torch.zeros_like(z))
    torch.testing.assert_close(a, b)
    # With eta = 0 the step lands exactly on q_sample(x0, i-1, eps).
    torch.testing.assert_close(a, s.q_sample(x0, i - 1, eps), rtol=1e-5, atol=1e-5)
    # Per-sample eta equals per-sample calls.
    eta = torch.tensor([0.3, 0.7])
    both = s.ddim_step(x0, eps, i, eta, z)
    one = s.ddim_step(x0[1:], eps[1:], i[1:], 0.7, z[1:])
    torch.testing.assert_close(both[1:], one)

"""The DR2 sampler: exact parity with the reference loop, per-sample steps, reproducibility."""

import itertools

import pytest
import torch

from models.diffusion import dr2_schedule
from models.dr2 import DR2Params, dr2_model_calls, dr2_sample, dr2_start_step
from models.noise import SeededNoise, sample_seed
from models.unet import UNetModel
from tests.helpers import randomize_parameters, tiny_unet
from tests.vectors import config, state_dict, vector


class RecordedNoise:
    """Replays the reference's recorded draws by meaning, and logs what was asked for."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.asked = []

    def __call__(self, kind, step, rows, like):
        key = "init" if kind == "init" else f"{kind}_{step}"
        self.asked.append(key)
        a = torch.from_numpy(self.arrays[key]).to(like.device)
        assert a.shape[1:] == like.shape[1:]
        return a.expand(len(rows), *a.shape[1:]).clone()


class Counting:
    """A model wrapper counting forwards and rows (images) through the network."""

    def __init__(self, model):
        self.model, self.calls, self.rows, self.timesteps = model, 0, 0, []

    def __call__(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        self.timesteps.append(t.tolist())
        return self.model(x, t)


@pytest.fixture(scope="module")
def reference_unet():
    model = UNetModel.from_config(config("tiny_unet_config.json"))
    model.load_state_dict(state_dict("tiny_unet_state_dict.pt"), strict=True)
    return model.eval()


def test_omega_rule_and_clamp():
    assert [dr2_start_step(n, 22) for n in (1, 2, 4, 8, 16)] == [27, 32, 42, 47, 52]
    assert dr2_start_step(4, 22) == 42 and dr2_start_step(8, 35) == 60 and dr2_start_step(1, 10) == 15
    assert dr2_start_step(16, 80) == 99  # the reference clamps to 100, which does not exist
    assert dr2_model_calls(4, 22) == 21 and dr2_model_calls(1, 10) == 1 and dr2_model_calls(16, 80) == 20
    with pytest.raises(ValueError):
        DR2Params.of(4, 100)


@pytest.mark.parametrize("N,tau,omega", [(4, 22, 42), (1, 10, 15), (8, 35, 60)])
def test_whole_loop_matches_reference(reference_unet, N, tau, omega):
    rec = vector(f"dr2_loop_N{N}_tau{tau}_omega{omega}.npz")
    params = DR2Params.of(N, tau)
    assert params.omega == omega
    noise = RecordedNoise(rec)
    model = Counting(reference_unet)
    with torch.no_grad():
        x0 = dr2_sample(model, dr2_schedule(), torch.from_numpy(rec["y"]), [params], noise)
    err = (x0.numpy() - rec["x0"]).__abs__().max()
    assert err < 1e-4, f"max abs error {err}"
    if N == 1:
        assert model.calls == 1 and noise.asked == [f"qy_{tau}"]  # no wasted calls
        assert model.timesteps == [[dr2_schedule().timestep_map[tau]]]
    else:
        assert model.calls == omega - tau + 1
        # the draws the reference made, in its order (z_tau is drawn there but unused)
        expected = ["init"] + list(itertools.chain.from_iterable(
            (f"z_{i}", f"qy_{i - 1}") for i in range(omega, tau, -1)))
        assert noise.asked == expected
        assert model.timesteps[0] == [dr2_schedule().timestep_map[omega]]


def _run(model, y, params, seeds):
    with torch.no_grad():
        return dr2_sample(model, dr2_schedule(), y, params, SeededNoise(seeds))


@pytest.fixture(scope="module")
def random_unet():
    return randomize_parameters(tiny_unet(), seed=3).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    y = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    params = [DR2Params.of(4, 22), DR2Params.of(8, 35), DR2Params.of(1, 10), DR2Params.of(2, 30),
              DR2Params.of(16, 80)]
    seeds = [sample_seed(1234, f"face_{k}.png") for k in range(5)]
    return y, params, seeds


def test_mixed_settings_run_exactly_their_own_steps(random_unet, batch):
    y, params, seeds = batch
    model = Counting(random_unet)
    _run(model, y, params, seeds)
    assert model.rows == sum(dr2_model_calls(p.N, p.tau) for p in params)
    # one forward per step where some sample is active, never one with no rows
    active = set()
    for p in params:
        active |= set(range(p.tau, (p.tau if p.N == 1 else p.omega) + 1))
    assert model.calls == len(active) < max(p.omega for p in params) - min(p.tau for p in params) + 1


def test_sample_is_bit_identical_alone_in_batch_and_permuted(random_unet, batch):
    y, params, seeds = batch
    together = _run(random_unet, y, params, seeds)
    for k in range(len(params)):
        alone = _run(random_unet, y[k:k + 1], [params[k]], [seeds[k]])
        assert torch.equal(alone[0], together[k]), f"sample {k} differs alone vs in batch"
    perm = [3, 0, 4, 2, 1]
    shuffled = _run(random_unet, y[perm], [params[p] for p in perm], [seeds[p] for p in perm])
    assert torch.equal(shuffled, together[perm])
    pair = _run(random_unet, y[[4, 1]], [params[4], params[1]], [seeds[4], seeds[1]])
    assert torch.equal(pair, together[[4, 1]])


def test_seed_changes_result_and_same_seed_reproduces(random_unet, batch):
    y, params, seeds = batch
    a = _run(random_unet, y[:1], params[:1], [seeds[0]])
    b = _run(random_unet, y[:1], params[:1], [seeds[0]])
    c = _run(random_unet, y[:1], params[:1], [sample_seed(1235, "face_0.png")])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0  # x0-hat is clamped


def test_bf16_autocast_close_to_fp32(random_unet, batch):
    y, params, seeds = batch

    def bf16(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return random_unet(x, t)

    full = _run(random_unet, y[:2], params[:2], seeds[:2])
    half = _run(bf16, y[:2], params[:2], seeds[:2])
    assert half.dtype == torch.float32
    rel = (half - full).norm() / full.norm()
    assert rel < 0.1, rel

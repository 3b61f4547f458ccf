"""Dynamic (DynFaceRestore-style) restoration: the sampler's batching invariants, DSST, the blur estimator,
the DifFace prior on the ddim250 grid, the learned-DBLM interface, and the restore/benchmark integration."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.diffusion import DiffusionSchedule, linear_betas, respaced_linear_schedule
from models.dynamic import (
    REF_SIZE,
    DSSTTable,
    DynParams,
    SpectralBlurEstimator,
    dynamic_model_calls,
    dynamic_sample,
    noise_to_signal,
)
from models.guidance import blur
from models.noise import SeededNoise, sample_seed
from models.unet import UNetModel
from tasks.images import resize_to
from tasks.manifest import read_manifest
from tasks.runtime import RuntimeConfig
from tests.helpers import randomize_parameters, tiny_unet
from tests.vectors import VECTORS, config, vector

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
DDIM250 = respaced_linear_schedule(1000, "ddim250")
CPU = RuntimeConfig(device="cpu")


class Counting:
    """Model wrapper: rows per call and the original timesteps the network was given."""

    def __init__(self, model):
        self.model, self.rows, self.timesteps = model, [], []

    def __call__(self, x, t):
        self.rows.append(x.shape[0])
        self.timesteps.append(t.tolist())
        return self.model(x, t)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return randomize_parameters(tiny_unet(), seed=1).eval()


def _inputs(B: int, G: int = 2, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, 3, size, size, generator=g) * 2 - 1)
    guides = torch.stack([blur(x, s) for s in (1.5, 0.7)[:G]], 1) if G else x.new_zeros(B, 0, 3, size, size)
    return x, guides


def _params(start, eta=0.0, gamma=0.5, sigmas=(1.5, 0.7), offs=(0, 2)):
    return DynParams(start=start, eta=eta, sigmas=sigmas, starts=tuple(max(0, start - o) for o in offs), gamma=gamma)


@torch.inference_mode()
def test_mixed_start_steps_in_one_batch_equal_each_sample_alone(net):
    x, guides = _inputs(4)
    params = [_params(6, eta=0.3), _params(2, eta=0.0), _params(0, eta=0.5), _params(4, eta=0.2, gamma=0.0)]
    noise = SeededNoise([11, 12, 13, 14])
    model = Counting(net)
    batch = dynamic_sample(model, DDIM250, x, guides, params, noise)
    assert torch.isfinite(batch).all() and batch.abs().max() <= 1
    # no forward for a sample before its start: at respaced step i exactly the started samples go through
    assert model.rows == [sum(p.start >= i for p in params) for i in range(6, -1, -1)]
    assert sum(model.rows) == dynamic_model_calls(params) == 7 + 3 + 1 + 5
    assert model.timesteps[0] == [24] and model.timesteps[-1] == [0, 0, 0, 0]  # ddim250: original t = 4 i
    for b in range(4):
        alone = dynamic_sample(net, DDIM250, x[b:b + 1], guides[b:b + 1], [params[b]],
                               SeededNoise([noise.seeds[b]]))
        assert torch.equal(batch[b:b + 1], alone), f"sample {b} differs when batched"


@torch.inference_mode()
def test_start_zero_is_one_model_call_and_the_guided_x0(net):
    from models.guidance import apply_scale_map, closed_form_guidance, guidance_scale_map

    x, guides = _inputs(1)
    model = Counting(net)
    p = _params(0)
    out = dynamic_sample(model, DDIM250, x, guides, [p], SeededNoise([5]))
    assert model.rows == [1] and model.timesteps == [[0]]
    step = torch.zeros(1, dtype=torch.long)
    xt = DDIM250.q_sample(x, step, SeededNoise([5])("init", 0, [0], x))
    x0 = DDIM250.predict_x0(xt, step, net(xt, torch.zeros(1, dtype=torch.long))[:, :3]).clamp(-1, 1)
    X = closed_form_guidance(x0, guides, torch.tensor([p.sigmas], dtype=torch.float64), [[0.5, 0.5]])
    assert torch.equal(out, apply_scale_map(x0, X, guidance_scale_map(x)).clamp(-1, 1))
    # gamma 0 (or no guides): exactly the unguided x0-hat
    bare = dynamic_sample(net, DDIM250, x, guides, [_params(0, gamma=0.0)], SeededNoise([5]))
    assert torch.equal(bare, x0)


@torch.inference_mode()
def test_eta_zero_is_deterministic_given_the_init(net):
    x, guides = _inputs(2)

    class ZNoise(SeededNoise):
        def __init__(self, seeds, salt):
            super().__init__(seeds)
            self.salt = salt

        def __call__(self, kind, step, rows, like):
            if kind == "z":
                return torch.randn(like.shape, generator=torch.Generator().manual_seed(self.salt + step))
            return super().__call__(kind, step, rows, like)

    runs = [dynamic_sample(net, DDIM250, x, guides, [_params(3), _params(5)], ZNoise([1, 2], salt)) for salt in (0, 99)]
    assert torch.equal(runs[0], runs[1])
    noisy = [dynamic_sample(net, DDIM250, x, guides, [_params(3, eta=1.0)] * 2, ZNoise([1, 2], salt))
             for salt in (0, 99)]
    assert not torch.equal(noisy[0], noisy[1])


def test_dyn_params_validation_and_guide_schedule():
    with pytest.raises(ValueError, match="strictly decreasing"):
        DynParams(start=5, sigmas=(1.0, 2.0), starts=(5, 3))
    with pytest.raises(ValueError, match="non-increasing"):
        DynParams(start=5, sigmas=(2.0, 1.0), starts=(3, 5))
    table = DSSTTable.load(ROOT / "configs" / "dsst.yaml")
    p = DynParams.of([4.0, 2.0, 0.5], table, DDIM250, REF_SIZE, gamma=1.0, sigma_est=0.5)
    assert p.start == table.start_index(4.0, REF_SIZE, DDIM250) == 100  # the blurriest guide from the start
    assert p.starts[0] == p.start > p.starts[1] > p.starts[2]  # sharper guides join at lower t
    assert p.gammas_at(p.start) == [1.0, 0.0, 0.0] and p.gammas_at(0) == [1.0, 1.0, 1.0]
    assert p.eta == pytest.approx(0.05)  # sigma_est / 10
    assert DynParams.of([4.0], table, DDIM250, REF_SIZE, gamma=1.0, max_start=20).start == 20


def test_dsst_table_is_monotone_and_lookups_reproduce_it():
    table = DSSTTable.load(ROOT / "configs" / "dsst.yaml")
    raw = __import__("yaml").safe_load((ROOT / "configs" / "dsst.yaml").read_text())
    sched = respaced_linear_schedule(1000, table.respacing)
    assert raw["n_images"] == len(list(SAMPLES.glob("*.png"))) and table.size == REF_SIZE
    assert list(table.start_t) == sorted(table.start_t) and list(table.respaced_start) == sorted(table.respaced_start)
    for s, t, i in zip(table.sigma, table.start_t, table.respaced_start):
        assert table.start_t_of(s) == t and table.start_index(s, REF_SIZE, sched) == i
        assert table.start_index(s / 2, REF_SIZE // 2, sched) == i  # sigma in px of the image's own size
    dense = [table.start_index(s, REF_SIZE, sched) for s in np.linspace(0, 20, 401)]
    assert dense == sorted(dense) and dense[-1] == table.respaced_start[-1]
    # the criterion and its calibration: the typical sigma starts at t = 400 = ddim250 index 100
    base = DiffusionSchedule(linear_betas(1000))
    nts = noise_to_signal(base)
    typical = table.sigma.index(raw["typical_sigma"])
    assert table.start_t[typical] == raw["typical_t"] == 400 and table.respaced_start[typical] == 100
    for r, t in zip(raw["rms"], table.start_t):
        assert r <= table.c * nts[t] * (1 + 1e-5) and (t == 0 or r > table.c * nts[t - 1])


def test_build_dsst_criterion_on_small_faces():
    from workflows.build_dsst import build_table, load_faces

    x = load_faces(SAMPLES, 128)
    t = build_table(x, sigmas=(0.0, 0.5, 1.0, 2.0, 4.0), typical_sigma=1.0, respacing="100")
    assert t["start_t"][2] == 400 and t["start_t"] == sorted(t["start_t"]) and t["start_t"][0] == 0
    assert t["respaced_start"] == sorted(t["respaced_start"]) and t["n_images"] == 4


def _faces(size: int) -> tuple[list[str], torch.Tensor]:
    paths = sorted(SAMPLES.glob("*.png"))
    ims = [resize_to(np.ascontiguousarray(cv2.imread(str(p))[..., ::-1]), size) for p in paths]
    return [p.name for p in paths], torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).double() / 127.5 - 1


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def test_blur_estimator_is_monotone_and_accurate_on_faces_blurred_by_known_sigma():
    """Faces at 256, blurred by sigma in {1, 2, 3, 4} px at 512 (0.5..2 px at 256), saved as uint8.

    Tolerances (px at 512): on the sharp faces (20595, Julia_Roberts_crop) |estimate - sigma| <= 0.25 sigma
    + 0.35; on every face the total blur adds in quadrature, |total(k_s * x) - hypot(s, total(x))| <= 15 %;
    the estimate strictly increases with sigma on every face.
    """
    names, x = _faces(256)
    est = SpectralBlurEstimator()
    ref = est.sharp_sigma
    scale = REF_SIZE / 256
    levels = (0.0, 1.0, 2.0, 3.0, 4.0)
    got = torch.stack([est.estimate(_quantise(blur(x, s / scale)) if s else x) * scale for s in levels], 1)
    for b, name in enumerate(names):
        row = got[b].tolist()
        assert all(a < c for a, c in zip(row, row[1:])), f"{name}: not monotone {row}"
        total0 = np.hypot(row[0], ref)
        for s, e in zip(levels[1:], row[1:]):
            assert abs(np.hypot(e, ref) - np.hypot(s, total0)) <= 0.15 * np.hypot(s, total0), (name, s, e)
            if name in ("20595.png", "Julia_Roberts_crop.png"):
                assert abs(e - s) <= 0.25 * s + 0.35, (name, s, e)
    guides, sigmas = est(x[:1].float())
    assert guides.shape == (1, 3, 3, 256, 256) and (sigmas[0, :-1] > sigmas[0, 1:]).all()
    assert torch.equal(guides[0, 2], x[0].float())  # d_3 = 0: the input itself, at sigma_3 = sigma_est
    torch.testing.assert_close(guides[0, 0], blur(x[:1].float(), 2.0 / scale)[0])


def _tiny_difface():
    from tasks.dynamic_stage import TINY_DIFFACE_UNET

    ref = config("tiny_difface_unet_config.json")
    for k, v in TINY_DIFFACE_UNET.items():
        want = [ref["image_size"] // r for r in ref[k]] if k == "attention_resolutions" else ref[k]
        assert (list(v) if isinstance(v, tuple) else v) == want, k
    return UNetModel.from_config(TINY_DIFFACE_UNET)


@torch.inference_mode()
def test_tiny_difface_prior_on_the_ddim250_grid():
    from tasks.dynamic_stage import DynamicConfig, build_prior

    path = VECTORS / "tiny_difface_unet_state_dict.pt"
    model = _tiny_difface()
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    built, identity, native = build_prior(DynamicConfig(prior="tiny-difface", weights=str(path)))
    assert identity.startswith("sha256:") and native is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), built.state_dict().values()))
    x, guides = _inputs(2, G=2, seed=3)
    counted = Counting(model.eval())
    out = dynamic_sample(counted, DDIM250, x, guides, [_params(3, eta=0.1), _params(1)], SeededNoise([7, 8]))
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    assert counted.timesteps == [[12], [8], [4, 4], [0, 0]]  # DifFace's t = 4k, per-sample starts


class ReplayDifFaceDraws:
    """The recorded DifFace run's draws: "init" at the diffused index N is q_noise, ("z", i) is z_{i - shift}
    (shift 1: the same draws in the same order for a chain whose steps are one index higher)."""

    def __init__(self, vec: dict, shift: int = 0):
        self.vec, self.shift, self.asked = vec, shift, []

    def __call__(self, kind, step, rows, like):
        self.asked.append((kind, step))
        key = "q_noise" if kind == "init" else f"z_{step - self.shift}"
        assert kind in ("init", "z") and (kind == "z" or step == int(self.vec["N"])), (kind, step)
        return torch.from_numpy(self.vec[key]).expand(like.shape).clone()


class RecordingModel(Counting):
    """Counting, and the state each call received."""

    def __init__(self, model):
        super().__init__(model)
        self.inputs = []

    def __call__(self, x, t):
        self.inputs.append(x.clone())
        return super().__call__(x, t)


@pytest.fixture(scope="module")
def difface_tiny_net():
    model = _tiny_difface()
    model.load_state_dict(torch.load(VECTORS / "tiny_difface_unet_state_dict.pt", weights_only=True), strict=True)
    return model.eval()


DIFFACE_LOOPS = ["difface_ddim_loop_ddim250_s100_eta0.npz", "difface_ddim_loop_ddim250_s100_eta05.npz",
                 "difface_ddim_loop_ddim250_s37_eta05.npz"]


@pytest.mark.parametrize("name", DIFFACE_LOOPS)
@torch.inference_mode()
def test_difface_convention_reproduces_difface_recorded_loop(name, difface_tiny_net):
    """DifFace's sample_func_ir_aligned core (guidance off) replayed from its recorded draws: x_start
    bit-identical, the network's timesteps exactly (first call at N - 1), the result to float precision."""
    vec = vector(name)
    N, eta = int(vec["N"]), float(vec["eta"])
    y = torch.from_numpy(vec["y"])
    no_guides = y.new_zeros((1, 0) + tuple(y.shape[1:]))
    model, draws = RecordingModel(difface_tiny_net), ReplayDifFaceDraws(vec)
    out = dynamic_sample(model, DDIM250, y, no_guides, [DynParams(start=N, eta=eta)], draws, convention="difface")
    assert torch.equal(model.inputs[0], torch.from_numpy(vec["x_start"]))  # q_sample to index N, float32 coefs
    assert [t[0] for t in model.timesteps] == vec["timesteps"].tolist()  # 4(N-1), ..., 4, 0
    assert len(model.timesteps) == N == dynamic_model_calls([DynParams(start=N)], "difface")
    # the draws actually used: q_noise and, for eta > 0, z_{N-1} .. z_1 (z_0 is multiplied by 0 in DifFace)
    assert draws.asked == [("init", N)] + ([("z", i) for i in range(N - 1, 0, -1)] if eta > 0 else [])
    torch.testing.assert_close(model.inputs[1], torch.from_numpy(vec["x_first"]), rtol=0, atol=1e-5)
    err = (out - torch.from_numpy(vec["out"])).abs().max().item()
    assert err <= 1e-5, err
    # the project's convention (first call at the diffused index) is NOT DifFace's: it misses by far more
    other = dynamic_sample(difface_tiny_net, DDIM250, y, no_guides, [DynParams(start=N, eta=eta)],
                           ReplayDifFaceDraws(vec, shift=1))
    assert (other - torch.from_numpy(vec["out"])).abs().max().item() > 1e-2


@torch.inference_mode()
def test_per_step_scale_map_is_evaluated_at_every_guided_step(net):
    from models.guidance import apply_scale_map, closed_form_guidance
    from tests.plugins import TinyGuidanceScaleNet

    x, guides = _inputs(3, seed=4)
    params = [_params(5, eta=0.2), _params(2), _params(3, gamma=0.0)]
    calls = []

    def ones(g, x0, t):
        calls.append((g.shape[0], t.tolist()))
        return torch.ones_like(x0[:, :1])

    plain = dynamic_sample(net, DDIM250, x, guides, params, SeededNoise([1, 2, 3]), scale_map=torch.ones(3, 1, 32, 32))
    stepped = dynamic_sample(net, DDIM250, x, guides, params, SeededNoise([1, 2, 3]), step_scale_map=ones)
    assert torch.equal(plain, stepped)  # a map of ones at every step is plain closed-form guidance
    # one call per guided row and step (rows one at a time on CPU), at the step's original timestep
    want = [(1, [4 * i]) for i in range(5, -1, -1) for b in (0, 1) if i <= params[b].start]
    assert calls == want
    # at start 0 the map sees (the sample's guides, its unguided clipped x0-hat, t = 0)
    dgsa = TinyGuidanceScaleNet(guides=2).eval()
    seen = []

    def spy(g, x0, t):
        seen.append((g, x0, t))
        return dgsa(g, x0, t)

    p = _params(0)
    out = dynamic_sample(net, DDIM250, x[:1], guides[:1], [p], SeededNoise([5]), step_scale_map=spy)
    step = torch.zeros(1, dtype=torch.long)
    xt = DDIM250.q_sample(x[:1], step, SeededNoise([5])("init", 0, [0], x[:1]))
    x0 = DDIM250.predict_x0(xt, step, net(xt, step)[:, :3]).clamp(-1, 1)
    assert torch.equal(seen[0][0], guides[:1]) and torch.equal(seen[0][1], x0) and seen[0][2].tolist() == [0]
    X = closed_form_guidance(x0, guides[:1], torch.tensor([p.sigmas], dtype=torch.float64), [[0.5, 0.5]])
    assert torch.equal(out, apply_scale_map(x0, X, dgsa(guides[:1], x0, step)).clamp(-1, 1))
    # batched equals alone with the learned map too
    batch = dynamic_sample(net, DDIM250, x, guides, params, SeededNoise([1, 2, 3]), step_scale_map=dgsa)
    for b in range(3):
        alone = dynamic_sample(net, DDIM250, x[b:b + 1], guides[b:b + 1], [params[b]], SeededNoise([b + 1]),
                               step_scale_map=dgsa)
        assert torch.equal(batch[b:b + 1], alone)
    with pytest.raises(ValueError, match="not both"):
        dynamic_sample(net, DDIM250, x, guides, params, SeededNoise([1, 2, 3]), scale_map=torch.ones(3, 1, 32, 32),
                       step_scale_map=dgsa)


def test_difface_convention_needs_a_start_of_at_least_one(net):
    x, guides = _inputs(1)
    with pytest.raises(ValueError, match="start >= 1"):
        dynamic_sample(net, DDIM250, x, guides, [_params(0)], SeededNoise([1]), convention="difface")
    with pytest.raises(ValueError, match="convention must be one of"):
        dynamic_sample(net, DDIM250, x, guides, [_params(2)], SeededNoise([1]), convention="ddpm")


class FakeDBLM(torch.nn.Module):
    """A 'learned' blur-level mapping: guides = the input blurred at two fixed levels."""

    def __init__(self, sigmas=(1.5, 0.5)):
        super().__init__()
        self.sigmas = sigmas
        self.gain = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        guides = torch.stack([blur(x, s) * self.gain for s in self.sigmas], 1)
        return guides, torch.tensor([list(self.sigmas)] * x.shape[0])


def test_learned_dblm_plugin_loads_its_weights(tmp_path):
    from tasks.dynamic_stage import DynamicConfig, build_estimator

    path = tmp_path / "dblm.pt"
    torch.save({"gain": torch.full((1,), 2.0)}, path)
    cfg = DynamicConfig(estimator="tests.test_dynamic:FakeDBLM", estimator_weights=str(path))
    dblm, ident = build_estimator(cfg, torch.device("cpu"))
    assert ident.startswith("sha256:") and ident.endswith("dblm.pt")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    guides, sigmas = dblm(x)
    assert guides.shape == (2, 2, 3, 16, 16) and sigmas.tolist() == [[1.5, 0.5]] * 2
    torch.testing.assert_close(guides[:, 0], 2 * blur(x, 1.5))
    with pytest.raises(RuntimeError, match="no weights for the DBLM"):
        build_estimator(DynamicConfig(estimator="tests.test_dynamic:FakeDBLM"), torch.device("cpu"))


class SpySample:
    """Wraps tasks.dynamic_stage.dynamic_sample: records what each call diffused, its guides and options."""

    def __init__(self):
        from tasks import dynamic_stage

        self.real, self.calls = dynamic_stage.dynamic_sample, []

    def __call__(self, model, schedule, x_init, guides, params, noise, **kw):
        self.calls.append(dict(x_init=x_init.clone(), guides=guides.clone(), params=list(params), **kw))
        return self.real(model, schedule, x_init, guides, params, noise, **kw)


def _lq_batch(n: int = 2, size: int = 32) -> tuple[list[str], np.ndarray]:
    _, x = _faces(64)
    hq = ((x[:n] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    lq = np.stack([resize_to(cv2.GaussianBlur(im, (0, 0), 1.5), size) for im in hq])
    return [f"s{k}" for k in range(n)], lq


@pytest.fixture(scope="module")
def tiny_stage():
    from tasks.dynamic_stage import DynamicConfig, DynamicStage

    cfg = DynamicConfig(prior="tiny", allow_random_weights=True, max_start=4)
    return DynamicStage(cfg, None, CPU, seed=3, diffuse_modes=["auto", "input"])


@torch.inference_mode()
def test_dynamic_stage_diffuses_dr2_x0hat_by_default_and_the_input_only_when_asked(tiny_stage, monkeypatch):
    from models.diffusion import dr2_schedule
    from models.dr2 import DR2Params, dr2_sample
    from models.noise import derive_seed
    from tasks.runtime import to_model_range

    spy = SpySample()
    monkeypatch.setattr("tasks.dynamic_stage.dynamic_sample", spy)
    ids, lq = _lq_batch()
    assert tiny_stage.modes == {"auto": "dr2", "input": "input"}
    x0, params, info = tiny_stage.restore_float(lq, ids)
    seeds = [sample_seed(3, i) for i in ids]
    y = to_model_range(lq, torch.device("cpu"))
    # default: DR2's x0-hat (the prior network, N=4, tau=22, draws derived apart from the chain's) is diffused
    want = dr2_sample(tiny_stage._network, dr2_schedule(), y, [DR2Params.of(4, 22)] * 2,
                      SeededNoise([derive_seed("dr2-estimate", s) for s in seeds]))
    call = spy.calls[0]
    assert torch.equal(call["x_init"], want) and not torch.equal(want, y)
    # ... and the guides are it re-blurred at known levels: sigma_g = hypot(its blur, d_g)
    est = tiny_stage.estimator.estimate(want)
    scale = 32 / REF_SIZE
    for b in range(2):
        want_sig = [np.hypot(float(est[b]), d * scale) for d in (2.0, 1.0, 0.0)]
        np.testing.assert_allclose(call["params"][b].sigmas, want_sig, rtol=1e-12)
        torch.testing.assert_close(call["guides"][b, 0], blur(want[b:b + 1], 2.0 * scale)[0])
        assert torch.equal(call["guides"][b, 2], want[b])
        assert info[b]["blur_mapper"] == "dr2(N=4,tau=22,weights=random-init:tiny)"
        assert info[b]["diffused_sigma"] == pytest.approx(float(est[b]) / scale)
        assert info[b]["guide_sigmas"] == ",".join(f"{s / scale:.3f}" for s in want_sig)
        assert info[b]["start_convention"] == "call-at-start" and info[b]["scale_map"] == "structure-tensor"
    assert call["convention"] == "call-at-start" and callable(call["scale_map"])
    # the raw input only on request
    x0_raw, _, info_raw = tiny_stage.restore_float(lq, ids, "input")
    assert torch.equal(spy.calls[1]["x_init"], y) and info_raw[0]["blur_mapper"] == "input"
    assert not torch.equal(x0, x0_raw)
    with pytest.raises(KeyError):
        tiny_stage.restore_float(lq, ids, "dblm")  # not one of this actor's modes


@torch.inference_mode()
def test_dynamic_stage_difface_convention_and_a_separate_dr2_mapper(monkeypatch):
    from models.diffusion import dr2_schedule
    from models.dr2 import DR2Params, dr2_sample
    from models.noise import derive_seed
    from tasks.config import Sampled
    from tasks.dr2_stage import DR2Config
    from tasks.dynamic_stage import DynamicConfig, DynamicStage
    from tasks.runtime import to_model_range

    spy = SpySample()
    monkeypatch.setattr("tasks.dynamic_stage.dynamic_sample", spy)
    cfg = DynamicConfig(prior="tiny-difface", allow_random_weights=True, max_start=0, start_convention="difface")
    # the mapper's (N, tau) are the workflow's dr2.N / dr2.tau (one name, one place)
    dr2 = DR2Config(architecture="tiny", allow_random_weights=True, N=Sampled((2,)), tau=Sampled((5,)))
    stage = DynamicStage(cfg, None, CPU, seed=0, dr2=dr2)
    assert stage.weights == "random-init:tiny-difface+dr2=random-init:tiny"
    ids, lq = _lq_batch()
    counted = Counting(stage._network)
    monkeypatch.setattr(stage, "_network", counted)
    x0, params, info = stage.restore_float(lq, ids)
    # max_start 0 is raised to 1 under the difface convention: one call, at index 0 (t = 0), per sample
    assert [p.start for p in params] == [1, 1] and counted.timesteps == [[0, 0]]
    assert spy.calls[0]["convention"] == "difface"
    assert info[0]["blur_mapper"] == "dr2(N=2,tau=5,weights=random-init:tiny)"
    assert info[0]["start_convention"] == "difface" and info[0]["start_t"] == 4
    # the DR2 mapper is the tiny DR2 network, not the prior: its x0-hat is what the chain diffused
    seeds = [derive_seed("dr2-estimate", sample_seed(0, i)) for i in ids]
    want = dr2_sample(stage.dr2_host._network, dr2_schedule(), to_model_range(lq, torch.device("cpu")),
                      [DR2Params.of(2, 5)] * 2, SeededNoise(seeds))
    assert torch.equal(spy.calls[0]["x_init"], want)


def test_diffuse_options_are_refused_in_one_line_naming_the_fix(caplog):
    from tasks.config import Sampled
    from tasks.dr2_stage import DR2Config
    from tasks.dynamic_stage import DynamicConfig, resolve_diffuse

    with pytest.raises(ValueError, match="dynamic.diffuse must be one of auto, dr2, dblm, input"):
        DynamicConfig(diffuse="raw")
    with pytest.raises(ValueError, match="dynamic.start_convention must be one of call-at-start, difface"):
        DynamicConfig(start_convention="ddpm")
    # diffuse dr2 runs one DR2 setting for every sample: dr2.N / dr2.tau must be fixed, valid values
    tiny = DynamicConfig(prior="tiny")
    with pytest.raises(ValueError, match=r"^--dr2.N: dynamic.diffuse dr2 needs one fixed .* got \[4, 8\]$"):
        resolve_diffuse(tiny, DR2Config(N=Sampled((4, 8))))
    with pytest.raises(ValueError, match=r"^--dr2.tau: dynamic.diffuse dr2 needs one fixed integer value"):
        resolve_diffuse(tiny, DR2Config(tau=Sampled(low=10, high=30)))
    with pytest.raises(ValueError, match=r"^--dr2.N / --dr2.tau: invalid DR2 parameters N=4, tau=150"):
        resolve_diffuse(tiny, DR2Config(tau=Sampled((150,))))
    assert resolve_diffuse(tiny, DR2Config(N=Sampled((4, 8))), "input") == "input"  # no DR2 run: no constraint
    difface = DynamicConfig(prior="difface-512")
    with pytest.raises(ValueError, match="--dr2.weights .* or choose --dynamic.diffuse input"):
        resolve_diffuse(difface, DR2Config())
    assert resolve_diffuse(difface, DR2Config(weights="/w/DR2_FFHQ.pkl")) == "dr2"
    assert resolve_diffuse(difface, DR2Config(), "input") == "input"
    with pytest.raises(ValueError, match="needs a learned DBLM"):
        resolve_diffuse(DynamicConfig(), None, "dblm")
    learned = DynamicConfig(estimator="tests.test_dynamic:FakeDBLM")
    assert resolve_diffuse(learned, None) == "dblm"
    with pytest.raises(ValueError, match="use dynamic.diffuse dblm"):
        resolve_diffuse(learned, None, "dr2")
    from workflows.restore import main as restore  # refused on the driver, before Ray starts

    assert restore(["--method", "dynamic", "--dynamic.prior", "difface-512", "--dynamic.allow-random-weights",
                    "true", "--output", "/nonexistent/never-written"]) == 2
    assert "dynamic.diffuse dr2 needs a DR2 network" in caplog.text
    assert restore(["--method", "dynamic", "--dynamic.prior", "tiny", "--dynamic.allow-random-weights", "true",
                    "--dr2.N", "4,8", "--output", "/nonexistent/never-written"]) == 2
    assert "--dr2.N: dynamic.diffuse dr2 needs one fixed integer value" in caplog.text


@torch.inference_mode()
def test_learned_dblm_output_is_diffused_and_guides(tmp_path, monkeypatch):
    from tasks.dynamic_stage import DynamicConfig, DynamicStage

    path = tmp_path / "dblm.pt"
    torch.save({"gain": torch.full((1,), 1.0)}, path)
    spy = SpySample()
    monkeypatch.setattr("tasks.dynamic_stage.dynamic_sample", spy)
    cfg = DynamicConfig(prior="tiny", allow_random_weights=True, max_start=3, estimator="tests.test_dynamic:FakeDBLM",
                        estimator_weights=str(path))
    stage = DynamicStage(cfg, None, CPU, seed=0)
    ids, lq = _lq_batch()
    _, _, info = stage.restore_float(lq, ids)
    call = spy.calls[0]
    assert stage.modes == {"auto": "dblm"} and call["guides"].shape[1] == 2
    assert torch.equal(call["x_init"], call["guides"][:, -1])  # the sharpest blur-mapped image
    assert info[0]["blur_mapper"].startswith("dblm(sha256:") and info[0]["diffused_sigma"] == pytest.approx(0.5 * 16)


@torch.inference_mode()
def test_learned_per_step_scale_map_plugin_through_the_stage(tmp_path, monkeypatch):
    from tasks.dynamic_stage import DynamicConfig, DynamicStage
    from tasks.weights import WeightsError
    from tests.plugins import TinyGuidanceScaleNet

    torch.manual_seed(5)
    trained = TinyGuidanceScaleNet(guides=3)
    path = tmp_path / "dgsa.pt"
    torch.save(trained.state_dict(), path)
    cfg = DynamicConfig(prior="tiny", allow_random_weights=True, max_start=3, diffuse="input",
                        scale_map_net="tests.plugins:TinyGuidanceScaleNet", scale_map_weights=str(path),
                        scale_map_kwargs={"guides": 3})
    spy = SpySample()
    monkeypatch.setattr("tasks.dynamic_stage.dynamic_sample", spy)
    stage = DynamicStage(cfg, None, CPU, seed=0)
    ids, lq = _lq_batch()
    x0, params, info = stage.restore_float(lq, ids)
    call = spy.calls[0]
    assert call["scale_map"] is None and call["step_scale_map"] is stage.step_scale_map
    assert info[0]["scale_map"].startswith("tests.plugins:TinyGuidanceScaleNet@sha256:")
    assert "+dgsa=sha256:" in stage.weights
    # the loaded weights are the file's (strict), and the chain equals the sampler run with that network
    assert all(torch.equal(a, b) for a, b in zip(stage.step_scale_map.net.state_dict().values(),
                                                 trained.state_dict().values()))
    direct = spy.real(stage._network, stage.schedule, call["x_init"], call["guides"], params,
                      SeededNoise([sample_seed(0, i) for i in ids]), step_scale_map=trained.eval())
    assert torch.equal(x0, direct)
    torch.save({"inp.weight": trained.inp.weight}, path)  # missing keys: refused (strict load)
    with pytest.raises(WeightsError, match="3 missing"):
        DynamicStage(cfg, None, CPU, seed=0)
    prior_path = tmp_path / "prior.pt"  # a prior with weights, so the missing DGSA weights are what fails
    torch.save(stage.model.state_dict(), prior_path)
    with pytest.raises(RuntimeError, match="no weights for the DGSA map"):
        DynamicStage(DynamicConfig(prior="tiny", weights=str(prior_path), diffuse="input",
                                   scale_map_net="tests.plugins:TinyGuidanceScaleNet"), None, CPU, seed=0)


def _tiny_faces(root: Path, n: int, size: int = 64) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = sorted(SAMPLES.glob("*.png"))[:n]
    for p in paths:
        cv2.imwrite(str(root / p.name), cv2.resize(cv2.imread(str(p)), (size, size), interpolation=cv2.INTER_AREA))
    return [p.name for p in paths]


def test_restore_workflow_with_method_dynamic(ray_local, tmp_path):
    from tasks.dynamic_stage import DynamicConfig, DynamicStage
    from workflows.restore import main as restore

    ids = _tiny_faces(tmp_path / "in", 2)
    out = tmp_path / "out"
    args = ["--method", "dynamic", "--dynamic.prior", "tiny", "--dynamic.allow-random-weights", "true",
            "--dynamic.max-start", "6", "--image.size", "32", "--enhancer.name", "bicubic", "--enhancer.size", "64",
            "--write.dr2", "true", "--runtime.device", "cpu", "--runtime.batch-size", "2",
            "--cluster.block-rows", "2", "--input", str(tmp_path / "in"), "--output", str(out)]
    assert restore(args) == 0
    df = read_manifest(str(out)).set_index("id")
    assert sorted(df.index) == sorted(ids) and (df["status"] == "ok").all()
    assert (df["restore_method"] == "dynamic").all() and (df["weights"] == "random-init:tiny").all()
    assert ((df["omega"] >= 0) & (df["omega"] <= 6)).all() and (df["start_t"] == 4 * df["omega"]).all()
    assert df["N"].isna().all() and (df["enhancer_weights"] == "bicubic").all()
    assert all(len(s.split(",")) == 3 for s in df["guide_sigmas"])
    # which mapper made the diffused image and the guides, at which blur levels, under which convention
    assert (df["blur_mapper"] == "dr2(N=4,tau=22,weights=random-init:tiny)").all()
    assert np.isfinite(df["diffused_sigma"]).all() and (df["start_convention"] == "call-at-start").all()
    assert (df["scale_map"] == "structure-tensor").all()
    # the workflow's output is the stage's, a pure function of (seed, id)
    stage = DynamicStage(DynamicConfig(prior="tiny", allow_random_weights=True, max_start=6), None, CPU, seed=0)
    for i in ids:
        assert cv2.imread(df.loc[i, "dr2"]).shape == (32, 32, 3)
        assert cv2.imread(df.loc[i, "restored"]).shape == (64, 64, 3)
    batch = {"id": np.array(ids, dtype=object), "status": np.array(["ok"] * 2, dtype=object),
             "image": np.stack([resize_to(np.ascontiguousarray(cv2.imread(str(tmp_path / "in" / i))[..., ::-1]), 32)
                                for i in ids])}
    got = stage(batch)
    for k, i in enumerate(ids):
        assert np.array_equal(got["dr2"][k], cv2.imread(df.loc[i, "dr2"])[..., ::-1])
        assert got["omega"][k] == df.loc[i, "omega"]


def test_benchmark_stage_runs_dynamic_methods_both_ways_side_by_side(monkeypatch):
    from tasks.benchmark_stage import DynamicBenchmarkStage, MetricsConfig, parse_methods_with_dynamic
    from tasks.dr2_stage import DR2Config
    from tasks.dynamic_stage import DynamicConfig
    from tasks.restore_stage import EnhancerConfig

    methods = [{"name": "input"}, {"name": "dyn", "dynamic": True},
               {"name": "dyn+bicubic", "dynamic": True, "enhancer": "bicubic", "diffuse": "dr2"},
               {"name": "dyn_raw", "dynamic": True, "diffuse": "input"}]
    with pytest.raises(ValueError, match="dynamic method"):
        parse_methods_with_dynamic([{"name": "d", "dynamic": True, "N": 4}])
    with pytest.raises(ValueError, match="duplicate"):
        parse_methods_with_dynamic([{"name": "d"}, {"name": "d", "dynamic": True}])
    with pytest.raises(ValueError, match="diffuse must be one of"):
        parse_methods_with_dynamic([{"name": "d", "dynamic": True, "diffuse": "raw"}])
    spy = SpySample()
    monkeypatch.setattr("tasks.dynamic_stage.dynamic_sample", spy)
    stage = DynamicBenchmarkStage(methods, DynamicConfig(prior="tiny", allow_random_weights=True, max_start=3),
                                  DR2Config(), EnhancerConfig(name="bicubic", size=64),
                                  MetricsConfig(names=["psnr_rgb"]), CPU, seed=0, model_size=32)
    _, x = _faces(64)
    hq = ((x[:2] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    batch = {"id": np.array(["a", "b"], dtype=object), "stem": np.array(["a", "b"], dtype=object),
             "status": np.array(["ok", "ok"], dtype=object), "image": hq,
             "lq_pixels": np.stack([cv2.GaussianBlur(im, (0, 0), 1.5) for im in hq])}
    out = stage(batch)
    assert list(out["method"]) == ["input"] * 2 + ["dyn"] * 2 + ["dyn+bicubic"] * 2 + ["dyn_raw"] * 2
    assert out["restored"].shape == (8, 64, 64, 3) and np.isfinite(out["psnr_rgb"]).all()
    assert list(out["omega"][:2]) == [-1, -1] and (out["omega"][2:] >= 0).all()
    assert list(out["weights"][2:]) == (["random-init:tiny+none"] * 2 + ["random-init:tiny+bicubic"] * 2
                                        + ["random-init:tiny+none"] * 2)
    # the sampler ran once per mapper: dyn (auto) and dyn+bicubic (dr2) share the DR2-mapped chain, dyn_raw its own
    assert len(spy.calls) == 2
    assert not torch.equal(spy.calls[0]["x_init"], spy.calls[1]["x_init"])
    assert list(out["blur_mapper"]) == [""] * 2 + ["dr2(N=4,tau=22,weights=random-init:tiny)"] * 4 + ["input"] * 2
    assert np.isnan(out["diffused_sigma"][:2]).all() and np.isfinite(out["diffused_sigma"][2:]).all()
    assert all(len(g.split(",")) == 3 for g in out["guide_sigmas"][2:]) and list(out["start_t"][:2]) == [-1, -1]
    assert not np.array_equal(out["restored"][2:4], out["restored"][6:8])  # the two ways differ
    assert np.array_equal(out["restored"][2:4], stage._finish(spy.real(
        stage.dynamic_stage._network, stage.dynamic_stage.schedule, spy.calls[0]["x_init"], spy.calls[0]["guides"],
        spy.calls[0]["params"], SeededNoise([sample_seed(0, "a"), sample_seed(0, "b")]),
        scale_map=spy.calls[0]["scale_map"]), "none", 64))


def test_benchmark_workflow_runs_dyn_and_dyn_raw(ray_local, tmp_path):
    from workflows.benchmark import main as benchmark

    ids = _tiny_faces(tmp_path / "hq", 2)
    out = tmp_path / "out"
    methods = [{"name": "input"}, {"name": "dyn", "dynamic": True}, {"name": "dyn_raw", "dynamic": True,
                                                                      "diffuse": "input"}]
    args = ["--input", str(tmp_path / "hq"), "--output", str(out), "--allow-random-weights", "true",
            "--dr2.architecture", "tiny", "--dynamic.prior", "tiny", "--dynamic.allow-random-weights", "true",
            "--dynamic.max-start", "3", "--dynamic.size", "32", "--image.gt-size", "64", "--enhancer.size", "64",
            "--metrics.names", "[psnr_rgb]", "--runtime.device", "cpu",
            "--runtime.batch-size", "2", "--cluster.block-rows", "2"]
    assert benchmark(args + ["--methods", json.dumps(methods)]) == 0
    df = read_manifest(str(out)).set_index(["method", "id"]).sort_index()
    assert len(df) == 6 and (df["status"] == "ok").all() and np.isfinite(df["psnr_rgb"]).all()
    for i in ids:
        assert df.loc[("dyn", i), "blur_mapper"] == "dr2(N=4,tau=22,weights=random-init:tiny)"
        assert df.loc[("dyn_raw", i), "blur_mapper"] == "input"
        assert df.loc[("input", i), "blur_mapper"] in ("", None)
        for m in ("dyn", "dyn_raw"):
            row = df.loc[(m, i)]
            assert row["start_convention"] == "call-at-start" and np.isfinite(row["diffused_sigma"])
            assert len(row["guide_sigmas"].split(",")) == 3 and 0 <= row["omega"] <= 3
    # main refuses an unresolvable diffuse on the driver, before Ray starts
    bad = [{"name": "d", "dynamic": True, "diffuse": "dblm"}]
    assert benchmark(args + ["--methods", json.dumps(bad)]) == 2


def test_benchmark_config_accepts_dynamic_methods():
    from tasks.config import load
    from workflows.benchmark import BenchmarkConfig

    cfg = load(BenchmarkConfig, ["--methods", json.dumps([{"name": "dyn", "dynamic": True}]),
                                 "--dynamic.prior", "difface-512", "--dynamic.respacing", "ddim250"], "")
    assert cfg.dynamic.prior == "difface-512" and cfg.methods == [{"name": "dyn", "dynamic": True}]

"""The per-batch DR2 stage: uint8 in and out, per-sample parameters, error rows, weights handling."""

import numpy as np
import pytest
import torch

from models.unet import UNetModel, dr2_unet_config
from tasks.config import Sampled
from tasks.dr2_stage import DR2Config, DR2Stage, build_dr2_unet, dr2_random_label
from tasks.load_stage import draw_params
from tasks.runtime import RuntimeConfig, to_model_range, to_uint8
from tasks.weights import RANDOM_INIT


def test_uint8_conversion_rounds_and_clips_never_wraps():
    x = torch.tensor([-5.0, -1.0, -0.99, 0.0, 0.5, 1.0, 7.0]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    u = to_uint8(x)[0, 0, :, 0]
    # (x+1)*127.5 = -510, 0, 1.275, 127.5, 191.25, 255, 1020: clipped and rounded half-to-even
    assert u.tolist() == [0, 0, 1, 128, 191, 255, 255]
    img = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    assert np.array_equal(to_uint8(to_model_range(img, torch.device("cpu"))), img)  # exact round trip


def _batch(n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ids = np.array([f"dir/face_{k}.png" for k in range(n)], dtype=object)
    status = np.array(["ok"] * n, dtype=object)
    return {"id": ids, "image": images, "status": status,
            "N": np.array([4, 8, 1, 2][:n]), "tau": np.array([22, 35, 10, 30][:n])}


@pytest.fixture(scope="module")
def stage():
    cfg = DR2Config(allow_random_weights=True, architecture="tiny")
    return DR2Stage(cfg, RuntimeConfig(device="cpu"), seed=11)


def test_stage_outputs_uint8_per_sample_and_labels_random_weights(stage):
    batch = _batch()
    out = stage(dict(batch))
    assert out["dr2"].dtype == np.uint8 and out["dr2"].shape == batch["image"].shape
    assert out["omega"].tolist() == [42, 60, 15, 40]
    assert set(out["weights"]) == {f"{RANDOM_INIT}:tiny"}
    # a sample's output depends on its id and the job seed, not on its batch
    alone = stage({k: v[1:2] for k, v in batch.items()})
    assert np.array_equal(alone["dr2"][0], out["dr2"][1])
    other_seed = DR2Stage(DR2Config(allow_random_weights=True, architecture="tiny"), RuntimeConfig(device="cpu"),
                          seed=12)({k: v[1:2] for k, v in batch.items()})
    assert not np.array_equal(other_seed["dr2"][0], out["dr2"][1])


def test_error_rows_pass_through_without_compute(stage, monkeypatch):
    batch = _batch()
    batch["status"] = np.array(["ok", "error", "ok", "error"], dtype=object)
    seen = []
    real = stage.dr2_uint8
    monkeypatch.setattr(stage, "dr2_uint8", lambda images, ids, params: seen.append(ids) or real(images, ids, params))
    out = stage(dict(batch))
    assert seen == [["dir/face_0.png", "dir/face_2.png"]]
    assert not out["dr2"][1].any() and not out["dr2"][3].any() and out["omega"][1] == -1
    full = stage(_batch())
    assert np.array_equal(out["dr2"][[0, 2]], full["dr2"][[0, 2]])


def test_refuses_to_run_without_weights_unless_allowed():
    with pytest.raises(RuntimeError, match="no DR2 weights configured"):
        build_dr2_unet(DR2Config())
    with pytest.raises(ValueError, match="architecture"):
        build_dr2_unet(DR2Config(architecture="big", allow_random_weights=True))


def test_random_init_label_is_the_one_the_network_builder_records():
    for arch, label in (("tiny", "random-init:tiny"), ("ffhq256", "random-init")):
        cfg = DR2Config(allow_random_weights=True, architecture=arch)
        assert dr2_random_label(cfg) == label
        if arch == "tiny":  # the full-size UNet is too big to build here just for its label
            assert build_dr2_unet(cfg)[1] == label


def test_full_size_checkpoint_loads_strictly_through_the_stage_builder(tmp_path):
    # A random state_dict in the real layout, saved like the real file: the user's path minus the numbers.
    ref = UNetModel.from_config(dr2_unet_config()).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}
    path = tmp_path / "DR2_FFHQ.pkl"
    torch.save(sd, path)
    model, identity = build_dr2_unet(DR2Config(weights=str(path)))
    assert identity.startswith("sha256:") and identity.endswith(":DR2_FFHQ.pkl")
    assert torch.equal(model.state_dict()["out.2.weight"], sd["out.2.weight"])
    missing = tmp_path / "nope" / "DR2_FFHQ.pkl"
    with pytest.raises(FileNotFoundError, match="DR2_FFHQ.pkl"):
        build_dr2_unet(DR2Config(weights=str(missing)))


def test_per_sample_params_depend_only_on_seed_and_id():
    specs = {"N": Sampled.parse([4, 8, 16]), "tau": Sampled.parse({"low": 20, "high": 35}),
             "sigma": Sampled.parse("0.5:3")}
    a = draw_params(0, "x/1.png", specs)
    assert a == draw_params(0, "x/1.png", specs)
    assert a["N"] in (4, 8, 16) and 20 <= a["tau"] <= 35 and isinstance(a["tau"], int)
    assert 0.5 <= a["sigma"] <= 3.0
    draws = [draw_params(0, f"x/{k}.png", specs) for k in range(200)]
    assert {d["N"] for d in draws} == {4, 8, 16} and len({d["tau"] for d in draws}) == 16
    assert draws != [draw_params(1, f"x/{k}.png", specs) for k in range(200)]
    # adding a parameter does not change the others (each has its own stream)
    more = dict(specs, extra=Sampled.parse([1, 2]))
    assert {k: draw_params(0, "x/1.png", more)[k] for k in specs} == a


def test_random_init_is_the_same_network_in_every_actor():
    torch.manual_seed(123)  # whatever the global RNG state, the demo network is fixed
    a, _ = build_dr2_unet(DR2Config(allow_random_weights=True, architecture="tiny"))
    torch.manual_seed(456)
    b, _ = build_dr2_unet(DR2Config(allow_random_weights=True, architecture="tiny"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_compiled_network_is_one_fixed_shape_graph_with_eager_results(stage, monkeypatch):
    """runtime.compile pads every network call to batch_size rows: a short batch, mixed (N, tau) (so steps
    with 1..4 rows) and a batch larger than batch_size all reuse one graph, and results equal eager's."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from tasks.runtime import NetworkHost

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")  # dynamo's real tracing, without minutes of codegen on CPU
    monkeypatch.setattr(NetworkHost, "compile_backend", counter)
    cfg = DR2Config(allow_random_weights=True, architecture="tiny")
    compiled = DR2Stage(cfg, RuntimeConfig(device="cpu", compile="default", batch_size=2), seed=11)
    shapes = []
    real = compiled.model
    compiled.model = lambda x, t: shapes.append(x.shape[0]) or real(x, t)

    batch = _batch(3)  # 3 rows > batch_size 2, N in {1, 4, 8}: steps run 1..3 of them
    out = compiled(dict(batch))
    assert np.array_equal(out["dr2"], stage(_batch(3))["dr2"])
    short = compiled({k: v[1:2] for k, v in batch.items()})
    assert np.array_equal(short["dr2"][0], out["dr2"][1])
    assert set(shapes) == {2}, "every compiled call sees exactly batch_size rows"
    assert counter.frame_count == 1, "one graph, no recompilation for other row counts"
    with pytest.raises(ValueError, match="runtime.compile must be one of off, default"):
        RuntimeConfig(compile="fast")
    torch._dynamo.reset()


def test_a_sample_does_not_depend_on_the_n_tau_of_its_batch_mates(stage):
    """Mixed (N, tau) batch mates: each sample's float x0-hat equals its run alone, bit for bit.

    The face arrives channels_last-strided from uint8 NHWC, and alone it went through the network in that
    layout while in a batch it was gathered into a contiguous tensor: CPU kernels round the two differently.
    """
    from models.dr2 import DR2Params

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    ids = [f"mix/{k}.png" for k in range(6)]
    params = [DR2Params.of(n, t) for n, t in [(4, 10), (2, 12), (8, 11), (4, 13), (16, 9), (2, 10)]]
    with torch.inference_mode():
        together = stage.dr2_x0(images, ids, params)
        for k in range(6):
            alone = stage.dr2_x0(images[k:k + 1], ids[k:k + 1], params[k:k + 1])
            assert torch.equal(alone[0], together[k]), f"sample {k} changed with its batch mates"

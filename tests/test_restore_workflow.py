"""Enhancers (built-in and plug-in) and the restoration workflow on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from models.enhancers import enhance, handover
from models.sparnethd import from_config as sparnet_from_config
from tasks.manifest import read_manifest
from tasks.restore_stage import EnhancerConfig, build_enhancer
from workflows.restore import main as restore

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
TINY_SPAR = {"min_ch": 8, "max_ch": 16, "size": 64, "min_feat_size": 16, "res_depth": 1}
FAST = ["--allow-random-weights", "true", "--dr2.architecture", "tiny", "--image.size", "32", "--dr2.N", "2",
        "--dr2.tau", "5", "--runtime.batch-size", "4", "--runtime.device", "cpu", "--cluster.block-rows", "4",
        "--enhancer.size", "64"]
CPU = torch.device("cpu")


def test_handover_is_clamp_then_bicubic():
    x = torch.randn(2, 3, 16, 16) * 2
    torch.testing.assert_close(handover(x, 32), F.interpolate(x.clamp(-1, 1), size=(32, 32), mode="bicubic",
                                                               align_corners=False))
    assert handover(x, 16).abs().max() <= 1


def test_missing_weights_refused_alike_on_the_driver_and_in_the_actor(tmp_path, caplog):
    """One missing-weights check per network: the driver's one-line refusal is the actor builder's error."""
    from tasks.dr2_stage import DR2Config, build_dr2_unet
    from tasks.dynamic_stage import DynamicConfig, build_prior

    common = ["--input", str(SAMPLES), "--output", str(tmp_path / "never"), "--image.size", "32"]
    for argv, build in ((["--dr2.architecture", "tiny"], lambda: build_dr2_unet(DR2Config(architecture="tiny"))),
                        (["--method", "dynamic", "--dynamic.prior", "tiny"],
                         lambda: build_prior(DynamicConfig(prior="tiny")))):
        caplog.clear()
        assert restore(common + argv) == 2
        with pytest.raises(RuntimeError, match="no .*weights configured") as refused:
            build()
        assert str(refused.value) in caplog.text and "\n" not in str(refused.value)
    assert not (tmp_path / "never").exists()


def test_builtin_and_plugin_enhancers(tmp_path):
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    none, size, ident = build_enhancer(EnhancerConfig(name="none"), CPU)
    assert size is None and ident == "none" and torch.equal(enhance(none, x0, size), x0)
    bic, size, _ = build_enhancer(EnhancerConfig(name="bicubic", size=32), CPU)
    torch.testing.assert_close(enhance(bic, x0, size), handover(x0, 32).clamp(-1, 1))
    plug, size, ident = build_enhancer(EnhancerConfig(name="tests.plugins:BrightenEnhancer", size=32,
                                                      kwargs={"amount": 0.5}), CPU)
    assert ident == "tests.plugins:BrightenEnhancer"  # no parameters: nothing to load or fake
    torch.testing.assert_close(enhance(plug, x0, size), (handover(x0, 32) + 0.5).clamp(-1, 1))
    with pytest.raises(RuntimeError, match="no weights configured for enhancer 'sparnethd'"):
        build_enhancer(EnhancerConfig(name="sparnethd", kwargs=TINY_SPAR), CPU)
    with pytest.raises(ValueError, match="module:Class"):
        build_enhancer(EnhancerConfig(name="nonsense"), CPU)


def test_sparnethd_enhancer_loads_its_checkpoint_strictly(tmp_path):
    ref = sparnet_from_config(TINY_SPAR)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    path = tmp_path / "SPARNetHD_tiny.pth"
    torch.save(sd, path)
    model, size, ident = build_enhancer(EnhancerConfig(name="sparnethd", kwargs=TINY_SPAR, size=64,
                                                       weights=str(path)), CPU)
    assert ident.startswith("sha256:") and ident.endswith("SPARNetHD_tiny.pth") and size == 64
    assert torch.equal(model.state_dict()["out_conv.conv2d.weight_orig"], sd["out_conv.conv2d.weight_orig"])


def _inputs(root: Path, n: int = 4) -> list[str]:
    face = cv2.resize(cv2.imread(str(SAMPLES / "256.png")), (64, 64), interpolation=cv2.INTER_AREA)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        cv2.imwrite(str(root / f"f{k}.png"), np.roll(face, 3 * k, axis=1))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return [f"f{k}.png" for k in range(n)] + ["broken.png"]


def test_restore_shared_and_separate_topologies(ray_local, tmp_path):
    ids = _inputs(tmp_path / "in")
    args = [*FAST, "--enhancer.allow-random-weights", "true", "--enhancer.kwargs", json.dumps(TINY_SPAR),
            "--write.dr2", "true", "--input", str(tmp_path / "in")]
    assert restore([*args, "--output", str(tmp_path / "shared")]) == 0
    assert restore([*args, "--output", str(tmp_path / "separate"), "--topology", "separate"]) == 0
    a = read_manifest(str(tmp_path / "shared")).set_index("id")
    b = read_manifest(str(tmp_path / "separate")).set_index("id")
    # The summary says how busy the model actors were: one pool in shared, two in separate.
    for topology, stages in (("shared", {"RestoreStage"}), ("separate", {"DR2Stage", "EnhanceStage"})):
        summary = json.loads((tmp_path / topology / "_summary.json").read_text())
        assert {actor.split("@")[0] for actor in summary["busy"]} == stages
        assert all(s > 0 for s in summary["busy"].values()) and 0 < summary["actor_utilisation"] <= 1.0
        # ... and how much of that was the diffusion network (DR2's UNet; the enhancer is not one)
        assert {actor.split("@")[0] for actor in summary["network"]} == stages - {"EnhanceStage"}
        assert all(0 < s < summary["busy"][a] for a, s in summary["network"].items())
        assert 0 < summary["network_share"] < 1
    assert sorted(a.index) == sorted(ids) and a.loc["broken.png", "status"] == "error"
    assert (a["enhancer"] == "sparnethd").all() and (a.loc[a.status == "ok", "enhancer_weights"]
                                                     == "random-init:sparnethd").all()
    for i in ids[:-1]:
        ra, rb = cv2.imread(a.loc[i, "restored"]), cv2.imread(b.loc[i, "restored"])
        assert ra.shape == (64, 64, 3)
        # DR2 is the same function of (seed, id) in both topologies; the enhancer sees the float x0 in
        # shared mode and the uint8 intermediate in separate mode, so outputs agree to quantisation level.
        assert np.array_equal(cv2.imread(a.loc[i, "dr2"]), cv2.imread(b.loc[i, "dr2"]))
        assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 3


def test_per_sample_settings_from_an_input_list(ray_local, tmp_path):
    _inputs(tmp_path / "in", 2)
    listing = tmp_path / "list.parquet"
    pd.DataFrame({"uri": [str(tmp_path / "in" / "f0.png"), str(tmp_path / "in" / "f1.png")],
                  "N": [2, 4], "tau": [5, 9]}).to_parquet(listing)
    out = tmp_path / "out"
    assert restore([*FAST, "--enhancer.name", "bicubic", "--input", str(listing), "--output", str(out)]) == 0
    df = read_manifest(str(out)).sort_values("N")
    assert df[["N", "tau", "omega"]].values.tolist() == [[2, 5, 15], [4, 9, 29]]
    assert (df["enhancer_weights"] == "bicubic").all() and "dr2" not in df.columns  # not written: not declared


def test_timed_stage_records_busy_time_per_actor_across_stages():
    import time

    from tasks.manifest import BUSY_COLUMN, busy_by_actor
    from tasks.pipeline import NETWORK_PREFIX, timed
    from tasks.runtime import NETWORK_CLOCK

    class Slow:
        def __init__(self, pause: float):
            self.pause = pause

        def __call__(self, batch):
            time.sleep(self.pause)
            return batch

    class WithNetwork(Slow):
        def __call__(self, batch):
            with NETWORK_CLOCK.forward(torch.device("cpu")):
                time.sleep(self.pause / 2)
            return super().__call__(batch)

    first, second, third = timed(Slow)(0.2), timed(Slow)(0.1), timed(WithNetwork)(0.2)
    assert type(first).__name__ == "Slow"  # Ray Data names the operator after the class
    out = second(first({"id": np.array(["a", "b"])}))
    assert all(v.count(";") == 1 for v in out[BUSY_COLUMN])  # both stages on every row
    busy = busy_by_actor(out[BUSY_COLUMN])
    assert len(busy) == 1  # same process: one actor id (Slow@host:pid), both calls summed
    # sleeps last at least their pause (a busy machine only adds): lower bounds and differences, no windows
    assert sum(busy.values()) >= 0.3
    # a stage that runs a network also records its forward time, under "network:<actor>"
    busy = busy_by_actor(third({"id": np.array(["a", "b"])})[BUSY_COLUMN])
    (actor, stage), (net_actor, network) = sorted(busy.items(), key=lambda kv: kv[0].startswith(NETWORK_PREFIX))
    assert net_actor == NETWORK_PREFIX + actor and actor.startswith("WithNetwork@")
    assert network >= 0.099 and stage - network >= 0.199  # the forward is inside the stage, the plain sleep not


def test_enhancer_result_does_not_depend_on_its_batch_on_cpu():
    torch.manual_seed(0)
    # big enough for oneDNN to pick batch-dependent kernels (the tiny config happens to be invariant)
    spar = sparnet_from_config({"min_ch": 16, "max_ch": 64, "size": 128, "min_feat_size": 16, "res_depth": 2})
    spar = spar.eval()
    x0 = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # random SPARNetHD outputs explode (~1e12): rescale so enhance's clamp keeps them
        scale = float(spar(handover(x0, 128)).abs().max())

    class Rescaled(torch.nn.Module):
        def forward(self, x):
            return spar(x) / scale

    model = Rescaled()
    with torch.no_grad():
        together = enhance(model, x0, 128)
        alone = torch.cat([enhance(model, x0[i : i + 1], 128) for i in range(4)])
        permuted = enhance(model, x0[[2, 0, 3, 1]], 128)
    assert torch.equal(together, alone) and torch.equal(permuted, together[[2, 0, 3, 1]])

"""The GPU scheduling path on a CPU machine: a local Ray that declares one logical GPU.

What a GPU cluster does that CI cannot otherwise see: the DR2 actors ask for GPUs (one per GPU, or several
sharing one with gpus_per_actor < 1), and decoding is NOT fused into the GPU actor (Ray fuses a task map
into an actor map only when their resources match), so the CPU stages overlap the GPU's work. The actors
find no CUDA here and run on CPU, which is all this test needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import build
from tasks.manifest import read_manifest
from tasks.pipeline import Plan
from workflows.augment import AugmentConfig, build_pipeline
from workflows.augment import main as augment

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
FAST = ["--allow-random-weights", "true", "--dr2.architecture", "tiny", "--image.size", "32", "--dr2.N", "2",
        "--dr2.tau", "5", "--runtime.batch-size", "2", "--cluster.block-rows", "2", "--cluster.manifest-rows", "4"]


@pytest.fixture(scope="module")
def ray_one_gpu():
    import ray

    from tasks.pipeline import ROOT

    # 4 logical CPUs: two 1-CPU actors plus the decode/write tasks must fit (they are slots, not cores)
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _physical_plan(ray, capsys, device: str) -> str:
    cfg = build(AugmentConfig, {"runtime": {"device": device}, "dr2": {"allow_random_weights": True}})
    todo = pd.DataFrame({"id": ["a.png"], "source": ["/nowhere/a.png"], "stem": ["a"], "key_error": [""],
                         "key_error_kind": [""]})
    build_pipeline(cfg, Plan(todo=todo, total=1, skipped=0, ignored=0, duplicates=0), ray, "test").explain()
    out = capsys.readouterr().out
    return out[out.index("Physical Plan (Optimized)"):]


def test_decode_is_not_fused_into_the_gpu_actor(ray_one_gpu, capsys):
    gpu = _physical_plan(ray_one_gpu, capsys, "auto")
    assert "TaskPoolMapOperator[MapBatches(LoadFaces)]" in gpu
    assert "ActorPoolMapOperator[MapBatches(DR2Stage)]" in gpu
    # on CPU actors (same resources) Ray fuses them: decoding then runs inside the DR2 actor
    cpu = _physical_plan(ray_one_gpu, capsys, "cpu")
    assert "MapBatches(LoadFaces)->MapBatches(DR2Stage)" in cpu


def test_two_actors_share_one_gpu(ray_one_gpu, tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted(SAMPLES.glob("*.png")):
        shutil.copy(p, inputs / p.name)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="augment"):
        assert augment([*FAST, "--input", str(inputs), "--output", str(out),
                        "--runtime.gpus-per-actor", "0.5"]) == 0
    # 0.5 GPU each on one GPU: a pool of two actors, each asking Ray for half of the GPU
    assert "DR2 actor pool: 2 actor(s), 0.50 GPU each, batch 2" in caplog.text
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["ok"] == 4 and summary["error"] == 0
    assert 1 <= len(summary["busy"]) <= 2  # which actors got the 2 batches is Ray's choice
    manifest = read_manifest(str(out))
    assert sorted(manifest["id"]) == sorted(p.name for p in SAMPLES.glob("*.png"))

"""Process-level tests: a job killed mid-run then rerun, and `ray job submit` against `ray start --head`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflows" / "augment.py"
ARGS = ["--allow-random-weights", "true", "--dr2.architecture", "tiny", "--runtime.device", "cpu",
        "--blur.sigma", "1.0", "--cluster.num-cpus", "2"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _faces(root: Path, n: int, size: int = 64) -> list[str]:
    rng = np.random.default_rng(1)
    base = cv2.resize(cv2.imread(str(ROOT / "data/samples/256.png")), (size, size), interpolation=cv2.INTER_AREA)
    ids = []
    for k in range(n):
        img = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        (root / f"{k // 10}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / f"{k // 10}/face_{k:03d}.png"), img)
        ids.append(f"{k // 10}/face_{k:03d}.png")
    return ids


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "disabled"  # local head + job submit without tokens (Ray >= 2.59 default is on)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _raw_ids(out: Path) -> list[str]:
    shards = list((out / "manifest").glob("part-*.parquet"))
    return sorted(pd.concat([pd.read_parquet(p, columns=["id"]) for p in shards])["id"]) if shards else []


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session: Ray's workers run in process groups of their own
    (a killpg of the driver's group leaves them finishing their tasks), but they stay in its session."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not left:
            return
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], capture_output=True)
        time.sleep(0.2)
    raise AssertionError(f"processes of the killed job still running: {left}")


def test_killed_job_rerun_ends_with_every_input_exactly_once(tmp_path):
    ids = _faces(tmp_path / "in", 16, size=48)
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--input", str(tmp_path / "in"), "--output", str(out), *ARGS,
           "--image.size", "48", "--dr2.N", "2", "--dr2.tau", "10", "--runtime.batch-size", "2",
           "--cluster.block-rows", "2", "--cluster.manifest-rows", "2"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not list(out.glob("manifest/part-*.parquet")):
            time.sleep(0.1)
        tail = (tmp_path / "first.log").read_text()[-2000:]
        assert proc.poll() is None, "the job ended before it could be interrupted: " + tail
    finally:
        _kill_session(proc)
    committed = _raw_ids(out)
    assert 0 < len(committed) < len(ids), len(committed)
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped"] == len(committed)
    assert summary["ok"] + summary["error"] == len(ids) - len(committed)
    assert _raw_ids(out) == sorted(ids)  # every input exactly once
    assert len(list((out / "lq").rglob("*.png"))) == len(ids)


def test_ray_job_submit_against_a_head_node(tmp_path):
    ids = _faces(tmp_path / "in", 4, size=48)
    out = tmp_path / "out"
    env = _env()
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    # --block keeps the head in the foreground, in a session of its own: the test stops exactly this cluster
    # (a `ray stop` would stop every Ray on the machine, other test runs' included).
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
              "--", "python", "workflows/augment.py", "--input", str(tmp_path / "in"), "--output", str(out),
              *[a for a in ARGS if a not in ("--cluster.num-cpus", "2")], "--image.size", "32",
              "--dr2.N", "2", "--dr2.tau", "5"]
    try:
        deadline = time.time() + 180
        while True:  # the dashboard and the head's job agent come up a few seconds after the head starts
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            said = job.stdout + job.stderr  # the CLI prints the server's 500 to either
            starting = any(m in said for m in ("No available agent", "Connection refused", "Failed to connect"))
            if job.returncode == 0 or not starting or time.time() > deadline or head.poll() is not None:
                break
            time.sleep(3)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
    finally:
        _kill_session(head)
    assert _raw_ids(out) == sorted(ids)
    df = pd.concat(pd.read_parquet(p) for p in (out / "manifest").glob("part-*.parquet"))
    assert (df["status"] == "ok").all() and (df["weights"] == "random-init:tiny").all()
    assert all(Path(p).is_file() for p in df["lq"])

"""Smoke test of bench/bench_dynamic.py: tiny CPU runs in-process, their table and JSON."""

from __future__ import annotations

import json

import torch

from bench import bench_dynamic


def test_bench_dynamic_rows_ratios_and_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    full, only = tmp_path / "full.json", tmp_path / "only.json"
    # N=2, tau=5: omega 15, 11 forwards per image, at 32x32: seconds on CPU
    common = ["--arch", "tiny", "--size", "32", "--batch-size", "2", "--N", "2", "--tau", "5", "--warmup", "0",
              "--repeats", "1", "--device", "cpu"]
    assert bench_dynamic.main(common + ["--json", str(full)]) == 0
    assert bench_dynamic.main(common + ["--sampler-only", "--json", str(only)]) == 0
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.startswith("| configuration |"))
    assert {"images/s", "ms/forward"} <= {c.strip() for c in head.split("|")}  # a table with these columns

    rows = json.loads(full.read_text())["rows"]
    assert [r["configuration"].split(" (")[0] for r in rows] == [
        "dr2_sample", "dynamic_sample", "dynamic_sample + spectral estimator",
        "sampler only: dr2_sample, zero network", "sampler only: dynamic_sample, zero network"]
    assert rows[0]["ratio_vs_dr2"] == 1.0 and rows[3]["ratio_vs_dr2"] == 1.0
    for r in rows:
        assert r["images_per_s"] > 0 and r["forwards_per_image"] == 11 and len(r["times_s"]) == 1
        assert abs(r["ms_per_forward"] - 1000 / (r["images_per_s"] * 11)) < 1e-6
    sampler = json.loads(only.read_text())["rows"]
    assert [r["configuration"] for r in sampler] == [r["configuration"] for r in rows[3:]]
    assert sampler[0]["ratio_vs_dr2"] == 1.0
    assert abs(sampler[1]["ratio_vs_dr2"] - sampler[1]["images_per_s"] / sampler[0]["images_per_s"]) < 1e-12

"""Smoke test of bench/bench_dr2.py: a tiny CPU run in-process, its table and its JSON."""

from __future__ import annotations

import json

import torch

from bench import bench_dr2


def test_bench_tiny_cpu(tmp_path, capsys):
    threads = torch.get_num_threads()
    out_json = tmp_path / "bench.json"
    # One thread: the smoke test stays fast even when other processes share the cores.
    result = bench_dr2.main(["--device", "cpu", "--arch", "tiny", "--size", "32", "--batch-sizes", "1,2",
                         "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out_json)])
    assert torch.get_num_threads() == threads  # main() restores the process state

    text = capsys.readouterr().out
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("configuration"))
    assert "x b1" in lines[head] and "images/s" in lines[head] and "TFLOP/s" in lines[head]
    assert set(lines[head + 1].replace(" ", "")) == {"-"}
    rows = [line.split() for line in lines[head + 2:] if line.startswith("fp32")]
    assert len(rows) == 2
    assert [r[2] for r in rows] == ["1", "2"]  # "fp32 eager <batch> ..."
    assert rows[0][-1] == "1.00" and float(rows[1][-1]) > 0
    assert "RANDOM" in text and torch.__version__ in text

    data = json.loads(out_json.read_text())
    assert data == json.loads(json.dumps(result))
    meta = data["meta"]
    assert meta["forwards_per_image"] == 21 and meta["size"] == 32 and meta["arch"] == "tiny"
    assert meta["flops_per_forward"] > 0 and meta["device"] == "cpu"
    assert [r["batch"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        for key in ("configuration", "images_per_s", "ms_per_image", "forwards_per_s", "tflops", "pct_peak",
                    "ratio_vs_b1", "times_s", "precision", "channels_last", "compile", "batch_invariant_cpu"):
            assert key in r
        assert r["images_per_s"] > 0 and r["finite"] is True and len(r["times_s"]) == 1
        assert abs(r["forwards_per_s"] - 21 * r["images_per_s"]) < 1e-9 * r["forwards_per_s"]
    assert data["rows"][0]["ratio_vs_b1"] == 1.0

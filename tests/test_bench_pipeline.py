"""Smoke test of bench/bench_pipeline.py: a tiny CPU run in-process on the shared local Ray, its table and JSON."""

from __future__ import annotations

import json

import torch

from bench import bench_pipeline


def test_bench_pipeline_tiny_cpu(ray_local, tmp_path, capsys):
    threads = torch.get_num_threads()
    out_json = tmp_path / "bench.json"
    # 11 UNet forwards per image at 32x32; no warm-up run and no 10N run: the smoke test stays short.
    result = bench_pipeline.main(["--images", "4", "--size", "32", "--arch", "tiny", "--N", "2", "--tau", "5",
                         "--batch-size", "2", "--face-size", "64", "--device", "cpu", "--warmup-images", "0",
                         "--workdir", str(tmp_path), "--json", str(out_json)])
    assert ray_local.is_initialized()  # the shared Ray is left running
    assert torch.get_num_threads() == threads  # main() restores the process state
    assert not list(tmp_path.glob("bench_pipeline_*"))  # temporary inputs and outputs are removed

    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["mode", "images"])
    assert lines[head].split() == ["mode", "images", "seconds", "images/s", "ratio", "mem_MiB", "rss_MiB",
                                   "store_MiB", "busy%", "net%"]
    assert set(lines[head + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[head + 2:]:
        cells = line.split()
        if not cells or cells[0] not in ("pipeline", "model-only"):
            break
        rows[cells[0]] = cells
    assert set(rows) == {"pipeline", "model-only"}
    for cells in rows.values():
        assert cells[1] == "4" and float(cells[2]) > 0 and float(cells[3]) > 0
    ratio = float(rows["pipeline"][4])
    assert ratio > 0 and float(rows["model-only"][4]) == 1.0
    assert abs(ratio - float(rows["pipeline"][3]) / float(rows["model-only"][3])) < 0.01 * ratio + 1e-3
    assert 0 < float(rows["pipeline"][8]) <= 100 and rows["model-only"][8] == "-"  # the DR2 actors' busy share
    assert all(0 < float(rows[m][9]) <= 100 for m in rows)  # the UNet's share of the stage / loop time
    assert any(line.startswith("ratio pipeline/model-only") for line in lines)
    assert any("torch threads: 1" in line for line in lines)  # cpus_per_actor 1 -> one thread, as the actor

    data = json.loads(out_json.read_text())
    assert data["table"] == json.loads(json.dumps(result["table"], default=str))
    assert [r["mode"] for r in data["table"]] == ["pipeline", "model-only"]
    assert data["meta"]["forwards_per_image"] == 11 and data["meta"]["torch_threads"] == 1
    pipe = data["table"][0]
    assert pipe["images"] == 4 and pipe["images_per_s"] > 0 and pipe["ratio"] > 0
    if pipe["memory"] is not None:  # Linux: sampled from /proc
        assert pipe["memory"]["samples"] > 0 and pipe["memory"]["peak_rss"] > 0

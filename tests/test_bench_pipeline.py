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
    cols = lines[head].split()  # a table with these columns (more may be added, in any order)
    assert {"images", "seconds", "images/s", "ratio", "busy%", "net%"} <= set(cols)
    col = {name: cols.index(name) for name in cols}
    assert set(lines[head + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[head + 2:]:
        cells = line.split()
        if not cells or cells[0] not in ("pipeline", "model-only"):
            break
        rows[cells[0]] = cells
    assert set(rows) == {"pipeline", "model-only"}
    for cells in rows.values():
        assert cells[col["images"]] == "4" and float(cells[col["seconds"]]) > 0 and float(cells[col["images/s"]]) > 0
    ratio = float(rows["pipeline"][col["ratio"]])
    assert ratio > 0 and float(rows["model-only"][col["ratio"]]) == 1.0
    speed = {m: float(rows[m][col["images/s"]]) for m in rows}
    assert abs(ratio - speed["pipeline"] / speed["model-only"]) < 0.01 * ratio + 1e-3
    busy = col["busy%"]  # the DR2 actors' busy share
    assert 0 < float(rows["pipeline"][busy]) <= 100 and rows["model-only"][busy] == "-"
    assert all(0 < float(rows[m][col["net%"]]) <= 100 for m in rows)  # the UNet's share of the stage / loop time
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

"""Smoke test of bench/bench_restore.py: a tiny CPU run in-process on the shared local Ray, its table and JSON."""

from __future__ import annotations

import json

import torch

from bench import bench_restore

TINY_SPAR = {"min_ch": 8, "max_ch": 16, "size": 64, "min_feat_size": 16, "res_depth": 1}


def test_bench_restore_tiny_cpu(ray_local, tmp_path, capsys):
    threads = torch.get_num_threads()
    out_json = tmp_path / "bench.json"
    # 11 UNet forwards per image at 32x32, a tiny SPARNetHD at 64x64; no warm-up run: the smoke test stays short.
    result = bench_restore.main(["--images", "4", "--size", "32", "--arch", "tiny", "--N", "2", "--tau", "5",
                         "--batch-size", "2", "--face-size", "64", "--device", "cpu", "--enhancer-size", "64",
                         "--enhancer-kwargs", json.dumps(TINY_SPAR), "--warmup-images", "0",
                         "--workdir", str(tmp_path), "--json", str(out_json)])
    assert ray_local.is_initialized()  # the shared Ray is left running
    assert torch.get_num_threads() == threads  # main() restores the process state
    assert not list(tmp_path.glob("bench_restore_*"))  # temporary inputs and outputs are removed

    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("topology"))
    cols = lines[head].split()  # a table with these columns (more may be added, in any order)
    assert {"images", "seconds", "images/s", "ratio"} <= set(cols)
    col = {name: cols.index(name) for name in cols}
    assert set(lines[head + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[head + 2:]:
        cells = line.split()
        if len(cells) != len(cols) or cells[0] not in ("shared", "separate", "model-only"):
            break
        rows[cells[0]] = cells
    assert set(rows) == {"shared", "separate", "model-only"}
    for cells in rows.values():
        assert cells[col["images"]] == "4"
        assert all(float(cells[col[c]]) > 0 for c in ("seconds", "images/s", "ratio"))
    assert float(rows["shared"][col["ratio"]]) == 1.0
    ratio = float(rows["separate"][col["ratio"]])
    speed = {t: float(rows[t][col["images/s"]]) for t in rows}
    assert abs(ratio - speed["separate"] / speed["shared"]) < 0.01 * ratio + 1e-3
    assert any(line.startswith("ratio separate/shared = ") for line in lines)
    assert any(line.startswith("model-only split: DR2") for line in lines)

    data = json.loads(out_json.read_text())
    assert data["table"] == json.loads(json.dumps(result["table"], default=str))
    assert [r["topology"] for r in data["table"]] == ["shared", "separate", "model-only"]
    assert data["meta"]["forwards_per_image"] == 11 and data["meta"]["enhancer_kwargs"] == TINY_SPAR
    for row in data["table"]:
        assert row["images"] == 4 and row["images_per_s"] > 0 and row["ratio"] > 0
    assert all("--topology" not in a for a in data["meta"]["workflow_args"].values())
    model = data["table"][2]
    assert model["dr2_s_per_image"] > 0 and model["enhancer_s_per_image"] > 0

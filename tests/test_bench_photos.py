"""Smoke test of bench/bench_photos.py: two photos in-process with the tiny DR2, its tables and its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import torch

from bench import bench_photos

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["detection", "plan+align", "restoration", "paste-back", "detect+align+paste", "total"]


def _markdown_rows(lines: list[str], first: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows) of the Markdown table whose header starts with `first`."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} "))
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    assert set(lines[start + 1].replace("|", "").replace(":", "")) == {"-"}
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows


def test_bench_photos_tiny_cpu(tmp_path, capsys):
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    out_json = tmp_path / "bench.json"
    photo = ROOT / "data" / "photos" / "Blake_Lively.jpg"
    # 11 UNet forwards per face at 32x32, bicubic to 64: a few seconds for the 3 faces of the two photos.
    result = bench_photos.main(["--input", f"{photo},astronaut", "--arch", "tiny", "--size", "32", "--N", "2",
                         "--tau", "5", "--batch-size", "2", "--threads", "1", "--json", str(out_json)])
    assert torch.get_num_threads() == threads and cv2.getNumThreads() == cv_threads  # process state restored

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench_photos: 2 photos, ")
    assert any(line.startswith("threads: torch 1, OpenCV 1") and "load average" in line for line in lines)
    head, rows = _markdown_rows(lines, "stage")
    # a table with these columns (more may be added, in any order), one row per stage
    assert {"photos", "faces", "seconds", "faces/s", "share of total"} <= set(head)
    col = {name: head.index(name) for name in head}
    assert [r[0] for r in rows] == STAGES
    by = {r[0]: r for r in rows}
    faces = int(by["total"][col["faces"]])
    assert faces >= 2  # MTCNN finds both faces of the collage and the astronaut's
    for r in rows:
        assert r[col["photos"]] == "2" and int(r[col["faces"]]) == faces
        assert float(r[col["seconds"]]) > 0 and float(r[col["faces/s"]]) > 0
    assert any(line.startswith("ratio restoration / (detect+align+paste) = ") for line in lines)
    _, proj = _markdown_rows(lines, "scenario")  # the projections table: one row per scenario
    assert len(proj) == 3
    _, per_photo = _markdown_rows(lines, "photo")
    assert [p[0] for p in per_photo] == ["Blake_Lively.jpg", "astronaut"]

    data = json.loads(out_json.read_text())
    assert data["text"] == result["text"]
    assert [r["stage"] for r in data["table"]] == STAGES
    for r in data["table"]:
        assert r["faces"] == faces and r["seconds"] > 0 and r["ms_per_face"] > 0 and r["faces_per_s"] > 0
    meta = data["meta"]
    assert meta["arch"] == "tiny" and meta["size"] == 32 and meta["enhancer_size"] == 64
    assert meta["forwards_per_face"] == 11 and meta["torch_threads"] == 1 and meta["faces_restored"] == faces
    assert meta["full_size_geometry"]["plan+align"] > 0 and meta["full_size_geometry"]["paste-back"] > 0
    assert [p["kind"] for p in data["projections"]] == ["measurement", "projection", "projection from a target"]
    assert sum(p["restored"] for p in data["photos"]) == faces
    assert all(p["detection_s"] > 0 for p in data["photos"])


def test_bench_photos_upscaled_has_an_upsampling_stage(capsys):
    photo = ROOT / "data" / "photos" / "Blake_Lively.jpg"
    result = bench_photos.main(["--input", str(photo), "--arch", "tiny", "--size", "32", "--N", "2", "--tau", "5",
                                "--threads", "1", "--upscale", "2", "--upsampler-tile", "200",
                                "--upsampler-budget", "200000", "--no-full-size-geometry", "--gpu-faces-per-s", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("upsampling: RRDBNet tiny x2") for line in lines)
    _, rows = _markdown_rows(lines, "stage")
    assert [r[0] for r in rows] == ["detection", "plan+align", "restoration", "upsampling", "paste-back",
                                    "detect+align+paste", "total"]
    by = {r["stage"]: r for r in result["table"]}
    parts = sum(by[s]["seconds"] for s in ("detection", "plan+align", "restoration", "upsampling", "paste-back"))
    assert by["upsampling"]["seconds"] > 0 and abs(parts - by["total"]["seconds"]) < 1e-9
    assert abs(sum(by[s]["share"] for s in ("detection", "plan+align", "restoration", "upsampling",
                                            "paste-back")) - 1) < 1e-9
    assert result["meta"]["upscale"] == 2 and result["photos"][0]["upsampling_s"] > 0
    _, per_photo = _markdown_rows(lines, "photo")
    assert len(per_photo[0]) == 7  # with the upsample ms column

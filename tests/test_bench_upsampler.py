"""Smoke test of bench/bench_upsampler.py: tiled vs untiled megapixels/s on a tiny RRDBNet, in-process."""

from __future__ import annotations

import pytest
import torch

from bench import bench_upsampler


def test_bench_upsampler_speed_table(capsys):
    threads = torch.get_num_threads()
    result = bench_upsampler.main(["--size", "96x64", "--tiles", "32,48", "--pad", "4", "--repeats", "1",
                                   "--threads", "1"])
    assert torch.get_num_threads() == threads
    rows = result["rows"]
    assert [r["tile"] for r in rows] == [0, 32, 48] and rows[0]["ratio_to_untiled"] == 1.0
    for r in rows:
        assert r["seconds"] > 0 and abs(r["mpx_per_s"] - 96 * 64 / 1e6 / r["seconds"]) < 1e-9
        assert abs(r["out_mpx_per_s"] - 4 * r["mpx_per_s"]) < 1e-9  # x2: 4 output px per input px
        assert abs(r["ratio_to_untiled"] - r["mpx_per_s"] / rows[0]["mpx_per_s"]) < 1e-9
    # 96x64 at tile 32 pad 4: 3x2 windows of 40x40 over 6144 px
    assert rows[1]["windows"] == 6 and rows[1]["overlap"] == 6 * 40 * 40 / (96 * 64)
    out = capsys.readouterr().out
    assert "untiled (baseline)" in out and "| tile 32 pad 4 |" in out


@pytest.mark.slow  # ~50 s on 2 busy cores: a child process runs MTCNN and the upsampler on 12 MP
def test_a_4000x3000_photo_at_upscale_2_stays_under_the_stated_memory_bound(capsys):
    """The whole photo path (detect, restore, tiled upsampling at a 0.25 MP budget, paste, PNG) in a fresh
    process: the photo's peak RSS increment stays under 1 GiB (measured 711 MB; the README's table)."""
    result = bench_upsampler.main(["--memory", "--only", "3"])
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["faces"] == 2 and row["out_shape"][:2] == [6000, 8000]
    assert row["upscale"] == 2 and row["upsampler"] == "realesrgan-x2" and row["peak_reset"]
    assert 0 < row["increment_mb"] < 1024

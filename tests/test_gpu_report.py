"""bench/gpu_report.py on runbook-shaped output: tables, the issue's two targets, tarballs, the plot."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from bench import gpu_report


def _dr2(rows, arch="ffhq256", size=256):
    meta = dict(arch=arch, size=size, N=4, tau=22, forwards_per_image=21, device_name="NVIDIA H100 80GB HBM3",
                torch="2.11.0")
    return {"meta": meta, "rows": [dict(configuration=c, batch=b, images_per_s=ips, tflops=ips * 8.15,
                                        pct_peak=ips * 8.15 / 9.89, error=None) for c, b, ips in rows]}


def _write(folder: Path, best: float, arch="ffhq256") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "dr2_fp32": _dr2([("reference (fp32 eager b1)", 1, 2.0), ("fp32 eager", 1, 2.1), ("fp32 eager", 8, 6.0)],
                         arch),
        "dr2_bf16_cl": _dr2([("reference (fp32 eager b1)", 1, 2.2), ("bf16 channels_last eager", 1, 5.0),
                             ("bf16 channels_last eager", 64, best)], arch),
        "pipeline_1actor": {"table": [dict(mode="pipeline", images=512, images_per_s=40.0, ratio=0.93,
                                           actor_busy=0.97, network_share=0.9),
                                      dict(mode="model-only", images=512, images_per_s=43.0, ratio=1.0,
                                           network_share=0.95)]},
    }
    for name, body in files.items():
        (folder / f"{name}.json").write_text(json.dumps(body))
    (folder / "device.txt").write_text("nvidia-smi table\n2.11.0 NVIDIA H100 80GB HBM3\n")


def test_tables_targets_and_plot(tmp_path, capsys):
    _write(tmp_path / "a", best=50.0)
    out = gpu_report.main([str(tmp_path / "a"), "--plot", str(tmp_path / "p.png")])
    assert "device: 2.11.0 NVIDIA H100 80GB HBM3" in out
    assert "| reference (fp32 eager b1) | 2.2 |  |  |" in out  # one reference row: the fastest of the runs
    assert "| bf16 channels_last eager | 5.0 |  | 50.0 |" in out  # images/s by batch (b1, b8, b64)
    assert "| bf16 channels_last eager | 64 | 50.00 | 407.5 | 41.2 | 22.7 |" in out  # x reference = 50 / 2.2
    assert "**50.0 images/s** (bf16 channels_last eager, batch 64): meets the 45 images/s target" in out
    assert "22.7x the reference-style run" in out and "meets the 20x target" in out
    assert "| 1actor | pipeline | 512 | 40.00 | 0.93 | 97 | 90 |" in out
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == out


def test_misses_are_said_and_tarballs_are_read(tmp_path):
    _write(tmp_path / "b", best=30.0)
    with tarfile.open(tmp_path / "sampler.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "b", arcname=".")
    out = gpu_report.main([str(tmp_path / "sampler.tar.gz")])
    assert "MISSES the 45 images/s target" in out and "13.6x" in out and "MISSES the 20x target" in out
    _write(tmp_path / "tiny", best=30.0, arch="tiny")
    assert "targets: not applicable" in gpu_report.main([str(tmp_path / "tiny")])

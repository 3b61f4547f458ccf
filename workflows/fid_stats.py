"""Compute FID reference statistics (mu, sigma) of an image set, e.g. FFHQ, for FIDs without ground truth.

    python workflows/fid_stats.py --input s3://datasets/ffhq/512/ --output s3://stats/ffhq512_tf.npz \\
        --weights s3://models/pt_inception-2015-12-05-6726825d.pth --image.size 512

The input is anything the workflows read (folder / prefix listed recursively, glob, .parquet/.csv list of
URIs); images are read and decoded as the benchmark reads them (tasks.listing + tasks.load_stage: square
check, PIL-bicubic resize to image.size), then run through the FID network of `protocol` with its own input
handling (for fid_tf_inception pytorch-fid's: bilinear 299x299, 2x - 1). Compute the statistics at the size
the benchmark scores (image.size): the resize path is part of the FID protocol.

The .npz holds `mu` and `sigma` (pytorch-fid / clean-fid layout, readable by `python -m pytorch_fid` and by
benchmark.py's metrics.fid_reference), plus `protocol`, `count` and `source`. It runs in this process (no
Ray): statistics are one pass of (count, sum, sum of outer products) in float64, so the order of the
batches does not change them beyond rounding. Unreadable images are skipped and counted; none is an error.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tasks.config import load, opt
from tasks.load_stage import ImageConfig, load_in_process
from tasks.metrics import FID_METRICS, FID_NETWORKS, FIDStats, fid_reference_npz
from tasks.storage import get_fs, write_bytes
from tasks.weights import RANDOM_INIT

log = logging.getLogger("fid_stats")


@dataclass(frozen=True)
class FIDStatsConfig:
    input: str = opt("data/samples", "images: folder/prefix (recursive), glob, or .parquet/.csv list with a uri column")
    output: str = opt("out/fid_stats.npz", "the .npz to write (local path or fsspec URI)")
    protocol: str = opt("fid_tf_inception", "FID network: fid_tf_inception (papers' TF Inception) | fid_tv_inception")
    weights: str | None = opt(None, "the network's checkpoint (pt_inception-2015-12-05-6726825d.pth for "
                                    "fid_tf_inception); unset = torch hub cache; random-init only for tests")
    sha256: str | None = opt(None, "optional sha256 pin of the checkpoint")
    image: ImageConfig = ImageConfig(size=512)
    batch_size: int = opt(32, "images per forward pass")
    device: str = opt("cpu", "torch device for the network (cpu, cuda, cuda:1, mps)")
    storage_options: dict = opt({}, "fsspec options (e.g. {endpoint_url: ...}); credentials from the environment")


def compute_stats(cfg: FIDStatsConfig) -> tuple[FIDStats, int, str]:
    """(statistics of every readable image, number skipped as unreadable, the network's weights identity)."""
    if cfg.protocol not in FID_METRICS:
        raise ValueError(f"protocol must be one of {list(FID_METRICS)}, got {cfg.protocol!r}")
    so = cfg.storage_options or None
    net = FID_NETWORKS[cfg.protocol](cfg.weights, device=cfg.device, sha256=cfg.sha256, storage_options=so)
    stats, skipped = FIDStats(), 0
    for batch in load_in_process(cfg.input, cfg.image, so, cfg.batch_size):
        ok = batch["status"] == "ok"
        skipped += int((~ok).sum())
        if ok.any():
            x = torch.from_numpy(batch["image"][ok]).permute(0, 3, 1, 2).float() / 255.0
            stats.update(net(x))
    if stats.count < 2:
        raise ValueError(f"FID statistics need at least 2 readable images, got {stats.count} from {cfg.input}")
    return stats, skipped, net.weights_identity


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: FIDStatsConfig = load(FIDStatsConfig, argv, __doc__)
    if cfg.protocol not in FID_METRICS:
        log.error("--protocol must be one of %s, got %r", list(FID_METRICS), cfg.protocol)
        return 2
    stats, skipped, weights = compute_stats(cfg)
    if weights.startswith(RANDOM_INIT):
        log.warning("%s\nRANDOM-INIT FID network: these statistics are NOT a usable FID reference.\n%s", "!" * 80,
                    "!" * 80)
    fs, path = get_fs(cfg.output, cfg.storage_options or None)
    write_bytes(fs, path, fid_reference_npz(stats, cfg.protocol, source=cfg.input, weights=weights))
    log.info("wrote %s: %s statistics of %d images (%d skipped) from %s", cfg.output, cfg.protocol, stats.count,
             skipped, cfg.input)
    return 0


if __name__ == "__main__":
    sys.exit(main())

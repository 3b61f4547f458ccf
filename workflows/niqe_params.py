"""Fit NIQE pristine parameters (the multivariate Gaussian of natural-scene features) on clean faces.

    python workflows/niqe_params.py --input s3://datasets/ffhq/512/ --output s3://stats/niqe_ffhq512.npz

NIQE's published parameters (BasicSR's niqe_pris_params.npz) were fitted on 125 pristine natural photos; a
face-specific model is fitted here the same way (tasks.niqe.fit_pristine, estimatemodelparam.m): each image's
96x96 blocks sharper than 0.75 x its sharpest block, 36 features per block, their mean and covariance. Images
are read as the workflows read them (tasks.listing + tasks.load_stage: square check, PIL-bicubic resize to
image.size). The .npz has BasicSR's layout (mu_pris_param, cov_pris_param, gaussian_window), so it can be
given to benchmark.py as --metrics.weights '{niqe: <path>}'. Runs in this process (no Ray).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from tasks.config import load, opt
from tasks.load_stage import ImageConfig, load_in_process
from tasks.niqe import SHARPNESS_THRESHOLD, fit_pristine, luma
from tasks.storage import get_fs, write_bytes

log = logging.getLogger("niqe_params")


@dataclass(frozen=True)
class NIQEParamsConfig:
    input: str = opt("data/samples", "clean faces: folder/prefix (recursive), glob, or .parquet/.csv list with uri")
    output: str = opt("out/niqe_params.npz", "the .npz to write (local path or fsspec URI)")
    image: ImageConfig = ImageConfig(size=512)
    sharpness_threshold: float = opt(SHARPNESS_THRESHOLD, "keep blocks sharper than this x the image's sharpest "
                                                          "block (estimatemodelparam.m's sh_th)")
    batch_size: int = opt(16, "images read per step")
    storage_options: dict = opt({}, "fsspec options (e.g. {endpoint_url: ...}); credentials from the environment")


def read_lumas(cfg: NIQEParamsConfig):
    """Yield the luma of every readable image (unreadable ones are logged and skipped)."""
    for batch in load_in_process(cfg.input, cfg.image, cfg.storage_options or None, cfg.batch_size):
        for k in range(len(batch["id"])):
            if batch["status"][k] == "ok":
                yield luma(batch["image"][k])

def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: NIQEParamsConfig = load(NIQEParamsConfig, argv, __doc__)
    if not 0 <= cfg.sharpness_threshold < 1:
        log.error("--sharpness-threshold must be in [0, 1), got %s", cfg.sharpness_threshold)
        return 2
    params = fit_pristine(read_lumas(cfg), sharpness_threshold=cfg.sharpness_threshold, source=cfg.input)
    fs, path = get_fs(cfg.output, cfg.storage_options or None)
    write_bytes(fs, path, params.to_npz())
    log.info("wrote %s: NIQE pristine MVG from %s (mean of the first features %s)", cfg.output, cfg.input,
             np.round(params.mu[:2], 4).tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())

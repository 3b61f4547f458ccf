"""The DR2 stage: a per-batch callable (a Ray Data actor) that runs DR2 on uint8 faces.

In: batch["image"] uint8 (B, S, S, 3) at the model size, batch["id"], batch["N"], batch["tau"], and
batch["status"] ("ok" rows are processed; others pass through untouched). Out: batch["dr2"] uint8
(B, S, S, 3), rounded and clipped (never wrapped), plus "omega", "seed", "weights" per row.
The model is built and its weights loaded once, in __init__.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from models.diffusion import dr2_schedule
from models.dr2 import DR2Params, dr2_sample
from models.noise import SeededNoise, sample_seed
from models.unet import UNetModel, dr2_unet_config
from tasks.config import Sampled, opt
from tasks.runtime import NetworkHost, RuntimeConfig, to_model_range, to_uint8
from tasks.stage import PIXELS, ImageStage, per_row
from tasks.weights import RANDOM_INIT, fill_zero_init, load_weights, random_init_label

log = logging.getLogger(__name__)

TINY_UNET = dict(image_size=64, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                 attention_resolutions=[4], channel_mult=(1, 2, 2), num_head_channels=32,
                 use_scale_shift_norm=True, resblock_updown=True, dropout=0.0)


@dataclass(frozen=True)
class DR2Config:
    weights: str | None = opt(None, "DR2 diffusion weights (DR2_FFHQ.pkl, ffhq_p2.pt, ffhq_10m.pt or "
                                    ".safetensors): a local path or fsspec URI such as s3://bucket/DR2_FFHQ.pkl")
    sha256: str | None = opt(None, "expected sha256 of the weights file (refuse to run on a mismatch)")
    allow_random_weights: bool = opt(False, "run DR2 without weights on a random-init network: outputs are "
                                            "NOT restorations and are labelled random-init (demo/tests only). "
                                            "The short flag --allow-random-weights sets this one only; the enhancer, "
                                            "dynamic prior, face parser and upsampler each have their own "
                                            "<section>.allow_random_weights",
                                     flag="--allow-random-weights")
    architecture: str = opt("ffhq256", "UNet: 'ffhq256' (the real checkpoint layout) or 'tiny' "
                                       "(test-size, random weights only)")
    N: Sampled = opt(Sampled((4,)), "low-pass factor N per sample: fixed, a set (4,8,16) or a range")
    tau: Sampled = opt(Sampled((22,)), "last diffusion step tau per sample (0..99): fixed, set or range")


def check_dr2_params(dr2: DR2Config, size: int) -> None:
    """Refuse, on the driver, (N, tau) settings that no sample could run with: N must divide the model size
    (the low-pass resizes by 1/N), tau must be a step of the 100-step schedule."""
    def candidates(spec: Sampled) -> list:
        if spec.values:
            return list(spec.values)
        if isinstance(spec.low, int) and isinstance(spec.high, int):
            return list(range(spec.low, spec.high + 1))
        return [spec.low, spec.high]

    divisors = [d for d in range(1, size + 1) if size % d == 0]
    bad_n = [n for n in candidates(dr2.N) if not isinstance(n, int) or n not in divisors]
    if bad_n:
        raise ValueError(f"--dr2.N: every N must divide image.size {size}; allowed: {', '.join(map(str, divisors))}; "
                         f"got {dr2.N.describe()!r}")
    bad_tau = [t for t in candidates(dr2.tau) if not isinstance(t, int) or not 0 <= t <= 99]
    if bad_tau:
        raise ValueError(f"--dr2.tau: every tau must be an integer step 0..99; got {dr2.tau.describe()!r}")


def missing_dr2_weights(cfg: DR2Config) -> str | None:
    """The one-line refusal of DR2 without weights when random-init is not allowed (said alike by the
    workflows' drivers and the actors), else None."""
    if cfg.weights or cfg.allow_random_weights:
        return None
    return ("no DR2 weights configured: set --dr2.weights PATH_OR_URI (DR2_FFHQ.pkl, e.g. s3://bucket/DR2_FFHQ.pkl), "
            "or --allow-random-weights for a pipeline demo whose outputs are random-init network outputs, NOT "
            "restorations")


def build_dr2_unet(cfg: DR2Config, *, storage_options: dict | None = None) -> tuple[UNetModel, str]:
    """The network and its weights identity; refuses to run without weights unless allowed."""
    if cfg.architecture not in ("ffhq256", "tiny"):
        raise ValueError(f"dr2.architecture must be 'ffhq256' or 'tiny', got {cfg.architecture!r}")
    unet_cfg = dr2_unet_config() if cfg.architecture == "ffhq256" else TINY_UNET
    with torch.random.fork_rng(devices=[]):  # random-init must be the same network in every actor and run
        torch.manual_seed(0)
        model = UNetModel.from_config(unet_cfg)
    if cfg.weights:
        if cfg.architecture != "ffhq256":
            raise ValueError("dr2.weights can only be loaded into the 'ffhq256' architecture")
        identity = load_weights(model, cfg.weights, sha256=cfg.sha256, storage_options=storage_options)
        return model, identity
    missing = missing_dr2_weights(cfg)
    if missing:
        raise RuntimeError(missing)
    fill_zero_init(model)
    return model, dr2_random_label(cfg)


def dr2_random_label(cfg: DR2Config) -> str:
    """The weights identity of DR2 without weights: random-init, or random-init:tiny for the test-size UNet."""
    return random_init_label(None if cfg.architecture == "ffhq256" else cfg.architecture)


class DR2Stage(NetworkHost, ImageStage):
    """Ray Data callable class: the network is built once per actor. Adds 'dr2' (uint8, the input's size)."""

    READS = ("id", "status", "image", "N", "tau")
    ADDS = (("dr2", PIXELS), ("omega", pa.int64()), ("seed", pa.int64()), ("weights", pa.string()))

    def __init__(self, dr2: DR2Config, runtime: RuntimeConfig, seed: int, storage_options: dict | None = None):
        self.cfg, self.seed = dr2, int(seed)
        model, self.weights = build_dr2_unet(dr2, storage_options=storage_options)
        self._place(model, runtime)
        self.schedule = dr2_schedule()
        if self.weights.startswith(RANDOM_INIT):
            log.warning("DR2 stage on %s runs a RANDOM-INIT network (%s): outputs are not restorations",
                        self.device, self.weights)
        log.info("DR2 stage ready on %s (pid %d, weights %s)", self.device, os.getpid(), self.weights)

    @torch.inference_mode()
    def dr2_x0(self, images: np.ndarray, ids: list[str], params: list[DR2Params]) -> torch.Tensor:
        """DR2's x0-hat in [-1, 1] (B,3,S,S) on the actor's device; seeds come from (job seed, id)."""
        y = to_model_range(images, self.device)
        seeds = [sample_seed(self.seed, i) for i in ids]
        return dr2_sample(self._network, self.schedule, y, params, SeededNoise(seeds))

    def dr2_uint8(self, images: np.ndarray, ids: list[str], params: list[DR2Params]) -> np.ndarray:
        """DR2 on uint8 (B,S,S,3) faces with per-sample params -> uint8 (B,S,S,3)."""
        return to_uint8(self.dr2_x0(images, ids, params))

    @staticmethod
    def samples(batch: dict[str, np.ndarray], ok: np.ndarray) -> tuple[list[str], list[DR2Params]]:
        """The ids and (N, tau) of the rows ok."""
        return ([str(batch["id"][k]) for k in ok],
                [DR2Params.of(int(batch["N"][k]), int(batch["tau"][k])) for k in ok])

    def annotate(self, batch: dict[str, np.ndarray]) -> None:
        """Per-row omega (-1 for error rows), seed and weights identity for the manifest."""
        n = len(batch["id"])
        batch["omega"] = np.array([DR2Params.of(int(batch["N"][k]), int(batch["tau"][k])).omega
                                   if batch["status"][k] == "ok" else -1 for k in range(n)], dtype=np.int64)
        batch["seed"] = np.array([sample_seed(self.seed, str(i)) for i in batch["id"]], dtype=np.int64)
        batch["weights"] = per_row(batch, self.weights)

    def output_sizes(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        return {"dr2": batch["image"].shape[1]}

    def run(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
        return {"dr2": self.dr2_uint8(batch["image"][ok], *self.samples(batch, ok))}

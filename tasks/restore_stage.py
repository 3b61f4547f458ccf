"""Restoration stages: DR2 then an enhancement module, on one device (shared) or as two actor pools.

shared: one actor runs DR2 and hands its float x0-hat straight to the enhancer (as the reference does:
clamp, bicubic 256 -> 512). separate: DR2 actors emit the uint8 intermediate, enhancer actors read it;
this lets the two pools scale independently at the cost of one quantisation and a transfer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from models.enhancers import BUILTIN, enhance
from tasks.config import opt
from tasks.dr2_stage import DR2Config, DR2Stage
from tasks.plugins import build_network, import_plugin
from tasks.runtime import RuntimeConfig, autocast_on, half_dtype, resolve_device, to_model_range, to_uint8
from tasks.stage import PIXELS, ImageStage, per_row
from tasks.write_stage import WriteConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreWriteConfig(WriteConfig):
    dr2: bool = opt(False, "also write DR2's intermediate (at the model size) as dr2")


@dataclass(frozen=True)
class EnhancerConfig:
    name: str = opt("sparnethd", "enhancement module: none | bicubic | sparnethd | a plug-in class "
                                 "'package.module:Class' (called on (B,3,S,S) in [-1,1], returns [-1,1])")
    weights: str | None = opt(None, "enhancer weights (SPARNetHD_FFHQ_DR2aug.pth ...), path or fsspec URI")
    sha256: str | None = opt(None, "expected sha256 of the enhancer weights")
    size: int = opt(512, "hand-over size: DR2's 256 output is clamped and bicubic-resized to this")
    kwargs: dict = opt({}, "constructor arguments for the enhancer class (e.g. {min_ch: 16, size: 64})")
    allow_random_weights: bool = opt(False, "run the enhancer without weights (random-init; demo/tests only)")


class Enhancer(NamedTuple):
    network: Any  # a torch module or a plug-in callable on (B,3,S,S) in [-1, 1]
    hand_over: int | None  # DR2's output is clamped and resized to this before the enhancer; None: no hand-over
    weights: str  # its weights identity (a file's, "random-init...", or the builtin's name)


def build_enhancer(cfg: EnhancerConfig, device: torch.device, storage_options: dict | None = None) -> Enhancer:
    if cfg.name in ("none", "bicubic"):
        return Enhancer(BUILTIN[cfg.name]().to(device), None if cfg.name == "none" else cfg.size, cfg.name)
    if cfg.name in BUILTIN:
        factory, kwargs = BUILTIN[cfg.name], ({"config": cfg.kwargs} if cfg.kwargs else {})
    else:
        factory, kwargs = import_plugin(cfg.name, "enhancer.name", "none, bicubic, sparnethd"), dict(cfg.kwargs)
    model, identity = build_network(
        factory, kwargs, name=cfg.name, weights=cfg.weights, sha256=cfg.sha256,
        allow_random_weights=cfg.allow_random_weights, storage_options=storage_options,
        missing=f"no weights configured for enhancer {cfg.name!r}: set enhancer.weights (e.g. "
                "SPARNetHD_FFHQ_DR2aug.pth), or enhancer.allow_random_weights for a demo whose outputs are NOT "
                "restorations")
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
    return Enhancer(model, cfg.size if cfg.name != "none" else None, identity)


class RestoreStage(ImageStage):
    """Shared topology: DR2 and the enhancer in one actor. Adds 'dr2' (uint8 256) and 'restored'."""

    READS = DR2Stage.READS
    ADDS = (*DR2Stage.ADDS, ("restored", PIXELS), ("enhancer_weights", pa.string()))

    def __init__(self, dr2: DR2Config, enhancer: EnhancerConfig, runtime: RuntimeConfig, seed: int,
                 storage_options: dict | None = None):
        self.dr2 = DR2Stage(dr2, runtime, seed, storage_options)
        self.enhancer, self.size, self.enhancer_weights = build_enhancer(enhancer, self.dr2.device, storage_options)

    def _enhance(self, x0: torch.Tensor) -> torch.Tensor:
        with autocast_on(self.dr2.half):
            return enhance(self.enhancer, x0, self.size)

    def output_sizes(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        s = batch["image"].shape[1]
        return {"dr2": s, "restored": self.size or s}

    @torch.inference_mode()
    def run(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
        x0 = self.dr2.dr2_x0(batch["image"][ok], *self.dr2.samples(batch, ok))
        return {"dr2": to_uint8(x0), "restored": to_uint8(self._enhance(x0))}

    def annotate(self, batch: dict[str, np.ndarray]) -> None:
        self.dr2.annotate(batch)
        batch["enhancer_weights"] = per_row(batch, self.enhancer_weights)


class EnhanceStage(ImageStage):
    """Separate topology: the enhancer alone, reading DR2's uint8 intermediate."""

    READS = ("status", "dr2")
    ADDS = (("restored", PIXELS), ("enhancer_weights", pa.string()))

    def __init__(self, enhancer: EnhancerConfig, runtime: RuntimeConfig, storage_options: dict | None = None):
        self.device = resolve_device(runtime.device)
        self.half = half_dtype(runtime, self.device)  # as the shared topology's enhancer
        self.enhancer, self.size, self.enhancer_weights = build_enhancer(enhancer, self.device, storage_options)

    def output_sizes(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        return {"restored": self.size or batch["dr2"].shape[1]}

    @torch.inference_mode()
    def run(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
        x0 = to_model_range(batch["dr2"][ok], self.device)
        with autocast_on(self.half):
            return {"restored": to_uint8(enhance(self.enhancer, x0, self.size))}

    def annotate(self, batch: dict[str, np.ndarray]) -> None:
        batch["enhancer_weights"] = per_row(batch, self.enhancer_weights)

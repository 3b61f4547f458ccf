"""Background upsampler of whole photos (--photos.upscale S): Real-ESRGAN's RRDBNet, bicubic, or a plug-in.

The network runs tiled (models/tiling.py) on the restoration actor's device: tiles of `tile` input px with
`pad` px of context, as many per forward as fit `pixel_budget` input px (within a photo, or across the
photos of a batch with `across_photos`). So a photo of any size the decoder accepts costs one budget of
activations, plus its output.

Without weights the upsampler falls back (`fallback`): bicubic (the photo is resized with
photos.align.enlarge_interp in the paste-back task) or none (the photo keeps its size, upscale 1). The driver
decides this before Ray starts (`resolve_upscale`), logs it loudly, and every photo row records the upscale,
the upsampler and its weights identity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from models.rrdbnet import UNSHUFFLE, RRDBNet, realesrgan_config
from models.tiling import tiled_upscale
from tasks.config import opt
from tasks.plugins import build_network, import_plugin

log = logging.getLogger(__name__)

NETWORKS = ("realesrgan",)
BUILTIN = ("realesrgan", "bicubic")
FALLBACKS = ("bicubic", "none")


@dataclass(frozen=True)
class UpsamplerConfig:
    name: str = opt("realesrgan", "background upsampler used when photos.upscale > 1: realesrgan (RRDBNet with "
                                  "RealESRGAN_x2plus.pth / RealESRGAN_x4plus.pth) | bicubic | a plug-in "
                                  "'pkg.module:Class' (a module with an int attribute `scale`, optional "
                                  "`input_multiple`; float (B,3,h,w) in [0,1] -> (B,3,h*scale,w*scale))")
    weights: str | None = opt(None, "upsampler weights (path or fsspec URI); without them see `fallback`")
    sha256: str | None = opt(None, "expected sha256 (or a 16+ hex prefix) of the upsampler weights")
    key: str = opt("params_ema", "checkpoint entry holding the state_dict (Real-ESRGAN: params_ema; '' = the "
                                 "top level)")
    scale: int = opt(0, "the network's own scale: 2 (RealESRGAN_x2plus) or 4 (x4plus); 0 = photos.upscale. "
                        "photos.upscale must divide it (x4 at upscale 2 keeps the 2x2 mean of the x4 output)")
    kwargs: dict = opt({}, "constructor arguments (RRDBNet: num_feat, num_block, num_grow_ch; a plug-in's own)")
    fallback: str = opt("bicubic", "without weights: bicubic (resize with photos.align.enlarge_interp) | none "
                                   "(photos keep their size); said in the log, summary and every photo row")
    tile: int = opt(400, "tile side in input px (Real-ESRGAN/GFPGAN's bg_tile); 0 = whole photos (memory grows "
                         "with the photo)")
    pad: int = opt(10, "context px around each tile, cut off after the forward (Real-ESRGAN's tile_pad); "
                       "seams vanish when it reaches the network's receptive radius")
    pixel_budget: int = opt(2_000_000, "input px per forward (tiles x (tile + 2 pad)^2): bounds the actor's "
                                       "activation memory whatever the photo size; tiles shrink to fit it")
    across_photos: bool = opt(False, "stack same-size tiles of different photos into one forward (fuller batches "
                                     "for small photos on a GPU); off: a photo's result does not depend on the "
                                     "photos beside it (batched convolutions differ in the last bits)")
    allow_random_weights: bool = opt(False, "run a network upsampler without weights (random-init; tests only)")

    def __post_init__(self):
        if self.fallback not in FALLBACKS:
            raise ValueError(f"photos.upsampler.fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.scale not in (0, 1, 2, 4) and self.name == "realesrgan":
            raise ValueError(f"photos.upsampler.scale must be 0, 1, 2 or 4 for realesrgan, got {self.scale!r}")
        if self.tile < 0 or self.pad < 0 or self.pixel_budget < 1:
            raise ValueError("photos.upsampler.tile and .pad must be >= 0 and .pixel_budget >= 1, got "
                             f"{self.tile}, {self.pad}, {self.pixel_budget}")


def runs_network(cfg: UpsamplerConfig) -> bool:
    """True when the upsampler is a network that will run (weights, random-init allowed, or a plug-in)."""
    if cfg.name == "bicubic":
        return False
    if cfg.name in NETWORKS:
        return bool(cfg.weights) or cfg.allow_random_weights
    return True  # a plug-in: build_network decides (a parameter-free one needs no weights)


def network_scale(cfg: UpsamplerConfig, upscale: int) -> int:
    return cfg.scale or upscale


def resolve_upscale(cfg: UpsamplerConfig, upscale: int) -> tuple[int, str, str]:
    """(effective upscale, upsampler label, note) on the driver: what the photo rows will say.

    Raises ValueError naming the option for a combination that cannot run.
    """
    if int(upscale) != upscale or upscale < 1:
        raise ValueError(f"photos.upscale must be an integer >= 1, got {upscale!r}")
    if upscale == 1:
        return 1, "none", ""
    if cfg.name not in BUILTIN and ("." not in cfg.name and ":" not in cfg.name):
        raise ValueError(f"photos.upsampler.name must be one of {BUILTIN} or a plug-in 'pkg.module:Class', "
                         f"got {cfg.name!r}")
    if cfg.name == "bicubic":
        return upscale, "bicubic", ""
    if cfg.name in NETWORKS:
        scale = network_scale(cfg, upscale)
        if scale not in UNSHUFFLE or scale % upscale:
            raise ValueError(f"photos.upscale {upscale} must divide photos.upsampler.scale {scale} (1, 2 or 4 "
                             "for realesrgan): e.g. upscale 2 with RealESRGAN_x2plus (scale 2) or x4plus (scale 4)")
        if not runs_network(cfg):
            note = (f"no upsampler weights (photos.upsampler.weights): {cfg.fallback} background"
                    + ("" if cfg.fallback == "bicubic" else ", photo kept at its size"))
            return (upscale if cfg.fallback == "bicubic" else 1), cfg.fallback, note
        return upscale, f"{cfg.name}-x{scale}", ""
    return upscale, cfg.name, ""


class TiledUpsampler:
    """A network upsampler on one device: __call__(photos, upscale) -> upscaled uint8 photos (tiled)."""

    def __init__(self, cfg: UpsamplerConfig, upscale: int, device: torch.device, half: torch.dtype | None = None,
                 storage_options: dict | None = None):
        self.cfg, self.device, self.half = cfg, device, half
        if cfg.name in NETWORKS:
            kwargs = {**realesrgan_config(network_scale(cfg, upscale)), **cfg.kwargs}
            factory, label = RRDBNet, "realesrgan"
        else:
            factory = import_plugin(cfg.name, "photos.upsampler.name", ", ".join(BUILTIN))
            kwargs, label = dict(cfg.kwargs), cfg.name
        model, self.identity = build_weighted(factory, kwargs, cfg, label, storage_options)
        self.model = model.to(device) if isinstance(model, torch.nn.Module) else model
        self.scale = int(self.model.scale)
        # the input side must be a multiple of this: RRDBNet's unshuffle factor, a plug-in's input_multiple
        self.multiple = int(getattr(self.model, "input_multiple", getattr(self.model, "unshuffle", 1)))
        if self.scale % upscale:
            raise ValueError(f"photos.upscale {upscale} must divide the upsampler's scale {self.scale}")
        self.upscale = upscale

    def tile_and_batch(self) -> tuple[int, int]:
        """(tile, windows per forward) within the pixel budget: the tile shrinks when one window exceeds it."""
        cfg, m = self.cfg, self.multiple
        tile = cfg.tile
        side = math.isqrt(cfg.pixel_budget)
        if tile == 0 or tile + 2 * cfg.pad > side:
            tile = max(m, (side - 2 * cfg.pad) // m * m)
        win = -(-(tile + 2 * cfg.pad) // m) * m
        return tile, max(1, cfg.pixel_budget // (win * win))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.half is not None:
            with torch.autocast(self.device.type, dtype=self.half):
                return self.model(x)
        return self.model(x)

    def __call__(self, photos: list[np.ndarray]) -> list[np.ndarray]:
        tile, batch = self.tile_and_batch()
        return tiled_upscale(self._forward, photos, self.scale, out_scale=self.upscale, tile=tile,
                             pad=self.cfg.pad, batch=batch, multiple=self.multiple, device=self.device,
                             across_images=self.cfg.across_photos)


def build_weighted(factory, kwargs: dict, cfg: UpsamplerConfig, label: str, storage_options: dict | None):
    """(model, identity) with the weights under cfg.key ('params_ema' for Real-ESRGAN), strictly loaded."""
    from tasks.weights import load_weights

    model, identity = build_network(
        factory, kwargs, name=label, weights=None, sha256=None, storage_options=storage_options,
        allow_random_weights=cfg.allow_random_weights or bool(cfg.weights),
        missing=f"no weights configured for photos.upsampler.name {cfg.name!r}: set photos.upsampler.weights")
    if cfg.weights:
        identity = load_weights(model, cfg.weights, sha256=cfg.sha256, storage_options=storage_options,
                                key=cfg.key or None)
    return model, identity

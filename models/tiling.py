"""Tiled inference of an image-to-image upsampler over uint8 photos of any size, in bounded memory.

A photo is cut into cores of `tile` px; each core is run inside a window that adds `pad` px of context on
every side (shifted inwards at the photo's edges, so every window of a photo has the same size) and only the
core of the output is kept, as Real-ESRGAN's tile mode does. A photo's windows are stacked into forward
passes of `batch` windows; with across_images, same-size windows of several photos share them (fewer, fuller
forwards, but batched convolutions differ in the last bits with the batch's composition, so a photo's result
would then depend on the photos beside it). Outputs are written
straight into uint8 arrays: memory is the photos, their outputs, and one batch of windows.

Where an output pixel's receptive field fits inside its window the result equals the untiled one; with
pad >= the network's receptive radius that is every pixel. Where it does not (pad smaller), pixels within
(radius - pad) of an inner core edge see the window's zero padding instead of the neighbouring pixels.

Pure torch + numpy, no I/O. fn: float (B, 3, h, w) in [0, 1] on `device` -> (B, 3, h*scale, w*scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Window", "plan_windows", "tiled_upscale"]


@dataclass(frozen=True)
class Window:
    """One forward's input window (wy0:wy1, wx0:wx1) and the core (cy0:cy1, cx0:cx1) kept from its output."""

    cy0: int
    cy1: int
    cx0: int
    cx1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _axis(dim: int, tile: int, pad: int) -> list[tuple[int, int, int, int]]:
    """(core0, core1, win0, win1) along one axis; every window has the same length min(dim, tile + 2 pad)."""
    if tile <= 0 or tile >= dim:
        return [(0, dim, 0, dim)]
    win = min(dim, tile + 2 * pad)
    out = []
    for c0 in range(0, dim, tile):
        w0 = min(max(c0 - pad, 0), dim - win)  # shifted inwards at the edges: same size, more context
        out.append((c0, min(c0 + tile, dim), w0, w0 + win))
    return out


def plan_windows(height: int, width: int, tile: int, pad: int, multiple: int = 1) -> list[Window]:
    """Windows covering a (height, width) image whose sides are multiples of `multiple` (the network's
    input divisor); tile and pad are rounded up to it so every window starts and ends on its grid."""
    if height % multiple or width % multiple:
        raise ValueError(f"image {height}x{width} is not a multiple of {multiple}")
    tile = _round_up(tile, multiple) if tile > 0 else 0
    pad = _round_up(max(pad, 0), multiple)
    return [Window(cy0, cy1, cx0, cx1, wy0, wy1, wx0, wx1)
            for cy0, cy1, wy0, wy1 in _axis(height, tile, pad)
            for cx0, cx1, wx0, wx1 in _axis(width, tile, pad)]


def _padded(image: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-padded at the bottom/right to a multiple of `multiple` (Real-ESRGAN's mod pad)."""
    h, w = image.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return image
    mode = "reflect" if h > ph and w > pw else "edge"
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)


@torch.inference_mode()
def tiled_upscale(fn: Callable[[torch.Tensor], torch.Tensor], images: list[np.ndarray], scale: int, *,
                  out_scale: int | None = None, tile: int = 0, pad: int = 0, batch: int = 1, multiple: int = 1,
                  device: torch.device | str = "cpu", across_images: bool = False) -> list[np.ndarray]:
    """Each uint8 (H, W, 3) image -> uint8 (H*out_scale, W*out_scale, 3) through fn (a x`scale` network).

    out_scale (default scale) must divide scale: a smaller one is an exact box mean of the network's output
    per core (INTER_AREA on an integer factor), so tiling does not change it. tile 0 = whole images.
    batch: windows per forward, within an image (deterministic per image), or across images of the same
    window size with across_images.
    """
    out_scale = scale if out_scale is None else int(out_scale)
    if out_scale < 1 or scale % out_scale:
        raise ValueError(f"out_scale {out_scale} must divide the network's scale {scale}")
    shrink = scale // out_scale
    device = torch.device(device)
    outs, jobs = [], []  # jobs: (image index, window) in a deterministic order
    sources = []
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"tiled_upscale expects uint8 (H, W, 3) images, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        outs.append(np.empty((h * out_scale, w * out_scale, 3), np.uint8))
        src = _padded(img, multiple)
        sources.append(src)
        jobs += [(i, win) for win in plan_windows(src.shape[0], src.shape[1], tile, pad, multiple)]
    groups: dict[tuple[int, int, int], list] = {}
    for job in jobs:
        i, win = job
        groups.setdefault((-1 if across_images else i, win.wy1 - win.wy0, win.wx1 - win.wx0), []).append(job)
    for group in groups.values():
        for k in range(0, len(group), max(1, batch)):
            chunk = group[k : k + max(1, batch)]
            x = np.stack([sources[i][w.wy0 : w.wy1, w.wx0 : w.wx1] for i, w in chunk])
            x = torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            y = fn(x).float().clamp_(0.0, 1.0)
            if shrink > 1:
                y = F.avg_pool2d(y, shrink)
            y = y.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for (i, w), res in zip(chunk, y):
                out = outs[i]
                oy0, ox0 = w.cy0 * out_scale, w.cx0 * out_scale
                oy1, ox1 = min(w.cy1 * out_scale, out.shape[0]), min(w.cx1 * out_scale, out.shape[1])
                ry0, rx0 = (w.cy0 - w.wy0) * out_scale, (w.cx0 - w.wx0) * out_scale
                out[oy0:oy1, ox0:ox1] = res[ry0 : ry0 + oy1 - oy0, rx0 : rx0 + ox1 - ox0]
    return outs

"""Synthetic degradation for benchmarks: y = [(x (*) k_sigma) downsample r + n_delta]_JPEG_q upsample r.

One low-quality (LQ) face per high-quality (HQ) face, a pure function of (HQ image, job seed, sample id):

1. blur: an explicit 2-D Gaussian kernel (anisotropic covariance from sigma_x, sigma_y, theta; normalised to
   sum 1), applied with `cv2.filter2D` and OpenCV's default reflect border (BORDER_REFLECT_101), as BasicSR /
   GFPGAN / DifFace do;
2. downsample by r with `cv2.resize(..., INTER_LINEAR)` to (floor(H / r), floor(W / r)), the sources'
   `int(h // scale)` (at least 1 pixel); r < 1 (GFPGAN's range starts at 0.8) upsamples here;
3. Gaussian noise of std `noise` on the 0-255 scale, independent per channel, from a generator seeded by
   (job seed, sample id, "noise"); then clipped to [0, 255];
4. JPEG at quality q (rounded to uint8, `cv2.imencode`/`imdecode`, in BGR order as the sources so chroma
   subsampling acts on the real colour channels); q None skips it;
5. upsample back to (H, W) with INTER_LINEAR, round and clip to uint8.

The per-sample parameters are drawn by `draw_degradation(preset, job_seed, sample_id)`, each field from its
own stream seeded by (job seed, sample id, field name), so adding or changing one field never changes the
others (the scheme of `tasks.load_stage.draw_params`, in a "degradation" namespace so a load-stage parameter
of the same name does not share a stream).

Presets (`PRESETS`), with their sources:

- "gfpgan": GFPGAN's training degradation (options/train_gfpgan_v1.yml + gfpgan/data/ffhq_degradation_dataset.py):
  41x41 kernel, iso/aniso 50/50, sigma in [0.1, 10] (iso: sigma_y = sigma_x, theta = 0; aniso: sigma_x,
  sigma_y independent, theta uniform in [-pi, pi] as BasicSR's `random_mixed_kernels`), r in [0.8, 8],
  noise in [0, 20], JPEG q in [60, 100] (integers, both ends), bilinear down and up. That config's colour
  jitter and random greyscale are augmentations, not part of this degradation.
- "difface-celeba-test": DifFace's CelebA-Test protocol (datapipe/face_degradation_testing.py and the
  "journal" test-set script: 4000 CelebA-HQ 512 faces, seed 10000): anisotropic 41x41 kernel, sigma_x,
  sigma_y in {4, 8, 12, 16}, theta in {0, pi/4, pi/2, 3pi/4}, sf in {4, 8, ..., 40}, noise in
  {1, 5, 10, 15, 20} (BasicSR's `add_gaussian_noise(img, sigma=nf)` uses nf / 255 on [0, 1], i.e. nf on the
  0-255 scale), JPEG q in {30, 40, 50, 60, 70}. DifFace enumerates the full grid (5 q x 10 sf x 5 noise x
  4 sigma_x x 4 theta = 4000, sigma_y random); here each sample draws every factor independently and
  uniformly from the same sets, so the marginals match but the grid is not balanced exactly.
- "codeformer-heavy": CodeFormer's "large" stage-II degradation (options/CodeFormer_stage3.yml,
  `*_large` keys): 41x41, iso/aniso 50/50, sigma in [1, 15], r in [4, 30], noise in [0, 20], q in [30, 80].

Custom ranges: a dict with any of the `DegradationParams` field names, each value in `Sampled` syntax
(`4`, `[4, 8]`, `{low: 1, high: 4}`, or the CLI strings `"4,8"`, `"1:4"`), optionally `base: <preset>` to
override some fields of a preset. Without a base, missing fields take the identity values (no blur, r = 1, no
noise, no JPEG); a missing sigma_y follows sigma_x, and kernel "iso" always forces sigma_y = sigma_x, theta = 0.

For plots by strength: `severity(p)` is the std (HQ pixels) of one isotropic Gaussian blur equivalent to the
blur plus the downsampling: hypot(sqrt(sigma_x * sigma_y), max(r - 1, 0) / 2), where sqrt(sigma_x * sigma_y)
is the isotropic sigma of the same kernel area and (r - 1) / 2 is the anti-aliasing sigma scikit-image uses
for a downscale by r (0 at the identity; noise and JPEG are left out and reported separately). `level(p)`
buckets by the scale factor r alone, the axis papers report by (DifFace splits CelebA-Test by sf), in bins
closed on the left: "x<2", "x2-4", "x4-8", "x8-16", "x>=16" (`LEVELS`, mildest first).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from models.noise import derive_seed
from tasks.config import Sampled

KERNELS = ("iso", "aniso")
LEVELS = ("x<2", "x2-4", "x4-8", "x8-16", "x>=16")
_LEVEL_EDGES = (2.0, 4.0, 8.0, 16.0)
_MIN_SIGMA = 1e-6  # below this a kernel axis is a delta (the exponent underflows to 0 off the centre)


@dataclass(frozen=True)
class DegradationParams:
    """The degradation of one sample. Sigmas in HQ pixels, theta in radians, noise std on the 0-255 scale."""

    kernel: str = "iso"
    kernel_size: int = 41
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    scale: float = 1.0
    noise: float = 0.0
    jpeg_quality: int | None = None

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if int(self.kernel_size) != self.kernel_size or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size!r}")
        if self.sigma_x < 0 or self.sigma_y < 0:
            raise ValueError(f"sigmas must be >= 0, got {self.sigma_x}, {self.sigma_y}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        q = self.jpeg_quality
        if q is not None and (int(q) != q or not 0 <= q <= 100):
            raise ValueError(f"jpeg_quality must be an integer in [0, 100] or None, got {q!r}")

    def to_row(self) -> dict[str, Any]:
        """Flat scalars for the manifest (prefixed `deg_`); jpeg_quality None (no JPEG) stays None (null)."""
        row = {f"deg_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}
        row["deg_severity"] = severity(self)
        row["deg_level"] = level(self)
        return row


IDENTITY = DegradationParams()

_PI = math.pi
PRESETS: dict[str, dict[str, Sampled]] = {
    "gfpgan": {
        "kernel": Sampled(values=("iso", "aniso")),
        "kernel_size": Sampled(values=(41,)),
        "sigma_x": Sampled(low=0.1, high=10.0),
        "sigma_y": Sampled(low=0.1, high=10.0),
        "theta": Sampled(low=-_PI, high=_PI),
        "scale": Sampled(low=0.8, high=8.0),
        "noise": Sampled(low=0.0, high=20.0),
        "jpeg_quality": Sampled(low=60, high=100),
    },
    "difface-celeba-test": {
        "kernel": Sampled(values=("aniso",)),
        "kernel_size": Sampled(values=(41,)),
        "sigma_x": Sampled(values=(4.0, 8.0, 12.0, 16.0)),
        "sigma_y": Sampled(values=(4.0, 8.0, 12.0, 16.0)),
        "theta": Sampled(values=(0.0, _PI / 4, _PI / 2, 3 * _PI / 4)),
        "scale": Sampled(values=tuple(float(s) for s in range(4, 41, 4))),
        "noise": Sampled(values=(1.0, 5.0, 10.0, 15.0, 20.0)),
        "jpeg_quality": Sampled(values=(30, 40, 50, 60, 70)),
    },
    "codeformer-heavy": {
        "kernel": Sampled(values=("iso", "aniso")),
        "kernel_size": Sampled(values=(41,)),
        "sigma_x": Sampled(low=1.0, high=15.0),
        "sigma_y": Sampled(low=1.0, high=15.0),
        "theta": Sampled(low=-_PI, high=_PI),
        "scale": Sampled(low=4.0, high=30.0),
        "noise": Sampled(low=0.0, high=20.0),
        "jpeg_quality": Sampled(low=30, high=80),
    },
}

_FIELDS = tuple(f.name for f in dataclasses.fields(DegradationParams))


def preset_spec(preset: str | dict) -> dict[str, Sampled]:
    """The per-field `Sampled` specs of a preset name or a custom dict (see the module docstring)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown degradation preset {preset!r}; known: {sorted(PRESETS)}")
        return dict(PRESETS[preset])
    if not isinstance(preset, dict):
        raise TypeError(f"a preset is a name or a dict, got {type(preset).__name__}")
    unknown = set(preset) - set(_FIELDS) - {"base"}
    if unknown:
        raise ValueError(f"unknown degradation field(s) {sorted(unknown)}; known: {list(_FIELDS)} and 'base'")
    if "base" in preset:
        spec = preset_spec(str(preset["base"]))
    else:
        spec = {name: Sampled(values=(getattr(IDENTITY, name),)) for name in _FIELDS if name != "sigma_y"}
    spec.update({k: Sampled.parse(v) for k, v in preset.items() if k != "base"})
    return spec


def draw_degradation(preset: str | dict, job_seed: int, sample_id: str) -> DegradationParams:
    """The degradation of sample `sample_id`: a pure function of (preset, job seed, sample id)."""
    spec = preset_spec(preset)
    got = {name: s.draw(random.Random(derive_seed("degradation", int(job_seed), str(sample_id), name)))
           for name, s in spec.items()}
    if "sigma_y" not in got:
        got["sigma_y"] = got["sigma_x"]
    if got["kernel"] == "iso":
        got["sigma_y"], got["theta"] = got["sigma_x"], 0.0
    q = got["jpeg_quality"]
    return DegradationParams(
        kernel=str(got["kernel"]), kernel_size=int(got["kernel_size"]),
        sigma_x=float(got["sigma_x"]), sigma_y=float(got["sigma_y"]), theta=float(got["theta"]),
        scale=float(got["scale"]), noise=float(got["noise"]), jpeg_quality=None if q is None else int(q))


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """A size x size bivariate Gaussian (float64, sums to 1); x is the column axis, y the row axis.

    Covariance R diag(sigma_x^2, sigma_y^2) R^T with R the rotation by theta (BasicSR's convention), so
    theta = pi/2 swaps the axes (the transpose of theta = 0). A sigma of 0 is a delta along that axis.
    """
    half = size // 2
    ax = np.arange(-half, half + 1, dtype=np.float64)
    x, y = np.meshgrid(ax, ax)  # x varies along columns, y along rows
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y  # coordinates in the kernel's principal frame (R^T [x, y])
    sx, sy = max(float(sigma_x), _MIN_SIGMA), max(float(sigma_y), _MIN_SIGMA)
    k = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return k / k.sum()


def kernel_of(p: DegradationParams) -> np.ndarray:
    return gaussian_kernel(p.kernel_size, p.sigma_x, p.sigma_y, p.theta)


def lq_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of the downsampled image: floor(H / r), floor(W / r) as the sources, at least 1."""
    return max(1, int(height // scale)), max(1, int(width // scale))


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> tuple[np.ndarray, int]:
    """JPEG-encode an RGB uint8 image at `quality` and decode it: (decoded RGB uint8, encoded bytes)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed to write a JPEG")
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB), int(buf.size)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def degrade(hq: np.ndarray, p: DegradationParams, job_seed: int, sample_id: str) -> np.ndarray:
    """The LQ image (uint8 H x W x 3 RGB, same size as `hq`) of one sample: see the module docstring."""
    if hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {hq.dtype} {hq.shape}")
    h, w = hq.shape[:2]
    x = hq.astype(np.float32)
    k = kernel_of(p)
    if k.max() < 1.0:  # a delta kernel (sigma ~ 0) leaves the image as it is
        x = cv2.filter2D(x, -1, k.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
    hl, wl = lq_size(h, w, p.scale)
    if (hl, wl) != (h, w):
        x = cv2.resize(x, (wl, hl), interpolation=cv2.INTER_LINEAR)
    if p.noise > 0:
        rng = np.random.default_rng(derive_seed("degradation", int(job_seed), str(sample_id), "noise"))
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(p.noise)
    x = np.clip(x, 0.0, 255.0)
    if p.jpeg_quality is not None:
        x = jpeg_roundtrip(_to_uint8(x), p.jpeg_quality)[0].astype(np.float32)
    if (hl, wl) != (h, w):
        x = cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)
    return _to_uint8(x)


def severity(p: DegradationParams) -> float:
    """Equivalent isotropic blur std in HQ pixels of the blur and the downsampling (0 at the identity)."""
    return float(math.hypot(math.sqrt(p.sigma_x * p.sigma_y), max(p.scale - 1.0, 0.0) / 2.0))


def level(p: DegradationParams) -> str:
    """The strength bucket by scale factor r: one of `LEVELS` ("x<2", "x2-4", "x4-8", "x8-16", "x>=16")."""
    for name, edge in zip(LEVELS, _LEVEL_EDGES):
        if p.scale < edge:
            return name
    return LEVELS[-1]

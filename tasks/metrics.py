"""Face-restoration metrics computed batched on one device: PSNR, SSIM, LPIPS, identity, FID features.

Conventions (see /work/shared/REFERENCE.md, "Metric conventions"):

- Images are float tensors (B, 3, H, W) in [0, 1], RGB, on any device; `MetricSuite` takes uint8 (B, H, W, 3).
- PSNR / SSIM are computed in float64 (float32 on MPS, which has no float64) with data range 1, either on
  RGB (per-image mean over the three channels, as usual) or on Y: ITU-R BT.601 luma in the "studio swing"
  range, Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 1], i.e. Y in [16, 235] / 255,
  not rounded: the BasicSR `to_y_channel` / pyiqa `test_y_channel` convention (pyiqa's `ssim` is Y, `ssimc` RGB).
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5, MATLAB `fspecial` = separable normalised
  1-D Gaussian), K1 = 0.01, K2 = 0.03, data range 1, population (biased) local variances, 'valid' filtering
  (no padding: the SSIM map is (H - 10) x (W - 10) and its mean is the score), as BasicSR and the MATLAB
  reference do. skimage's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)` gives the same number: it filters with mode='reflect' but then crops (win_size - 1) // 2 = 5
  pixels from every border before averaging, which leaves exactly the valid region, where the padding is
  never read.
- LPIPS: the `lpips` package (linear heads from its wheel) on inputs mapped to [-1, 1]; the backbone (torchvision
  AlexNet / VGG16 ImageNet weights) comes from a configured path/URI or the torch hub cache ($TORCH_HOME):
  never downloaded. The metric is named with its net: "lpips_alex" / "lpips_vgg".
- Identity: insightface arcface_torch IResNet-50 (`backbone.pth` key layout), RGB input resized to 112x112,
  normalised (x - 0.5) / 0.5, 512-d embedding L2-normalised; "ids" = cosine similarity (higher is better),
  "deg" = angle in degrees (lower is better).
- FID: 2048-d pool3 features, statistics accumulated as (count, sum, sum of outer products) in float64 and
  merged exactly across shards. Two networks, each its own metric name: `fid_tf_inception` is the FID of the
  literature (pytorch-fid's port of the 2015 TensorFlow Inception, models/fid_inception.py, with pytorch-fid's
  input handling: bilinear 299x299, 2x - 1); `fid_tv_inception` uses torchvision's ImageNet Inception-v3 and
  is comparable only with itself. A FID is against the run's ground truth or against reference statistics
  (`FIDReference`: mu/sigma in the pytorch-fid / clean-fid .npz layout).

- LMD `lmd_mtcnn5` (tasks/lmd.py): mean distance in px of the bundled MTCNN's 5 landmarks, restored vs ground
  truth (NaN where a face is not found); plug-in landmark detectors give `lmd_<name>` metrics.
- NIQE `niqe` (tasks/niqe.py): the published no-reference algorithm against pristine parameters from a path.
- Plug-ins (`plugins={name: {class, weights, kwargs}}`): kind "no_reference" (e.g. pyiqa's learned metrics via
  tasks/iqa_plugins.py) or "landmarks"; a plug-in raising MetricUnavailableError is unavailable with its reason.
- Without ground truth (real-world inputs) the full-reference metrics are not applicable (NaN, with the reason)
  and identity compares the output with the method's input.

Every pretrained network loads from a configured local path or fsspec URI (or the torch hub cache for the
torchvision backbones); when the weights are absent the metric is reported unavailable with the reason and no
number is produced. `tasks.weights.RANDOM_INIT` ("random-init") as a weights setting builds a deliberately
random network (tests, benchmarks); its identity is recorded as such.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.arcface import IResNet, iresnet50
from models.fid_inception import fid_inception_v3
from tasks.lmd import LandmarkDistance, MTCNNLandmarks
from tasks.storage import get_fs
from tasks.weights import RANDOM_INIT, WeightsNotFoundError, load_weights

__all__ = [
    "METRIC_NAMES",
    "WEIGHT_KEYS",
    "FIDStats",
    "IResNet",
    "IdentityEmbedder",
    "InceptionFeatures",
    "LPIPSMetric",
    "MetricBatch",
    "MetricSuite",
    "MetricUnavailableError",
    "FIDReference",
    "TFInceptionFeatures",
    "check_metric_names",
    "fid_against_reference",
    "fid_from_stats",
    "fid_reference_npz",
    "load_fid_reference",
    "frechet_distance",
    "iresnet50",
    "psnr",
    "rgb_to_y",
    "ssim",
]

FID_METRICS = ("fid_tf_inception", "fid_tv_inception")  # dataset-level: the literature's network, torchvision's
METRIC_NAMES = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips_alex", "lpips_vgg", "ids", "deg", "lmd_mtcnn5",
                "niqe", *FID_METRICS)
# Per-image metrics that compare with the ground truth: not applicable to real-world inputs.
FULL_REFERENCE = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips_alex", "lpips_vgg", "lmd_mtcnn5")
# Keys of MetricSuite's `weights` / `sha256` mappings: one per pretrained network ("identity" serves ids and deg).
# "niqe" is the pristine-parameter .npz (BasicSR's niqe_pris_params.npz layout), not a network.
WEIGHT_KEYS = ("lpips_alex", "lpips_vgg", "identity", "niqe", *FID_METRICS)
PLUGIN_KINDS = ("landmarks", "no_reference")

# torch hub cache file names of the torchvision ImageNet checkpoints ($TORCH_HOME/hub/checkpoints/<name>).
HUB_FILES = {
    "alexnet": "alexnet-owt-7be5be79.pth",
    "vgg16": "vgg16-397923af.pth",
    "inception_v3": "inception_v3_google-0cc3c7bd.pth",
    "pt_inception": "pt_inception-2015-12-05-6726825d.pth",  # pytorch-fid's port of the 2015 TF graph
}


def check_metric_names(names: Sequence[str], plugins: Mapping[str, Mapping] | None = None) -> list[str]:
    """The names, deduplicated in order; ValueError naming the allowed values otherwise ("fid" is ambiguous).

    plugins: {metric name: {class, weights?, kwargs?}} (metrics.plugins): their names are allowed too.
    """
    names = list(dict.fromkeys(names))
    plugins = dict(plugins or {})
    if "fid" in names:
        raise ValueError("metrics.names: 'fid' does not say which network; use fid_tf_inception (the FID of papers: "
                         "pytorch-fid's TF Inception) or fid_tv_inception (torchvision's ImageNet Inception-v3)")
    clash = [p for p in plugins if p in METRIC_NAMES]
    if clash:
        raise ValueError(f"metrics.plugins: {clash} are built-in metric names; name plug-ins otherwise")
    for p, spec in plugins.items():
        if not isinstance(spec, Mapping) or "class" not in spec or set(spec) - {"class", "weights", "kwargs"}:
            raise ValueError(f"metrics.plugins.{p}: expected {{class: pkg.module:Class, weights: path, kwargs: {{}}}}, "
                             f"got {spec!r}")
    bad = [n for n in names if n not in METRIC_NAMES and n not in plugins]
    if bad:
        raise ValueError(f"metrics.names: unknown {bad}; allowed: {list(METRIC_NAMES)} or a metrics.plugins name "
                         f"({list(plugins)})")
    return names


class MetricUnavailableError(RuntimeError):
    """A metric cannot be computed here (its weights are not configured or absent); str() is the reason."""


# --------------------------------------------------------------------------------------------------------------
# PSNR / SSIM
# --------------------------------------------------------------------------------------------------------------

_Y_COEFFS = (65.481, 128.553, 24.966)  # 219 * (0.299, 0.587, 0.114): BT.601 luma scaled to [16, 235]

# Elements per working chunk. CPU: temporaries of ~4 MB (float64) stay in cache and below glibc's mmap threshold
# (recycled from the heap, not page-faulted in afresh for every batch): PSNR measured 1.5-2.3x faster than with
# whole-batch temporaries at 16 x 512 x 512 (1 thread); accelerators: large chunks, few kernel launches.
_CHUNK_ELEMS = {"cpu": 1 << 19}
_CHUNK_ELEMS_DEFAULT = 1 << 25


@contextmanager
def _single_threaded(device: torch.device):
    """Run CPU PSNR/SSIM on one intra-op thread (restored afterwards).

    They are long sequences of small elementwise ops; torch splits each one across its threads, and on a shared
    machine every split waits for a descheduled thread: measured here, SSIM of 16 x 512 x 512 took 23 s with 2
    threads and 0.46 s with 1. Ray actors get OMP_NUM_THREADS = their CPUs (1 by default) anyway; parallelism comes
    from the actors.
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _chunk(device: torch.device, elems_per_item: int) -> int:
    return max(1, _CHUNK_ELEMS.get(device.type, _CHUNK_ELEMS_DEFAULT) // max(1, elems_per_item))


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 studio-swing luma of RGB in [0, 1]: (B, 3, H, W) -> (B, 1, H, W) in [16/255, 235/255], unrounded.

    The same values as BasicSR's `bgr2ycbcr(y_only=True)` / pyiqa's `rgb2ycbcr` on float input.
    """
    y = x[:, 0] * _Y_COEFFS[0]  # axpy form: one output buffer (einsum copied batched inputs: 2x slower on CPU)
    y.add_(x[:, 1], alpha=_Y_COEFFS[1]).add_(x[:, 2], alpha=_Y_COEFFS[2]).add_(16.0).div_(255.0)
    return y.unsqueeze(1)


def _to_unit(x: torch.Tensor, dtype: torch.dtype, y_channel: bool) -> torch.Tensor:
    """A chunk in the working dtype, [0, 1] (uint8 is divided by 255), optionally reduced to Y."""
    x = x.to(dtype) / 255.0 if x.dtype == torch.uint8 else x.to(dtype)
    return rgb_to_y(x) if y_channel else x


def psnr(x: torch.Tensor, y: torch.Tensor, *, y_channel: bool = False) -> torch.Tensor:
    """Per-image PSNR in dB with data range 1: 10 log10(1 / MSE), MSE over all channels and pixels.

    x, y: (B, 3, H, W) float in [0, 1] (or uint8, read as value / 255). y_channel=False: RGB (MSE over the 3
    channels, as skimage's `peak_signal_noise_ratio(data_range=1)`); True: BT.601 Y in [16, 235] / 255 (BasicSR /
    pyiqa convention). Identical images give +inf. Returns float64 (B,) on x's device.
    """
    _check_pair(x, y)
    dt = _work_dtype(x.device)
    step = _chunk(x.device, x[0].numel())
    mse = []
    with _single_threaded(x.device):
        for i in range(0, x.shape[0], step):
            a = _to_unit(x[i : i + step], dt, y_channel)
            b = _to_unit(y[i : i + step].to(x.device), dt, y_channel)
            mse.append((a - b).square_().flatten(1).mean(dim=1))  # a may alias the input: no in-place on it
    mse = torch.cat(mse) if mse else torch.empty(0, dtype=dt, device=x.device)
    return 10.0 * torch.log10(1.0 / mse)  # mse == 0 -> +inf


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> list[float]:
    """Normalised 1-D Gaussian taps (MATLAB fspecial('gaussian', size, sigma) is their outer product)."""
    half = size // 2
    w = [math.exp(-((k - half) ** 2) / (2.0 * sigma**2)) for k in range(size)]
    s = sum(w)
    return [v / s for v in w]


_WINDOW = _gaussian_window()


def _filter_valid(t: torch.Tensor, taps: Sequence[float]) -> torch.Tensor:
    """Separable correlation with `taps` along H then W, 'valid' region only: (..., H, W) -> (..., H-k+1, W-k+1).

    Written as in-place shifted multiply-adds: works on every device and dtype, allocates two outputs only and
    runs faster than float64 conv2d on CPU (which has no vectorised float64 convolution).
    """
    k = len(taps)
    h, w = t.shape[-2:]
    rows = torch.zeros((*t.shape[:-2], h - k + 1, w), dtype=t.dtype, device=t.device)
    for i, a in enumerate(taps):
        rows.add_(t[..., i : i + h - k + 1, :], alpha=a)
    out = torch.zeros((*t.shape[:-2], h - k + 1, w - k + 1), dtype=t.dtype, device=t.device)
    for i, a in enumerate(taps):
        out.add_(rows[..., :, i : i + w - k + 1], alpha=a)
    return out


def _ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM map of (N, h, W) planes over their valid region: (N, h - 10, W - 10)."""
    c1, c2 = 0.01**2, 0.03**2  # (K * data_range)^2 with data range 1
    stack = torch.stack([x, y, x * x, y * y, x * y])  # (5, N, h, W): one filtering pass for all moments
    mx, my, mxx, myy, mxy = _filter_valid(stack, _WINDOW)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my  # population moments (no N/(N-1))
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


# CPU: SSIM is filtered in bands of output rows, ~64k elements per moment map, so that the five maps and their
# filtered copies stay in cache (about twice as fast as whole 512x512 planes; the result is the same).
_SSIM_BAND_ELEMS_CPU = 1 << 16


def _ssim_planes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each (H, W) plane: (N, H, W) x 2 -> (N,)."""
    k = len(_WINDOW)
    h, w = x.shape[-2:]
    oh, ow = h - k + 1, w - k + 1
    if x.device.type == "cpu":
        planes = max(1, _SSIM_BAND_ELEMS_CPU // (h * w))
        band = max(1, _SSIM_BAND_ELEMS_CPU // (planes * w))
    else:
        planes, band = _chunk(x.device, 5 * h * w), oh
    out = []
    for j in range(0, x.shape[0], planes):
        a, b = x[j : j + planes], y[j : j + planes]
        total = torch.zeros(a.shape[0], dtype=x.dtype, device=x.device)
        for r in range(0, oh, band):
            rows = slice(r, min(oh, r + band) + k - 1)
            total += _ssim_map(a[:, rows], b[:, rows]).sum(dim=(-2, -1))
        out.append(total / (oh * ow))
    return torch.cat(out)


def ssim(x: torch.Tensor, y: torch.Tensor, *, y_channel: bool = False) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1,
    'valid' filtering (BasicSR / MATLAB): the mean of the (H-10) x (W-10) SSIM map.

    x, y: (B, 3, H, W) float in [0, 1] (or uint8, read as value / 255), at least 11x11. y_channel=False: mean of
    the three per-channel RGB scores (skimage `channel_axis` convention); True: on BT.601 Y in [16, 235] / 255.
    Equals skimage's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)` (its reflect padding is cropped away). Returns float64 (B,) on x's device.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < len(_WINDOW):
        raise ValueError(f"SSIM needs images of at least {len(_WINDOW)}x{len(_WINDOW)}, got {tuple(x.shape[-2:])}")
    dt = _work_dtype(x.device)
    channels = 1 if y_channel else 3
    step = _chunk(x.device, channels * x.shape[-2] * x.shape[-1])  # images converted to float64 at a time
    out = []
    with _single_threaded(x.device):
        for i in range(0, x.shape[0], step):
            a = _to_unit(x[i : i + step], dt, y_channel).flatten(0, 1)  # (b * C, H, W)
            b = _to_unit(y[i : i + step].to(x.device), dt, y_channel).flatten(0, 1)
            out.append(_ssim_planes(a, b).view(-1, channels).mean(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=dt, device=x.device)


# --------------------------------------------------------------------------------------------------------------
# Weights resolution
# --------------------------------------------------------------------------------------------------------------


def _hub_checkpoint(filename: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _resolve(weights: str | None, what: str, hub_file: str | None = None) -> str:
    """The URI to load, RANDOM_INIT, or MetricUnavailableError when nothing is configured or cached."""
    if weights:
        return weights
    if hub_file is not None:
        cached = _hub_checkpoint(hub_file)
        if os.path.isfile(cached):
            return cached
        raise MetricUnavailableError(
            f"no {what} weights configured and the torch hub cache lacks {cached} "
            f"(configure a path/URI to the torchvision state_dict, or set TORCH_HOME to a cache holding {hub_file})"
        )
    raise MetricUnavailableError(f"no {what} weights configured (set a local path or fsspec URI to the checkpoint)")


def _load_into(model: nn.Module, uri: str, sha256: str | None, storage_options: dict | None) -> str:
    """Strictly load a checkpoint into model (tasks.weights); a missing file makes the metric unavailable."""
    try:
        return load_weights(model, uri, sha256=sha256, storage_options=storage_options)
    except WeightsNotFoundError as e:
        raise MetricUnavailableError(str(e)) from None


def _empty(builder, *args, **kwargs) -> nn.Module:
    """Build a module without initialising its parameters (they are all overwritten by a strict load)."""
    with torch.device("meta"):
        model = builder(*args, **kwargs)
    return model.to_empty(device="cpu")


# --------------------------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------------------------

_LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16"}
_LPIPS_CPU_PIXELS = 1 << 20


class LPIPSMetric:
    """LPIPS v0.1 of the `lpips` package with a configured torchvision backbone; lower is better.

    weights: a torchvision `alexnet` / `vgg16` state_dict (path or fsspec URI, loaded with weights_only=True);
    None looks in the torch hub cache ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth /
    vgg16-397923af.pth) and raises MetricUnavailableError when absent (nothing is downloaded);
    RANDOM_INIT keeps the random backbone (lpips' pnet_rand=True). The linear heads are the package's own.
    """

    def __init__(
        self,
        net: str = "alex",
        weights: str | None = None,
        *,
        device: str | torch.device = "cpu",
        sha256: str | None = None,
        storage_options: dict | None = None,
    ):
        if net not in _LPIPS_BACKBONES:
            raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
        self.net = net
        self.name = f"lpips_{net}"
        arch = _LPIPS_BACKBONES[net]
        uri = _resolve(weights, f"{self.name} backbone ({arch})", HUB_FILES[arch])
        import lpips  # imports torchvision; only needed when the metric is used
        import torchvision

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` argument, used by lpips
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if uri == RANDOM_INIT:
            self.weights_identity = RANDOM_INIT
        else:
            backbone = _empty(getattr(torchvision.models, arch))
            self.weights_identity = _load_into(backbone, uri, sha256, storage_options)
            _copy_backbone(model.net, backbone.features)
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image pair, float32 (B,); inputs in [0, 1] are mapped to [-1, 1].

        On CPU the batch runs in chunks of ~1 Mpixel (4 images at 512x512): the activations of a whole large batch
        fall out of cache (measured ~1.3x slower at 16 x 512 x 512); elsewhere the batch runs at once.
        """
        _check_pair(x, y)
        step = max(1, _LPIPS_CPU_PIXELS // (x.shape[-2] * x.shape[-1])) if self.device.type == "cpu" else x.shape[0]
        out = []
        for i in range(0, x.shape[0], max(1, step)):
            a = x[i : i + step].to(self.device, torch.float32) * 2 - 1
            b = y[i : i + step].to(self.device, torch.float32) * 2 - 1
            out.append(self.model(a, b).flatten())
        return torch.cat(out) if out else torch.empty(0, device=self.device)


def _copy_backbone(lpips_net: nn.Module, features: nn.Sequential) -> None:
    """Copy torchvision `features[i]` into lpips' `slice<k>.<i>` (the slices hold features[0 .. last-1])."""
    copied = set()
    for name, part in lpips_net.named_children():
        if not name.startswith("slice"):
            continue
        for idx, child in part.named_children():
            child.load_state_dict(features[int(idx)].state_dict(), strict=True)
            copied.add(int(idx))
    with_params = {i for i, m in enumerate(features) if any(True for _ in m.parameters())}
    if not with_params <= copied:
        raise RuntimeError(f"lpips backbone layout changed: layers {sorted(with_params - copied)} not copied")


# --------------------------------------------------------------------------------------------------------------
# Identity (ArcFace IResNet)
# --------------------------------------------------------------------------------------------------------------


class IdentityEmbedder:
    """ArcFace identity embeddings (insightface arcface_torch IResNet-50 `backbone.pth`).

    Inputs are face images in [0, 1]; `crop` = (top, left, bottom, right) fractions of the image to keep before
    resizing (None: the whole image). They are resized to 112x112 (bilinear, antialiased) and normalised
    (x - 0.5) / 0.5 on RGB, as arcface_torch's inference does. arcface_torch expects insightface's 5-point
    112x112 alignment; FFHQ-aligned faces resized whole are a close but not identical framing, so compare
    scores only under the same framing. Output: 512-d embeddings, L2-normalised.
    weights: path / fsspec URI of the state_dict (required: no cache fallback), or RANDOM_INIT.
    """

    name = "ids"
    size = 112

    def __init__(
        self,
        weights: str | None,
        *,
        device: str | torch.device = "cpu",
        sha256: str | None = None,
        storage_options: dict | None = None,
        crop: tuple[float, float, float, float] | None = None,
    ):
        uri = _resolve(weights, "ArcFace IResNet-50 (identity)")
        if uri == RANDOM_INIT:
            model, self.weights_identity = iresnet50(), RANDOM_INIT
        else:
            model = _empty(iresnet50)
            self.weights_identity = _load_into(model, uri, sha256, storage_options)
        if crop is not None and not (0 <= crop[0] < crop[2] <= 1 and 0 <= crop[1] < crop[3] <= 1):
            raise ValueError(f"crop must be (top, left, bottom, right) fractions with top < bottom, got {crop}")
        self.crop = crop
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 512) float32 unit vectors."""
        x = x.to(self.device, torch.float32)
        if self.crop is not None:
            h, w = x.shape[-2:]
            t, l, b, r = self.crop
            x = x[..., round(t * h) : round(b * h), round(l * w) : round(r * w)]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return F.normalize(self.model((x - 0.5) / 0.5), dim=1)

    def compare(self, restored: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine similarity, angle in degrees), float64 (B,) each, between restored and GT embeddings."""
        _check_pair(restored, gt)
        e = self.embed(torch.cat([restored, gt.to(restored.device)])).double()
        a, b = e.chunk(2)
        cos = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1).clamp(-1.0, 1.0)
        return cos, torch.rad2deg(torch.arccos(cos))


# --------------------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class InceptionFeatures:
    """2048-d pool3 features (global average pool before `fc`) of torchvision's Inception-v3: `fid_tv_inception`.

    weights: torchvision's `inception_v3` ImageNet state_dict (inception_v3_google-0cc3c7bd.pth layout, with the
    AuxLogits head) from a path / fsspec URI; None looks in the torch hub cache; RANDOM_INIT for tests.
    Inputs in [0, 1] are resized to 299x299 (bilinear, align_corners=False, no antialias by default, as
    pytorch-fid resizes), normalised with the ImageNet mean/std and passed through the model with
    transform_input=True, exactly as torchvision runs these weights (together equivalent to 2x - 1).

    This is NOT the FID of the literature: that is `TFInceptionFeatures` (`fid_tf_inception`). Compare FIDs only
    between runs of the same network and resize settings, and store images as PNG (JPEG changes FID).
    """

    name = "fid_tv_inception"
    size = 299
    dim = 2048

    def __init__(
        self,
        weights: str | None = None,
        *,
        device: str | torch.device = "cpu",
        sha256: str | None = None,
        storage_options: dict | None = None,
        antialias: bool = False,
    ):
        from torchvision.models import inception_v3

        uri = _resolve(weights, "torchvision Inception-v3 (fid_tv_inception)", HUB_FILES["inception_v3"])
        kwargs = dict(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        if uri == RANDOM_INIT:
            model, self.weights_identity = inception_v3(**kwargs), RANDOM_INIT
        else:
            model = _empty(inception_v3, **kwargs)
            self.weights_identity = _load_into(model, uri, sha256, storage_options)
        model.aux_logits, model.AuxLogits = False, None  # training-only head
        model.fc = nn.Identity()  # the forward then returns flatten(avgpool) = pool3, dropout being off in eval
        self.antialias = antialias
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 2048) float64 pool3 features."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=self.antialias)
        return self.model((x - self._mean) / self._std).double()


class TFInceptionFeatures:
    """2048-d pool3 features of the FID Inception (models.fid_inception): `fid_tf_inception`, the FID of papers.

    weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the 2015 TensorFlow graph ported to torch;
    clean-fid uses the same network) from a path / fsspec URI, loaded strictly; None looks in the torch hub cache
    ($TORCH_HOME/hub/checkpoints/, where pytorch-fid caches it); RANDOM_INIT for tests. Input handling is
    pytorch-fid's: [0, 1] float32, bilinear resize to 299x299 (align_corners=False, no antialias), then 2x - 1.
    """

    name = "fid_tf_inception"
    size = 299
    dim = 2048

    def __init__(
        self,
        weights: str | None = None,
        *,
        device: str | torch.device = "cpu",
        sha256: str | None = None,
        storage_options: dict | None = None,
    ):
        uri = _resolve(weights, "TF Inception (fid_tf_inception, pt_inception-2015-12-05)", HUB_FILES["pt_inception"])
        if uri == RANDOM_INIT:
            model, self.weights_identity = fid_inception_v3(), RANDOM_INIT
        else:
            model = _empty(fid_inception_v3)
            self.weights_identity = _load_into(model, uri, sha256, storage_options)
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 2048) float64 pool3 features."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        return self.model(x.to(self.device, torch.float32)).double()


FID_NETWORKS = {"fid_tf_inception": TFInceptionFeatures, "fid_tv_inception": InceptionFeatures}
FID_DIM = 2048


class FIDStats:
    """Feature statistics accumulated exactly as (count, sum, sum of outer products) in float64.

    Batches are added with `update` (plain float64 additions: any split equals a single pass up to rounding);
    `mean` and `cov` (unbiased, as np.cov) are derived at the end.
    """

    def __init__(self, dim: int = 2048):
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features) -> FIDStats:
        f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        f = f.astype(np.float64, copy=False)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or inf")
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features accumulated")
        return self.sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (normalised by count - 1, as np.cov with rows as observations)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 features, have {self.count}")
        mu = self.mean
        c = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (c + c.T) / 2  # exact symmetry


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr sqrtm(S1 S2) (Dowson & Landau): the FID of pytorch-fid.

    Exact, in float64, from two symmetric eigendecompositions instead of scipy.linalg.sqrtm of the
    non-symmetric product (2048-d, one thread: ~3 s instead of ~15 s). With R = sqrtm(S1) symmetric PSD,
    S1 S2 is similar to A = R S2 R (symmetric PSD), so Tr sqrtm(S1 S2) = sum sqrt(eig(A)); with
    S1 = V diag(w) V^T, A is similar (via V) to D (V^T S2 V) D, D = diag(sqrt(w)), which is what is decomposed.

    Singular / ill-conditioned covariances (fewer samples than dimensions) need no special case: eigh does not
    fail on them. The covariances are symmetrised ((S + S^T) / 2); eigenvalues of S1 at round-off level
    (<= n * eps * max|w|, numpy's matrix_rank tolerance) are set to 0 and negative ones of A from round-off
    are clipped to 0, see `_trace_sqrt_product`. An eigenvalue below -1e-3 * max|w| (of S1 or of A) means no
    covariance: ValueError (as pytorch-fid raised on a large imaginary part of sqrtm). `eps` keeps pytorch-fid's
    fallback: only if LAPACK's eigh does not converge (LinAlgError) is eps * I added to both covariances and
    the computation repeated. NaN/inf inputs raise ValueError. The result is clamped at 0 from below:
    identical statistics give 0 up to round-off (|.| <~ 1e-10 even for ill-conditioned covariances).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("mean or covariance contains NaN or inf")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        offset = np.eye(s1.shape[0]) * eps
        tr_covmean = _trace_sqrt_product(s1 + offset, s2 + offset)
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr sqrtm(S1 S2) for symmetric PSD S1, S2 (float64): sum sqrt(eig(D V^T S2 V D)), S1 = V D^2 V^T.

    Eigenvalues of S1 at round-off level (<= n * eps * max|w|, numpy's matrix_rank tolerance) are set to 0:
    for a rank-deficient S1 (fewer samples than dimensions) about half of them are +-1e-13 noise whose
    square roots would add ~1e-8 relative of spurious trace (scipy's sqrtm of S1 S2 has the same error);
    zeroed, the FID matches an exact reference to ~1e-13 relative. Those of A = D B D are only clipped at 0:
    its range is about that of S1 squared, so the same tolerance there would drop genuine eigenvalues. Hence
    when S2 has the lower rank, A's extra null eigenvalues stay round-off (~eps * |A|) and their square roots
    give ~1e-8 relative error, as sqrtm does; `fid_from_stats` therefore passes the smaller sample first.
    """
    w1, v1 = np.linalg.eigh(s1)
    _check_psd(w1, "sigma1")
    # Only S1's range contributes (zeroed eigenvalues give zero rows and columns of A): with few samples (rank k
    # << n) A is k x k, and the two n^3 products shrink to n^2 k (2048-d, 16 images: ~3x faster).
    keep = w1 > w1.size * np.finfo(np.float64).eps * np.abs(w1).max(initial=0.0)
    d, vk = np.sqrt(w1[keep]), v1[:, keep]
    a = vk.T @ s2 @ vk
    a = d[:, None] * ((a + a.T) / 2) * d[None, :]
    w = np.linalg.eigvalsh(a)
    _check_psd(w, "sigma2")  # D B D with B = V^T S2 V is PSD iff S2 is (on the range of S1)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _check_psd(w: np.ndarray, what: str, rtol: float = 1e-3) -> None:
    """Negative eigenvalues from round-off are expected; one below -rtol * max|w| means no covariance."""
    top = float(np.abs(w).max(initial=0.0))
    if w.size and w.min() < -rtol * top:
        raise ValueError(f"{what} is not positive semi-definite: eigenvalue {w.min():.3g} (largest |.| {top:.3g})")


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    """FID between two feature sets; symmetric, so the one with fewer samples (lower rank) goes first.

    `frechet_distance` is exact (~1e-13 relative) when the first covariance has the lower rank; in the other
    order a rank-deficient second covariance leaves round-off in A's null space (~1e-8 relative, as sqrtm).
    """
    if b.count < a.count:
        a, b = b, a
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


@dataclass(frozen=True)
class FIDReference:
    """Reference statistics (mean, covariance) of a named image set, e.g. FFHQ, for FID without ground truth.

    The file is an .npz with float arrays `mu` (D,) and `sigma` (D, D): the layout pytorch-fid's `--save-stats`
    and clean-fid write. Files this project writes (workflows/fid_stats.py) also hold `protocol` (the FID
    metric whose network made the features), `count` and `source`; a file without `protocol` is taken to be
    of `fid_tf_inception` (pytorch-fid's and clean-fid's network).
    """

    name: str
    uri: str
    mu: np.ndarray
    sigma: np.ndarray
    protocol: str = "fid_tf_inception"
    count: int = -1  # -1: not recorded in the file
    source: str = ""

    @property
    def describe(self) -> str:
        n = f", {self.count} images" if self.count >= 0 else ""
        src = f", from {self.source}" if self.source else ""
        return f"{self.name}: {self.uri} ({self.protocol}{n}{src})"


def load_fid_reference(name: str, uri: str, storage_options: dict | None = None) -> FIDReference:
    """Read reference statistics (see FIDReference); FileNotFoundError / ValueError name the file."""
    fs, path = get_fs(uri, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"FID reference statistics {name!r} not found: {uri}") from None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"FID reference {uri} lacks {missing} (an .npz with mu and sigma is expected); "
                             f"it has {z.files}")
        mu, sigma = np.asarray(z["mu"], np.float64).ravel(), np.asarray(z["sigma"], np.float64)
        protocol = str(z["protocol"]) if "protocol" in z.files else "fid_tf_inception"
        count = int(z["count"]) if "count" in z.files else -1
        source = str(z["source"]) if "source" in z.files else ""
        if "weights" in z.files and str(z["weights"]).startswith(RANDOM_INIT):
            source = f"{source} [{RANDOM_INIT} network: not a real reference]".strip()
    if sigma.shape != (mu.size, mu.size):
        raise ValueError(f"FID reference {uri}: sigma {sigma.shape} does not match mu ({mu.size},)")
    if protocol not in FID_METRICS:
        raise ValueError(f"FID reference {uri}: protocol {protocol!r} is not among {list(FID_METRICS)}")
    return FIDReference(name, uri, mu, sigma, protocol, count, source)


def fid_reference_npz(stats: FIDStats, protocol: str, source: str = "", weights: str = "") -> bytes:
    """Reference statistics as pytorch-fid / clean-fid read them (mu, sigma), plus protocol, count, source and
    the network's weights identity."""
    if protocol not in FID_METRICS:
        raise ValueError(f"protocol must be one of {list(FID_METRICS)}, got {protocol!r}")
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mean, sigma=stats.cov, protocol=np.array(protocol), count=np.array(stats.count),
             source=np.array(source), weights=np.array(weights))
    return buf.getvalue()


def fid_against_reference(stats: FIDStats, ref: FIDReference) -> float:
    """FID of a feature set against reference statistics (the set, usually the smaller sample, goes first)."""
    if ref.mu.size != stats.dim:
        raise ValueError(f"reference {ref.name} has dimension {ref.mu.size}, features have {stats.dim}")
    return frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)


# --------------------------------------------------------------------------------------------------------------
# The suite an actor builds once
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MetricBatch:
    """One batch's results: values[name] is float64 (B,) in input order; fid_features[metric][source] is
    (B, 2048) for each FID network; not_applicable[name] says why a metric has no value for this batch (e.g. a
    full-reference metric without ground truth)."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    fid_features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)


_SOURCES = ("restored", "gt")
NO_GT = "not applicable: no ground truth (real-world input)"


class MetricSuite:
    """Builds the requested metrics once on a device and computes them on batches of (restored, gt) pairs.

    names: a subset of METRIC_NAMES. weights: {key: path/URI | None | RANDOM_INIT} for the keys in WEIGHT_KEYS
    ("lpips_alex", "lpips_vgg": torchvision backbones, None = torch hub cache; "identity": the ArcFace
    checkpoint for ids/deg; "fid_tf_inception": pytorch-fid's pt_inception-2015-12-05 weights, "fid_tv_inception":
    torchvision's Inception-v3, None = torch hub cache for both). sha256 pins checkpoints per key.
    A metric whose weights are absent is listed in `unavailable` (name -> reason) and yields no values;
    malformed checkpoints (wrong keys/shapes, digest mismatch) raise. `weights_identity` records what was loaded.
    fid_sources: which images' Inception features to return for dataset-level FID ("restored" and/or "gt").
    """

    def __init__(
        self,
        names: Sequence[str],
        device: str | torch.device = "cpu",
        weights: Mapping[str, str | None] | None = None,
        storage_options: dict | None = None,
        *,
        sha256: Mapping[str, str | None] | None = None,
        fid_sources: Sequence[str] = _SOURCES,
        identity_crop: tuple[float, float, float, float] | None = None,
        plugins: Mapping[str, Mapping] | None = None,
    ):
        names = check_metric_names(names, plugins)
        weights, sha256 = dict(weights or {}), dict(sha256 or {})
        bad = [k for k in list(weights) + list(sha256) if k not in WEIGHT_KEYS]
        if bad:
            raise ValueError(f"unknown weights keys {bad}; known: {list(WEIGHT_KEYS)}")
        bad = [s for s in fid_sources if s not in _SOURCES]
        if bad:
            raise ValueError(f"fid_sources must be among {_SOURCES}, got {bad}")
        self.names = names
        self.device = torch.device(device)
        self.fid_sources = tuple(fid_sources)
        self.unavailable: dict[str, str] = {}
        self.weights_identity: dict[str, str] = {}
        self.lpips: dict[str, LPIPSMetric] = {}
        self.identity: IdentityEmbedder | None = None
        self.fid: dict[str, TFInceptionFeatures | InceptionFeatures] = {}
        common = dict(device=self.device, storage_options=storage_options)

        def build(metric_names: list[str], key: str, factory):
            try:
                model = factory(weights.get(key), sha256=sha256.get(key), **common)
            except MetricUnavailableError as e:
                for n in metric_names:
                    self.unavailable[n] = str(e)
                return None
            for n in metric_names:
                self.weights_identity[n] = model.weights_identity
            return model

        for net in ("alex", "vgg"):
            if f"lpips_{net}" in names:
                m = build([f"lpips_{net}"], f"lpips_{net}", lambda w, net=net, **kw: LPIPSMetric(net, w, **kw))
                if m is not None:
                    self.lpips[m.name] = m
        id_names = [n for n in ("ids", "deg") if n in names]
        if id_names:
            self.identity = build(id_names, "identity", lambda w, **kw: IdentityEmbedder(w, crop=identity_crop, **kw))
        for name, cls in FID_NETWORKS.items():
            if name in names:
                m = build([name], name, lambda w, cls=cls, **kw: cls(w, **kw))
                if m is not None:
                    self.fid[name] = m
        self.niqe = None
        if "niqe" in names:
            self.niqe = build(["niqe"], "niqe", lambda w, **kw: NIQEMetric(w, **kw))
        self.lmd: dict[str, LandmarkDistance] = {}
        if "lmd_mtcnn5" in names:
            self.lmd["lmd_mtcnn5"] = LandmarkDistance("lmd_mtcnn5", MTCNNLandmarks(device=str(self.device)))
            self.weights_identity["lmd_mtcnn5"] = self.lmd["lmd_mtcnn5"].weights_identity
        self.no_reference: dict[str, object] = {}
        self.plugin_info: dict[str, tuple[str, bool, str, str]] = {}
        for name, spec in dict(plugins or {}).items():
            if name in names:
                self._add_plugin(name, spec, storage_options)

    def _add_plugin(self, name: str, spec: Mapping, storage_options: dict | None) -> None:
        """A plug-in metric: Class(weights, device, **kwargs) with kind "landmarks" (an LMD) or "no_reference"
        (score(images) -> (B,) floats, `higher_better`); MetricUnavailableError from it = unavailable."""
        from tasks.plugins import import_plugin

        cls = import_plugin(str(spec["class"]), f"metrics.plugins.{name}.class", "a plug-in metric class")
        kind = getattr(cls, "kind", None)
        if kind not in PLUGIN_KINDS:
            raise ValueError(f"metrics.plugins.{name}: {spec['class']} has kind {kind!r}; expected one of "
                             f"{list(PLUGIN_KINDS)}")
        try:
            plugin = cls(spec.get("weights"), str(self.device), **dict(spec.get("kwargs") or {}))
        except MetricUnavailableError as e:
            self.unavailable[name] = str(e)
            return
        ident = str(getattr(plugin, "weights_identity", "") or spec.get("weights") or spec["class"])
        self.weights_identity[name] = ident
        protocol = str(getattr(plugin, "protocol", "") or f"plug-in {spec['class']}")
        if kind == "landmarks":
            self.lmd[name] = LandmarkDistance(name, plugin, ident)
            self.plugin_info[name] = (name, False, "{:.3f}", f"landmark distance (px), {protocol}")
        else:
            self.no_reference[name] = plugin
            self.plugin_info[name] = (name, bool(getattr(plugin, "higher_better", True)), "{:.4f}", protocol)

    @property
    def full_reference(self) -> set[str]:
        """Metrics that need the ground truth: the built-in ones and plug-in landmark distances."""
        return set(FULL_REFERENCE) | set(self.lmd)

    @property
    def available(self) -> list[str]:
        return [n for n in self.names if n not in self.unavailable]

    def __call__(self, restored, gt=None, *, input=None) -> MetricBatch:
        """restored, gt: uint8 RGB (B, H, W, 3) numpy arrays or tensors, or sequences of (H, W, 3) uint8 arrays
        (sizes may differ between pairs: pairs of equal size are batched together). Values come back in input
        order; FID metrics have no per-image value: their features are in `fid_features`.

        gt=None (real-world input): the full-reference metrics are not applicable (NaN, reason in
        `not_applicable`); identity (ids/deg) then compares the output with `input` (the face given to the
        method, same size) when it is passed.
        """
        target = gt if gt is not None else input
        groups, n = _group_pairs(restored, target if target is not None else restored)
        out = MetricBatch(unavailable=dict(self.unavailable))
        per_image = [m for m in self.available if m not in FID_NETWORKS]
        if gt is None:
            full = self.full_reference
            skip = [m for m in per_image if m in full or (target is None and m in ("ids", "deg"))]
            out.not_applicable = {m: NO_GT if m in full else "not applicable: no ground truth or input"
                                  for m in skip}
        vals = {m: np.full(n, np.nan, dtype=np.float64) for m in per_image}
        sources = [s for s in self.fid_sources if s == "restored" or gt is not None]
        feats = {name: {s: np.empty((n, FID_DIM)) for s in sources} for name in self.fid}
        groups = [grp for grp in groups if len(grp[0])]  # an empty batch yields empty arrays
        todo = [m for m in per_image if m not in out.not_applicable]
        for idx, r8, g8 in groups:
            r8, g8 = r8.to(self.device), g8.to(self.device)
            for m, v in self._compute(r8, g8, todo).items():
                vals[m][idx] = v
            for name, net in self.fid.items():
                for s, t in zip(_SOURCES, (r8, g8)):
                    if s in feats[name]:
                        feats[name][s][idx] = net(_unit(t, torch.float32)).cpu().numpy()
        out.values = vals
        out.fid_features = feats
        return out

    def _compute(self, r8: torch.Tensor, g8: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
        res: dict[str, torch.Tensor] = {}
        for m in names:  # uint8 in: converted chunk by chunk in float64
            if m in ("psnr_rgb", "psnr_y"):
                res[m] = psnr(r8, g8, y_channel=m.endswith("_y"))
            elif m in ("ssim_rgb", "ssim_y"):
                res[m] = ssim(r8, g8, y_channel=m.endswith("_y"))
        r32, g32 = _unit(r8, torch.float32), _unit(g8, torch.float32)
        for m in names:
            if m in self.lpips:
                res[m] = self.lpips[m](r32, g32)
        if self.identity is not None and ("ids" in names or "deg" in names):
            cos, deg = self.identity.compare(r32, g32)
            res.update({k: v for k, v in (("ids", cos), ("deg", deg)) if k in names})
        out = {k: v.detach().double().cpu().numpy() for k, v in res.items()}
        host = [m for m in names if m in self.lmd or m in self.no_reference or m == "niqe"]
        if host:  # landmark detectors and NR metrics take RGB uint8 (H, W, 3) arrays
            r_np = list(r8.permute(0, 2, 3, 1).cpu().numpy())
            g_np = list(g8.permute(0, 2, 3, 1).cpu().numpy())
            for m in host:
                if m in self.lmd:
                    out[m] = self.lmd[m].compare(r_np, g_np)
                elif m == "niqe":
                    out[m] = self.niqe(r_np)
                else:
                    out[m] = _plugin_scores(m, self.no_reference[m], r_np)
        return out


def _plugin_scores(name: str, plugin, images: list[np.ndarray]) -> np.ndarray:
    v = np.asarray(plugin.score(images), dtype=np.float64).reshape(-1)
    if v.shape != (len(images),):
        raise ValueError(f"metric plug-in {name} returned {v.shape[0]} scores for {len(images)} images")
    return v


class NIQEMetric:
    """NIQE (tasks.niqe) with pristine parameters from a path / URI (BasicSR niqe_pris_params.npz layout)."""

    name = "niqe"

    def __init__(self, weights: str | None, *, device=None, sha256: str | None = None,
                 storage_options: dict | None = None):
        from tasks.niqe import load_niqe_params

        if not weights or weights == RANDOM_INIT:
            raise MetricUnavailableError(
                "no NIQE pristine parameters configured (metrics.weights.niqe: BasicSR's niqe_pris_params.npz holds "
                "the published ones, or fit some with workflows/niqe_params.py)")
        try:
            self.params = load_niqe_params(weights, storage_options)
        except FileNotFoundError as e:
            raise MetricUnavailableError(str(e)) from None
        self.weights_identity = f"niqe-params:{os.path.basename(weights.rstrip('/'))}"

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from tasks.niqe import niqe_batch

        return niqe_batch(images, self.params)


def _unit(x8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> dtype in [0, 1] (x / 255, exact in float64)."""
    return x8.to(dtype) / 255.0


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _to_u8_nchw(a, what: str) -> torch.Tensor:
    t = _as_tensor(a)
    if t.dtype != torch.uint8:
        raise TypeError(f"{what}: expected uint8 images, got {t.dtype}")
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"{what}: expected RGB images of shape (B, H, W, 3), got {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).contiguous()


def _group_pairs(restored, gt) -> tuple[list[tuple[np.ndarray, torch.Tensor, torch.Tensor]], int]:
    """[(indices, restored u8 (b,3,H,W), gt u8 (b,3,H,W))] with one group per image size, and the count."""
    def batched(a) -> bool:
        return (isinstance(a, torch.Tensor) or (isinstance(a, np.ndarray) and a.dtype != object)) and a.ndim == 4

    if batched(restored) and batched(gt):
        r, g = _to_u8_nchw(restored, "restored"), _to_u8_nchw(gt, "gt")
        if r.shape != g.shape:
            raise ValueError(f"restored and gt batches differ in shape: {tuple(r.shape)} vs {tuple(g.shape)}")
        return [(np.arange(r.shape[0]), r, g)], r.shape[0]
    rs, gs = list(restored), list(gt)
    if len(rs) != len(gs):
        raise ValueError(f"{len(rs)} restored images but {len(gs)} gt images")
    by_shape: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(zip(rs, gs)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"pair {i}: restored {tuple(a.shape)} and gt {tuple(b.shape)} differ in size")
        by_shape.setdefault(tuple(a.shape), []).append(i)
    groups = []
    for idx in by_shape.values():
        r = _to_u8_nchw(torch.stack([_as_tensor(rs[i]) for i in idx]), "restored")
        g = _to_u8_nchw(torch.stack([_as_tensor(gs[i]) for i in idx]), "gt")
        groups.append((np.asarray(idx), r, g))
    return groups, len(rs)

"""The dynamic restoration stage (DynFaceRestore-style): blur estimator -> DSST start -> dynamic DDIM with
closed-form Gaussian guidance on a face prior -> optional enhancer. A per-batch callable (a Ray Data actor).

In: batch["image"] uint8 (B, S, S, 3), batch["id"], batch["status"] ("ok" rows are processed). Out:
batch["dr2"] uint8 (the diffusion output at the prior's size, written by --write.dr2), batch["restored"],
and per row "omega" (the respaced start step), DYNAMIC_COLUMNS, "seed", "weights", "enhancer_weights".
Each sample's noise depends only on (job seed, id) (SeededNoise(sample_seed)), so outputs do not depend on
batching, order, worker or retries (bit-identical on CPU).

Also the benchmark's dynamic methods: `parse_methods_with_dynamic` and `DynamicBenchmarkStage` (method
spec {name, dynamic: true, enhancer}).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from models.diffusion import dr2_schedule, respaced_linear_schedule
from models.dr2 import DR2Params, dr2_sample
from models.dynamic import REF_SIZE, DSSTTable, DynParams, SpectralBlurEstimator, dynamic_sample
from models.enhancers import enhance
from models.guidance import guidance_scale_map
from models.noise import SeededNoise, derive_seed, sample_seed
from models.unet import UNetModel, difface_unet_config, dr2_unet_config
from tasks.benchmark_stage import BenchmarkStage, MetricsConfig, parse_methods
from tasks.config import opt
from tasks.dr2_stage import TINY_UNET, NetworkHost, RuntimeConfig, autocast_on, to_model_range, to_uint8
from tasks.images import resize_to
from tasks.plugins import build_network, import_plugin
from tasks.restore_stage import EnhancerConfig, build_enhancer
from tasks.weights import RANDOM_INIT, fill_zero_init, load_weights

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]

# DifFace's improved-diffusion UNet at test size (the layout of /work/shared/test-vectors/tiny_difface_unet_*).
# DifFace lists attention at feature-map size 2 of a 32 image: downsample factor 16, which 2 levels never reach.
TINY_DIFFACE_UNET = dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=(1, 2),
                         attention_resolutions=[16], dropout=0.0, channel_mult=(1, 2), conv_resample=True,
                         num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False,
                         use_new_attention_order=False)
PRIORS = {  # name -> (UNet config, native size or None = the input's size)
    "dr2-256": (dr2_unet_config, 256),
    "difface-512": (difface_unet_config, 512),
    "tiny": (lambda: dict(TINY_UNET), None),
    "tiny-difface": (lambda: dict(TINY_DIFFACE_UNET), None),
}
DR2_PRIORS = ("dr2-256", "tiny")  # the DR2 network layout (can also produce the DR2 estimate)

DYNAMIC_COLUMNS = [("restore_method", pa.string()), ("sigma_est", pa.float64()), ("guide_sigmas", pa.string()),
                   ("start_t", pa.int64()), ("eta", pa.float64())]


@dataclass(frozen=True)
class DynamicConfig:
    prior: str = opt("dr2-256", "diffusion prior: dr2-256 (DR2_FFHQ.pkl / ffhq_p2.pt / ffhq_10m.pt layout) | "
                                "difface-512 (iddpm_ffhq512_ema500000.pth) | tiny | tiny-difface (test sizes)")
    weights: str | None = opt(None, "prior weights: a local path or fsspec URI")
    sha256: str | None = opt(None, "expected sha256 of the prior weights")
    weights_key: str | None = opt(None, "select a nested state_dict in the checkpoint (e.g. 'state_dict')")
    allow_random_weights: bool = opt(False, "run a random-init prior (demo/tests only; NOT restorations)")
    size: int = opt(0, "sampling size; 0 = the prior's native size (256 / 512; tiny priors: the input size)")
    respacing: str = opt("ddim250", "DDIM grid over T = 1000 (DifFace: ddim250, t = 4k)")
    dsst: str = opt("configs/dsst.yaml", "DSST table (workflows/build_dsst.py); relative paths from the repo root")
    max_start: int = opt(-1, "cap on the respaced start step (cost control); -1 = none")
    estimator: str = opt("spectral", "blur-level estimator: spectral (training-free) or a learned DBLM class "
                                     "'package.module:Class' called on (B,3,S,S) in [-1,1] -> (guides (B,G,3,S,S), "
                                     "sigmas (B,G) px, decreasing)")
    estimator_weights: str | None = opt(None, "learned DBLM weights (path or URI)")
    estimator_sha256: str | None = opt(None, "expected sha256 of the DBLM weights")
    estimator_kwargs: dict = opt({}, "constructor arguments of the learned DBLM class")
    guide_blur: list[float] = opt([2.0, 1.0, 0.0], "spectral estimator: extra blur per guide (px at 512), "
                                                  "strictly decreasing; G = its length; sigma_g = hypot(sigma, d_g)")
    sharp_sigma: float = opt(1.6, "spectral estimator: total blur of a sharp face (px at 512), removed in quadrature")
    guide_source: str = opt("input", "what is diffused and re-blurred into guides: input | dr2 (DR2's x0-hat, "
                                     "run with the same network: needs a dr2-256/tiny prior)")
    dr2_N: int = opt(4, "guide_source dr2: DR2's N")
    dr2_tau: int = opt(22, "guide_source dr2: DR2's tau")
    gamma: float = opt(0.5, "guidance strength per active guide (0 = unguided DDIM from the DSST start)")
    eta: float | None = opt(None, "DDIM eta for every sample; unset = per sample eta_scale * sigma_est (px at 512)")
    eta_scale: float = opt(0.1, "the eta rule's factor (DynFaceRestore: eta = std / 10), capped at 1")
    scale_map: bool = opt(True, "DGSA: scale the guidance per pixel (strong on contours, weak in texture)")
    scale_map_sigma: float = opt(1.5, "DGSA structure-tensor smoothing (px)")
    scale_map_floor: float = opt(0.1, "DGSA minimum scale")


def resolve_path(path: str) -> str:
    return path if "://" in path or os.path.isabs(path) else str(ROOT / path)


def build_prior(cfg: DynamicConfig, *, storage_options: dict | None = None) -> tuple[UNetModel, str, int | None]:
    """(network, weights identity, native size); refuses to run without weights unless allowed."""
    if cfg.prior not in PRIORS:
        raise ValueError(f"dynamic.prior must be one of {sorted(PRIORS)}, got {cfg.prior!r}")
    make, native = PRIORS[cfg.prior]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNetModel.from_config(make())
    if cfg.weights:
        identity = load_weights(model, cfg.weights, sha256=cfg.sha256, storage_options=storage_options,
                                key=cfg.weights_key)
        return model, identity, native
    if not cfg.allow_random_weights:
        raise RuntimeError(f"no weights configured for the dynamic prior {cfg.prior!r}: set dynamic.weights "
                           "(DR2_FFHQ.pkl for dr2-256, iddpm_ffhq512_ema500000.pth for difface-512), or "
                           "dynamic.allow_random_weights for a demo whose outputs are NOT restorations")
    fill_zero_init(model)
    return model, f"{RANDOM_INIT}:{cfg.prior}", native


class LearnedDBLM:
    """A learned blur-level mapping network named by 'package.module:Class', weights loaded strictly."""

    def __init__(self, cfg: DynamicConfig, device: torch.device, storage_options: dict | None = None):
        factory = import_plugin(cfg.estimator, "dynamic.estimator", "spectral")
        net, self.identity = build_network(
            factory, dict(cfg.estimator_kwargs), name=cfg.estimator, weights=cfg.estimator_weights,
            sha256=cfg.estimator_sha256, allow_random_weights=cfg.allow_random_weights,
            storage_options=storage_options,
            missing=f"no weights for the DBLM {cfg.estimator!r}: set dynamic.estimator_weights")
        self.net = net.to(device) if isinstance(net, torch.nn.Module) else net

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        guides, sigmas = self.net(images)
        B = images.shape[0]
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(B, -1).cpu()
        if guides.shape[:2] != (B, sigmas.shape[1]) or guides.shape[2:] != images.shape[1:]:
            raise ValueError(f"DBLM returned guides {tuple(guides.shape)} and sigmas {tuple(sigmas.shape)} for "
                             f"images {tuple(images.shape)}")
        return guides.float(), sigmas


def build_estimator(cfg: DynamicConfig, device: torch.device, storage_options: dict | None = None):
    """(estimator, identity): images (B,3,S,S) in [-1,1] -> (guides (B,G,3,S,S), sigmas (B,G) px)."""
    if cfg.estimator == "spectral":
        return SpectralBlurEstimator(cfg.guide_blur, sharp_sigma=cfg.sharp_sigma), "spectral"
    dblm = LearnedDBLM(cfg, device, storage_options)
    return dblm, dblm.identity


class DynamicStage(NetworkHost):
    """Ray Data callable class: prior, DSST table, estimator and (optionally) enhancer built once per actor."""

    def __init__(self, dynamic: DynamicConfig, enhancer: EnhancerConfig | None, runtime: RuntimeConfig, seed: int,
                 storage_options: dict | None = None):
        self.cfg, self.seed = dynamic, int(seed)
        if dynamic.guide_source not in ("input", "dr2"):
            raise ValueError(f"dynamic.guide_source must be input or dr2, got {dynamic.guide_source!r}")
        if dynamic.guide_source == "dr2" and dynamic.prior not in DR2_PRIORS:
            raise ValueError(f"dynamic.guide_source dr2 runs DR2 with the prior network: needs a prior in "
                             f"{DR2_PRIORS}, got {dynamic.prior!r}")
        model, self.weights, self.native_size = build_prior(dynamic, storage_options=storage_options)
        self._place(model, runtime)
        self.schedule = respaced_linear_schedule(1000, dynamic.respacing)
        self.table = DSSTTable.load(resolve_path(dynamic.dsst))
        self.estimator, self.estimator_identity = build_estimator(dynamic, self.device, storage_options)
        self.enhancer = self.size_out = None
        self.enhancer_weights = "none"
        if enhancer is not None:
            self.enhancer, self.size_out, self.enhancer_weights = build_enhancer(enhancer, self.device,
                                                                                 storage_options)
        if self.weights.startswith(RANDOM_INIT):
            log.warning("dynamic stage on %s runs a RANDOM-INIT prior (%s): outputs are not restorations",
                        self.device, self.weights)
        log.info("dynamic stage ready on %s (pid %d, prior %s, weights %s, estimator %s)", self.device,
                 os.getpid(), dynamic.prior, self.weights, self.estimator_identity)

    def model_size(self, input_size: int) -> int:
        return self.cfg.size or self.native_size or input_size

    @torch.inference_mode()
    def restore_float(self, images: np.ndarray, ids: list[str]) -> tuple[torch.Tensor, list[DynParams], list[dict]]:
        """uint8 (B,S,S,3) faces -> (x0 in [-1,1] (B,3,S',S') at the model size, params, per-row info)."""
        size = self.model_size(images.shape[1])
        if images.shape[1] != size:
            images = np.stack([resize_to(im, size) for im in images])  # PIL bicubic, as the load stage
        y = to_model_range(images, self.device)
        seeds = [sample_seed(self.seed, i) for i in ids]
        if self.cfg.guide_source == "dr2":
            p = DR2Params.of(self.cfg.dr2_N, self.cfg.dr2_tau)
            noise = SeededNoise([derive_seed("dr2-estimate", s) for s in seeds])  # draws apart from the chain's
            y = dr2_sample(self._network, dr2_schedule(), y, [p] * len(ids), noise)
        guides, sigmas = self.estimator(y)
        guides = guides.to(self.device)
        params = [DynParams.of(sig.tolist(), self.table, self.schedule, size, gamma=self.cfg.gamma,
                               eta=self.cfg.eta, eta_scale=self.cfg.eta_scale, max_start=self.cfg.max_start)
                  for sig in sigmas]
        scale_map = (functools.partial(guidance_scale_map, sigma=self.cfg.scale_map_sigma,
                                       floor=self.cfg.scale_map_floor) if self.cfg.scale_map
                     else torch.ones((len(ids), 1, size, size), device=self.device))
        x0 = dynamic_sample(self._network, self.schedule, y, guides, params, SeededNoise(seeds), scale_map=scale_map)
        info = [{"sigma_est": float(sig[-1]) * REF_SIZE / size, "start_t": int(self.schedule.timestep_map[p.start]),
                 "guide_sigmas": ",".join(f"{float(s) * REF_SIZE / size:.3f}" for s in sig), "eta": p.eta}
                for sig, p in zip(sigmas, params)]
        return x0, params, info

    def _enhance(self, x0: torch.Tensor) -> torch.Tensor:
        with autocast_on(self.half):
            return enhance(self.enhancer, x0, self.size_out)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["status"] == "ok")
        ids = [str(batch["id"][k]) for k in ok]
        n = len(batch["id"])
        size = self.model_size(batch["image"].shape[1])
        out_size = self.size_out or size
        diffused = np.zeros((n, size, size, 3), np.uint8)
        restored = np.zeros((n, out_size, out_size, 3), np.uint8)
        omega = np.full(n, -1, np.int64)
        cols: dict[str, list] = {"sigma_est": [np.nan] * n, "guide_sigmas": [""] * n, "start_t": [-1] * n,
                                 "eta": [np.nan] * n}
        if len(ok):
            x0, params, info = self.restore_float(batch["image"][ok], ids)
            diffused[ok] = to_uint8(x0)
            restored[ok] = to_uint8(self._enhance(x0)) if self.enhancer is not None else diffused[ok]
            for j, k in enumerate(ok):
                omega[k] = params[j].start
                for c in cols:
                    cols[c][k] = info[j][c]
        batch["dr2"], batch["restored"], batch["omega"] = diffused, restored, omega
        batch["restore_method"] = np.array(["dynamic"] * n, dtype=object)
        batch["sigma_est"] = np.array(cols["sigma_est"], np.float64)
        batch["guide_sigmas"] = np.array(cols["guide_sigmas"], dtype=object)
        batch["start_t"] = np.array(cols["start_t"], np.int64)
        batch["eta"] = np.array(cols["eta"], np.float64)
        batch["seed"] = np.array([sample_seed(self.seed, str(i)) for i in batch["id"]], dtype=np.int64)
        batch["weights"] = np.array([self.weights] * n, dtype=object)
        batch["enhancer_weights"] = np.array([self.enhancer_weights] * n, dtype=object)
        return batch


# ---------------------------------------------------------------------------------------------------------
# Benchmark methods {name, dynamic: true, enhancer}
# ---------------------------------------------------------------------------------------------------------
def is_dynamic(method: dict) -> bool:
    return bool(method.get("dynamic", False))


def parse_methods_with_dynamic(methods: list[dict]) -> list[dict]:
    """parse_methods for the DR2/input methods, plus dynamic methods {name, dynamic: true, enhancer?}; order kept."""
    plain = parse_methods([m for m in methods if not is_dynamic(m)])
    it = iter(plain)
    out, seen = [], {m["name"] for m in plain}
    for m in methods:
        if not is_dynamic(m):
            out.append(next(it))
            continue
        m = dict(m)
        unknown = set(m) - {"name", "dynamic", "enhancer"}
        if unknown or "name" not in m or m["dynamic"] is not True:
            raise ValueError(f"a dynamic method is {{name, dynamic: true, enhancer}}, got {m}")
        if m["name"] in seen:
            raise ValueError(f"duplicate method name {m['name']!r}")
        seen.add(m["name"])
        m.setdefault("enhancer", "none")
        out.append(m)
    return out


def has_dynamic(methods: list[dict]) -> bool:
    return any(is_dynamic(m) for m in methods)


class DynamicBenchmarkStage(BenchmarkStage):
    """BenchmarkStage plus dynamic methods: the dynamic sampler runs once per batch (shared by every dynamic
    method, whatever its enhancer); its rows carry omega = the respaced start and the prior's weights."""

    def __init__(self, methods: list[dict], dynamic: DynamicConfig, dr2, enhancer: EnhancerConfig,
                 metrics: MetricsConfig, runtime: RuntimeConfig, seed: int, model_size: int = 256,
                 storage_options: dict | None = None, real_world: bool = False):
        methods = parse_methods_with_dynamic(methods)
        self.dyn = DynamicStage(dynamic, None, runtime, seed, storage_options)
        super().__init__([m for m in methods if not is_dynamic(m)], dr2, enhancer, metrics, runtime, seed,
                         model_size, storage_options, device=self.dyn.device, real_world=real_world)
        self.methods = methods
        self._add_enhancers({m["enhancer"] for m in methods if is_dynamic(m)}, enhancer, storage_options)
        self._starts: list[int] = []

    def _method_outputs(self, batch, ok) -> dict[str, np.ndarray]:
        outs = super()._method_outputs(batch, ok)  # dynamic methods come back as the LQ (no N): replaced here
        dyn = [m for m in self.methods if is_dynamic(m)]
        if not dyn:
            return outs
        gt_size = batch["image"].shape[1]
        ids = [str(batch["id"][k]) for k in ok]
        x0, params, _ = self.dyn.restore_float(batch["lq_pixels"][ok], ids)
        self._starts = [p.start for p in params]
        for m in dyn:
            outs[m["name"]] = self._finish(x0, m["enhancer"], gt_size)
        return outs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._starts = []
        out = super().__call__(batch)
        n = len(batch["id"])
        ok = np.flatnonzero(batch["status"] == "ok")
        start = np.full(n, -1, np.int64)
        if self._starts:
            start[ok] = self._starts
        for j, m in enumerate(self.methods):
            if is_dynamic(m):
                rows = slice(j * n, (j + 1) * n)
                out["omega"][rows] = start
                out["weights"][rows] = f"{self.dyn.weights}+{self.enhancers[m['enhancer']][2]}"
        return out

"""The dynamic restoration stage (DynFaceRestore-style): blur mapper -> DSST start -> dynamic DDIM with
closed-form Gaussian guidance on a face prior -> optional enhancer. A per-batch callable (a Ray Data actor).

Blur mapper (dynamic.diffuse): the image diffused to the start step and the source of the guides at known
blur levels. dr2 = DR2's x0-hat at the workflow's fixed dr2.N / dr2.tau (the prior network when it has
DR2's layout, else the workflow's DR2 network), re-blurred by the spectral estimator's known extra levels;
dblm = a learned DBLM plug-in's images; input = the raw degraded input, only when asked for. See
models/dynamic.py for which parts are the paper's and which are training-free substitutes.

In: batch["image"] uint8 (B, S, S, 3), batch["id"], batch["status"] ("ok" rows are processed). Out:
batch["dr2"] uint8 (the diffusion output at the prior's size, written by --write.dr2), batch["restored"],
and per row "omega" (the respaced start step), DYNAMIC_COLUMNS (mapper, blur levels, convention, scale
map), "seed", "weights" (the prior's identity, then every other network the chain used), "enhancer_weights".
Each sample's noise depends only on (job seed, id) (SeededNoise(sample_seed)), so outputs do not depend on
batching, order, worker or retries (bit-identical on CPU).

The benchmark's dynamic methods (`DynamicBenchmarkStage`) live in tasks/benchmark_stage.py.
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
import torch.nn.functional as F

from models.diffusion import dr2_schedule, respaced_linear_schedule
from models.dr2 import DR2Params, dr2_sample
from models.dynamic import REF_SIZE, START_CONVENTIONS, DSSTTable, DynParams, SpectralBlurEstimator, dynamic_sample
from models.enhancers import enhance
from models.guidance import guidance_scale_map
from models.noise import SeededNoise, derive_seed, sample_seed
from models.unet import UNetModel, difface_unet_config, dr2_unet_config
from tasks.config import Sampled, opt
from tasks.dr2_stage import TINY_UNET, DR2Config, DR2Stage
from tasks.images import resize_to
from tasks.plugins import build_network, import_plugin
from tasks.restore_stage import EnhancerConfig, build_enhancer
from tasks.runtime import NetworkHost, RuntimeConfig, autocast_on, to_model_range, to_uint8
from tasks.stage import PIXELS, ImageStage, per_row
from tasks.weights import RANDOM_INIT, fill_zero_init, load_weights, random_init_label

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
                   ("start_t", pa.int64()), ("eta", pa.float64()), ("blur_mapper", pa.string()),
                   ("diffused_sigma", pa.float64()), ("start_convention", pa.string()), ("scale_map", pa.string())]
# what is diffused to the start step and made into guides (DynamicConfig.diffuse)
DIFFUSE_MODES = ("auto", "dr2", "dblm", "input")
STRUCTURE_TENSOR = "structure-tensor"  # the training-free DGSA stand-in (models.guidance.guidance_scale_map)


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
    start_convention: str = opt("call-at-start", "how the chain starts at the DSST step s: call-at-start diffuses to "
                                                 "s and calls the network at s first (s + 1 calls; the state's noise "
                                                 "level is the one the network is told) | difface diffuses to s and "
                                                 "calls at s - 1 first (s calls, s >= 1): DifFace's q_sample(y, N) + "
                                                 "ddim_sample_loop(start_timesteps=N), reproduced sample for sample")
    dsst: str = opt("configs/dsst.yaml", "DSST table sigma -> start step (workflows/build_dsst.py); relative paths "
                                         "from the repo root. TRAINING-FREE SUBSTITUTE for DynFaceRestore's table: "
                                         "built from a criterion (the blur residual is hidden by the start's noise) "
                                         "calibrated on ONE assumption (4 px at 512 starts at DifFace's t = 400)")
    max_start: int = opt(-1, "cap on the respaced start step (cost control); -1 = none")
    diffuse: str = opt("auto", "what is diffused to the start step and made into the guides: dr2 = DR2's x0-hat "
                               "at dr2.N / dr2.tau (fixed values; a smooth, degradation-free face: the prior network "
                               "when it is dr2-256/tiny, else the workflow's dr2.* network), re-blurred by "
                               "guide_blur at known levels | dblm = the learned DBLM's (dynamic.estimator) blurred "
                               "images, the sharpest diffused | input = the "
                               "raw degraded input (noise, JPEG and resampling included, which the Gaussian guidance "
                               "model cannot explain) | auto = dblm with a learned estimator, else dr2")
    estimator: str = opt("spectral", "blur-level estimator: spectral (TRAINING-FREE SUBSTITUTE for DynFaceRestore's "
                                     "DBLM: assumes a 1/f^2 face spectrum times a Gaussian plus a white floor) or a "
                                     "learned DBLM class 'package.module:Class' called on (B,3,S,S) in [-1,1] -> "
                                     "(guides (B,G,3,S,S), sigmas (B,G) px, decreasing)")
    estimator_weights: str | None = opt(None, "learned DBLM weights (path or URI)")
    estimator_sha256: str | None = opt(None, "expected sha256 of the DBLM weights")
    estimator_kwargs: dict = opt({}, "constructor arguments of the learned DBLM class")
    guide_blur: list[float] = opt([2.0, 1.0, 0.0], "spectral estimator: extra blur per guide (px at 512), "
                                                  "strictly decreasing; G = its length; sigma_g = hypot(sigma, d_g)")
    sharp_sigma: float = opt(1.6, "spectral estimator: total blur of a sharp face (px at 512), removed in quadrature")
    gamma: float = opt(0.5, "strength of the paper's closed-form Gaussian guidance per active guide (0 = unguided "
                            "DDIM from the DSST start); the padded FFT solve is exact for the circular model only")
    eta: float | None = opt(None, "DDIM eta for every sample; unset = per sample eta_scale * sigma_est (px at 512)")
    eta_scale: float = opt(0.1, "the eta rule's factor (DynFaceRestore: eta = std / 10), capped at 1")
    scale_map: bool = opt(True, "DGSA: scale the guidance per pixel (strong on contours, weak in texture); "
                                "false = plain closed-form guidance")
    scale_map_net: str = opt(STRUCTURE_TENSOR, "DGSA map: structure-tensor (TRAINING-FREE SUBSTITUTE for the "
                                               "paper's learned DGSA, computed once from the diffused image: assumes "
                                               "guidance helps on coherent edges and hurts in texture) or a learned "
                                               "per-step map 'package.module:Class' called at every guided step on "
                                               "(guides (B,G,3,S,S), x0-hat (B,3,S,S), t (B,)) -> (B,1,S,S)")
    scale_map_weights: str | None = opt(None, "learned DGSA weights (path or URI), loaded strictly")
    scale_map_sha256: str | None = opt(None, "expected sha256 of the learned DGSA weights")
    scale_map_kwargs: dict = opt({}, "constructor arguments of the learned DGSA class")
    scale_map_sigma: float = opt(1.5, "structure-tensor DGSA: smoothing (px)")
    scale_map_floor: float = opt(0.1, "structure-tensor DGSA: minimum scale")

    def __post_init__(self):  # checked where the config is built: the driver, before any actor starts
        if self.start_convention not in START_CONVENTIONS:
            raise ValueError(f"dynamic.start_convention must be one of {', '.join(START_CONVENTIONS)}, "
                             f"got {self.start_convention!r}")
        if self.diffuse not in DIFFUSE_MODES:
            raise ValueError(f"dynamic.diffuse must be one of {', '.join(DIFFUSE_MODES)}, got {self.diffuse!r}")


def mapper_dr2_params(dr2: DR2Config | None) -> DR2Params:
    """DR2's (N, tau) for the dr2 blur mapper: the workflow's dr2.N / dr2.tau (DR2Config defaults without a dr2
    section), which must be one fixed value each: the mapper runs one DR2 setting for every sample."""
    dr2 = dr2 or DR2Config()
    N, tau = Sampled.parse(dr2.N), Sampled.parse(dr2.tau)  # a DR2Config built in code may hold plain ints
    for name, spec in (("N", N), ("tau", tau)):
        if len(spec.values) != 1 or not isinstance(spec.values[0], int) or isinstance(spec.values[0], bool):
            raise ValueError(f"--dr2.{name}: dynamic.diffuse dr2 needs one fixed integer value (the blur mapper runs "
                             f"one DR2 setting for every sample), got {spec.describe()!r}")
    try:
        return DR2Params.of(N.values[0], tau.values[0])
    except ValueError as e:
        raise ValueError(f"--dr2.N / --dr2.tau: {e}") from None


def resolve_diffuse(cfg: DynamicConfig, dr2: DR2Config | None, diffuse: str | None = None) -> str:
    """The mapper that `diffuse` (default cfg.diffuse) names, or ValueError saying which option to set.

    dr2 needs a DR2 network: the prior itself when it has DR2's layout, else dr2.* with weights (or
    allow_random_weights for a demo), and one fixed dr2.N / dr2.tau (mapper_dr2_params). A learned estimator
    is a DBLM: it pairs with dblm or input only.
    """
    mode = cfg.diffuse if diffuse is None else diffuse
    if mode not in DIFFUSE_MODES:
        raise ValueError(f"dynamic.diffuse must be one of {', '.join(DIFFUSE_MODES)}, got {mode!r}")
    learned = cfg.estimator != "spectral"
    if mode == "auto":
        mode = "dblm" if learned else "dr2"
    if mode == "dblm" and not learned:
        raise ValueError("dynamic.diffuse dblm needs a learned DBLM: set dynamic.estimator 'pkg.module:Class' "
                         "(or use dynamic.diffuse dr2 | input)")
    if mode == "dr2" and learned:
        raise ValueError("dynamic.diffuse dr2 re-blurs DR2's x0-hat with the spectral estimator; with a learned "
                         "dynamic.estimator use dynamic.diffuse dblm (or input)")
    if mode == "dr2" and cfg.prior not in DR2_PRIORS and not (dr2 and (dr2.weights or dr2.allow_random_weights)):
        raise ValueError(f"dynamic.diffuse dr2 needs a DR2 network and the prior {cfg.prior!r} is not one: set "
                         "--dr2.weights (DR2_FFHQ.pkl), or choose --dynamic.diffuse input to diffuse the raw input")
    if mode == "dr2":
        mapper_dr2_params(dr2)
    return mode


def resolve_path(path: str) -> str:
    return path if "://" in path or os.path.isabs(path) else str(ROOT / path)


def missing_prior_weights(cfg: DynamicConfig) -> str | None:
    """The one-line refusal of a prior without weights when random-init is not allowed (said alike by the
    drivers and the actors), else None."""
    if cfg.weights or cfg.allow_random_weights:
        return None
    return (f"no weights configured for the dynamic prior {cfg.prior!r}: set --dynamic.weights PATH_OR_URI "
            "(DR2_FFHQ.pkl for dr2-256, iddpm_ffhq512_ema500000.pth for difface-512), or "
            "--dynamic.allow-random-weights true for a demo whose outputs are NOT restorations")


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
    missing = missing_prior_weights(cfg)
    if missing:
        raise RuntimeError(missing)
    fill_zero_init(model)
    return model, random_init_label(cfg.prior), native


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


class LearnedScaleMap:
    """A learned per-step DGSA map named by 'package.module:Class', weights loaded strictly:
    (guides (B,G,C,H,W), x0-hat (B,C,H,W), original t (B,)) -> (B,1,H,W)."""

    def __init__(self, cfg: DynamicConfig, device: torch.device, storage_options: dict | None = None):
        factory = import_plugin(cfg.scale_map_net, "dynamic.scale_map_net", STRUCTURE_TENSOR)
        net, self.identity = build_network(
            factory, dict(cfg.scale_map_kwargs), name=cfg.scale_map_net, weights=cfg.scale_map_weights,
            sha256=cfg.scale_map_sha256, allow_random_weights=cfg.allow_random_weights,
            storage_options=storage_options,
            missing=f"no weights for the DGSA map {cfg.scale_map_net!r}: set dynamic.scale_map_weights")
        self.net = net.to(device) if isinstance(net, torch.nn.Module) else net

    @torch.inference_mode()
    def __call__(self, guides: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = self.net(guides, x0, t)
        if scale.shape[0] != x0.shape[0] or scale.shape[-2:] != x0.shape[-2:] or scale.shape[1] not in (1, x0.shape[1]):
            raise ValueError(f"DGSA map returned {tuple(scale.shape)} for x0-hat {tuple(x0.shape)}")
        return scale.float()


class DynamicStage(NetworkHost, ImageStage):
    """Ray Data callable class: prior, DSST table, blur mapper(s), estimator and (optionally) enhancer built
    once per actor.

    dr2: the workflow's DR2 settings, the DR2 mapper's network when the prior is not DR2's layout.
    diffuse_modes: every dynamic.diffuse value this actor will be asked for (the benchmark runs several side
    by side); default: dynamic.diffuse alone.
    """

    READS = ("id", "status", "image")
    ADDS = (("dr2", PIXELS), ("restored", PIXELS), ("omega", pa.int64()), ("seed", pa.int64()),
            ("weights", pa.string()), ("enhancer_weights", pa.string()), *DYNAMIC_COLUMNS)

    def __init__(self, dynamic: DynamicConfig, enhancer: EnhancerConfig | None, runtime: RuntimeConfig, seed: int,
                 storage_options: dict | None = None, dr2: DR2Config | None = None,
                 diffuse_modes: list[str] | None = None):
        self.cfg, self.seed = dynamic, int(seed)
        self.modes = {m: resolve_diffuse(dynamic, dr2, m) for m in (diffuse_modes or [dynamic.diffuse])}
        model, self.prior_weights, self.native_size = build_prior(dynamic, storage_options=storage_options)
        self._place(model, runtime)
        self.schedule = respaced_linear_schedule(1000, dynamic.respacing)
        self.table = DSSTTable.load(resolve_path(dynamic.dsst))
        self.estimator, self.estimator_identity = build_estimator(dynamic, self.device, storage_options)
        # the DR2 mapper: the prior itself when it has DR2's layout, else the workflow's DR2 network (at 256)
        self.dr2_host, self.dr2_size, labels = None, None, [self.prior_weights]
        self.dr2_params = mapper_dr2_params(dr2) if "dr2" in self.modes.values() else None
        if "dr2" in self.modes.values() and dynamic.prior not in DR2_PRIORS:
            self.dr2_host = DR2Stage(dr2, runtime, seed, storage_options)
            self.dr2_size = 256 if dr2.architecture == "ffhq256" else None
            labels.append(f"dr2={self.dr2_host.weights}")
        if any(m == "dblm" or (m == "input" and dynamic.estimator != "spectral") for m in self.modes.values()):
            labels.append(f"dblm={self.estimator_identity}")
        self.step_scale_map, self.scale_map_identity = None, STRUCTURE_TENSOR if dynamic.scale_map else "ones"
        if dynamic.scale_map and dynamic.scale_map_net != STRUCTURE_TENSOR:
            self.step_scale_map = LearnedScaleMap(dynamic, self.device, storage_options)
            self.scale_map_identity = f"{dynamic.scale_map_net}@{self.step_scale_map.identity}"
            labels.append(f"dgsa={self.step_scale_map.identity}")
        # the manifest's weights column: the prior's identity, then every other network the chain used
        self.weights = "+".join(labels)
        self.enhancer = self.size_out = None
        self.enhancer_weights = "none"
        if enhancer is not None:
            self.enhancer, self.size_out, self.enhancer_weights = build_enhancer(enhancer, self.device,
                                                                                 storage_options)
        if RANDOM_INIT in self.weights:
            log.warning("dynamic stage on %s runs RANDOM-INIT networks (%s): outputs are not restorations",
                        self.device, self.weights)
        log.info("dynamic stage ready on %s (pid %d, prior %s, weights %s, estimator %s, diffuse %s, start %s, "
                 "scale map %s)", self.device, os.getpid(), dynamic.prior, self.weights, self.estimator_identity,
                 self.modes, dynamic.start_convention, self.scale_map_identity)

    def model_size(self, input_size: int) -> int:
        return self.cfg.size or self.native_size or input_size

    def _dr2_estimate(self, images: np.ndarray, seeds: list[int], size: int) -> tuple[torch.Tensor, str]:
        """DR2's x0-hat of uint8 faces at the sampling size, and the mapper's label. Its draws are derived
        apart from the chain's, so the chain's init noise is independent of DR2's."""
        p = self.dr2_params
        noise = SeededNoise([derive_seed("dr2-estimate", s) for s in seeds])
        if self.dr2_host is None:
            network, identity, dr2_size = self._network, self.prior_weights, size
        else:
            network, identity = self.dr2_host._network, self.dr2_host.weights
            dr2_size = self.dr2_size or size
        if images.shape[1] != dr2_size:
            images = np.stack([resize_to(im, dr2_size) for im in images])  # the reference's PIL bicubic
        x0 = dr2_sample(network, dr2_schedule(), to_model_range(images, self.device), [p] * len(seeds), noise)
        if dr2_size != size:  # DR2's 256 estimate handed to a 512 prior, as DR2 hands it to its enhancer
            x0 = F.interpolate(x0.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
        return x0.to(self.device), f"dr2(N={p.N},tau={p.tau},weights={identity})"

    @torch.inference_mode()
    def restore_float(self, images: np.ndarray, ids: list[str], diffuse: str | None = None
                      ) -> tuple[torch.Tensor, list[DynParams], list[dict]]:
        """uint8 (B,S,S,3) faces -> (x0 in [-1,1] (B,3,S',S') at the model size, params, per-row info).

        diffuse: one of the actor's diffuse_modes (default dynamic.diffuse).
        """
        mode = self.modes[self.cfg.diffuse if diffuse is None else diffuse]
        size = self.model_size(images.shape[1])
        seeds = [sample_seed(self.seed, i) for i in ids]
        resized = images if images.shape[1] == size else np.stack([resize_to(im, size) for im in images])
        y = to_model_range(resized, self.device)  # the degraded input at the sampling size
        B = len(ids)
        if mode == "dr2":
            x_init, mapper = self._dr2_estimate(images, seeds, size)
            diffused_sigma = self.estimator.estimate(x_init)  # the x0-hat's own blur: the guides add known blur
            guides, sigmas = self.estimator.guides_for(x_init, diffused_sigma)
        elif mode == "dblm":
            guides, sigmas = self.estimator(y)
            x_init, diffused_sigma = guides[:, -1], sigmas[:, -1]  # the sharpest blur-mapped image
            mapper = f"dblm({self.estimator_identity})"
        else:  # the raw input: its blur is not a known level (noise, JPEG, resampling)
            if isinstance(self.estimator, SpectralBlurEstimator):
                diffused_sigma = self.estimator.estimate(y)
                guides, sigmas = self.estimator.guides_for(y, diffused_sigma)
            else:
                guides, sigmas = self.estimator(y)
                diffused_sigma = torch.full((B,), float("nan"), dtype=torch.float64)
            x_init, mapper = y, "input"
        guides = guides.to(self.device)
        difface = self.cfg.start_convention == "difface"
        params = [DynParams.of(sig.tolist(), self.table, self.schedule, size, gamma=self.cfg.gamma,
                               eta=self.cfg.eta, eta_scale=self.cfg.eta_scale, max_start=self.cfg.max_start,
                               min_start=1 if difface else 0)
                  for sig in sigmas]
        scale_map = step_scale_map = None
        if not self.cfg.scale_map:
            scale_map = torch.ones((B, 1, size, size), device=self.device)
        elif self.step_scale_map is not None:
            step_scale_map = self.step_scale_map
        else:
            scale_map = functools.partial(guidance_scale_map, sigma=self.cfg.scale_map_sigma,
                                          floor=self.cfg.scale_map_floor)
        x0 = dynamic_sample(self._network, self.schedule, x_init, guides, params, SeededNoise(seeds),
                            scale_map=scale_map, step_scale_map=step_scale_map,
                            convention=self.cfg.start_convention)
        to_ref = REF_SIZE / size
        info = [{"sigma_est": float(sig[-1]) * to_ref, "start_t": int(self.schedule.timestep_map[p.start]),
                 "guide_sigmas": ",".join(f"{float(s) * to_ref:.3f}" for s in sig), "eta": p.eta,
                 "blur_mapper": mapper, "diffused_sigma": float(d) * to_ref,
                 "start_convention": self.cfg.start_convention, "scale_map": self.scale_map_identity}
                for sig, p, d in zip(sigmas, params, diffused_sigma)]
        return x0, params, info

    def _enhance(self, x0: torch.Tensor) -> torch.Tensor:
        with autocast_on(self.half):
            return enhance(self.enhancer, x0, self.size_out)

    def output_sizes(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        size = self.model_size(batch["image"].shape[1])
        return {"dr2": size, "restored": self.size_out or size}

    def empty_columns(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        return {"omega": np.full(n, -1, np.int64), "restore_method": per_row(batch, "dynamic"),
                **info_arrays(empty_info(n))}

    @torch.inference_mode()
    def run(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
        x0, params, info = self.restore_float(batch["image"][ok], [str(batch["id"][k]) for k in ok])
        diffused = to_uint8(x0)
        restored = to_uint8(self._enhance(x0)) if self.enhancer is not None else diffused
        return {"dr2": diffused, "restored": restored, "omega": [p.start for p in params],
                **{c: [row[c] for row in info] for c in INFO_COLUMNS}}

    def annotate(self, batch: dict[str, np.ndarray]) -> None:
        batch["seed"] = np.array([sample_seed(self.seed, str(i)) for i in batch["id"]], dtype=np.int64)
        batch["weights"] = per_row(batch, self.weights)
        batch["enhancer_weights"] = per_row(batch, self.enhancer_weights)


INFO_COLUMNS = {name: kind for name, kind in DYNAMIC_COLUMNS if name != "restore_method"}


def empty_info(n: int) -> dict[str, list]:
    """Per-row dynamic annotations of rows the sampler did not run (error rows, other methods)."""
    return {c: ([-1] * n if t == pa.int64() else [np.nan] * n if t == pa.float64() else [""] * n)
            for c, t in INFO_COLUMNS.items()}


def info_arrays(cols: dict[str, list]) -> dict[str, np.ndarray]:
    return {c: np.array(v, np.int64 if INFO_COLUMNS[c] == pa.int64() else np.float64
                        if INFO_COLUMNS[c] == pa.float64() else object) for c, v in cols.items()}

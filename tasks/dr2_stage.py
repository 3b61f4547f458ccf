"""The DR2 stage: a per-batch callable (a Ray Data actor) that runs DR2 on uint8 faces.

In: batch["image"] uint8 (B, S, S, 3) at the model size, batch["id"], batch["N"], batch["tau"], and
batch["status"] ("ok" rows are processed; others pass through untouched). Out: batch["dr2"] uint8
(B, S, S, 3), rounded and clipped (never wrapped), plus "omega", "seed", "weights" per row.
The model is built and its weights loaded once, in __init__.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from models.diffusion import dr2_schedule
from models.dr2 import DR2Params, dr2_sample
from models.noise import SeededNoise, sample_seed
from models.unet import UNetModel, dr2_unet_config
from tasks.config import Sampled, opt
from tasks.weights import RANDOM_INIT, fill_zero_init, load_weights

log = logging.getLogger(__name__)

TINY_UNET = dict(image_size=64, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                 attention_resolutions=[4], channel_mult=(1, 2, 2), num_head_channels=32,
                 use_scale_shift_norm=True, resblock_updown=True, dropout=0.0)


@dataclass(frozen=True)
class DR2Config:
    weights: str | None = opt(None, "DR2 diffusion weights (DR2_FFHQ.pkl, ffhq_p2.pt, ffhq_10m.pt or "
                                    ".safetensors): a local path or fsspec URI such as s3://bucket/DR2_FFHQ.pkl")
    sha256: str | None = opt(None, "expected sha256 of the weights file (refuse to run on a mismatch)")
    allow_random_weights: bool = opt(False, "run without weights on a random-init network: outputs are "
                                            "NOT restorations and are labelled random-init (demo/tests only)",
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


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
PRECISIONS = ("bf16", "fp16", "fp32", "bf16-weights", "fp16-weights")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = opt("auto", "where the DR2 actors run: auto (cuda if the actor has a GPU), cuda or cpu")
    precision: str = opt("bf16", "network precision on CUDA: bf16 or fp16 (autocast: fp32 weights, matmuls and "
                                 "convolutions in half), bf16-weights or fp16-weights (weights and activations "
                                 "in half, GroupNorm still fp32), or fp32. CPU always runs fp32")
    channels_last: bool = opt(True, "channels_last memory format on CUDA (faster convolutions)")
    compile: str = opt("off", "torch.compile the network: off, default, reduce-overhead (also CUDA graphs of the "
                              "forward) or max-autotune. Each actor compiles once, on its first batch (minutes for the "
                              "full UNet); every network call is then padded to batch_size rows, so one graph "
                              "serves short last batches and mixed (N, tau) steps alike")
    batch_size: int = opt(16, "images per DR2 batch (per actor call); fill the GPU")
    num_actors: int = opt(0, "DR2 actor pool size; 0 = one per GPU in the cluster (or 1 without GPUs)")
    gpus_per_actor: float = opt(1.0, "GPUs per DR2 actor when the cluster has GPUs (fractions share one)")
    cpus_per_actor: float = opt(1.0, "CPUs per DR2 actor (also its torch threads on CPU)")
    torch_threads: int = opt(0, "torch CPU threads per actor; 0 = cpus_per_actor")

    def __post_init__(self):  # checked where the config is built: the driver, before any actor starts
        if self.precision not in PRECISIONS:
            raise ValueError(f"runtime.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"runtime.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but no CUDA device is visible to this actor")
    return torch.device(requested)


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
    if not cfg.allow_random_weights:
        raise RuntimeError(
            "no DR2 weights configured: set dr2.weights (e.g. --dr2.weights /models/DR2_FFHQ.pkl or "
            "s3://bucket/DR2_FFHQ.pkl). For a demo of the pipeline only, pass --allow-random-weights: "
            "its outputs are random-init network outputs, NOT restorations.")
    fill_zero_init(model)
    return model, RANDOM_INIT if cfg.architecture == "ffhq256" else f"{RANDOM_INIT}:tiny"


def to_model_range(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float32 (B,3,H,W) in [-1, 1], as the reference's (x/255 - 0.5)/0.5."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (B,3,H,W) -> uint8 (B,H,W,3): rounded and clipped, never wrapped."""
    return ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def half_dtype(runtime: RuntimeConfig, device: torch.device) -> torch.dtype | None:
    """The actor's half dtype (None: fp32, and always on CPU). Enhancers run under autocast to it in
    either precision mode (autocast or half weights)."""
    return HALF.get(runtime.precision.removesuffix("-weights")) if device.type == "cuda" else None


def autocast_on(dtype: torch.dtype | None):
    """CUDA autocast to dtype, or nothing (fp32, CPU)."""
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


class NetworkClock:
    """Seconds this process spent in diffusion-network forwards, taken per stage call (pipeline.timed).

    CUDA: pairs of timing events around each forward, read after the batch (its outputs are on the host
    by then, so no extra synchronisation); CPU: wall time. Next to the stage's wall time this says how much
    of an actor's time is the network and how much the sampler around it (noise, low-pass, transfers).
    """

    def __init__(self):
        self.seconds, self.events = 0.0, []

    @contextlib.contextmanager
    def forward(self, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
            if len(self.events) > 64:  # nobody taking (a bench loop): fold the finished ones, never wait
                self._fold(wait=False)
        else:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0

    def _fold(self, wait: bool) -> None:
        if wait and self.events:
            self.events[-1][1].synchronize()
        done = 0
        for start, end in self.events:
            if not end.query():
                break
            self.seconds += start.elapsed_time(end) / 1e3
            done += 1
        del self.events[:done]

    def take(self) -> float:
        """Seconds since the last take, and reset."""
        self._fold(wait=True)
        seconds, self.seconds = self.seconds, 0.0
        return seconds


NETWORK_CLOCK = NetworkClock()  # one per process: a Ray actor is a process


class NetworkHost:
    """What every stage running a diffusion network shares: the actor's device and threads, the network
    placed for inference (eval, no grad; on CUDA channels_last and bf16/fp16 autocast per runtime; compiled
    per runtime.compile), and `_network(x, t)`, the call the samplers make.
    """

    compile_backend = "inductor"  # torch.compile's backend; tests swap in a counting one

    def _place(self, model: torch.nn.Module, runtime: RuntimeConfig) -> None:
        self.runtime, self.device = runtime, resolve_device(runtime.device)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, runtime.torch_threads or int(runtime.cpus_per_actor)))
        model = model.eval().requires_grad_(False).to(self.device)
        self.autocast = self.weight_dtype = None
        self.channels_last = self.device.type == "cuda" and runtime.channels_last
        self.half = half_dtype(runtime, self.device)
        if self.device.type == "cuda":
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
            half = self.half
            if runtime.precision.endswith("-weights"):
                model, self.weight_dtype = model.to(half), half
            else:
                self.autocast = half
        # A compiled graph is specialised to its batch size (dynamic=False: static shapes are what CUDA
        # graphs and the fastest kernels need), so calls are padded to one fixed size instead.
        self.fixed_batch = 0
        if runtime.compile != "off":
            self.fixed_batch = max(1, int(runtime.batch_size))
            mode = None if runtime.compile == "default" else runtime.compile
            model = torch.compile(model, dynamic=False, mode=mode, backend=self.compile_backend)
        self.model = model

    def _network(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with NETWORK_CLOCK.forward(self.device):
            if not self.fixed_batch:
                return self._call(x, t)
            return torch.cat([self._fixed_forward(x[s:s + self.fixed_batch], t[s:s + self.fixed_batch])
                              for s in range(0, x.shape[0], self.fixed_batch)])

    def _call(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model on x in the runtime's layout, dtype and autocast (the output may be half: callers
        take .float())."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.weight_dtype is not None:
            x = x.to(self.weight_dtype)
        with autocast_on(self.autocast):
            return self.model(x, t)

    def _fixed_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One compiled call on exactly fixed_batch rows in one memory layout: short inputs are padded with
        copies of their last row (a valid input; rows never mix in the network), cut off the output."""
        n, pad = x.shape[0], self.fixed_batch - x.shape[0]
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            t = torch.cat([t, t[-1:].expand(pad)])
        if not self.channels_last:
            x = x.contiguous()  # strides are part of the graph's guards, and inputs arrive in either layout
        out = self._call(x, t)
        # CUDA graphs reuse their output buffer at the next replay: the caller gets its own copy
        return out[:n].clone() if self.runtime.compile == "reduce-overhead" else out[:n]


class DR2Stage(NetworkHost):
    """Ray Data callable class: the network is built once per actor."""

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
    def restore_float(self, images: np.ndarray, ids: list[str], params: list[DR2Params]) -> torch.Tensor:
        """DR2's x0-hat in [-1, 1] (B,3,S,S) on the actor's device; seeds come from (job seed, id)."""
        y = to_model_range(images, self.device)
        seeds = [sample_seed(self.seed, i) for i in ids]
        return dr2_sample(self._network, self.schedule, y, params, SeededNoise(seeds))

    def restore(self, images: np.ndarray, ids: list[str], params: list[DR2Params]) -> np.ndarray:
        """DR2 on uint8 (B,S,S,3) faces with per-sample params -> uint8 (B,S,S,3)."""
        return to_uint8(self.restore_float(images, ids, params))

    @staticmethod
    def ok_rows(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str], list[DR2Params]]:
        ok = np.flatnonzero(batch["status"] == "ok")
        return (ok, [str(batch["id"][k]) for k in ok],
                [DR2Params.of(int(batch["N"][k]), int(batch["tau"][k])) for k in ok])

    def annotate(self, batch: dict[str, np.ndarray]) -> None:
        """Per-row omega (-1 for error rows), seed and weights identity for the manifest."""
        n = len(batch["id"])
        batch["omega"] = np.array([DR2Params.of(int(batch["N"][k]), int(batch["tau"][k])).omega
                                   if batch["status"][k] == "ok" else -1 for k in range(n)], dtype=np.int64)
        batch["seed"] = np.array([sample_seed(self.seed, str(i)) for i in batch["id"]], dtype=np.int64)
        batch["weights"] = np.array([self.weights] * n, dtype=object)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok, ids, params = self.ok_rows(batch)
        size = batch["image"].shape[1]
        out = np.zeros((len(batch["id"]), size, size, 3), dtype=np.uint8)
        if len(ok):
            out[ok] = self.restore(batch["image"][ok], ids, params)
        batch["dr2"] = out
        self.annotate(batch)
        return batch

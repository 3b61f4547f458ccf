"""The GPU runtime every model stage shares: where an actor runs and in which precision (RuntimeConfig,
resolve_device, half_dtype, autocast_on), the uint8 <-> [-1, 1] conversions at a stage's edges, the
per-process network clock (pipeline.timed reads it) and NetworkHost, the network placed for inference.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from tasks.config import opt

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

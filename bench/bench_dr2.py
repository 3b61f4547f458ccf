#!/usr/bin/env python
"""Throughput of the DR2 sampler (images/s) by batch size, on the current device.

Each timed call is one whole `dr2_sample` run over a batch at (N, tau) (default (4, 22): 21 UNet forwards
per image), with the network wrapped exactly as production wraps it (`tasks.dr2_stage.DR2Stage`: autocast
and channels_last on CUDA, fp32 on CPU, seeded random weights). Options that production does not use on
CPU (bf16/fp16 autocast, channels_last) are added by a thin wrapper around the stage's own network call.

    scripts/env.sh python bench/bench_dr2.py --arch tiny --batch-sizes 1,2,4,8        # quick CPU run
    scripts/env.sh python bench/bench_dr2.py --precision bf16 --channels-last --with-reference-baseline

Weights are random (seeded): speed does not depend on the values, and a fresh guided-diffusion UNet
(zero output convs) would not exercise every layer the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

if __package__ in (None, ""):  # `python bench/bench_dr2.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_size, cpu_name, fmt, kept_state, load_average, text_table  # noqa: E402
from models.diffusion import dr2_schedule  # noqa: E402
from models.dr2 import DR2Params, dr2_model_calls, dr2_sample  # noqa: E402
from models.noise import SeededNoise, sample_seed  # noqa: E402
from tasks.dr2_stage import DR2Config, DR2Stage  # noqa: E402
from tasks.runtime import HALF, PRECISIONS, RuntimeConfig  # noqa: E402

FFHQ256_GFLOP = 387.9  # per forward at 1x3x256x256 (/work/shared/REFERENCE.md)
H100_BF16_DENSE_TFLOPS = 989.0


@dataclass(frozen=True)
class Variant:
    """One configuration: a table block of rows, one per batch size."""

    label: str
    precision: str
    channels_last: bool
    compile: bool
    batch_invariant_cpu: bool
    batch_sizes: tuple[int, ...]
    reference: bool = False
    compile_mode: str = "default"


@dataclass
class Row:
    configuration: str
    batch: int
    images_per_s: float | None = None
    ms_per_image: float | None = None
    forwards_per_s: float | None = None
    tflops: float | None = None
    pct_peak: float | None = None
    ratio_vs_b1: float | None = None
    ratio_vs_ref: float | None = None
    precision: str = ""
    channels_last: bool = False
    compile: bool = False
    batch_invariant_cpu: bool = True
    times_s: list[float] = field(default_factory=list)
    finite: bool | None = None
    error: str | None = None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags and options whose default is 'none' (explained in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


COLUMNS = """columns: configuration; batch; images/s (batch / median seconds of a whole dr2_sample call); ms/image;
fwd/s (per-image UNet forwards per second = images/s x forwards/image); TFLOP/s achieved (FLOP per forward x fwd/s:
387.9 GFLOP at 256x256 for ffhq256, scaled by (size/256)^2; FlopCounterMode for tiny); % peak (with a peak);
x b1 (images/s over the same configuration's batch-1 row); x ref (over the reference row, with
--with-reference-baseline)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Images/s of the DR2 sampler (whole dr2_sample calls) for several batch sizes, with the "
                    "production network wrapper (tasks.dr2_stage.DR2Stage). Weights are random and seeded: "
                    "speed does not depend on their values.",
        epilog=COLUMNS, formatter_class=_HelpFormatter)
    p.add_argument("--N", type=int, default=4, help="DR2 low-pass factor N (the image size must be divisible by it)")
    p.add_argument("--tau", type=int, default=22,
                   help="DR2 last step tau; omega follows from (N, tau), forwards/image = omega - tau + 1")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated batch sizes; batch 1 is always added (the ratio column's reference). "
                        "Default: 1,2,4,8,16,32,64 on CUDA, 1,2,4,8 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda if available, else cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="UNet precision (runtime.precision): bf16/fp16 run under torch.autocast, *-weights cast "
                        "the network to half (CUDA as in production; on CPU a "
                        "benchmark-only extra); the sampler arithmetic stays fp32")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last weights and UNet inputs (production default on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (one specialised graph per batch size, compiled during "
                        "warm-up); falls back to eager with a note if compilation fails")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"), default="default",
                   help="torch.compile mode: reduce-overhead captures CUDA graphs of the fixed-shape forward (the "
                        "step loop's launch overhead), max-autotune also searches kernels (slow to compile)")
    p.add_argument("--arch", choices=("ffhq256", "tiny"), default="ffhq256",
                   help="ffhq256 = the real DR2 UNet (93.6 M parameters, ~4 s per forward on 2 CPU cores); "
                        "tiny = tasks.dr2_stage.TINY_UNET for quick CPU runs")
    p.add_argument("--size", type=int, default=None,
                   help="image size in pixels (default 256 for ffhq256, 64 for tiny); must be divisible by N "
                        "and by the UNet's downsampling (32 for ffhq256, 4 for tiny)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed dr2_sample calls per batch size before timing (at least 1 with --compile)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed dr2_sample calls per batch size; images/s uses the median time")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = torch's default (the number of cores)")
    p.add_argument("--with-reference-baseline", action="store_true",
                   help="first row: a reference-style run (batch 1, fp32, eager, no channels_last, no "
                        "autocast), the baseline the other rows are compared against in the 'x ref' column")
    p.add_argument("--also-cpu-batched", action="store_true",
                   help="on CPU, also run every batch size with UNetModel.batch_invariant_cpu=False (one "
                        "batched forward; production runs samples one at a time for bit-identical results)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="set torch.backends.cudnn.benchmark=True (production leaves it off)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for the '%% peak' column; default 989 (H100/H200 bf16 dense) when the "
                        "CUDA device name contains H100 or H200, else no column")
    p.add_argument("--json", metavar="PATH", help="also write the header facts and all rows as JSON")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    return p.parse_args(argv)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Network:
    """A DR2Stage (production wrapper, random seeded weights; compiled by its own runtime.compile, padded to
    `batch` rows) plus the benchmark-only CPU extras."""

    def __init__(self, arch: str, device: torch.device, v: Variant, threads: int, batch: int):
        runtime = RuntimeConfig(device=device.type, precision=v.precision if device.type == "cuda" else "fp32",
                                channels_last=v.channels_last, torch_threads=threads, batch_size=batch,
                                compile=v.compile_mode if v.compile else "off")
        self.stage = DR2Stage(DR2Config(architecture=arch, allow_random_weights=True), runtime, seed=0)
        self.device = device
        self.eager = getattr(self.stage.model, "_orig_mod", self.stage.model)
        self.eager.batch_invariant_cpu = v.batch_invariant_cpu
        self.compiled = v.compile
        self.fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.stage._network
        if device.type == "cpu" and (v.channels_last or v.precision != "fp32"):
            # Production runs CPU in fp32 with contiguous tensors: apply the same wrapping here.
            if v.channels_last:
                self.eager.to(memory_format=torch.channels_last)
            half, inner = HALF.get(v.precision.removesuffix("-weights")), self.stage._network
            weights = v.precision.endswith("-weights")
            if weights:
                self.eager.to(half)

            def cpu_network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                if v.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if half is None:
                    return inner(x, t)
                if weights:
                    return inner(x.to(half), t)
                with torch.autocast("cpu", dtype=half):
                    return inner(x, t)

            self.fn = cpu_network

    def uncompile(self) -> None:
        self.stage.model, self.stage.fixed_batch, self.compiled = self.eager, 0, False


def count_flops(arch: str, size: int, device: torch.device, model: torch.nn.Module) -> float:
    """FLOPs of one batch-1 UNet forward: the reference count for ffhq256, FlopCounterMode for tiny."""
    if arch == "ffhq256":
        return FFHQ256_GFLOP * 1e9 * (size / 256) ** 2
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        dtype = next(model.parameters()).dtype  # half with *-weights
        model(torch.zeros(1, 3, size, size, device=device, dtype=dtype), torch.tensor([500], device=device))
    return float(counter.get_total_flops())


def time_batch(net: Network, schedule, params: DR2Params, batch: int, size: int, warmup: int,
               repeats: int) -> tuple[list[float], bool]:
    """Seconds per whole dr2_sample call (repeats of them, after warmup calls) and whether outputs are finite."""
    device = net.device
    g = torch.Generator().manual_seed(1234)
    y = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    noise = SeededNoise([sample_seed(0, f"bench-{i}") for i in range(batch)])
    plist = [params] * batch
    times = []
    for k in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        out = dr2_sample(net.fn, schedule, y, plist, noise)
        sync(device)
        dt = time.perf_counter() - t0
        if k >= warmup:
            times.append(dt)
    finite = bool(torch.isfinite(out).all())
    return times, finite


def render_table(rows: list[Row], with_peak: bool, with_ref: bool) -> str:
    head = ["configuration", "batch", "images/s", "ms/image", "fwd/s", "TFLOP/s"]
    head += ["% peak"] if with_peak else []
    head += ["x b1"] + (["x ref"] if with_ref else [])
    body = []
    for r in rows:
        if r.error:
            cells = [r.configuration, str(r.batch), r.error] + [""] * (len(head) - 3)
        else:
            cells = [r.configuration, str(r.batch), fmt(r.images_per_s, ".3f"), fmt(r.ms_per_image, ".1f"),
                     fmt(r.forwards_per_s, ".2f"), fmt(r.tflops, ".3f")]
            cells += [fmt(r.pct_peak, ".1f")] if with_peak else []
            cells += [fmt(r.ratio_vs_b1, ".2f")] + ([fmt(r.ratio_vs_ref, ".2f")] if with_ref else [])
        body.append(cells)
    return text_table(head, body)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table; returns {"meta": ..., "rows": [...]} (as written by --json)."""
    args = parse_args(argv)
    with kept_state("tasks.dr2_stage"):
        logging.getLogger("tasks.dr2_stage").setLevel(logging.ERROR)  # the random-weights warning: the header says so
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if device.type == "cuda" and args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True

    size = args.size or (256 if args.arch == "ffhq256" else 64)
    params = DR2Params.of(args.N, args.tau)
    check_size(size, args.arch, args.N)
    default_bs = "1,2,4,8,16,32,64" if device.type == "cuda" else "1,2,4,8"
    batch_sizes = sorted({1, *(int(b) for b in (args.batch_sizes or default_bs).split(",") if b.strip())})
    if batch_sizes[0] < 1:
        raise SystemExit("batch sizes must be >= 1")
    calls = dr2_model_calls(params.N, params.tau)
    name = device_name(device)
    load = (load_average() or [None])[0]
    peak = args.peak_tflops
    if peak is None and device.type == "cuda" and any(k in name for k in ("H100", "H200")):
        peak = H100_BF16_DENSE_TFLOPS
    warmup = max(args.warmup, 1) if args.compile else max(args.warmup, 0)
    repeats = max(args.repeats, 1)

    tokens = [args.precision] + (["channels_last"] if args.channels_last else []) + (
        [f"compile:{args.compile_mode}" if args.compile_mode != "default" else "compile"] if args.compile
        else ["eager"])
    main_v = Variant(" ".join(tokens), args.precision, args.channels_last, args.compile, True, tuple(batch_sizes),
                     compile_mode=args.compile_mode)
    variants = []
    if args.with_reference_baseline:
        variants.append(Variant("reference (fp32 eager b1)", "fp32", False, False, True, (1,), reference=True))
    variants.append(main_v)
    if args.also_cpu_batched and device.type == "cpu":
        variants.append(replace(main_v, label=main_v.label + " batch_invariant_cpu=False", batch_invariant_cpu=False))

    header = [
        f"DR2 sampler benchmark: N={params.N} tau={params.tau} (omega={params.omega}, {calls} UNet forwards/image), "
        f"arch {args.arch} at {size}x{size}",
        f"torch {torch.__version__} | device {device.type} ({name}) | threads {threads} | precision {args.precision}"
        f" | channels_last {'on' if args.channels_last else 'off'} | compile {'on' if args.compile else 'off'}"
        + (f" | load average {load:.2f} at start" if load is not None and device.type == "cpu" else ""),
        "weights: RANDOM, seeded (speed does not depend on the values) | timing: median of "
        f"{repeats} whole dr2_sample calls after {warmup} warm-up, CUDA synchronised, inference_mode",
    ]
    schedule = dr2_schedule()
    rows: list[Row] = []
    flops = None
    notes = []
    with torch.inference_mode():
        for v in variants:
            b1 = None
            for b in v.batch_sizes:
                net = Network(args.arch, device, v, threads, b)  # per batch: a compiled graph has one batch size
                if flops is None:
                    flops = count_flops(args.arch, size, device, net.eager)
                row = Row(v.label, b, precision=v.precision, channels_last=v.channels_last, compile=v.compile,
                          batch_invariant_cpu=v.batch_invariant_cpu)
                rows.append(row)
                try:
                    row.times_s, row.finite = time_batch(net, schedule, params, b, size, warmup, repeats)
                except torch.cuda.OutOfMemoryError:
                    row.error = "out of memory"
                    del net
                    torch.cuda.empty_cache()
                    break  # larger batches will not fit either
                except Exception as e:  # torch.compile failures surface on the first call: go on eager
                    if not net.compiled:
                        raise
                    notes.append(f"torch.compile failed ({type(e).__name__}: {(str(e) or '?').splitlines()[0][:200]}"
                                 f"); '{v.label}' rows ran eager")
                    net.uncompile()
                    row.times_s, row.finite = time_batch(net, schedule, params, b, size, warmup, repeats)
                ips = b / statistics.median(row.times_s)
                row.images_per_s, row.ms_per_image, row.forwards_per_s = ips, 1e3 / ips, ips * calls
                row.tflops = row.forwards_per_s * flops / 1e12
                row.pct_peak = None if peak is None else 100 * row.tflops / peak
                b1 = b1 or ips
                row.ratio_vs_b1 = ips / b1
                del net
                if v.compile:
                    torch._dynamo.reset()  # drop this batch size's graphs (and their recompile budget)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    ref = next((r.images_per_s for r in rows if r.configuration.startswith("reference")), None)
    for r in rows:
        if ref and r.images_per_s:
            r.ratio_vs_ref = r.images_per_s / ref

    flop_src = "reference count 387.9 GFLOP at 256, scaled (size/256)^2" if args.arch == "ffhq256" else \
        "FlopCounterMode"
    header.append(f"FLOP per forward: {flops / 1e9:.3f} G ({flop_src})"
                  + (f" | % peak of {peak:g} TFLOP/s" + (" (H100/H200 bf16 dense)" if args.peak_tflops is None else "")
                     if peak else ""))
    print("\n".join(header))
    print(render_table(rows, peak is not None, ref is not None))
    print("fwd/s = per-image UNet forwards per second (images/s x forwards/image); x b1 = images/s over the same "
          "configuration's batch-1 row" + ("; x ref = over the reference row" if ref else ""))
    if any(r.finite is False for r in rows):
        print("note: some outputs were not finite (random weights); timings are still valid")
    for n in notes:
        print("note:", n)

    meta = dict(torch=torch.__version__, device=device.type, device_name=name, threads=threads, arch=args.arch,
                size=size, N=params.N, tau=params.tau, omega=params.omega, forwards_per_image=calls,
                flops_per_forward=flops, flop_source=flop_src, precision=args.precision,
                channels_last=args.channels_last, compile=args.compile, warmup=warmup, repeats=repeats,
                peak_tflops=peak, weights="random (seeded)", load_average_at_start=load, notes=notes)
    result = {"meta": meta, "rows": [asdict(r) for r in rows]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            cols = [k for k in asdict(rows[0]) if k != "times_s"] + ["times_s"]
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                d = asdict(r)
                d["times_s"] = " ".join(f"{t:.6f}" for t in r.times_s)
                w.writerow(d)
    return result


if __name__ == "__main__":
    main()

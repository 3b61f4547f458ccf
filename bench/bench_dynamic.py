#!/usr/bin/env python
"""Images/s of the dynamic sampler (models.dynamic.dynamic_sample) against DR2 (models.dr2.dr2_sample) at an
EQUAL number of UNet forwards per image, with the same network and the same batch.

DR2 runs (N, tau) (default (4, 22): omega 42, 21 forwards per image) on its 100-step grid; the dynamic
sampler starts every sample at respaced index forwards - 1 on the ddim250 grid (the same number of forwards),
with G guides (closed-form guidance every step), the DGSA scale map and eta > 0. A third row adds the
training-free blur estimator and guide construction (SpectralBlurEstimator), which the stage runs once per
batch. The ratio column is images/s over DR2's: what the per-step FFT guidance and DDIM bookkeeping cost
relative to DR2's low-pass refinement, with the network held fixed. Two more rows time both samplers around a
network that returns zeros: the samplers' own cost per forward, which the UNet hides at full size.

    scripts/env.sh python bench/bench_dynamic.py --arch tiny --batch-size 4            # quick CPU run
    scripts/env.sh python bench/bench_dynamic.py --arch ffhq256 --batch-size 8 --repeats 3   # GPU

Weights are random (seeded): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # `python bench/bench_dynamic.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.diffusion import dr2_schedule, respaced_linear_schedule  # noqa: E402
from models.dr2 import DR2Params, dr2_model_calls, dr2_sample  # noqa: E402
from models.dynamic import DynParams, SpectralBlurEstimator, dynamic_model_calls, dynamic_sample  # noqa: E402
from models.noise import SeededNoise, sample_seed  # noqa: E402
from tasks.dr2_stage import DR2Config, DR2Stage  # noqa: E402
from tasks.runtime import PRECISIONS, RuntimeConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("tiny", "ffhq256"), default="tiny", help="the DR2 network: tiny or full")
    p.add_argument("--size", type=int, default=None, help="image size (default 64 tiny, 256 ffhq256)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--N", type=int, default=4)
    p.add_argument("--tau", type=int, default=22)
    p.add_argument("--guides", type=int, default=3, help="G guides for the dynamic sampler")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--eta", type=float, default=0.2)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="runtime.precision on CUDA")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: shared cores make 2 threads contend); 0 = torch's default")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row; images/s uses the median")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--no-sampler-only", action="store_true",
                      help="skip the two rows that time the samplers around a zero network (their own overhead)")
    rows.add_argument("--sampler-only", action="store_true",
                      help="only those two rows (the samplers' own cost, quick at any size)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    size = args.size or (64 if args.arch == "tiny" else 256)
    runtime = RuntimeConfig(device=device, precision=args.precision if device == "cuda" else "fp32",
                            channels_last=device == "cuda", torch_threads=args.threads or 0)
    stage = DR2Stage(DR2Config(architecture=args.arch, allow_random_weights=True), runtime, seed=0)
    net = stage._network  # the production wrapper (autocast / channels_last on CUDA)
    dev = stage.device
    B = args.batch_size
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(B, 3, size, size, generator=g) * 2 - 1).to(dev)
    seeds = [sample_seed(0, f"img{b}") for b in range(B)]

    dr2p = [DR2Params.of(args.N, args.tau)] * B
    calls = dr2_model_calls(args.N, args.tau)
    ddim = respaced_linear_schedule(1000, "ddim250")
    est = SpectralBlurEstimator([2.0 * (args.guides - 1 - k) for k in range(args.guides)])
    guides, sigmas = est(y)
    dynp = [DynParams(start=calls - 1, eta=args.eta, sigmas=tuple(sigmas[b].tolist()),
                      starts=tuple(max(0, calls - 1 - 4 * k) for k in range(args.guides)), gamma=args.gamma)
            for b in range(B)]
    assert dynamic_model_calls(dynp) == calls * B

    def run_dr2():
        return dr2_sample(net, dr2_schedule(), y, dr2p, SeededNoise(seeds))

    def run_dyn():
        return dynamic_sample(net, ddim, y, guides, dynp, SeededNoise(seeds))

    def run_dyn_est():
        gd, _ = est(y)
        return dynamic_sample(net, ddim, y, gd, dynp, SeededNoise(seeds))

    def zero_net(x, t):  # the samplers' own cost: a network that costs nothing
        return torch.zeros((x.shape[0], 6) + tuple(x.shape[2:]), device=x.device)

    configs = [] if args.sampler_only else [
        (f"dr2_sample (N={args.N}, tau={args.tau})", run_dr2),
        (f"dynamic_sample (G={args.guides}, DGSA, eta={args.eta})", run_dyn),
        ("dynamic_sample + spectral estimator", run_dyn_est)]
    if not args.no_sampler_only:
        configs += [("sampler only: dr2_sample, zero network",
                     lambda: dr2_sample(zero_net, dr2_schedule(), y, dr2p, SeededNoise(seeds))),
                    ("sampler only: dynamic_sample, zero network",
                     lambda: dynamic_sample(zero_net, ddim, y, guides, dynp, SeededNoise(seeds)))]
    times: list[list[float]] = [[] for _ in configs]
    with torch.inference_mode():
        for _ in range(args.warmup):
            for _, fn in configs:
                fn()
        for _ in range(args.repeats):  # interleaved, so load drift on shared machines hits every row alike
            for k, (_, fn) in enumerate(configs):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    rows = []
    for (label, _), ts in zip(configs, times):
        med = statistics.median(ts)
        rows.append({"configuration": label, "batch": B, "forwards_per_image": calls, "seconds": med,
                     "images_per_s": B / med, "ms_per_forward": 1000 * med / (calls * B), "times_s": ts})
    for r in rows:  # against the DR2 row of the same kind (network or zero network)
        same = "sampler only: dr2_sample" if r["configuration"].startswith("sampler only") else "dr2_sample"
        r["ratio_vs_dr2"] = r["images_per_s"] / next(q for q in rows if q["configuration"].startswith(same))[
            "images_per_s"]
    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {cpu}, {torch.get_num_threads()} threads"
    print(f"# bench_dynamic: arch {args.arch}, {size}x{size}, batch {B}, {calls} forwards/image, {name}, "
          f"median of {args.repeats}")
    print("| configuration | images/s | ms/forward | x dr2 |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['configuration']} | {r['images_per_s']:.3f} | {r['ms_per_forward']:.1f} | "
              f"{r['ratio_vs_dr2']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

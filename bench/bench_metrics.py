#!/usr/bin/env python
"""Metric throughput (image pairs/s): the batched implementation vs a per-image loop in the same run.

For each metric and image size, one timed call computes the metric for a whole batch (B, 3, H, W) at once;
the per-image loop calls the same function B times on (1, 3, H, W) slices. Both results are checked to agree
before anything is timed. For PSNR/SSIM an independent per-image skimage loop is timed too, for scale.
LPIPS runs with a random backbone (weights do not change its speed; no download is needed).

    scripts/env.sh python bench/bench_metrics.py                                  # CPU, 256 and 512, batch 16
    scripts/env.sh python bench/bench_metrics.py --metrics lpips_alex,lpips_vgg --sizes 256 --device cuda

--suite times the whole MetricSuite (what a benchmark actor runs per batch) on real faces (data/samples, tiled
to the batch, with a noisy copy as the "restoration"): the --suite metrics alone, then with --new added (the
paper-comparable ones: NIQE, LMD, TF-Inception FID features), in the same process; it prints both images/s and
their ratio. Networks are random-init (speed does not depend on weights); NIQE's pristine parameters are fitted
on the sample faces first.

    scripts/env.sh python bench/bench_metrics.py --suite psnr_rgb,psnr_y,ssim_rgb,ssim_y,lpips_alex \\
        --new niqe,lmd_mtcnn5,fid_tf_inception --sizes 512 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # `python bench/bench_metrics.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import kept_state, load_average  # noqa: E402
from tasks import metrics as M  # noqa: E402
from tasks.weights import RANDOM_INIT  # noqa: E402

ALL = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips_alex", "lpips_vgg")
DEFAULT = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips_alex")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--metrics", default=",".join(DEFAULT), help=f"comma-separated, among {','.join(ALL)}")
    p.add_argument("--sizes", default="256,512", help="comma-separated square image sizes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: this process's CPU time (robust on a shared machine with --threads 1;"
                        " with more threads it also counts their spin-waits)")
    p.add_argument("--no-skimage", action="store_true", help="skip the skimage per-image reference loop")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--suite", metavar="METRICS", help="time the MetricSuite with these metrics (comma-separated) "
                                                       "instead of single metrics, then with --new added")
    p.add_argument("--new", default="niqe,lmd_mtcnn5,fid_tf_inception",
                   help="metrics added to --suite for the second timing (comma-separated)")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return statistics.median(times)


def make_pairs(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, H, W, 3) ground truth (smooth random fields) and a noisy 'restoration' of it."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (batch, 3, size // 16, size // 16)).astype(np.float32)
    gt = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bicubic")
    gt = gt.clamp(0, 255).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
    restored = np.clip(gt + rng.normal(0, 8, gt.shape), 0, 255).astype(np.uint8)
    return restored, gt


def metric_fn(name: str, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name.startswith(("psnr", "ssim")):
        fn = M.psnr if name.startswith("psnr") else M.ssim
        y = name.endswith("_y")
        return lambda a, b: fn(a, b, y_channel=y)
    return M.LPIPSMetric(name.split("_")[1], RANDOM_INIT, device=device)


def skimage_fn(name: str) -> Callable[[np.ndarray, np.ndarray], float] | None:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    def y(a: np.ndarray) -> np.ndarray:
        return (16.0 + (a / 255.0) @ np.array([65.481, 128.553, 24.966])) / 255.0

    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    return {
        "psnr_rgb": lambda r, g: peak_signal_noise_ratio(g / 255.0, r / 255.0, data_range=1.0),
        "psnr_y": lambda r, g: peak_signal_noise_ratio(y(g), y(r), data_range=1.0),
        "ssim_rgb": lambda r, g: structural_similarity(r / 255.0, g / 255.0, channel_axis=-1, **kw),
        "ssim_y": lambda r, g: structural_similarity(y(r), y(g), **kw),
    }.get(name)


def run_cell(name: str, fn, size: int, args, device: torch.device) -> dict:
    r8, g8 = make_pairs(args.batch, size)
    dtype = torch.float32 if name.startswith("lpips") else M._work_dtype(device)
    x = (torch.from_numpy(r8).permute(0, 3, 1, 2).to(device, dtype) / 255.0).contiguous()
    y = (torch.from_numpy(g8).permute(0, 3, 1, 2).to(device, dtype) / 255.0).contiguous()
    b = x.shape[0]

    def batched():
        return fn(x, y)

    def loop():
        return torch.cat([fn(x[i : i + 1], y[i : i + 1]) for i in range(b)])

    got_b, got_l = batched().double().cpu(), loop().double().cpu()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    if not torch.allclose(got_b, got_l, rtol=tol, atol=tol):
        raise AssertionError(f"{name} @ {size}: batched and per-image results differ: {got_b} vs {got_l}")
    t_b = timed(batched, device, args.warmup, args.repeats, args.clock)
    t_l = timed(loop, device, args.warmup, args.repeats, args.clock)
    row = dict(metric=name, size=size, batch=b, batched_ips=b / t_b, loop_ips=b / t_l, ratio=t_l / t_b,
               skimage_ips=None, mean_value=float(got_b.mean()))
    sk = None if args.no_skimage else skimage_fn(name)
    if sk is not None:
        ref = np.array([sk(r8[i], g8[i]) for i in range(b)])
        if not np.allclose(ref, got_b.numpy(), rtol=0, atol=1e-6):
            raise AssertionError(f"{name} @ {size}: differs from skimage: {ref} vs {got_b.numpy()}")
        t_s = timed(lambda: [sk(r8[i], g8[i]) for i in range(b)], torch.device("cpu"), 0, args.repeats, args.clock)
        row["skimage_ips"] = b / t_s
    return row


def render(rows: list[dict]) -> str:
    head = ["metric", "size", "batch", "batched img/s", "per-image img/s", "batched/loop", "skimage loop img/s"]
    cells = [[r["metric"], str(r["size"]), str(r["batch"]), f"{r['batched_ips']:.1f}", f"{r['loop_ips']:.1f}",
              f"{r['ratio']:.2f}x", "-" if r["skimage_ips"] is None else f"{r['skimage_ips']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(c):
        return "| " + " | ".join(v.rjust(w) if i > 0 else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(c) for c in cells)])


def face_pairs(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noisy copy, face) uint8 (B, H, W, 3): data/samples faces tiled to the batch (smooth fields without them)."""
    from pathlib import Path

    from tasks.images import decode_image, resize_to

    paths = sorted((Path(__file__).resolve().parents[1] / "data" / "samples").glob("*.png"))
    if not paths:
        return make_pairs(batch, size, seed)
    faces = [resize_to(decode_image(p.read_bytes())[0], size) for p in paths]
    gt = np.stack([faces[i % len(faces)] for i in range(batch)])
    rng = np.random.default_rng(seed)
    return np.clip(gt + rng.normal(0, 8, gt.shape), 0, 255).astype(np.uint8), gt


def run_suites(args, device: torch.device) -> list[dict]:
    """images/s of MetricSuite(base) and MetricSuite(base + new) on the same pairs, per size."""
    import tempfile

    from tasks.niqe import fit_pristine, luma

    base = [n for n in args.suite.split(",") if n]
    new = [n for n in args.new.split(",") if n and n not in base]
    rows = []
    pristine = fit_pristine([luma(g) for g in face_pairs(4, 512)[1]])  # the sample faces at 512
    for size in [int(s) for s in args.sizes.split(",") if s]:
        r8, g8 = face_pairs(args.batch, size)
        with tempfile.TemporaryDirectory() as tmp:
            params = Path(tmp) / "niqe.npz"
            params.write_bytes(pristine.to_npz())
            weights = {k: RANDOM_INIT for k in ("lpips_alex", "lpips_vgg", "identity", *M.FID_METRICS)}
            weights["niqe"] = str(params)
            suites = {"base": M.MetricSuite(base, device, weights),
                      "with new": M.MetricSuite(base + new, device, weights)}
            times = {}
            for label, suite in suites.items():
                if suite.unavailable:
                    raise SystemExit(f"unavailable: {suite.unavailable}")
                times[label] = timed(lambda suite=suite, r8=r8, g8=g8: suite(r8, g8), device, args.warmup,
                                     args.repeats, args.clock)
        b = args.batch
        row = dict(size=size, batch=b, base=",".join(base), new=",".join(new), base_ips=b / times["base"],
                   with_new_ips=b / times["with new"], slowdown=times["with new"] / times["base"])
        print(f"#   suite @ {size}: {row['base']}: {row['base_ips']:.2f} img/s; + {row['new']}: "
              f"{row['with_new_ips']:.2f} img/s ({row['slowdown']:.2f}x the time)", flush=True)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.suite:
        device = torch.device(args.device)
        with kept_state():
            if args.threads:
                torch.set_num_threads(args.threads)
            header = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                          clock=args.clock, cores=os.cpu_count(), loadavg_start=load_average())
            print(f"# metric suite throughput: device {device}, {header['threads']} threads, {args.clock} clock, "
                  f"load average at start {header['loadavg_start']}", flush=True)
            rows = run_suites(args, device)
            header["loadavg_end"] = load_average()
            result = dict(header=header, rows=rows)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)
            return result
    names = [n for n in args.metrics.split(",") if n]
    bad = [n for n in names if n not in ALL]
    if bad:
        raise SystemExit(f"unknown metrics {bad}; choose among {ALL}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    device = torch.device(args.device)
    with kept_state():
        if args.threads:
            torch.set_num_threads(args.threads)
        header = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(), clock=args.clock,
                      cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                      loadavg_start=load_average())
        print(f"# metrics throughput: device {device}, torch {header['torch']}, {header['threads']} threads, "
              f"{args.clock} clock, "
              f"{header['cores']} cores, load average at start {header['loadavg_start']}", flush=True)
        rows = []
        with torch.inference_mode():
            for name in names:
                fn = metric_fn(name, device)
                for size in sizes:
                    rows.append(run_cell(name, fn, size, args, device))
                    r = rows[-1]
                    print(f"#   {name} @ {size}: batched {r['batched_ips']:.1f} img/s, per-image {r['loop_ips']:.1f} "
                          f"img/s, ratio {r['ratio']:.2f}x", flush=True)
        header["loadavg_end"] = load_average()
        print(render(rows))
        result = dict(header=header, rows=rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result


if __name__ == "__main__":
    main()

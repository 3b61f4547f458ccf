#!/usr/bin/env python
"""Whole-photo geometry throughput on CPU: face alignment (warp) and paste-back (tasks/align.py).

    scripts/env.sh python bench/bench_align.py                        # 4000x3000 photo, 16 faces, 256 and 512
    scripts/env.sh python bench/bench_align.py --faces 64 --threads 1 --face-sizes 512

1. A synthetic band-limited photo (--width x --height, RGB uint8) and --faces face positions on a jittered grid,
   each with a random rotation (+-30 deg) and a face side in the photo drawn log-uniformly from
   [--min-side, --max-side] px; the landmarks are the FFHQ template mapped there.
2. Per face size, after one untimed pass, each operation runs --repeats times over all faces; the table shows
   the median: ms/face = median seconds / faces, faces/s = faces / median seconds.
     plan:        plan_faces (similarity fit, eye distance, border fraction, cap) for all faces.
     warp:        align_faces, i.e. warp_face per face (bilinear; box-filter supersampling when the face is
                  larger than the crop).
     paste:       paste_back of all restored crops (the aligned crops stand in for them) onto the photo,
                  including its one copy of the photo (--upscale > 1: its resize instead).
     warp+paste:  the two together, what a whole-photo job adds per face besides detection and restoration.
OpenCV's own threading applies (--threads, 0 = OpenCV's default); numpy work is single-threaded.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # `python bench/bench_align.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import cpu_name  # noqa: E402
from tasks.align import AlignConfig, align_faces, paste_back, plan_faces, template  # noqa: E402


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--width", type=int, default=4000, help="photo width, px")
    p.add_argument("--height", type=int, default=3000, help="photo height, px")
    p.add_argument("--faces", type=int, default=16, help="faces per photo (K)")
    p.add_argument("--face-sizes", default="256,512", help="aligned crop sizes to measure, comma-separated")
    p.add_argument("--min-side", type=float, default=100, help="smallest face side in the photo, px")
    p.add_argument("--max-side", type=float, default=700, help="largest face side in the photo, px")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per operation (median reported)")
    p.add_argument("--threads", type=int, default=0, help="cv2.setNumThreads; 0 = OpenCV's default")
    p.add_argument("--upscale", type=int, default=1, help="AlignConfig.upscale for paste-back")
    p.add_argument("--seed", type=int, default=0, help="seed for the photo and the face layout")
    return p.parse_args(argv)


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    small = rng.normal(0, 1, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(128 + img / img.std() * 40, 0, 255).astype(np.uint8)


def face_layout(k: int, width: int, height: int, min_side: float, max_side: float,
                rng: np.random.Generator) -> list[np.ndarray]:
    """K landmark sets (5, 2) on a jittered grid, faces of random rotation and size."""
    cols = math.ceil(math.sqrt(k * width / height))
    rows = math.ceil(k / cols)
    t = template(512)
    out = []
    for i in range(k):
        cx = (i % cols + 0.5 + rng.uniform(-0.2, 0.2)) * width / cols
        cy = (i // cols + 0.5 + rng.uniform(-0.2, 0.2)) * height / rows
        side = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
        a = math.radians(rng.uniform(-30, 30))
        s = side / 512
        R = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        out.append((t - t.mean(0)) @ R.T + (cx, cy))
    return out


def timed(fn, repeats: int) -> float:
    fn()  # untimed: first-touch allocations, OpenCV's lazy initialisation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        cv2.setNumThreads(args.threads)
    rng = np.random.default_rng(args.seed)
    photo = synthetic_photo(args.width, args.height, rng)
    landmarks = face_layout(args.faces, args.width, args.height, args.min_side, args.max_side, rng)
    k = args.faces
    print(f"photo {args.width}x{args.height}, {k} faces, sides {args.min_side:g}-{args.max_side:g} px, "
          f"upscale {args.upscale}, OpenCV {cv2.__version__} threads {cv2.getNumThreads()}, "
          f"{os.cpu_count()} CPUs ({cpu_name()}), median of {args.repeats}")
    rows = []
    for size in [int(s) for s in str(args.face_sizes).split(",")]:
        cfg = AlignConfig(face_size=size, max_faces=0, min_eye_distance=0, upscale=args.upscale)
        plans = plan_faces(landmarks, [1.0] * k, photo.shape, cfg)
        Ms = [p.matrix for p in plans]
        crops = align_faces(photo, plans, cfg)
        ops = {
            "plan": lambda cfg=cfg: plan_faces(landmarks, [1.0] * k, photo.shape, cfg),
            "warp": lambda plans=plans, cfg=cfg: align_faces(photo, plans, cfg),
            "paste": lambda crops=crops, Ms=Ms, cfg=cfg: paste_back(photo, crops, Ms, cfg),
            "warp+paste": lambda plans=plans, Ms=Ms, cfg=cfg: paste_back(photo, align_faces(photo, plans, cfg), Ms,
                                                                        cfg),
        }
        for name, fn in ops.items():
            sec = timed(fn, args.repeats)
            rows.append({"operation": name, "face_size": size, "faces": k, "ms_per_face": 1e3 * sec / k,
                         "faces_per_s": k / sec})
    head = f"{'operation':<12} {'face_size':>9} {'faces':>6} {'ms/face':>9} {'faces/s':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['operation']:<12} {r['face_size']:>9} {r['faces']:>6} {r['ms_per_face']:>9.2f} "
              f"{r['faces_per_s']:>9.1f}")
    return rows


if __name__ == "__main__":
    main()

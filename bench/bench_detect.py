#!/usr/bin/env python
"""Face detectors on whole photos: recall against hand-counted faces, false positives, and speed.

Images: every photo in <shared>/data/faces/whole (found through tests/vectors.py's SHARED, so
DR2PIPE_SHARED points a clone elsewhere at it), skimage.data.astronaut() and matplotlib's sample
grace_hopper.jpg. The expected faces below were counted and their boxes read off each image by eye.
A detection is a hit when its box overlaps a still unmatched expected box with IoU >= --iou (greedy, in
score order); detections that match nothing are false positives. Time: median of --repeats calls of
detect([image]) after one warm-up call, per image, on --device.

    scripts/env.sh python bench/bench_detect.py                        # mtcnn and haar, CPU
    scripts/env.sh python bench/bench_detect.py --repeats 1 --json out/bench_detect.json
    scripts/env.sh python bench/bench_detect.py --threads 1 --shrink 1,2,4 --blur 1   # smaller, softer faces
    scripts/env.sh python bench/bench_detect.py --detectors mtcnn,tests.plugins:CentreFaceDetector
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

if __package__ in (None, ""):  # `python bench/bench_detect.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tasks.detect import DetectorConfig, box_iou, build_detector  # noqa: E402

# Ground truth: clearly visible faces, (x0, y0, x1, y1) in pixels of the full-size image, forehead to chin,
# read off each image by eye (rough, hence the loose IoU threshold).
GROUND_TRUTH: dict[str, list[tuple[int, int, int, int]]] = {
    # one astronaut in a spacesuit, frontal
    "astronaut": [(175, 60, 270, 175)],
    # Grace Hopper in uniform, frontal portrait
    "grace_hopper": [(170, 110, 360, 345)],
    # 1297x1920 scanned print: two girls on a bench, older one standing behind (upper right), younger in front
    "00.jpg": [(770, 395, 925, 570), (490, 795, 655, 960)],
    # 783x1146 faded scanned print: man (left), woman (right), girl in white dress (front); small faces
    "10045.png": [(170, 95, 250, 215), (365, 105, 445, 215), (365, 420, 445, 515)],
    # 700x464 side-by-side collage: the same person as a child (left, tilted, mouth open) and as an adult
    "Blake_Lively.jpg": [(105, 120, 280, 330), (420, 100, 600, 330)],
}


@dataclass
class Result:
    image: str
    size: str
    expected: int | None
    found: dict[str, int] = field(default_factory=dict)       # detections kept (after min_score)
    hits: dict[str, int] = field(default_factory=dict)        # detections matching an expected face
    ms: dict[str, float] = field(default_factory=dict)        # median ms per detect([image])
    scores: dict[str, list[float]] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detectors", default="mtcnn,haar",
                   help="comma-separated detector names as DetectorConfig.name takes them (mtcnn, haar, or a "
                        "plug-in 'pkg.module:Class'); default: %(default)s")
    p.add_argument("--device", default="cpu", help="device for torch detectors: cpu | cuda | auto "
                                                   "(default: %(default)s)")
    p.add_argument("--min-score", type=float, default=None,
                   help="override every detector's min_score (default: each detector's own, mtcnn 0.9, haar 0.5)")
    p.add_argument("--min-face-size", type=int, default=20, help="DetectorConfig.min_face_size (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=1600,
                   help="DetectorConfig.max_side: larger photos are downscaled for detection (default: %(default)s)")
    p.add_argument("--iou", type=float, default=0.3,
                   help="IoU with an expected box for a detection to count as a hit (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per image and detector; the median is "
                                                          "reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op and OpenCV threads (0: leave the libraries' defaults)")
    p.add_argument("--shrink", default="1",
                   help="comma-separated downscale factors: each photo is also run shrunk by each factor (area "
                        "filter; expected boxes scaled), which probes small faces, e.g. 1,2,4 (default: %(default)s)")
    p.add_argument("--blur", type=float, default=0.0,
                   help="Gaussian blur sigma (pixels, after shrinking) to mimic degraded photos; 0 = none")
    p.add_argument("--images", default="",
                   help="comma-separated subset of image names to run (default: all)")
    p.add_argument("--json", metavar="PATH", help="also write the per-image rows and totals as JSON")
    return p.parse_args(argv)


def load_images(only: set[str]) -> list[tuple[str, np.ndarray]]:
    import skimage.data
    from matplotlib import cbook

    from tests.vectors import SHARED

    def read(path) -> np.ndarray:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"cannot read {path}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    images = [("astronaut", skimage.data.astronaut()),
              ("grace_hopper", read(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))]
    whole = SHARED / "data" / "faces" / "whole"
    if whole.is_dir():
        images += [(p.name, read(p)) for p in sorted(whole.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg",
                                                                                                ".png")]
    else:
        print(f"warning: {whole} not found (set DR2PIPE_SHARED); using the packaged photos only", file=sys.stderr)
    return [(n, im) for n, im in images if not only or n in only]


def match(boxes: list[tuple[float, ...]], truth: list[tuple[int, ...]], thr: float) -> int:
    """Greedy matching of detections (in score order) to expected boxes; returns the number of hits."""
    free = list(truth)
    hits = 0
    for b in boxes:
        best = max(free, key=lambda t: box_iou(b, t), default=None)
        if best is not None and box_iou(b, best) >= thr:
            free.remove(best)
            hits += 1
    return hits


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    names = [n.strip() for n in args.detectors.split(",") if n.strip()]
    only = {n.strip() for n in args.images.split(",") if n.strip()}
    images = []
    for image_name, img in load_images(only):
        for f in [float(x) for x in args.shrink.split(",")]:
            if f != 1:
                h, w = img.shape[:2]
                img_f = cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
            else:
                img_f = img
            if args.blur > 0:
                img_f = cv2.GaussianBlur(img_f, (0, 0), args.blur)
            images.append((image_name, f, img_f))
    detectors, load_s = {}, {}
    for n in names:
        t = time.perf_counter()
        detectors[n] = build_detector(DetectorConfig(name=n, device=args.device, min_score=args.min_score,
                                                     min_face_size=args.min_face_size, max_side=args.max_side))
        load_s[n] = time.perf_counter() - t
    results = []
    for image_name, f, img in images:
        truth = GROUND_TRUTH.get(image_name)
        if truth is not None and f != 1:
            truth = [tuple(v / f for v in t) for t in truth]
        label = image_name if f == 1 else f"{image_name} /{f:g}"
        r = Result(label, f"{img.shape[1]}x{img.shape[0]}", None if truth is None else len(truth))
        for n, det in detectors.items():
            faces = det.detect([img])[0]  # warm-up (and the result)
            times = []
            for _ in range(max(1, args.repeats)):
                t = time.perf_counter()
                det.detect([img])
                times.append(time.perf_counter() - t)
            r.found[n] = len(faces)
            r.hits[n] = match([f.box for f in faces], truth or [], args.iou)
            r.ms[n] = 1000 * statistics.median(times)
            r.scores[n] = [round(f.score, 4) for f in faces]
        results.append(r)
        print(f"  {label}: " + ", ".join(f"{n} {r.hits[n]}/{r.found[n]} in {r.ms[n]:.0f} ms" for n in names),
              file=sys.stderr)
    scored = [r for r in results if r.expected is not None]
    expected = sum(r.expected for r in scored)
    totals = {n: {"expected": expected, "hits": sum(r.hits[n] for r in scored),
                  "false_positives": sum(r.found[n] - r.hits[n] for r in scored),
                  "recall": sum(r.hits[n] for r in scored) / expected if expected else None,
                  "ms_per_image": statistics.mean(r.ms[n] for r in results) if results else None,
                  "load_s": load_s[n], "identity": getattr(detectors[n], "identity", n)}
              for n in names}
    env = {"device": args.device, "python": platform.python_version(), "opencv": cv2.__version__,
           "cpus": os.cpu_count(), "repeats": args.repeats, "iou": args.iou, "min_score": args.min_score,
           "min_face_size": args.min_face_size, "max_side": args.max_side, "shrink": args.shrink,
           "blur": args.blur}
    try:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return {"env": env, "rows": [r.__dict__ for r in results], "totals": totals}


def render(report: dict) -> str:
    names = list(report["totals"])
    head = ["image", "size", "expected"] + [f"{n} hits/found" for n in names] + [f"{n} ms" for n in names]
    body = []
    for r in report["rows"]:
        body.append([r["image"], r["size"], "?" if r["expected"] is None else str(r["expected"])]
                    + [f"{r['hits'][n]}/{r['found'][n]}" for n in names] + [f"{r['ms'][n]:.0f}" for n in names])
    t = report["totals"]
    body.append(["total", "", str(next(iter(t.values()))["expected"]) if t else ""]
                + [f"{t[n]['hits']}/{t[n]['hits'] + t[n]['false_positives']}" for n in names]
                + [f"{t[n]['ms_per_image']:.0f}" for n in names])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body] + [""]
    for n in names:
        x = t[n]
        recall = "n/a" if x["recall"] is None else f"{x['recall']:.3f}"
        out.append(f"{n}: recall {recall} ({x['hits']}/{x['expected']}), false positives {x['false_positives']}, "
                   f"{x['ms_per_image']:.0f} ms/image (mean of per-image medians), load {x['load_s']:.2f} s "
                   f"[{x['identity']}]")
    e = report["env"]
    out.append(f"device {e['device']}, torch {e.get('torch', '-')} ({e.get('torch_threads', '-')} threads), "
               f"opencv {e['opencv']}, {e['cpus']} CPUs, IoU >= {e['iou']}, min_face_size {e['min_face_size']}, "
               f"max_side {e['max_side']}, shrink {e['shrink']}, blur {e['blur']}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(render(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

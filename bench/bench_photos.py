#!/usr/bin/env python
"""Whole photos on CPU: faces/s of detection + alignment + paste-back, and their share next to restoration.

    scripts/env.sh python bench/bench_photos.py                       # tiny DR2 at 64², bicubic 128, 1 thread
    scripts/env.sh python bench/bench_photos.py --enhancer sparnethd --json out/bench_photos.json
    scripts/env.sh python bench/bench_photos.py --input data/photos,astronaut --repeats 3
    scripts/env.sh python bench/bench_photos.py --arch ffhq256 --device cuda      # on a GPU node
    scripts/env.sh python bench/bench_photos.py --upscale 2 --upsampler-arch full --upsampler-tile 64

One process, no Ray: the stage callables of a --photos.mode photos job, called in a loop.
1. Photos: data/photos/*.jpg, every photo in <shared>/data/faces/whole (tests/vectors.py's SHARED, so
   DR2PIPE_SHARED points a clone elsewhere at it) and skimage.data.astronaut(), identical files counted once;
   or --input (comma-separated files, folders, globs; 'astronaut' for skimage's). Each is decoded with
   tasks.images.decode_image (the astronaut from a PNG encoding), as LoadPhotos does; decoding is reported
   but not counted in the total.
2. One untimed warm-up photo (the smallest) goes through every stage, then every photo is timed per stage
   (--repeats passes; medians of the per-stage totals):
     detection:    the detector of DetectAlign (build_detector(DetectorConfig), mtcnn by default, device cpu
                   as PhotoConfig's) called as detector.detect([photo]), one photo per call.
     plan+align:   plan_faces + align_faces (AlignConfig defaults, face_size = the DR2 input size).
     restoration:  RestoreStage built as PhotoRestore builds it (DR2 --arch at --size, --N/--tau, random seeded
                   weights, then the enhancer at --enhancer-size), called on all ok crops of the run in chunks
                   of --batch-size (PhotoRestore chunks the crops of a batch of photos the same way).
     upsampling:   (--upscale > 1 only) the photos' backgrounds: TiledUpsampler as PhotoRestore runs it (RRDBNet
                   --upsampler-arch with random seeded weights, x--upscale, --upsampler-tile/-pad/-budget), all
                   photos of the pass in one call; or --upsampler bicubic (the fallback, cv2.resize). Attributed to
                   the photos by their pixel share.
     paste-back:   paste_back of each photo's restored crops onto its background (AlignConfig defaults, upscale
                   --upscale; no PNG encoding).
   ms/face and faces/s divide by the faces restored (status ok); "detect+align+paste" is the three CPU stages
   together, and its share is of the four stages' total.
3. The tiny CPU DR2 is not representative of restoration's cost, so the share is also projected with a per-face
   restoration cost: --restore-ms-per-face (default: the full-size CPU figure of the README, 21 UNet forwards x
   7.7 s = 161.7 s per face, ffhq256 fp32, DR2 only), and --gpu-faces-per-s (default 45 faces/s = 22.2 ms/face,
   issue 7's GPU target: a projection from a target, NOT a measurement). When the run's crops are smaller than
   the full-size ones (align 256, restored 512), plan+align and paste-back are timed again at those sizes on
   the same detections (the aligned crop bicubic-upscaled stands in for the restored one) and the projections
   use those figures (at upscale 1: the projections leave the upsampler out).
Torch and OpenCV run --threads threads (default 1: a per-core figure; Ray's CPU actors default to 1 thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/bench_photos.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    DOWNSAMPLE,
    HelpFormatter,
    cpu_name,
    dr2_setup,
    enhancer_kwargs,
    fmt,
    kept_state,
    load_average,
)
from models.dr2 import dr2_model_calls  # noqa: E402
from tasks.align import AlignConfig, align_faces, paste_back, plan_faces  # noqa: E402
from tasks.config import Sampled  # noqa: E402
from tasks.detect import DetectorConfig, build_detector  # noqa: E402
from tasks.dr2_stage import DR2Config  # noqa: E402
from tasks.images import decode_image, encode_png  # noqa: E402
from tasks.photo_stage import face_id  # noqa: E402
from tasks.restore_stage import EnhancerConfig, RestoreStage  # noqa: E402
from tasks.runtime import RuntimeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# README (bench_dr2): full-size UNet on this CPU, fp32, batch 1: 7.7 s per forward, 21 forwards at (N, tau) = (4, 22).
README_S_PER_FORWARD, README_FORWARDS = 7.7, 21
FULL_FACE_SIZE, FULL_RESTORED_SIZE = 256, 512  # DR2's input and the enhancer's output in a full-size job
CPU_STAGES = ("detection", "plan+align", "paste-back")
STAGES = ("detection", "plan+align", "restoration", "paste-back")
UPSCALED_STAGES = ("detection", "plan+align", "restoration", "upsampling", "paste-back")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("photos")
    g.add_argument("--input", default=None,
                   help="comma-separated photo files, folders (their image files) or globs; 'astronaut' = "
                        "skimage.data.astronaut(). Default: data/photos/*.jpg, <shared>/data/faces/whole, astronaut")
    g.add_argument("--photos", type=int, default=0, help="use only the first this many photos (0 = all)")
    g.add_argument("--max-pixels", type=int, default=50_000_000, help="decode_image's max_pixels (image.max_pixels)")
    g = p.add_argument_group("detection and alignment")
    g.add_argument("--detector", default="mtcnn", help="DetectorConfig.name: mtcnn | haar | plug-in 'pkg.mod:Class'")
    g.add_argument("--detector-device", default="cpu", help="DetectorConfig.device (the photo job's default: cpu)")
    g.add_argument("--detector-max-side", type=int, default=1600, help="DetectorConfig.max_side")
    g = p.add_argument_group("restoration")
    g.add_argument("--arch", choices=sorted(DOWNSAMPLE), default=None,
                   help="DR2 UNet: tiny (default on CPU) or ffhq256 (default on CUDA)")
    g.add_argument("--size", type=int, default=0,
                   help="DR2 input size = aligned crop side (image.size); 0 = 64 for tiny, 256 for ffhq256")
    g.add_argument("--N", type=int, default=4, help="DR2 low-pass factor N")
    g.add_argument("--tau", type=int, default=22, help="DR2 last step tau")
    g.add_argument("--enhancer", default="bicubic", help="enhancer.name: bicubic | none | sparnethd (on CPU: a "
                                                          "small SPARNetHD unless --enhancer-kwargs) | 'pkg.mod:Class'")
    g.add_argument("--enhancer-size", type=int, default=0,
                   help="enhancer.size (the restored crop's side); 0 = 2x --size")
    g.add_argument("--enhancer-kwargs", default=None, help="enhancer.kwargs as JSON/YAML (default: {} on CUDA, "
                                                           "a small SPARNetHD on CPU)")
    g.add_argument("--batch-size", type=int, default=4, help="faces per restoration call (runtime.batch_size)")
    g.add_argument("--device", default="cpu", help="restoration device: cpu | cuda | auto (detection: "
                                                    "--detector-device)")
    g.add_argument("--precision", default="bf16", help="runtime.precision on CUDA")
    g.add_argument("--seed", type=int, default=0, help="job seed (noise per face id)")
    g = p.add_argument_group("background upsampling (--photos.upscale)")
    g.add_argument("--upscale", type=int, default=1, help="photos.upscale: 1 = no upsampling stage")
    g.add_argument("--upsampler", choices=("realesrgan", "bicubic"), default="realesrgan",
                   help="photos.upsampler.name (realesrgan: random seeded RRDBNet at the network scale --upscale)")
    g.add_argument("--upsampler-arch", choices=("tiny", "full"), default="tiny",
                   help="RRDBNet size: tiny (16 features, 2 blocks) or full (Real-ESRGAN's 64, 23)")
    g.add_argument("--upsampler-tile", type=int, default=400, help="photos.upsampler.tile")
    g.add_argument("--upsampler-pad", type=int, default=10, help="photos.upsampler.pad")
    g.add_argument("--upsampler-budget", type=int, default=2_000_000, help="photos.upsampler.pixel_budget")
    g = p.add_argument_group("measurement")
    g.add_argument("--threads", type=int, default=1, help="torch intra-op and OpenCV threads (0 = the libraries' "
                                                          "defaults)")
    g.add_argument("--repeats", type=int, default=1, help="timed passes over all photos; per-stage medians")
    g.add_argument("--restore-ms-per-face", type=float, default=README_FORWARDS * README_S_PER_FORWARD * 1000,
                   help="per-face restoration cost for the CPU projection (default: README's full-size CPU DR2, "
                        f"{README_FORWARDS} forwards x {README_S_PER_FORWARD} s)")
    g.add_argument("--gpu-faces-per-s", type=float, default=45.0,
                   help="restoration rate for the GPU projection (issue 7's target, not a measurement); 0 = skip")
    g.add_argument("--full-size-geometry", default=True, action=argparse.BooleanOptionalAction,
                   help=f"when crops are smaller than {FULL_FACE_SIZE}/{FULL_RESTORED_SIZE}, also time plan+align "
                        "and paste-back at those sizes for the projections")
    g.add_argument("--json", default=None, help="write every figure (table, per-photo rows, projections) here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.photos < 0 or args.upscale < 1:
        p.error("--repeats, --batch-size and --upscale must be >= 1, --photos >= 0")
    if args.upsampler == "realesrgan" and args.upscale not in (1, 2, 4):
        p.error("--upscale must be 1, 2 or 4 with --upsampler realesrgan")
    return args


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class Photo:
    name: str
    source: str
    data: bytes
    rgb: np.ndarray | None = None
    decode_s: float = 0.0


def _astronaut() -> Photo:
    import skimage.data

    return Photo("astronaut", "skimage.data.astronaut()", encode_png(np.ascontiguousarray(skimage.data.astronaut())))


def _files(item: str) -> list[Path]:
    path = Path(item)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
    if any(c in item for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(item))]
    if not path.is_file():
        raise SystemExit(f"--input {item!r}: no such file, folder or glob match")
    return [path]


def gather_photos(spec: str | None) -> tuple[list[Photo], list[str]]:
    """(photos, notes): identical files are kept once (data/photos and the shared folder overlap)."""
    notes: list[str] = []
    items: list[str]
    if spec:
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        from tests.vectors import SHARED

        whole = SHARED / "data" / "faces" / "whole"
        items = [str(ROOT / "data" / "photos" / "*.jpg")]
        if whole.is_dir():
            items.append(str(whole))
        else:
            notes.append(f"{whole} not found (set DR2PIPE_SHARED): shared photos skipped")
        items.append("astronaut")
    photos: list[Photo] = []
    seen: dict[str, str] = {}
    names: set[str] = set()
    for item in items:
        found = [_astronaut()] if item == "astronaut" else [Photo(p.name, str(p), p.read_bytes()) for p in _files(item)]
        for ph in found:
            digest = hashlib.sha256(ph.data).hexdigest()
            if digest in seen:
                notes.append(f"{ph.source} is identical to {seen[digest]}: counted once")
                continue
            seen[digest] = ph.source
            if ph.name in names:  # same name, other content: keep the ids (face seeds) distinct
                ph.name = f"{Path(ph.source).parent.name}/{ph.name}"
            names.add(ph.name)
            photos.append(ph)
    if not photos:
        raise SystemExit(f"no photos found in {items}")
    return photos, notes


# ------------------------------------------------------------------------------------------------- stages


@dataclass
class PhotoResult:
    """One photo's pass: detections, plans, crops, restored crops, and per-stage seconds."""

    name: str
    faces: list = field(default_factory=list)
    plans: list = field(default_factory=list)
    crops: list = field(default_factory=list)
    restored: list = field(default_factory=list)
    background: np.ndarray | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def ok_plans(self) -> list:
        return [p for p in self.plans if p.status == "ok"]


def detect(detector, photo: Photo, r: PhotoResult) -> None:
    t = time.perf_counter()
    r.faces = detector.detect([photo.rgb])[0]
    r.seconds["detection"] = time.perf_counter() - t


def plan_align(photo: Photo, r: PhotoResult, cfg: AlignConfig) -> tuple[list, list, float]:
    """As DetectAlign: plan_faces on the detections, then align_faces; (plans, crops, seconds)."""
    t = time.perf_counter()
    plans = plan_faces([f.landmarks for f in r.faces], [f.score for f in r.faces], photo.rgb.shape, cfg,
                       [f.box for f in r.faces])
    crops = align_faces(photo.rgb, plans, cfg)
    return plans, crops, time.perf_counter() - t


def paste(photo: Photo, plans: list, restored: list, cfg: AlignConfig, background: np.ndarray | None = None) -> float:
    """As PasteAndWrite._photo: paste_back of the ok faces onto the background (nothing to do without a face);
    seconds."""
    ok = [p for p in plans if p.status == "ok"]
    if not ok:
        return 0.0
    canvas = None if background is None else background.copy()  # untimed: the actor hands over its own copy
    t = time.perf_counter()
    paste_back(photo.rgb, list(restored), [p.matrix for p in ok], cfg, canvas=canvas)
    return time.perf_counter() - t


def upsample(photos: list[Photo], results: list[PhotoResult], upsampler, upscale: int) -> None:
    """As PhotoRestore._backgrounds: every photo's background in one call (bicubic: cv2.resize per photo);
    the time is attributed by pixel share."""
    t = time.perf_counter()
    if upsampler is None:
        outs = [cv2.resize(ph.rgb, (ph.rgb.shape[1] * upscale, ph.rgb.shape[0] * upscale),
                           interpolation=cv2.INTER_CUBIC) for ph in photos]
    else:
        outs = upsampler([ph.rgb for ph in photos])
    sec = time.perf_counter() - t
    pixels = sum(ph.rgb.shape[0] * ph.rgb.shape[1] for ph in photos)
    for ph, r, bg in zip(photos, results, outs):
        r.background = bg
        r.seconds["upsampling"] = sec * ph.rgb.shape[0] * ph.rgb.shape[1] / pixels


def restore(stage: RestoreStage, results: list[PhotoResult], chunk: int, N: int, tau: int) -> float:
    """As PhotoRestore: every ok crop of the given photos, in chunks; fills r.restored, returns seconds."""
    owner, ids, crops = [], [], []
    for k, r in enumerate(results):
        for p, crop in zip(r.ok_plans, r.crops):
            owner.append(k)
            ids.append(face_id(r.name, p.index))
            crops.append(crop)
        r.restored = []
    t = time.perf_counter()
    for i in range(0, len(ids), chunk):
        sl = slice(i, i + chunk)
        n = len(ids[sl])
        faces = {"id": np.array(ids[sl], dtype=object), "image": np.stack(crops[sl]),
                 "status": np.array(["ok"] * n, dtype=object), "N": np.full(n, N, np.int64),
                 "tau": np.full(n, tau, np.int64)}
        out = stage(faces)  # to_uint8 copies to the host: CUDA work is finished when this returns
        for j, k in enumerate(owner[sl]):
            results[k].restored.append(out["restored"][j])
    return time.perf_counter() - t


def one_pass(photos: list[Photo], detector, stage: RestoreStage, cfg: AlignConfig, args,
             upsampler=None) -> list[PhotoResult]:
    """Every photo through detection, plan+align, restoration (all crops together), upsampling, paste-back."""
    results = [PhotoResult(ph.name) for ph in photos]
    for ph, r in zip(photos, results):
        detect(detector, ph, r)
    for ph, r in zip(photos, results):
        r.plans, r.crops, r.seconds["plan+align"] = plan_align(ph, r, cfg)
    total_restore = restore(stage, results, args.batch_size, args.N, args.tau)
    n_ok = sum(len(r.crops) for r in results)
    for r in results:  # the batch's time, attributed to the photos by their share of the faces
        r.seconds["restoration"] = total_restore * len(r.crops) / n_ok if n_ok else 0.0
    if cfg.upscale > 1:
        upsample(photos, results, upsampler, cfg.upscale)
    for ph, r in zip(photos, results):
        r.seconds["paste-back"] = paste(ph, r.plans, r.restored, cfg, r.background)
        r.background = None
    return results


def full_size_geometry(photos: list[Photo], results: list[PhotoResult], cfg: AlignConfig) -> dict[str, float]:
    """plan+align at FULL_FACE_SIZE and paste-back of FULL_RESTORED_SIZE crops, on the same detections."""
    full = dataclasses.replace(cfg, face_size=FULL_FACE_SIZE, upscale=1)
    out = {"plan+align": 0.0, "paste-back": 0.0}
    for ph, r in zip(photos, results):
        plans, crops, sec = plan_align(ph, r, full)
        out["plan+align"] += sec
        big = [cv2.resize(c, (FULL_RESTORED_SIZE, FULL_RESTORED_SIZE), interpolation=cv2.INTER_CUBIC) for c in crops]
        out["paste-back"] += paste(ph, plans, big, full)
    return out


# ------------------------------------------------------------------------------------------------- report


def stage_row(stage: str, photos: int, faces: int, seconds: float, total: float) -> dict:
    return {"stage": stage, "photos": photos, "faces": faces, "seconds": seconds,
            "ms_per_face": 1e3 * seconds / faces if faces else None,
            "faces_per_s": faces / seconds if seconds > 0 and faces else None,
            "share": seconds / total if total > 0 else None}


def markdown(head: list[str], body: list[list[str]], left: int = 1) -> str:
    """A Markdown table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i < left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule] + [line(r) for r in body])


def render_table(rows: list[dict]) -> str:
    head = ["stage", "photos", "faces", "seconds", "ms/face", "faces/s", "share of total"]
    body = [[r["stage"], str(r["photos"]), str(r["faces"]), f"{r['seconds']:.3f}", fmt(r["ms_per_face"], ".1f"),
             fmt(r["faces_per_s"], ".2f"), "-" if r["share"] is None else f"{100 * r['share']:.1f}%"] for r in rows]
    return markdown(head, body)


def render_projections(rows: list[dict]) -> str:
    head = ["scenario", "restoration ms/face", "detect+align+paste ms/face", "detect+align+paste share",
            "restoration / detect+align+paste"]
    body = [[r["scenario"], f"{r['restore_ms_per_face']:.1f}", f"{r['geometry_ms_per_face']:.1f}",
             f"{100 * r['geometry_share']:.2f}%", f"{r['ratio']:.1f}"] for r in rows]
    return markdown(head, body)


def projection(scenario: str, kind: str, restore_ms: float, geometry_ms: float, note: str) -> dict:
    total = restore_ms + geometry_ms
    return {"scenario": scenario, "kind": kind, "restore_ms_per_face": restore_ms,
            "geometry_ms_per_face": geometry_ms, "geometry_share": geometry_ms / total if total else 0.0,
            "ratio": restore_ms / geometry_ms if geometry_ms else float("inf"), "note": note}


# ------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark and print its tables; returns what --json writes."""
    args = parse_args(argv)
    loggers = ("tasks.dr2_stage", "tasks.restore_stage")
    with kept_state(*loggers, opencv=True):
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)  # the random-weights warnings
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    load_start = load_average()
    cuda, arch, size = dr2_setup(args)
    esize = args.enhancer_size or 2 * size
    ekwargs = enhancer_kwargs(args, cuda, esize)
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)

    photos, notes = gather_photos(args.input)
    if args.photos:
        photos = photos[:args.photos]
    for ph in photos:
        t = time.perf_counter()
        ph.rgb, _ = decode_image(ph.data, max_pixels=args.max_pixels)
        ph.decode_s = time.perf_counter() - t

    t0 = time.perf_counter()
    detector = build_detector(DetectorConfig(name=args.detector, device=args.detector_device,
                                             max_side=args.detector_max_side))
    detector_build_s = time.perf_counter() - t0
    align_cfg = AlignConfig(face_size=size, upscale=args.upscale)  # DetectAlign's, at image.size
    stages = UPSCALED_STAGES if args.upscale > 1 else STAGES
    upsampler, up_label = None, "none"
    if args.upscale > 1 and args.upsampler == "realesrgan":
        from tasks.upsample import TiledUpsampler, UpsamplerConfig

        ucfg = UpsamplerConfig(scale=args.upscale, allow_random_weights=True, tile=args.upsampler_tile,
                               pad=args.upsampler_pad, pixel_budget=args.upsampler_budget,
                               kwargs={"num_feat": 16, "num_block": 2, "num_grow_ch": 8}
                               if args.upsampler_arch == "tiny" else {})
        upsampler = TiledUpsampler(ucfg, args.upscale, torch.device("cuda" if cuda else "cpu"))
        up_label = (f"RRDBNet {args.upsampler_arch} x{args.upscale} random seeded weights, tile "
                    f"{args.upsampler_tile} pad {args.upsampler_pad}, budget {args.upsampler_budget} px/forward")
    elif args.upscale > 1:
        up_label = f"bicubic x{args.upscale}"
    runtime = RuntimeConfig(device="cuda" if cuda else "cpu", precision=args.precision, batch_size=args.batch_size,
                            torch_threads=args.threads)
    dr2_cfg = DR2Config(allow_random_weights=True, architecture=arch, N=Sampled((args.N,)), tau=Sampled((args.tau,)))
    enh_cfg = EnhancerConfig(name=args.enhancer, size=esize, kwargs=ekwargs, allow_random_weights=True)
    t0 = time.perf_counter()
    # As PhotoRestore builds its stage: RestoreStage(dr2=, enhancer=, runtime=, seed=, storage_options=).
    stage = RestoreStage(dr2=dr2_cfg, enhancer=enh_cfg, runtime=runtime, seed=args.seed, storage_options=None)
    stage_build_s = time.perf_counter() - t0
    if args.threads:  # DR2Stage sets torch threads from runtime (0 -> cpus_per_actor): keep ours
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    warm = min(photos, key=lambda ph: ph.rgb.shape[0] * ph.rgb.shape[1])
    t0 = time.perf_counter()
    warm_result = one_pass([warm], detector, stage, align_cfg, args, upsampler)
    if not warm_result[0].crops:  # no face in it: still warm restoration and paste-back up on a dummy crop
        stage({"id": np.array(["warmup"], dtype=object), "image": np.zeros((1, size, size, 3), np.uint8),
               "status": np.array(["ok"], dtype=object), "N": np.array([args.N]), "tau": np.array([args.tau])})
    warm_s = time.perf_counter() - t0

    passes = [one_pass(photos, detector, stage, align_cfg, args, upsampler) for _ in range(args.repeats)]
    results = passes[-1]
    sec = {s: statistics.median(sum(r.seconds[s] for r in p) for p in passes) for s in stages}
    full_geo = None
    if args.full_size_geometry and (size < FULL_FACE_SIZE or esize < FULL_RESTORED_SIZE):
        geo = [full_size_geometry(photos, results, align_cfg) for _ in range(args.repeats)]
        full_geo = {s: statistics.median(g[s] for g in geo) for s in ("plan+align", "paste-back")}
    load_end = load_average()

    n_photos = len(photos)
    n_ok = sum(len(r.crops) for r in results)
    with_faces = sum(1 for r in results if r.crops)
    statuses: dict[str, int] = {}
    for r in results:
        for p in r.plans:
            statuses[p.status] = statuses.get(p.status, 0) + 1
    detected = sum(statuses.values())
    total = sum(sec.values())
    geometry = sum(sec[s] for s in CPU_STAGES)
    table = [stage_row("detection", n_photos, n_ok, sec["detection"], total),
             stage_row("plan+align", n_photos, n_ok, sec["plan+align"], total),
             stage_row("restoration", with_faces, n_ok, sec["restoration"], total),
             *([stage_row("upsampling", n_photos, n_ok, sec["upsampling"], total)] if "upsampling" in sec else []),
             stage_row("paste-back", with_faces, n_ok, sec["paste-back"], total),
             stage_row("detect+align+paste", n_photos, n_ok, geometry, total),
             stage_row("total", n_photos, n_ok, total, total)]

    projections = []
    if n_ok:
        geo_ms = 1e3 * geometry / n_ok
        geo_note = f"align {size}, restored {esize}: this run's sizes"
        projections.append(projection(f"measured: {arch} DR2 {size}² + {args.enhancer} {esize}², "
                                      f"{'cuda' if cuda else f'cpu {threads} thread(s)'}", "measurement",
                                      1e3 * sec["restoration"] / n_ok, geo_ms, geo_note))
        if full_geo is not None:
            full_ms = 1e3 * (sec["detection"] + full_geo["plan+align"] + full_geo["paste-back"]) / n_ok
            geo_note = f"align {FULL_FACE_SIZE}, restored {FULL_RESTORED_SIZE}: geometry re-timed at full size"
        else:
            full_ms = geo_ms
        cpu_label = (f"projected: CPU full-size DR2, {args.restore_ms_per_face / 1e3:g} s/face"
                     + (f" (README: {README_FORWARDS} forwards x {README_S_PER_FORWARD} s)"
                        if args.restore_ms_per_face == README_FORWARDS * README_S_PER_FORWARD * 1000 else ""))
        projections.append(projection(cpu_label, "projection", args.restore_ms_per_face, full_ms, geo_note))
        if args.gpu_faces_per_s > 0:
            projections.append(projection(f"projected from issue 7's GPU target {args.gpu_faces_per_s:g} faces/s "
                                          "(not a measurement)", "projection from a target",
                                          1e3 / args.gpu_faces_per_s, full_ms, geo_note))

    skipped = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()) if k != "ok")
    dev = f"cuda ({torch.cuda.get_device_name()}, {args.precision})" if cuda else "cpu (fp32)"
    la = f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start" if load_start else ""
    header = [
        f"bench_photos: {n_photos} photos, {detected} faces detected, {n_ok} restored (status ok)"
        + (f" ({skipped} not restored)" if skipped else "")
        + f"; detector {getattr(detector, 'identity', args.detector)} on {args.detector_device}",
        f"restoration: DR2 {arch} at {size}x{size} RANDOM seeded weights, N={args.N} tau={args.tau} "
        f"({dr2_model_calls(args.N, args.tau)} UNet forwards/face) -> {args.enhancer} at {esize}x{esize}"
        + (f" {json.dumps(ekwargs)}" if ekwargs else "") + f", chunks of {args.batch_size} faces, device {dev}",
        *([f"upsampling: {up_label}; paste-back onto the x{args.upscale} background"] if args.upscale > 1 else []),
        f"threads: torch {threads}, OpenCV {cv2.getNumThreads()} (--threads {args.threads}) | {os.cpu_count()} CPUs "
        f"({cpu_name()})" + (f" | {la}" if la else "") + (f", {load_end[0]:.2f} at end" if load_end else ""),
        f"untimed: decode {sum(ph.decode_s for ph in photos):.2f} s, detector build {detector_build_s:.2f} s, "
        f"RestoreStage build {stage_build_s:.2f} s, warm-up photo {warm.name} {warm_s:.2f} s"
        + (f"; medians of {args.repeats} passes" if args.repeats > 1 else "; one timed pass"),
    ] + [f"note: {n}" for n in notes]
    per_photo = [{"photo": r.name, "source": ph.source, "width": ph.rgb.shape[1], "height": ph.rgb.shape[0],
                  "detected": len(r.plans), "restored": len(r.crops), "decode_s": ph.decode_s,
                  **{f"{s}_s": r.seconds[s] for s in stages}} for ph, r in zip(photos, results)]
    up_col = "upsampling" in stages
    photo_table = markdown(
        ["photo", "size", "faces ok/detected", "detect ms", "align ms", *(["upsample ms"] if up_col else []),
         "paste ms"],
        [[p["photo"], f"{p['width']}x{p['height']}", f"{p['restored']}/{p['detected']}",
          f"{1e3 * p['detection_s']:.1f}", f"{1e3 * p['plan+align_s']:.1f}",
          *([f"{1e3 * p['upsampling_s']:.1f}"] if up_col else []), f"{1e3 * p['paste-back_s']:.1f}"]
         for p in per_photo])

    lines = []
    by = {r["stage"]: r for r in table}
    g, rs = by["detect+align+paste"], by["restoration"]
    if n_ok and g["seconds"] > 0:
        lines.append(f"ratio restoration / (detect+align+paste) = {rs['seconds'] / g['seconds']:.2f} (measured: "
                     f"{arch} DR2 at {size}², not representative of a full-size job; see the projections)")
        lines.append(f"detect+align+paste: {g['faces_per_s']:.2f} faces/s on {threads} thread(s) = "
                     f"{g['ms_per_face']:.1f} ms/face (detection {by['detection']['ms_per_face']:.1f}, plan+align "
                     f"{by['plan+align']['ms_per_face']:.1f}, paste-back {by['paste-back']['ms_per_face']:.1f})")
    else:
        lines.append("no face restored: no per-face figures (ratio undefined)")
    proj_text = []
    if projections:
        proj_text = ["", "Projected share (restoration per face given, detect+align+paste as measured here):", "",
                     render_projections(projections), ""]
        if full_geo is not None:
            proj_text.append(f"projections use plan+align at {FULL_FACE_SIZE} and paste-back of {FULL_RESTORED_SIZE} "
                             f"crops re-timed on the same detections: plan+align {full_geo['plan+align']:.3f} s, "
                             f"paste-back {full_geo['paste-back']:.3f} s for {n_ok} faces")
        gpu = [p for p in projections if p["kind"] == "projection from a target"]
        if gpu:
            p = gpu[0]
            proj_text.append(f"GPU target (projection, not a measurement): one GPU at {args.gpu_faces_per_s:g} faces/s "
                             f"needs {args.gpu_faces_per_s * p['geometry_ms_per_face'] / 1e3:.1f} CPU threads of "
                             "detect+align+paste at this rate to keep up")
    text = "\n".join(header + ["", render_table(table), "", *lines, *proj_text, "", "Per photo (last pass):", "",
                               photo_table])
    print(text)

    result = {
        "meta": dict(arch=arch, size=size, N=args.N, tau=args.tau, forwards_per_face=dr2_model_calls(args.N, args.tau),
                     enhancer=args.enhancer, enhancer_size=esize, upscale=args.upscale, upsampler=up_label,
                     enhancer_kwargs=ekwargs, batch_size=args.batch_size,
                     device="cuda" if cuda else "cpu", detector=getattr(detector, "identity", args.detector),
                     detector_device=args.detector_device, torch_threads=threads, opencv_threads=cv2.getNumThreads(),
                     cpus=os.cpu_count(), cpu=cpu_name(), load_average_start=load_start, load_average_end=load_end,
                     torch=torch.__version__, opencv=cv2.__version__, repeats=args.repeats, photos=n_photos,
                     faces_detected=detected, faces_restored=n_ok, statuses=statuses, warmup_photo=warm.name,
                     warmup_seconds=warm_s, detector_build_seconds=detector_build_s,
                     stage_build_seconds=stage_build_s, decode_seconds=sum(ph.decode_s for ph in photos),
                     restore_ms_per_face_projection=args.restore_ms_per_face, gpu_faces_per_s=args.gpu_faces_per_s,
                     full_size_geometry=full_geo, notes=notes),
        "table": table,
        "photos": per_photo,
        "projections": projections,
        "text": text,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

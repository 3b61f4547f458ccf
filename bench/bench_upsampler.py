#!/usr/bin/env python
"""Background upsampler (tasks/upsample.py): megapixels/s tiled vs untiled, and a large photo's peak memory.

    scripts/env.sh python bench/bench_upsampler.py                          # tiny RRDBNet, 512x384, CPU 1 thread
    scripts/env.sh python bench/bench_upsampler.py --arch full --size 96x128 --tiles 48,64 --repeats 1
    scripts/env.sh python bench/bench_upsampler.py --memory                 # 4000x3000 photo, peak RSS per config
    scripts/env.sh python bench/bench_upsampler.py --arch full --device cuda --size 1024x768   # on a GPU node

Speed: one textured photo (--size WxH) through TiledUpsampler (the photo job's class: RRDBNet with random
seeded weights, --scale 2 or 4, upscale = scale) untiled (tile 0, the baseline) and at each --tiles tile
side with --pad context; the pixel budget is set so that --batch windows go in one forward. Figures: input
megapixels per second and the ratio to the untiled run in the same process (medians of --repeats after one
warm-up). Tiles cost their overlap: "px through the net" is the windows' total area over the photo's (edge
windows are shifted inwards to keep one size, so they overlap their neighbours more than 2 pad).

Memory (--memory): each configuration runs in a fresh child process that builds the photo job's stage
callables (no Ray) - DetectAlign (MTCNN, CPU), PhotoRestore (tiny DR2 at 32, bicubic enhancer to 64, the
upsampler), PasteAndWrite (PNG to a temp folder) - then pushes one --memory-size photo (Blake_Lively.jpg
resized, JPEG-encoded, decoded as LoadPhotos does) through them. The child reports its RSS after building
(baseline), resets the peak (Linux clear_refs 5), and reports the peak RSS (VmHWM) at the end: the increment
is what the photo cost, read off the whole process (decode, detection, restoration, upsampling, paste, PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import HelpFormatter, cpu_name, kept_state, load_average  # noqa: E402
from models.rrdbnet import realesrgan_config  # noqa: E402
from models.tiling import plan_windows  # noqa: E402
from tasks.upsample import TiledUpsampler, UpsamplerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_feat": 16, "num_block": 2, "num_grow_ch": 8}
# --memory configurations: (label, upscale, upsampler config overrides)
MEMORY_CONFIGS = [
    ("upscale 1 (no upsampler)", 1, {}),
    ("upscale 2, bicubic", 2, {"name": "bicubic"}),
    ("upscale 2, RRDBNet x2 tiny, tile 400 pad 10, budget 2 MP", 2, {}),
    ("upscale 2, RRDBNet x2 tiny, tile 128 pad 10, budget 0.25 MP", 2, {"tile": 128, "pixel_budget": 250_000}),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", choices=("tiny", "full"), default="tiny",
                   help=f"RRDBNet: tiny {TINY} or full (Real-ESRGAN's 64 features, 23 blocks)")
    p.add_argument("--scale", type=int, choices=(2, 4), default=2, help="network scale (x2plus / x4plus layout)")
    p.add_argument("--size", default="512x384", help="test photo WxH (speed)")
    p.add_argument("--tiles", default="64,128,256", help="comma-separated tile sides to time against untiled")
    p.add_argument("--pad", type=int, default=10, help="context px around each tile")
    p.add_argument("--batch", type=int, default=4, help="windows per forward (sets the pixel budget)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--memory", action="store_true", help="measure a large photo's peak RSS instead (child processes)")
    p.add_argument("--memory-size", default="4000x3000", help="WxH of the --memory photo")
    p.add_argument("--only", default="", help="--memory: comma-separated row numbers (0-based) to run (default all)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one --memory configuration
    return p.parse_args(argv)


def _wh(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def textured(w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def speed(args: argparse.Namespace) -> dict:
    w, h = _wh(args.size)
    photo = textured(w, h)
    device = torch.device(args.device)
    kwargs = TINY if args.arch == "tiny" else {}
    rows = []
    for tile in [0] + [int(t) for t in args.tiles.split(",") if t]:
        win = (tile + 2 * args.pad) if tile else max(w, h) + 2
        cfg = UpsamplerConfig(scale=args.scale, kwargs=kwargs, allow_random_weights=True, tile=tile, pad=args.pad,
                              pixel_budget=max(win * win * args.batch, w * h if tile == 0 else 1))
        up = TiledUpsampler(cfg, args.scale, device)
        up([photo])  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            up([photo])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        eff_tile, batch = up.tile_and_batch()
        m = up.multiple
        wins = plan_windows(-(-h // m) * m, -(-w // m) * m, eff_tile if tile else 0, args.pad, m)
        through = sum((x.wy1 - x.wy0) * (x.wx1 - x.wx0) for x in wins) / (w * h)
        rows.append({"tile": tile, "pad": args.pad if tile else 0, "windows_per_forward": batch if tile else 1,
                     "seconds": sec, "mpx_per_s": w * h / 1e6 / sec, "out_mpx_per_s": w * h * args.scale**2 / 1e6 / sec,
                     "windows": len(wins), "overlap": through})
    base = rows[0]["mpx_per_s"]
    for r in rows:
        r["ratio_to_untiled"] = r["mpx_per_s"] / base
    arch = f"RRDBNet {args.arch} {TINY if args.arch == 'tiny' else realesrgan_config(args.scale)}"
    print(f"bench_upsampler: {arch} x{args.scale}, random seeded weights, photo {w}x{h}, {args.device}, torch "
          f"{torch.get_num_threads()} thread(s), {cpu_name()}, load average {load_average()}; "
          f"medians of {args.repeats}")
    print()
    print("| tiling | windows/forward | px through the net | s | input MP/s | output MP/s | vs untiled |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = f"tile {r['tile']} pad {r['pad']}" if r["tile"] else "untiled (baseline)"
        print(f"| {label} | {r['windows_per_forward']} | x{r['overlap']:.2f} | {r['seconds']:.3f} | "
              f"{r['mpx_per_s']:.4f} | {r['out_mpx_per_s']:.3f} | {r['ratio_to_untiled']:.2f} |")
    return {"arch": args.arch, "scale": args.scale, "size": [w, h], "device": args.device, "rows": rows}


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS (so the build's own peak is not counted)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: str) -> None:
    """One --memory configuration, in this (fresh) process; prints a JSON line."""
    import tempfile

    from tasks.align import AlignConfig
    from tasks.detect import DetectorConfig
    from tasks.dr2_stage import DR2Config
    from tasks.images import decode_image
    from tasks.photo_stage import DetectAlign, PasteAndWrite, PhotoRestore, _objects
    from tasks.restore_stage import EnhancerConfig, RestoreStage
    from tasks.runtime import RuntimeConfig
    from tasks.upsample import resolve_upscale, runs_network

    cfg = json.loads(spec)
    torch.set_num_threads(1)
    w, h = cfg["size"]
    upcfg = UpsamplerConfig(**{"scale": 2, "kwargs": {"num_feat": 8, "num_block": 1, "num_grow_ch": 4},
                               "allow_random_weights": True, **cfg["upsampler"]})
    upscale, label, note = resolve_upscale(upcfg, cfg["upscale"])
    align = AlignConfig(face_size=32, upscale=upscale)
    detect = DetectAlign(DetectorConfig(device="cpu"), align)
    runtime = RuntimeConfig(device="cpu", batch_size=4)
    restore = PhotoRestore(RestoreStage, dict(dr2=DR2Config(allow_random_weights=True, architecture="tiny", N=2, tau=5),
                                              enhancer=EnhancerConfig(name="bicubic", size=64), runtime=runtime,
                                              seed=0, storage_options=None),
                           chunk=4, upscale=upscale, upsampler=upcfg if runs_network(upcfg) and upscale > 1 else None)
    out_dir = tempfile.mkdtemp()
    paste = PasteAndWrite(out_dir, align, write_faces=False, png_compression=1, constants={}, upsampler=label,
                          upsampler_note=note)
    src = cv2.imread(str(ROOT / "data" / "photos" / "Blake_Lively.jpg"))
    big = cv2.resize(src, (w, h), interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    del big
    del src
    base = status_mb("VmRSS")
    reset = reset_peak()
    t = time.perf_counter()
    photo, _ = decode_image(data, max_pixels=50_000_000)
    batch = {"id": np.array(["big.jpg"], dtype=object), "source": np.array(["big.jpg"], dtype=object),
             "stem": np.array(["big"], dtype=object), "status": np.array(["ok"], dtype=object),
             "error": np.array([""], dtype=object), "kind": np.array(["photo"], dtype=object),
             "photo": _objects([photo]), "N": np.array([2]), "tau": np.array([5])}
    del photo
    batch = paste(restore(detect(batch)))
    seconds = time.perf_counter() - t
    # the peak since the reset; without one, ru_maxrss (which includes the build's own peak)
    peak = status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"label": cfg["label"], "baseline_mb": base, "peak_reset": reset, "peak_mb": peak,
                      "increment_mb": peak - base,
                      "seconds": seconds, "status": str(batch["status"][0]), "faces": int(batch["faces_restored"][0]),
                      "upscale": int(batch["upscale"][0]), "upsampler": str(batch["upsampler"][0]),
                      "out_shape": list(cv2.imread(str(batch["restored"][0]), cv2.IMREAD_UNCHANGED).shape)
                      if batch["status"][0] == "ok" else None}))


def memory(args: argparse.Namespace) -> dict:
    w, h = _wh(args.memory_size)
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    only = {int(i) for i in args.only.split(",") if i.strip()}
    for i, (label, upscale, over) in enumerate(MEMORY_CONFIGS):
        if only and i not in only:
            continue
        spec = json.dumps({"label": label, "size": [w, h], "upscale": upscale, "upsampler": over})
        res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec], env=env,
                             capture_output=True, text=True, check=False)
        if res.returncode:
            raise SystemExit(f"child failed ({label}):\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"bench_upsampler --memory: one {w}x{h} photo through DetectAlign -> PhotoRestore -> PasteAndWrite in a "
          f"fresh process per row (no Ray), 1 torch thread, {cpu_name()}")
    print()
    print("| configuration | faces | output | s | RSS after build MB | peak RSS MB | photo's increment MB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        shape = "x".join(map(str, r["out_shape"][:2][::-1])) if r["out_shape"] else r["status"]
        print(f"| {r['label']} | {r['faces']} | {shape} | {r['seconds']:.1f} | {r['baseline_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['increment_mb']:.0f} |")
    return {"size": [w, h], "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    with kept_state(opencv=True):
        if args.threads:
            torch.set_num_threads(args.threads)
        result = memory(args) if args.memory else speed(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Build the DSST table (blur sigma -> diffusion start step) used by the dynamic restoration method.

    python workflows/build_dsst.py --input data/samples --output configs/dsst.yaml [--respacing ddim250] [--c C]

Criterion (REFERENCE.md, "a principled DSST"): the start for blur sigma is the smallest original timestep t
with

    RMS(x - k_sigma * x) <= c * sqrt((1 - abar_t) / abar_t),

i.e. where the noise that q_sample adds (std sqrt((1 - abar_t) / abar_t) in x0 units) drowns the detail the
blur removed. Equivalently the per-pixel KL between q(x_t | blurred x) and q(x_t | x), which is
abar_t / (2 (1 - abar_t)) * RMS^2, is at most c^2 / 2: c is the tolerated KL per pixel, in DifFace's
analysis of diffused estimators. RMS is pooled over the input faces (sqrt of the mean squared residual),
images read as RGB in [-1, 1] at --size (512: sigmas are px at a 512 face, models/dynamic.REF_SIZE), the
blur is models.guidance.blur (known Gaussian, reflect padding), the schedule DR2's / DifFace's linear betas
with T = 1000 (models.diffusion).

Calibration: without --c, c is set so that the typical degradation (--typical-sigma, default 4 px at 512)
maps to DifFace's start t = 400 (--typical-t; DifFace q_samples its estimate to ddim250 index 100 = t 400
for every input). DifFace diffuses the output of its estimator (SwinIR, L1-trained on the GFPGAN-style
range sigma <= 15, x0.8..x32), not the LQ input, so "typical" is the blur that estimate leaves, which
DifFace does not quantify. We ASSUME 4 px at 512 (2 px at DR2's 256): a regression estimate keeps the face's
structure but not its fine band, and 4 px is where the pooled residual RMS(x - k*x) of data/samples reaches
~0.08 (4% of the [-1, 1] range), i.e. eyelashes, hair strands and skin texture gone, eyes and mouth
intact. The table records the assumption; rerunning with another --typical-sigma (or an explicit --c)
rescales every start (start_t is monotone in sigma whatever c is).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import yaml

from models.diffusion import DiffusionSchedule, linear_betas, respaced_linear_schedule
from models.dynamic import REF_SIZE, DSSTTable, dsst_start_t, noise_to_signal, respaced_index
from models.guidance import blur
from tasks.images import decode_image, prepare_face

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIGMAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0,
                  14.0, 16.0)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def load_faces(folder: str | Path, size: int) -> torch.Tensor:
    """Every image in a local folder, square-checked and PIL-bicubic resized to size: (N,3,S,S) float64."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in EXTENSIONS)
    if not paths:
        raise SystemExit(f"no images in {folder}")
    faces = [prepare_face(decode_image(p.read_bytes())[0], size) for p in paths]
    x = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).to(torch.float64)
    return x / 127.5 - 1.0


def blur_rms(x: torch.Tensor, sigma: float) -> float:
    """sqrt(mean((x - k_sigma * x)^2)) over every image and pixel (float64)."""
    if sigma <= 0:
        return 0.0
    return float(torch.sqrt(torch.mean((x - blur(x, float(sigma))) ** 2)))


def build_table(x: torch.Tensor, *, sigmas=DEFAULT_SIGMAS, c: float | None = None, typical_sigma: float = 4.0,
                typical_t: int = 400, respacing: str = "ddim250", num_timesteps: int = 1000) -> dict:
    base = DiffusionSchedule(linear_betas(num_timesteps))
    nts = noise_to_signal(base)
    rms = [blur_rms(x, s) for s in sigmas]
    if c is None:
        # The smallest c with rms(typical) <= c * nts[typical_t]; the relative 1e-12 keeps the equality from
        # rounding to t + 1.
        known = [float(s) for s in sigmas]
        typical = rms[known.index(typical_sigma)] if typical_sigma in known else blur_rms(x, typical_sigma)
        c = typical / nts[typical_t] * (1 + 1e-12)
    start_t = [dsst_start_t(r, c, base) for r in rms]
    sched = respaced_linear_schedule(num_timesteps, respacing)
    table = {
        "sigma": [float(s) for s in sigmas],
        "start_t": start_t,
        "respaced_start": [respaced_index(t, sched) for t in start_t],
        "rms": [round(r, 6) for r in rms],
        "c": float(c),
        "respacing": respacing,
        "num_timesteps": num_timesteps,
        "size": int(x.shape[-1]),
        "n_images": int(x.shape[0]),
        "typical_sigma": float(typical_sigma),
        "typical_t": int(typical_t),
    }
    DSSTTable.from_dict(table)  # validates monotonicity
    return table


def header(args: argparse.Namespace, table: dict) -> str:
    how = (f"c = {table['c']:.6g} given" if args.c is not None else
           f"c = {table['c']:.6g} calibrated so that sigma = {table['typical_sigma']:g} px maps to "
           f"t = {table['typical_t']} (DifFace's start);\n# {table['typical_sigma']:g} px at 512 is the ASSUMED "
           "typical residual blur of DifFace's diffused estimate (see workflows/build_dsst.py)")
    return "\n".join([
        "# DSST: blur sigma (px at a 512 face) -> diffusion start step, for the dynamic restoration method.",
        "# Built by: python workflows/build_dsst.py " + " ".join(sys.argv[1:] or ["(defaults)"]),
        f"# Inputs: {table['n_images']} faces from {args.input}, RGB in [-1, 1] at {table['size']}x{table['size']}.",
        "# start_t = smallest t with RMS(x - k_sigma * x) <= c * sqrt((1 - abar_t) / abar_t) (linear betas, T = 1000);",
        f"# {how}.",
        "# rms = the pooled RMS(x - k_sigma * x); respaced_start = first respaced step with t >= start_t.",
        "# The sampler interpolates start_t linearly in sigma (clamped at the ends), see models/dynamic.DSSTTable.",
        f"# Generated {time.strftime('%Y-%m-%d')}; rerun the command to rebuild (do not edit by hand).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(ROOT / "data" / "samples"), help="folder of sharp aligned faces")
    p.add_argument("--output", default=str(ROOT / "configs" / "dsst.yaml"), help="YAML table to write")
    p.add_argument("--respacing", default="ddim250", help="respacing whose indices respaced_start lists")
    p.add_argument("--c", type=float, default=None, help="the criterion's constant (default: calibrated)")
    p.add_argument("--typical-sigma", type=float, default=4.0, help="blur (px at 512) calibrated to --typical-t")
    p.add_argument("--typical-t", type=int, default=400, help="start timestep of the typical blur (DifFace: 400)")
    p.add_argument("--size", type=int, default=REF_SIZE, help="face size the sigmas are measured at")
    p.add_argument("--sigmas", default=",".join(f"{s:g}" for s in DEFAULT_SIGMAS), help="table rows (px)")
    args = p.parse_args(argv)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    x = load_faces(args.input, args.size)
    table = build_table(x, sigmas=sigmas, c=args.c, typical_sigma=args.typical_sigma, typical_t=args.typical_t,
                        respacing=args.respacing)
    text = header(args, table) + yaml.safe_dump(table, sort_keys=False, default_flow_style=None, width=120)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    for s, t, i in zip(table["sigma"], table["start_t"], table["respaced_start"]):
        print(f"sigma {s:6.2f} -> t {t:4d} (respaced {i})")
    print(f"c = {table['c']:.6g}; wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

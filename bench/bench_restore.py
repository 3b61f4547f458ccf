#!/usr/bin/env python
"""Restoration throughput: DR2 and the enhancer sharing one actor (device) vs two actor pools, in one process.

    scripts/env.sh python bench/bench_restore.py --images 16 --repeats 3          # CPU: tiny DR2 + small SPARNetHD
    scripts/env.sh python bench/bench_restore.py --images 256                     # CUDA: ffhq256 + SPARNetHD 512, bf16

1. N synthetic aligned faces (PNG, --face-size, made from data/samples/*.png with a per-image random affine
   jitter, flip and colour change: bench_pipeline.synthetic_faces) are written to a temporary folder (or taken
   from --input), with a CSV listing (uri, id) that the workflow reads.
2. A local Ray is started once (tasks.pipeline.init_ray, as the workflow does; an already initialised Ray is
   reused), and one small untimed run of the workflow (shared topology) starts Ray's worker processes and imports.
3. `workflows.restore.main` runs with --topology shared and --topology separate on the same N images, each into a
   fresh output folder, with the same DR2, enhancer and runtime options (random seeded weights unless --weights /
   --enhancer-weights: speed does not depend on their values). images/s = ok / seconds from the run's
   _summary.json, i.e. the time to drain the Ray Data pipeline: actor start-up (process, imports, model build),
   read+decode+resize tasks, DR2, the enhancer, PNG encode+write, the Parquet manifest.
     shared:   one pool of --num-actors RestoreStage actors (DR2 then the enhancer on DR2's float output), each
               with --gpus-per-actor GPUs (CUDA) or --cpus-per-actor CPUs and as many torch threads (CPU).
     separate: a DR2Stage pool then an EnhanceStage pool, --num-actors each, handing over DR2's uint8 256 image
               through Ray's object store; each actor gets half of --gpus-per-actor (both pools share each GPU).
               On CPU each actor still gets --cpus-per-actor CPUs and threads, so separate runs twice the torch
               threads of shared: add --shared-args "--runtime.torch-threads 2" to compare at equal thread count.
   Rows move between stages in Ray blocks of --block-rows (default: one batch, so that a short run pipelines
   DR2 and the enhancer as a long job does with the workflow's 64-row blocks).
   With --repeats R the topologies alternate (shared, separate, separate, shared, ...) and the table shows medians.
4. model-only: RestoreStage (the shared topology's actor class, same configs) called in this process on the
   same images, decoded and resized beforehand, in batches of --batch-size after one untimed batch; the DR2 part
   (DR2Stage.dr2_x0) is timed on its own, the rest (hand-over, enhancer, uint8 conversion) is the enhancer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/bench_restore.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_pipeline import dr2_options, input_faces, listing, write_listing  # noqa: E402
from bench.common import (  # noqa: E402
    SMALL_SPARNET,
    HelpFormatter,
    cpu_name,
    dr2_setup,
    enhancer_kwargs,
    fmt,
    kept_state,
    load_average,
    text_table,
)
from models.dr2 import dr2_model_calls  # noqa: E402
from tasks.config import load  # noqa: E402
from tasks.images import decode_image, prepare_face  # noqa: E402
from tasks.load_stage import draw_params  # noqa: E402
from tasks.manifest import SUMMARY_FILE  # noqa: E402
from tasks.pipeline import ROOT, ClusterConfig, init_ray  # noqa: E402
from tasks.restore_stage import RestoreStage  # noqa: E402
from tasks.runtime import PRECISIONS  # noqa: E402
from workflows.restore import RestoreConfig  # noqa: E402
from workflows.restore import main as restore_main  # noqa: E402

TOPOLOGIES = ("shared", "separate")


@dataclass
class Run:
    topology: str             # shared | separate | model-only
    images: int
    seconds: float
    images_per_s: float
    ratio: float | None = None
    repeat: int = 0
    wall_s: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("topology", "images", "seconds", "images_per_s", "ratio", "repeat",
                                           "wall_s")}
        d.update(self.extra)
        return d


def run_workflow(argv: list[str], rows: list[tuple[str, str]], work: Path, name: str, topology: str,
                 keep: bool) -> Run:
    src = write_listing(work / f"{name}.csv", rows)
    out = work / f"out-{name}"  # a fresh folder: nothing is resumed
    t0 = time.perf_counter()
    rc = restore_main(["--input", str(src), "--output", str(out), "--topology", topology, *argv])
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"workflow exited with {rc} on {name}")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    if summary["ok"] != len(rows) or summary["error"]:
        raise SystemExit(f"{name}: {summary['ok']} ok, {summary['error']} error of {len(rows)} inputs; "
                         f"see {out}/manifest")
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return Run(topology, summary["ok"], summary["seconds"], summary["ok"] / summary["seconds"], wall_s=wall,
               extra={"summary_images_per_s": summary["images_per_s"]})


class ModelOnly:
    """RestoreStage (DR2 + enhancer, as one shared-topology actor) on pre-decoded images, in this process."""

    def __init__(self, cfg: RestoreConfig, rows: list[tuple[str, str]]):
        t0 = time.perf_counter()
        self.stage = RestoreStage(cfg.dr2, cfg.enhancer, cfg.runtime, seed=cfg.seed)  # torch threads as the actor
        self.build_s = time.perf_counter() - t0
        self.threads = torch.get_num_threads()
        self.cuda = self.stage.dr2.device.type == "cuda"
        self.batch = cfg.runtime.batch_size
        self.ids = [i for _, i in rows]
        specs = {"N": cfg.dr2.N, "tau": cfg.dr2.tau}
        drawn = [draw_params(cfg.seed, i, specs) for i in self.ids]  # as LoadFaces draws them
        self.n_param = np.array([int(p["N"]) for p in drawn], np.int64)
        self.tau_param = np.array([int(p["tau"]) for p in drawn], np.int64)
        self.images = np.stack([prepare_face(decode_image(Path(u).read_bytes(), max_pixels=cfg.image.max_pixels,
                                                          min_side=cfg.image.min_side)[0],
                                             cfg.image.size, cfg.image.non_square) for u, _ in rows])
        self.dr2_s = 0.0
        dr2_x0 = self.stage.dr2.dr2_x0

        def timed_dr2(*a, **kw):  # the DR2 part of RestoreStage.__call__, timed on its own
            t = time.perf_counter()
            x0 = dr2_x0(*a, **kw)
            if self.cuda:
                torch.cuda.synchronize()  # the stage's next step (to_uint8) waits for DR2 anyway
            self.dr2_s += time.perf_counter() - t
            return x0

        self.stage.dr2.dr2_x0 = timed_dr2

    def batches(self):
        for i in range(0, len(self.ids), self.batch):
            sl = slice(i, i + self.batch)
            n = len(self.ids[sl])
            yield {"id": np.array(self.ids[sl], dtype=object), "image": self.images[sl], "N": self.n_param[sl],
                   "tau": self.tau_param[sl], "status": np.array(["ok"] * n, dtype=object)}

    def warmup(self, n_batches: int) -> None:
        for k, batch in enumerate(self.batches()):
            if k >= n_batches:
                break
            self.stage(batch)

    def run(self) -> Run:
        self.dr2_s = 0.0
        t0 = time.perf_counter()
        for batch in self.batches():
            self.stage(batch)  # returns numpy: CUDA work is finished when it returns
        dt = time.perf_counter() - t0
        n = len(self.ids)
        return Run("model-only", n, dt, n / dt, extra={"dr2_s_per_image": self.dr2_s / n,
                                                       "enhancer_s_per_image": (dt - self.dr2_s) / n})


# ----------------------------------------------------------------------------------------------- report

def render_table(rows: list[Run]) -> str:
    head = ["topology", "images", "seconds", "images/s", "ratio"]
    body = [[r.topology, str(r.images), fmt(r.seconds, ".2f"), fmt(r.images_per_s, ".4f"), fmt(r.ratio, ".3f")]
            for r in rows]
    return text_table(head, body)


COLUMNS = """table: topology (shared / separate = workflows.restore end to end with that --topology; model-only =
RestoreStage called in this process on pre-decoded images); images; seconds (workflow: Ray Data drain time from
_summary.json; model-only: the timed loop); images/s; ratio (images/s over shared's). With --repeats R > 1 each
figure is the median over R runs."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=COLUMNS,
                                formatter_class=lambda prog: HelpFormatter(prog, max_help_position=32, width=110))
    dr2_options(p, "DR2")
    g = p.add_argument_group("enhancer (the same in both topologies and the model-only loop)")
    g.add_argument("--enhancer", default="sparnethd",
                   help="--enhancer.name: none | bicubic | sparnethd | a plug-in 'package.module:Class'")
    g.add_argument("--enhancer-size", type=int, default=None,
                   help="--enhancer.size, the hand-over size (DR2's output is bicubic-resized to it); "
                        "default 512 on CUDA, 128 on CPU")
    g.add_argument("--enhancer-kwargs", default=None,
                   help="--enhancer.kwargs as JSON/YAML, e.g. '{min_ch: 16, size: 128}'; default for sparnethd: "
                        f"on CPU a small one {json.dumps(SMALL_SPARNET)} plus size = --enhancer-size, on CUDA the "
                        "full SPARNetHD (at --enhancer-size)")
    g.add_argument("--enhancer-weights", default=None,
                   help="--enhancer.weights; default: random seeded weights (--enhancer.allow-random-weights)")
    g = p.add_argument_group("runtime (the same for both topologies' actors and the model-only loop)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="--runtime.device; auto = cuda when visible")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per actor call (--runtime.batch-size); default 16 on CUDA, 4 on CPU")
    g.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="--runtime.precision (CUDA only; CPU runs fp32)")
    g.add_argument("--num-actors", type=int, default=0,
                   help="--runtime.num-actors: actors per pool (separate has two pools); 0 = one per GPU, 1 on CPU")
    g.add_argument("--gpus-per-actor", type=float, default=1.0,
                   help="--runtime.gpus-per-actor: GPUs of a shared actor; a separate actor gets half")
    g.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="--runtime.cpus-per-actor: Ray CPUs of every actor, and its torch threads on CPU")
    g.add_argument("--torch-threads", type=int, default=0,
                   help="--runtime.torch-threads (0 = cpus-per-actor); the model-only loop uses the same")
    g = p.add_argument_group("ray / workflow")
    g.add_argument("--num-cpus", type=int, default=0,
                   help="Ray CPUs of the local Ray: logical slots, not cores (0 = the host's cores, raised so the "
                        "separate topology's actors leave 2 for the read/write tasks); ignored when Ray is running")
    g.add_argument("--num-gpus", type=int, default=-1, help="GPUs of the local Ray (-1 = autodetect)")
    g.add_argument("--block-rows", type=int, default=None,
                   help="--cluster.block-rows (rows per Ray block, the unit that moves between stages); default: "
                        "the batch size, so a short run streams as a long one does (with the workflow's 64 rows a "
                        "small run is one block, and the separate enhancer pool waits for DR2 to finish all of it)")
    g.add_argument("--workflow-args", default="",
                   help="more workflow options for every run, one shell-quoted string, e.g. \"--write.dr2 true\"")
    g.add_argument("--shared-args", default="",
                   help="workflow options for the shared runs only (and the model-only loop), e.g. "
                        "\"--runtime.torch-threads 2\"")
    g.add_argument("--separate-args", default="", help="workflow options for the separate runs only")
    g.add_argument("--warmup-images", type=int, default=None,
                   help="images of the untimed warm-up run (shared topology; starts Ray's workers); default one "
                        "batch; 0 = no warm-up")
    g.add_argument("--progress", action="store_true", help="show Ray Data progress bars")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=1,
                   help="timed runs per topology, interleaved (shared, separate, separate, shared, ...); medians")
    g.add_argument("--model-only", default=True, action=argparse.BooleanOptionalAction,
                   help="also time the bare RestoreStage loop in this process (the model-only reference)")
    g.add_argument("--model-warmup", type=int, default=1, help="untimed model-only batches before timing")
    g.add_argument("--workdir", default=None, help="where the temporary inputs and outputs go (default: system temp)")
    g.add_argument("--keep", action="store_true", help="keep the temporary inputs and outputs")
    g.add_argument("--json", default=None, help="write every figure (table rows, per-run details, setup) here")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        p.error("--images and --repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark and print its table; returns what --json writes."""
    args = parse_args(argv)
    with kept_state("tasks.dr2_stage", "tasks.restore_stage"):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    import ray

    cuda, arch, size = dr2_setup(args)
    batch = args.batch_size or (16 if cuda else 4)
    esize = args.enhancer_size or (512 if cuda else 128)
    ekwargs = enhancer_kwargs(args, cuda, esize)
    warm_n = batch if args.warmup_images is None else args.warmup_images

    flow = ["--dr2.architecture", arch, "--dr2.N", str(args.N), "--dr2.tau", str(args.tau),
            "--image.size", str(size), "--runtime.batch-size", str(batch),
            "--runtime.device", "cuda" if cuda else "cpu", "--runtime.precision", args.precision,
            "--runtime.cpus-per-actor", str(args.cpus_per_actor), "--runtime.torch-threads", str(args.torch_threads),
            "--runtime.gpus-per-actor", str(args.gpus_per_actor), "--runtime.num-actors", str(args.num_actors),
            "--enhancer.name", args.enhancer, "--enhancer.size", str(esize), "--enhancer.kwargs", json.dumps(ekwargs),
            "--seed", "0"]
    flow += ["--dr2.weights", args.weights] if args.weights else ["--allow-random-weights", "true"]
    flow += (["--enhancer.weights", args.enhancer_weights] if args.enhancer_weights
             else ["--enhancer.allow-random-weights", "true"])
    block_rows = args.block_rows or batch
    flow += ["--cluster.block-rows", str(block_rows)]
    flow += shlex.split(args.workflow_args)
    per_topology = {"shared": flow + shlex.split(args.shared_args), "separate": flow + shlex.split(args.separate_args)}
    cfgs: dict[str, RestoreConfig] = {
        t: load(RestoreConfig, ["--input", "-", "--output", "-", "--topology", t, *a], "",
                ROOT / "configs" / "restore.yaml") for t, a in per_topology.items()}

    work = Path(tempfile.mkdtemp(prefix="bench_restore_", dir=args.workdir))
    started_ray = False
    ctx = None
    progress0 = True
    load_avg: dict[str, tuple[float, ...] | None] = {"start": load_average()}
    try:
        files, root = input_faces(args, work, args.images)
        rows = listing(files, args.images, root)

        started_ray = not ray.is_initialized()
        num_cpus = args.num_cpus
        if started_ray and not num_cpus and not cuda:
            actors = max(1, args.num_actors or 1)
            num_cpus = max(os.cpu_count() or 1, int(np.ceil(2 * actors * args.cpus_per_actor)) + 2)
        init_ray(ClusterConfig(num_cpus=num_cpus, num_gpus=args.num_gpus))
        ctx = ray.data.DataContext.get_current()
        progress0, ctx.enable_progress_bars = ctx.enable_progress_bars, args.progress
        ray_cpus = ray.cluster_resources().get("CPU", 0)
        ray_gpus = ray.cluster_resources().get("GPU", 0)

        if warm_n > 0:
            t0 = time.perf_counter()
            run_workflow(per_topology["shared"], listing(files, warm_n, root), work, "warmup", "shared", args.keep)
            warm_s = time.perf_counter() - t0
        else:
            warm_s = 0.0
        load_avg["after_warmup"] = load_average()
        runs: list[Run] = []
        for rep in range(args.repeats):
            order = TOPOLOGIES if rep % 2 == 0 else TOPOLOGIES[::-1]
            for t in order:
                r = run_workflow(per_topology[t], rows, work, f"{t}-{rep}", t, args.keep)
                r.repeat = rep
                runs.append(r)
                print(f"[bench] {t} run {rep + 1}/{args.repeats}: {r.images_per_s:.4f} images/s "
                      f"({r.seconds:.1f} s)", file=sys.stderr, flush=True)
        model = None
        if args.model_only:
            for lg in ("tasks.dr2_stage", "tasks.restore_stage"):
                logging.getLogger(lg).setLevel(logging.ERROR)  # the random-weights warnings
            model = ModelOnly(cfgs["shared"], rows)
            model.warmup(args.model_warmup)
            for rep in range(args.repeats):
                m = model.run()
                m.repeat = rep
                runs.append(m)
        load_avg["end"] = load_average()
    finally:
        if ctx is not None:
            ctx.enable_progress_bars = progress0
        if started_ray:
            ray.shutdown()
        if args.keep:
            print(f"[bench] kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    def median_run(group: list[Run]) -> Run:
        first = group[0]
        extra = {k: statistics.median(r.extra[k] for r in group) for k in first.extra}
        return Run(first.topology, first.images, statistics.median(r.seconds for r in group),
                   statistics.median(r.images_per_s for r in group), repeat=-1 if len(group) > 1 else 0, extra=extra)

    table = [median_run([r for r in runs if r.topology == t]) for t in (*TOPOLOGIES, "model-only")
             if any(r.topology == t for r in runs)]
    shared = table[0]
    for r in table + runs:
        r.ratio = r.images_per_s / shared.images_per_s

    calls = dr2_model_calls(args.N, args.tau)
    threads = {t: max(1, c.runtime.torch_threads or int(c.runtime.cpus_per_actor)) for t, c in cfgs.items()}
    pools = {t: c.runtime.num_actors or ((int(ray_gpus // c.runtime.gpus_per_actor) or 1) if cuda else 1)
             for t, c in cfgs.items()}  # as tasks.pipeline.actor_pool sizes them
    dev = (f"cuda ({torch.cuda.get_device_name()}, {args.precision})" if cuda else f"cpu ({cpu_name()}, fp32)")
    la = load_avg["start"]
    header = [
        f"restore topologies: DR2 {arch} UNet at {size}x{size}, N={args.N} tau={args.tau} ({calls} UNet forwards/"
        f"image) -> enhancer {args.enhancer} at {esize}x{esize}" + (f" {json.dumps(ekwargs)}" if ekwargs else "")
        + f", batch {batch}, {block_rows} rows per Ray block, device {dev}",
        ("actors: shared = {sa} RestoreStage x {sg:g} GPU; separate = {pa} DR2Stage + {pa} EnhanceStage x {pg:g} GPU"
         .format(sa=pools["shared"], pa=pools["separate"], sg=cfgs["shared"].runtime.gpus_per_actor,
                 pg=cfgs["separate"].runtime.gpus_per_actor / 2) if cuda else
         f"actors: shared = {pools['shared']} RestoreStage x {threads['shared']} torch thread(s); separate = "
         f"{pools['separate']} DR2Stage + {pools['separate']} EnhanceStage x {threads['separate']} torch thread(s)")
        + f" | Ray CPUs {ray_cpus:g}" + (f" GPUs {ray_gpus:g}" if ray_gpus else "")
        + f" | host cores {os.cpu_count()}"
        + (f" | load average {la[0]:.2f} at start, {load_avg['end'][0]:.2f} at end" if la else ""),
        f"inputs: {'synthetic ' + str(args.face_size) + 'px PNG faces' if not args.input else args.input}; weights: "
        f"DR2 {args.weights or 'RANDOM'}, enhancer {args.enhancer_weights or 'RANDOM'} (seeded; speed does not "
        "depend on the values)",
        "workflow seconds = Ray Data drain (_summary.json): actor start-up (process, imports, model build) + read/"
        "decode/resize + DR2 + enhancer + PNG/write + manifest; not listing/planning. "
        f"Untimed warm-up run first ({warm_n} images, {warm_s:.1f} s).",
    ]
    if model is not None:
        header.append(f"model-only seconds = RestoreStage over {len(model.ids)} pre-decoded images in batches of "
                      f"{batch} in this process, {model.threads} torch thread(s), after {args.model_warmup} untimed "
                      f"batch(es); model build {model.build_s:.1f} s not included.")
    print("\n".join(header))
    print(render_table(table))
    lines = []
    by = {r.topology: r for r in table}
    lines.append(f"ratio separate/shared = {by['separate'].ratio:.3f}"
                 + (f" (medians of {args.repeats})" if args.repeats > 1 else ""))
    if args.repeats > 1:
        lines.append("per run images/s: " + " | ".join(
            f"{t} " + ", ".join(f"{r.images_per_s:.4f}" for r in runs if r.topology == t)
            for t in (*TOPOLOGIES, "model-only") if t in by))
    if "model-only" in by:
        m = by["model-only"]
        d, e = m.extra["dr2_s_per_image"], m.extra["enhancer_s_per_image"]
        lines.append(f"model-only split: DR2 {d:.4f} s/image, enhancer (hand-over + network + uint8) {e:.4f} s/image "
                     f"({100 * e / (d + e):.0f}% of the pair); ideal separate pipelining on free hardware = "
                     f"{(d + e) / max(d, e):.2f}x the serial pair")
    print("\n".join(lines))

    result = {
        "meta": dict(arch=arch, size=size, N=args.N, tau=args.tau, forwards_per_image=calls, batch=batch,
                     block_rows=block_rows,
                     device="cuda" if cuda else "cpu",
                     device_name=torch.cuda.get_device_name() if cuda else cpu_name(), precision=args.precision,
                     enhancer=args.enhancer, enhancer_size=esize, enhancer_kwargs=ekwargs,
                     torch_threads=threads, actors_per_pool=pools, ray_cpus=ray_cpus, ray_gpus=ray_gpus,
                     host_cores=os.cpu_count(), load_average=load_avg, torch=torch.__version__,
                     ray=ray.__version__, images=args.images, repeats=args.repeats, warmup_images=warm_n,
                     warmup_seconds=warm_s, model_warmup_batches=args.model_warmup,
                     model_build_seconds=model.build_s if model else None,
                     weights=args.weights or "random (seeded)",
                     enhancer_weights=args.enhancer_weights or "random (seeded)", input=args.input or "synthetic",
                     face_size=args.face_size, workflow_args=per_topology),
        "table": [r.as_dict() for r in table],
        "runs": [r.as_dict() for r in runs],
        "text": "\n".join(header + [render_table(table)] + lines),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Whole augmentation pipeline vs the bare DR2 model loop, on the same images and model, in one process.

    scripts/env.sh python bench/bench_pipeline.py --images 16 --arch tiny --size 64 --batch-size 4 --scale-memory
    scripts/env.sh python bench/bench_pipeline.py --images 256 --scale-memory          # CUDA: ffhq256, bf16

1. N synthetic aligned faces (PNG, --face-size, made from data/samples/*.png with a per-image random affine
   jitter, flip and colour change, so no two are the same) are written to a temporary folder (or taken from
   --input), with CSV listings (uri, id) the workflow reads.
2. A local Ray is started once (tasks.pipeline.init_ray, as the workflow does; an already initialised Ray is
   reused), and a small warm-up run of the workflow starts Ray's worker processes and imports.
3. `workflows.augment.main` runs on the N images (fixed N/tau, random seeded weights unless --weights):
   pipeline images/s = ok / seconds from the run's _summary.json, i.e. the time to drain the Ray Data
   pipeline: DR2 actor start-up (process, imports, model build), read+decode+resize tasks, DR2, blur+PNG
   encode+write of LQ and HQ, the Parquet manifest. Listing, resume planning and the summary are not in it.
4. The bare model loop: the same images are decoded and resized beforehand (tasks.images), then
   DR2Stage(same DR2Config, same RuntimeConfig).dr2_uint8() is timed over all batches in this process, with
   the torch threads one DR2 actor uses (runtime.torch_threads or cpus_per_actor on CPU).
5. Peak memory: a background thread sums the memory of this process and all its descendants (Ray's
   gcs_server, raylet, dashboard, idle workers, tasks, actors) every --mem-interval seconds: RssAnon from
   /proc/<pid>/status by default (private memory: heaps, tensors, decoded images; shared libraries and the
   object store's shared memory are left out, so nothing is counted once per worker), or PSS
   (--mem-metric pss); summed RSS is reported too. Each figure is the peak above the idle level measured just
   before the run, after the previous run's Ray Data workers have exited. Ray's object store use is sampled
   from the raylet. --scale-memory also runs the pipeline on 10N images: streaming should keep the peak flat.

Weights are random unless --weights is given: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/bench_pipeline.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import HelpFormatter, cpu_name, dr2_setup, fmt, kept_state, load_average, text_table  # noqa: E402
from models.dr2 import DR2Params, dr2_model_calls  # noqa: E402
from tasks.config import load  # noqa: E402
from tasks.dr2_stage import DR2Stage  # noqa: E402
from tasks.images import decode_image, prepare_face  # noqa: E402
from tasks.listing import IMAGE_EXTENSIONS  # noqa: E402
from tasks.load_stage import draw_params  # noqa: E402
from tasks.manifest import SUMMARY_FILE  # noqa: E402
from tasks.pipeline import ROOT, ClusterConfig, init_ray  # noqa: E402
from tasks.runtime import NETWORK_CLOCK, PRECISIONS  # noqa: E402
from workflows.augment import AugmentConfig  # noqa: E402
from workflows.augment import main as augment_main  # noqa: E402

SAMPLES = ROOT / "data" / "samples"
MIB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ----------------------------------------------------------------------------------------------- inputs

def synthetic_faces(folder: Path, count: int, face_size: int, seed: int = 0) -> list[Path]:
    """`count` distinct square PNG faces made from data/samples/*.png (jitter, flip, colour)."""
    sources = [cv2.imread(p, cv2.IMREAD_COLOR) for p in sorted(glob.glob(str(SAMPLES / "*.png")))]
    sources = [cv2.resize(s, (face_size, face_size), interpolation=cv2.INTER_AREA if s.shape[0] > face_size
                          else cv2.INTER_CUBIC) for s in sources if s is not None]
    if not sources:
        raise SystemExit(f"no sample faces under {SAMPLES}: pass --input")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        img = sources[i % len(sources)]
        c = face_size / 2
        m = cv2.getRotationMatrix2D((c, c), rng.uniform(-6, 6), rng.uniform(0.94, 1.06))
        m[:, 2] += rng.uniform(-0.02, 0.02, 2) * face_size
        img = cv2.warpAffine(img, m, (face_size, face_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        gain = rng.uniform(0.9, 1.1, 3) * rng.uniform(0.9, 1.1)
        img = np.clip(img.astype(np.float32) * gain + rng.uniform(-12, 12), 0, 255).astype(np.uint8)
        p = folder / f"face_{i:06d}.png"
        if not cv2.imwrite(str(p), img):
            raise OSError(f"cannot write {p}")
        paths.append(p)
    return paths


def input_files(folder: str) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"--input {folder}: not a local folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"--input {folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def input_faces(args: argparse.Namespace, work: Path, count: int) -> tuple[list[Path], Path | None]:
    """(files, root): the images under --input, else `count` synthetic faces written under `work`."""
    if args.input:
        return input_files(args.input), Path(args.input)
    t0 = time.perf_counter()
    files = synthetic_faces(work / "faces", count, args.face_size)
    print(f"[bench] {count} synthetic {args.face_size}x{args.face_size} faces in "
          f"{time.perf_counter() - t0:.1f} s under {work}", file=sys.stderr, flush=True)
    return files, None


def input_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "images" group with the options input_faces reads: --images, --input, --face-size."""
    g = p.add_argument_group("images")
    g.add_argument("--images", type=int, default=16, help="N: images per timed run")
    g.add_argument("--input", default=None,
                   help="a local folder of square aligned faces to use instead of synthetic ones (cycled, with "
                        "their own ids, when it holds fewer than the run needs)")
    g.add_argument("--face-size", type=int, default=512, help="side of the synthetic input faces (PNG)")
    return g


def dr2_options(p: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """input_options plus --size, and a `title` group with the DR2 options dr2_setup reads."""
    input_options(p).add_argument("--size", type=int, default=None,
                                  help="DR2 model size (--image.size); default 256 for ffhq256, 64 for tiny")
    g = p.add_argument_group(title)
    g.add_argument("--arch", choices=("tiny", "ffhq256"), default=None,
                   help="DR2 UNet (--dr2.architecture); default ffhq256 when the DR2 device is CUDA, else tiny")
    g.add_argument("--weights", default=None,
                   help="DR2 weights (--dr2.weights); default: random seeded weights (--allow-random-weights), "
                        "which run at the same speed")
    g.add_argument("--N", type=int, default=4, help="DR2 low-pass factor N, fixed for every sample (--dr2.N)")
    g.add_argument("--tau", type=int, default=22, help="DR2 last step tau, fixed for every sample (--dr2.tau)")
    return g


def listing(files: list[Path], count: int, root: Path | None) -> list[tuple[str, str]]:
    """(uri, id) for `count` samples, cycling through `files` (repeats get their own id: r<k>/<name>)."""
    rows = []
    for i in range(count):
        f = files[i % len(files)]
        name = f.relative_to(root).as_posix() if root else f.name
        rep = i // len(files)
        rows.append((str(f.resolve()), name if rep == 0 else f"r{rep:03d}/{name}"))
    return rows


def write_listing(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "id"])
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class Proc:
    ppid: int
    comm: str   # the kernel's 15-character name: Ray titles its workers ray::IDLE, ray::MapWorker(...
    nice: int
    cpu_ticks: int  # utime + stime


def proc_table() -> dict[int, Proc]:
    """Every process's parent, name and niceness, from /proc/<pid>/stat."""
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    text = f.read()
                comm = text[text.index("(") + 1:text.rindex(")")]
                rest = text[text.rindex(")") + 2:].split()
                table[int(d)] = Proc(int(rest[1]), comm, int(rest[16]), int(rest[11]) + int(rest[12]))
            except (OSError, IndexError, ValueError):
                continue
    return table


def process_tree(roots: Sequence[int], table: dict[int, Proc] | None = None) -> list[int]:
    table = proc_table() if table is None else table
    kids: dict[int, list[int]] = {}
    for pid, p in table.items():
        kids.setdefault(p.ppid, []).append(pid)
    seen, out = set(), list(roots)
    i = 0
    while i < len(out):
        if out[i] not in seen:
            seen.add(out[i])
            out += kids.get(out[i], [])
        i += 1
    return sorted(seen)


def process_memory(pid: int, metric: str) -> tuple[int, int] | None:
    """(metric, RSS) bytes of one process; None when it is gone or unreadable.

    metric "anon": RssAnon from /proc/<pid>/status (private heap, tensors, buffers; a counter, so cheap);
    "pss": Pss from /proc/<pid>/smaps_rollup (walks the page tables: ~5-20 ms for a torch process).
    """
    name, key = ("smaps_rollup", "Pss") if metric == "pss" else ("status", "RssAnon")
    rss_key = "Rss" if metric == "pss" else "VmRSS"
    try:
        with open(f"/proc/{pid}/{name}") as f:
            text = f.read()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in (key + ":", rss_key + ":"):
            kb[parts[0][:-1]] = int(parts[1])
    if key not in kb or rss_key not in kb:
        return None  # a kernel thread or a zombie
    return kb[key] * 1024, kb[rss_key] * 1024


def pipeline_processes_busy(roots: Sequence[int]) -> bool:
    """Whether a Ray Data map actor or task of a previous run is still alive (Ray titles them ray::Map...)."""
    table = proc_table()
    return any(table[pid].comm.startswith("ray::Map") for pid in process_tree(roots, table) if pid in table)


def ray_session_roots() -> list[int]:
    """Ray processes that are not our descendants (a Ray started elsewhere): found by session name."""
    try:
        import ray

        name = ray._private.worker._global_node.session_name
    except Exception:
        return []
    roots = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if name.encode() in f.read():
                        roots.append(int(d))
            except OSError:
                continue
    return roots


class ObjectStoreProbe:
    """Bytes used in Ray's object store, from the raylet (one small gRPC call); None if unavailable."""

    def __init__(self):
        self.stub = self.channel = None
        try:
            import ray
            from ray._private.grpc_utils import init_grpc_channel
            from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

            node = next(n for n in ray.nodes() if n["Alive"])
            self.channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
            self.stub = node_manager_pb2_grpc.NodeManagerServiceStub(self.channel)
            self.request = node_manager_pb2.FormatGlobalMemoryInfoRequest(include_memory_info=False)
            self()
        except Exception as e:  # a private API: the benchmark goes on without this figure
            logging.getLogger("bench").info("object store usage unavailable: %s", e)
            self.stub = None

    def __call__(self) -> int | None:
        if self.stub is None:
            return None
        try:
            return int(self.stub.FormatGlobalMemoryInfo(self.request, timeout=5).store_stats.object_store_bytes_used)
        except Exception:
            return None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = self.stub = None


@dataclass
class MemoryPeak:
    metric: str = "anon"
    baseline_mem: int = 0
    baseline_rss: int = 0
    peak_mem: int = 0
    peak_rss: int = 0
    peak_processes: int = 0
    store_baseline: int | None = None
    store_peak: int | None = None
    samples: int = 0
    sampler_cpu_s: float = 0.0
    settle_s: float = 0.0
    map_worker_nice: list[int] = field(default_factory=list)  # niceness of the Ray Data workers seen
    actor_ticks: dict[int, int] = field(default_factory=dict)  # CPU ticks of each actor (ray::MapWorker) seen

    @property
    def actor_cpu_s(self) -> float | None:
        return sum(self.actor_ticks.values()) / CLOCK_TICKS if self.actor_ticks else None

    @property
    def mem_delta_mib(self) -> float:
        return (self.peak_mem - self.baseline_mem) / MIB

    @property
    def rss_delta_mib(self) -> float:
        return (self.peak_rss - self.baseline_rss) / MIB

    @property
    def store_peak_mib(self) -> float | None:
        return None if self.store_peak is None else self.store_peak / MIB

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.pop("actor_ticks")
        d.update(actor_cpu_s=self.actor_cpu_s, mem_delta_mib=round(self.mem_delta_mib, 1),
                 rss_delta_mib=round(self.rss_delta_mib, 1),
                 store_peak_mib=None if self.store_peak is None else round(self.store_peak_mib, 1))
        return d


class MemorySampler:
    """Samples the summed memory of this process tree (+ Ray's processes) in a thread; `with` runs it."""

    def __init__(self, interval: float, metric: str, store: ObjectStoreProbe | None, extra_roots: Sequence[int] = ()):
        self.interval, self.store, self.roots = interval, store, [os.getpid(), *extra_roots]
        self.metric = metric
        self.available = os.path.exists(f"/proc/{os.getpid()}/" + ("smaps_rollup" if metric == "pss" else "status"))
        self.result = MemoryPeak(metric=metric)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> tuple[int, int, int]:
        mem = rss = n = 0
        table = proc_table()
        for pid in process_tree(self.roots, table):
            p = table.get(pid)
            if p and p.comm.startswith("ray::Map") and p.nice not in self.result.map_worker_nice:
                self.result.map_worker_nice.append(p.nice)
            if p and p.comm.startswith("ray::MapWorker"):  # the DR2 actor (a fused map on CPU)
                self.result.actor_ticks[pid] = p.cpu_ticks
            m = process_memory(pid, self.metric)
            if m:
                mem, rss, n = mem + m[0], rss + m[1], n + 1
        return mem, rss, n

    def baseline(self, samples: int = 3, settle_timeout: float = 60.0) -> None:
        """Idle level: wait for the previous run's Ray Data workers to exit, then average a few samples."""
        if not self.available:
            return
        t0 = time.perf_counter()
        while pipeline_processes_busy(self.roots) and time.perf_counter() - t0 < settle_timeout:
            time.sleep(0.2)
        time.sleep(0.5)
        self.result.settle_s = time.perf_counter() - t0
        got = []
        for _ in range(samples):
            got.append(self.sample())
            time.sleep(self.interval)
        self.result.baseline_mem = int(statistics.mean(g[0] for g in got))
        self.result.baseline_rss = int(statistics.mean(g[1] for g in got))
        self.result.store_baseline = self.store() if self.store else None

    def _run(self) -> None:
        r, t0 = self.result, time.thread_time()
        while True:
            mem, rss, n = self.sample()
            r.peak_mem, r.peak_rss = max(r.peak_mem, mem), max(r.peak_rss, rss)
            r.peak_processes = max(r.peak_processes, n)
            used = self.store() if self.store else None
            if used is not None:
                r.store_peak = max(r.store_peak or 0, used)
            r.samples += 1
            r.sampler_cpu_s = time.thread_time() - t0
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemorySampler:
        if self.available:
            self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ----------------------------------------------------------------------------------------------- runs

@dataclass
class Run:
    mode: str                 # pipeline | pipeline-marginal | model-only
    images: int
    seconds: float
    images_per_s: float
    ratio: float | None = None
    memory: MemoryPeak | None = None
    repeat: int = 0
    wall_s: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("mode", "images", "seconds", "images_per_s", "ratio", "repeat", "wall_s")}
        d["memory"] = self.memory.as_dict() if self.memory else None
        d.update(self.extra)
        return d


def run_pipeline(argv: list[str], rows: list[tuple[str, str]], work: Path, name: str, args,
                 store: ObjectStoreProbe | None, extra_roots: Sequence[int]) -> Run:
    src = write_listing(work / f"{name}.csv", rows)
    out = work / f"out-{name}"
    sampler = MemorySampler(args.mem_interval, args.mem_metric, store, extra_roots)
    sampler.baseline()
    t0 = time.perf_counter()
    with sampler:
        rc = augment_main(["--input", str(src), "--output", str(out), *argv])
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"workflow exited with {rc} on {name}")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    if summary["ok"] != len(rows) or summary["error"]:
        raise SystemExit(f"{name}: {summary['ok']} ok, {summary['error']} error of {len(rows)} inputs; "
                         f"see {out}/manifest")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return Run("pipeline", summary["ok"], summary["seconds"], summary["ok"] / summary["seconds"],
               memory=sampler.result, wall_s=wall, extra={"summary_images_per_s": summary["images_per_s"],
                                                          "actor_busy": summary.get("actor_utilisation"),
                                                          "network_share": summary.get("network_share")})


class ModelOnly:
    """The bare DR2 loop on pre-decoded images, with the pipeline's own DR2Config/RuntimeConfig."""

    def __init__(self, cfg: AugmentConfig, rows: list[tuple[str, str]]):
        t0 = time.perf_counter()
        self.stage = DR2Stage(cfg.dr2, cfg.runtime, seed=cfg.seed)  # sets torch threads as the actor does
        self.build_s = time.perf_counter() - t0
        self.threads = torch.get_num_threads()
        self.batch = cfg.runtime.batch_size
        self.ids = [i for _, i in rows]
        specs = {"N": cfg.dr2.N, "tau": cfg.dr2.tau}
        drawn = [draw_params(cfg.seed, i, specs) for i in self.ids]  # as LoadFaces draws them
        self.params = [DR2Params.of(int(p["N"]), int(p["tau"])) for p in drawn]
        t0 = time.perf_counter()  # what LoadFaces does per image (read, decode, square check, resize)
        self.images = np.stack([prepare_face(decode_image(Path(u).read_bytes(), max_pixels=cfg.image.max_pixels,
                                                          min_side=cfg.image.min_side)[0],
                                             cfg.image.size, cfg.image.non_square) for u, _ in rows])
        self.decode_s_per_image = (time.perf_counter() - t0) / len(rows)

    def batches(self):
        for i in range(0, len(self.ids), self.batch):
            yield self.images[i:i + self.batch], self.ids[i:i + self.batch], self.params[i:i + self.batch]

    def warmup(self, n_batches: int) -> None:
        for k, (x, ids, p) in enumerate(self.batches()):
            if k >= n_batches:
                break
            self.stage.dr2_uint8(x, ids, p)

    def run(self, interval: float, metric: str, store: ObjectStoreProbe | None, extra_roots: Sequence[int]) -> Run:
        sampler = MemorySampler(interval, metric, store, extra_roots)
        sampler.baseline()
        with sampler:
            NETWORK_CLOCK.take()
            t0, c0 = time.perf_counter(), time.process_time()
            for x, ids, p in self.batches():
                self.stage.dr2_uint8(x, ids, p)  # returns numpy: CUDA work is finished when it returns
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            network = NETWORK_CLOCK.take()
        n = len(self.ids)
        # this process's CPU time (all its threads) less the memory sampler's
        return Run("model-only", n, dt, n / dt, memory=sampler.result,
                   extra={"cpu_s": cpu - sampler.result.sampler_cpu_s, "network_share": network / dt})


# ----------------------------------------------------------------------------------------------- report

def render_table(rows: list[Run]) -> str:
    head = ["mode", "images", "seconds", "images/s", "ratio", "mem_MiB", "rss_MiB", "store_MiB", "busy%", "net%"]
    body = []

    def pct(r: Run, key: str) -> str:
        return fmt(100 * r.extra[key] if r.extra.get(key) is not None else None, ".0f")

    for r in rows:
        m = r.memory
        body.append([r.mode, str(r.images), fmt(r.seconds, ".2f"), fmt(r.images_per_s, ".4f"), fmt(r.ratio, ".3f"),
                     fmt(m.mem_delta_mib if m and m.samples else None, ".0f"),
                     fmt(m.rss_delta_mib if m and m.samples else None, ".0f"),
                     fmt(m.store_peak_mib if m else None, ".1f"), pct(r, "actor_busy"), pct(r, "network_share")])
    return text_table(head, body)


COLUMNS = """table: mode (pipeline = workflows.augment end to end; pipeline-marginal = (10N - N) images over the extra
seconds the 10N run took, i.e. without the fixed start-up and drain cost; model-only = DR2Stage.dr2_uint8 over all
batches); images; seconds (pipeline: drain time from _summary.json; model-only: the timed loop); images/s; ratio
(images/s over model-only's); mem_MiB / rss_MiB (peak of the summed --mem-metric / RSS of this process and every
Ray process, above the idle level just before the run); store_MiB (peak bytes in Ray's object store in the run);
busy% (pipeline: the DR2 actors' time inside their stage over actors x drain time, from _summary.json);
net% (time in UNet forwards over the stage time (pipeline) or the loop time (model-only): the rest is the
sampler around the network, host transfers and conversions).
With --repeats R > 1 the N-image rows are medians over R interleaved pipeline/model-only pairs."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=COLUMNS,
                                formatter_class=lambda prog: HelpFormatter(prog, max_help_position=32, width=110))
    dr2_options(p, "model")
    g = p.add_argument_group("runtime (the same for the pipeline's DR2 actor and the model-only loop)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="--runtime.device; auto = cuda when visible")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per DR2 call (--runtime.batch-size); default 16 on CUDA, 4 on CPU")
    g.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="--runtime.precision (CUDA only; CPU runs fp32)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="--runtime.cpus-per-actor: Ray CPUs of the DR2 actor, and its torch threads on CPU")
    g.add_argument("--torch-threads", type=int, default=0,
                   help="--runtime.torch-threads (0 = cpus-per-actor); the model-only loop uses the same")
    g.add_argument("--num-actors", type=int, default=0, help="--runtime.num-actors (0 = one per GPU, 1 on CPU)")
    g = p.add_argument_group("ray / pipeline")
    g.add_argument("--num-cpus", type=int, default=0, help="CPUs of the local Ray (0 = all cores)")
    g.add_argument("--num-gpus", type=int, default=-1, help="GPUs of the local Ray (-1 = autodetect)")
    g.add_argument("--worker-niceness", type=int, default=None,
                   help="niceness of the local Ray's workers (RAY_worker_niceness). Default: this process's, so the "
                        "DR2 actor and the in-process model-only loop get the same CPU priority. Ray's own default "
                        "is 15, which starves the pipeline on a machine shared with other work; ignored (and "
                        "reported) when Ray is already running")
    g.add_argument("--block-rows", type=int, default=None,
                   help="--cluster.block-rows (input rows per read task); default: the workflow's config")
    g.add_argument("--manifest-rows", type=int, default=None,
                   help="--cluster.manifest-rows; default: the workflow's config")
    g.add_argument("--pipeline-args", default="",
                   help="more workflow options, one shell-quoted string, e.g. \"--write.hq false\"")
    g.add_argument("--warmup-images", type=int, default=None,
                   help="images of the untimed warm-up run (starts Ray's workers); default one DR2 batch; "
                        "0 = no warm-up")
    g.add_argument("--progress", action="store_true", help="show Ray Data progress bars")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=1,
                   help="interleaved (pipeline, model-only) pairs on N images; the table shows medians")
    g.add_argument("--model-warmup", type=int, default=1, help="untimed model-only batches before timing")
    g.add_argument("--scale-memory", action="store_true",
                   help="also run the pipeline on --scale x N images (peak memory should stay flat)")
    g.add_argument("--scale", type=int, default=10, help="image multiple of the --scale-memory run")
    g.add_argument("--mem-interval", type=float, default=0.2, help="seconds between memory samples")
    g.add_argument("--mem-metric", choices=("anon", "pss"), default="anon",
                   help="per-process memory summed in mem_MiB: anon = RssAnon (/proc/<pid>/status: private "
                        "memory, cheap to read), pss = proportional set size (/proc/<pid>/smaps_rollup: exact "
                        "for shared pages but ~100 ms of CPU per sample for a Ray cluster)")
    g.add_argument("--workdir", default=None, help="where the temporary inputs and outputs go (default: system temp)")
    g.add_argument("--keep", action="store_true", help="keep the temporary inputs and outputs")
    g.add_argument("--json", default=None, help="write every figure (table rows, per-run details, setup) here")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.scale < 2:
        p.error("--images and --repeats must be >= 1, --scale >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark and print its table; returns what --json writes."""
    args = parse_args(argv)
    with kept_state("tasks.dr2_stage"):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    import ray

    cuda, arch, size = dr2_setup(args)
    batch = args.batch_size or (16 if cuda else 4)
    params = DR2Params.of(args.N, args.tau)
    warm_n = batch if args.warmup_images is None else args.warmup_images

    flow = ["--dr2.architecture", arch, "--dr2.N", str(args.N), "--dr2.tau", str(args.tau),
            "--image.size", str(size), "--runtime.batch-size", str(batch),
            "--runtime.device", "cuda" if cuda else "cpu", "--runtime.precision", args.precision,
            "--runtime.cpus-per-actor", str(args.cpus_per_actor), "--runtime.torch-threads", str(args.torch_threads),
            "--runtime.num-actors", str(args.num_actors), "--seed", "0"]
    flow += ["--dr2.weights", args.weights] if args.weights else ["--allow-random-weights", "true"]
    flow += ["--cluster.block-rows", str(args.block_rows)] if args.block_rows else []
    flow += ["--cluster.manifest-rows", str(args.manifest_rows)] if args.manifest_rows else []
    flow += shlex.split(args.pipeline_args)
    cfg: AugmentConfig = load(AugmentConfig, ["--input", "-", "--output", "-", *flow], "",
                              ROOT / "configs" / "augment.yaml")

    nice0 = os.getpriority(os.PRIO_PROCESS, 0)
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_", dir=args.workdir))
    started_ray = False
    store = ctx = None
    progress0 = True
    try:
        total = args.images * (args.scale if args.scale_memory else 1)
        files, root = input_faces(args, work, total)
        rows_n = listing(files, args.images, root)
        rows_big = listing(files, total, root) if args.scale_memory else []

        started_ray = not ray.is_initialized()
        saved_env = os.environ.get("RAY_worker_niceness")
        if started_ray:  # the raylet reads RAY_<config> variables from its environment
            os.environ["RAY_worker_niceness"] = str(nice0 if args.worker_niceness is None else args.worker_niceness)
        try:
            init_ray(ClusterConfig(num_cpus=args.num_cpus, num_gpus=args.num_gpus))
        finally:
            if saved_env is None:
                os.environ.pop("RAY_worker_niceness", None)
            else:
                os.environ["RAY_worker_niceness"] = saved_env
        ctx = ray.data.DataContext.get_current()
        progress0, ctx.enable_progress_bars = ctx.enable_progress_bars, args.progress
        ray_cpus = ray.cluster_resources().get("CPU", 0)
        store = ObjectStoreProbe()
        extra_roots = [p for p in ray_session_roots() if p not in process_tree([os.getpid()])]

        if warm_n > 0:
            t0 = time.perf_counter()
            run_pipeline(flow, listing(files, warm_n, root), work, "warmup", args, store, extra_roots)
            warm_s = time.perf_counter() - t0
        else:
            warm_s = 0.0
        runs: list[Run] = []
        model = None

        def done(r: Run) -> None:  # progress on stderr: a long run that dies still leaves its figures
            runs.append(r)
            m = r.memory
            print(f"[bench] {r.mode} {r.images} images: {r.seconds:.2f} s, {r.images_per_s:.4f} images/s"
                  + (f", peak {args.mem_metric} +{m.mem_delta_mib:.0f} MiB, RSS +{m.rss_delta_mib:.0f} MiB"
                     if m and m.samples else ""), file=sys.stderr, flush=True)

        for rep in range(args.repeats):
            r = run_pipeline(flow, rows_n, work, f"n-{rep}", args, store, extra_roots)
            r.repeat = rep
            done(r)
            if rep == 0 and args.scale_memory:
                done(run_pipeline(flow, rows_big, work, "scaled", args, store, extra_roots))
            if model is None:
                logging.getLogger("tasks.dr2_stage").setLevel(logging.ERROR)  # the random-weights warning
                model = ModelOnly(cfg, rows_n)
                model.warmup(args.model_warmup)
            m = model.run(args.mem_interval, args.mem_metric, store, extra_roots)
            m.repeat = rep
            done(m)
        threads = model.threads
    finally:
        if store is not None:
            store.close()
        if ctx is not None:
            ctx.enable_progress_bars = progress0
        if started_ray:
            ray.shutdown()
        if args.keep:
            print(f"[bench] kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    def pick(mode: str, images: int) -> list[Run]:
        return [r for r in runs if r.mode == mode and r.images == images]

    def median_run(group: list[Run]) -> Run:
        ips = statistics.median(r.images_per_s for r in group)
        first = group[0]
        extra = {}
        for key in ("actor_busy", "network_share"):
            vals = [r.extra[key] for r in group if r.extra.get(key) is not None]
            if vals:
                extra[key] = statistics.median(vals)
        return Run(first.mode, first.images, statistics.median(r.seconds for r in group), ips,
                   memory=first.memory, repeat=-1 if len(group) > 1 else 0, extra=extra)

    model_row = median_run(pick("model-only", args.images))
    pipe_row = median_run(pick("pipeline", args.images))
    table = [pipe_row]
    if args.scale_memory:
        big = pick("pipeline", total)[0]
        small = pick("pipeline", args.images)[0]
        table.append(big)
        extra_s = big.seconds - small.seconds
        if extra_s > 0:
            table.append(Run("pipeline-marginal", total - args.images, extra_s, (total - args.images) / extra_s))
    table.append(model_row)
    for r in table + runs:
        r.ratio = r.images_per_s / model_row.images_per_s

    calls = dr2_model_calls(params.N, params.tau)
    actors = str(cfg.runtime.num_actors) if cfg.runtime.num_actors else ("one per GPU" if cuda else "1")
    load_avg = load_average()
    mem_n = pick("pipeline", args.images)[0].memory
    worker_nice = sorted({v for r in runs if r.memory for v in r.memory.map_worker_nice})
    header = [
        f"pipeline vs model-only: {arch} UNet at {size}x{size}, N={params.N} tau={params.tau} (omega={params.omega},"
        f" {calls} UNet forwards/image), batch {batch}, device {'cuda' if cuda else 'cpu'}"
        + (f" ({torch.cuda.get_device_name()}, {args.precision})" if cuda else f" ({cpu_name()}, fp32)"),
        f"torch threads: {threads} in the model-only loop = the DR2 actor's (runtime.torch_threads or cpus_per_actor)"
        f" | Ray CPUs {ray_cpus:g} | DR2 actors {actors}"
        f" | host cores {os.cpu_count()}" + (f" | load average {load_avg[0]:.2f}" if load_avg else ""),
        f"CPU priority (niceness): model-only loop {nice0}, pipeline's Ray Data workers "
        f"{','.join(map(str, worker_nice)) or '?'}" + ("" if worker_nice in ([], [nice0]) else
                                                        "  <- NOT EQUAL: the ratio is unfair on a busy machine"),
        f"inputs: {'synthetic ' + str(args.face_size) + 'px PNG faces' if not args.input else args.input}; weights: "
        f"{args.weights or 'RANDOM, seeded (speed does not depend on the values)'}",
        "pipeline seconds = Ray Data drain (_summary.json): DR2 actor start-up (process, imports, model build) + "
        "read/decode/resize + DR2 + blur/PNG/write + manifest; not listing/planning. "
        + (f"Untimed warm-up run first ({warm_n} images, {warm_s:.1f} s): Ray worker start-up is not in the figures."
         if warm_n else "No warm-up run: Ray worker start-up IS in the first pipeline figure."),
        f"model-only seconds = DR2Stage.dr2_uint8 over {len(model.ids)} pre-decoded images in batches of {batch}, "
        f"after {args.model_warmup} untimed batch(es); model build {model.build_s:.1f} s not included; "
        f"read+decode+resize beforehand: {1e3 * model.decode_s_per_image:.1f} ms/image (this process)",
    ]
    print("\n".join(header))
    print(render_table(table))
    verdict = pipe_row.ratio >= 0.9
    lines = [f"ratio pipeline/model-only = {pipe_row.ratio:.3f} on {args.images} images "
             f"({'meets' if verdict else 'BELOW'} the 0.9 target)"]
    if args.repeats > 1:
        lines.append("per repeat images/s: pipeline " + ", ".join(f"{r.images_per_s:.4f}" for r in
                                                                  pick("pipeline", args.images))
                     + " | model-only " + ", ".join(f"{r.images_per_s:.4f}" for r in pick("model-only", args.images)))
    if args.scale_memory:
        mem_big = pick("pipeline", total)[0].memory
        if mem_n and mem_big and mem_n.samples and mem_big.samples:
            growth = mem_big.mem_delta_mib / mem_n.mem_delta_mib if mem_n.mem_delta_mib > 0 else float("nan")
            lines.append(f"peak memory above idle ({args.mem_metric}): {mem_n.mem_delta_mib:.0f} MiB for "
                         f"{args.images} images, {mem_big.mem_delta_mib:.0f} MiB for {total} ({growth:.2f}x for "
                         f"{args.scale}x the images; flat = about 1x); RSS {mem_n.rss_delta_mib:.0f} -> "
                         f"{mem_big.rss_delta_mib:.0f} MiB")
        if "pipeline-marginal" in [r.mode for r in table]:
            marg = table[2]
            lines.append(f"marginal pipeline rate (without fixed start-up/drain): {marg.images_per_s:.4f} images/s "
                         f"= {marg.ratio:.3f} x model-only")
    model_cpu = statistics.median(r.extra["cpu_s"] / r.images for r in pick("model-only", args.images))
    model_share = statistics.median(r.extra["cpu_s"] / r.seconds for r in pick("model-only", args.images))
    pipes = [r for r in runs if r.mode == "pipeline" and r.memory and r.memory.actor_cpu_s]
    if pipes:
        parts = [f"{r.memory.actor_cpu_s / r.images:.3f} ({r.images} images, on CPU "
                 f"{100 * r.memory.actor_cpu_s / r.seconds:.0f}% of the run)" for r in pipes]
        big_runs = [r for r in pipes if r.images == total and args.scale_memory]
        small_runs = [r for r in pipes if r.images == args.images]
        if big_runs and small_runs and args.scale_memory:
            marginal_cpu = (big_runs[0].memory.actor_cpu_s - small_runs[0].memory.actor_cpu_s) / (total - args.images)
            parts.append(f"{marginal_cpu:.3f} marginal")
        lines.append(f"CPU s/image: model-only loop {model_cpu:.3f} (on CPU {100 * model_share:.0f}% of the loop); "
                     "DR2 actor (with its start-up"
                     + (" and the fused read/decode" if not cuda else "") + ") " + ", ".join(parts))
    samplers = [r.memory for r in runs if r.memory and r.memory.samples]
    if samplers:
        cpu = sum(m.sampler_cpu_s for m in samplers) / max(1e-9, sum(r.seconds for r in runs if r.memory))
        lines.append(f"memory sampler: every {args.mem_interval:g} s, {cpu * 100:.1f}% of one core while sampling")
    else:
        lines.append("memory: not sampled (needs Linux /proc)")
    print("\n".join(lines))

    result = {
        "meta": dict(arch=arch, size=size, N=params.N, tau=params.tau, omega=params.omega, forwards_per_image=calls,
                     batch=batch, device="cuda" if cuda else "cpu",
                     device_name=torch.cuda.get_device_name() if cuda else cpu_name(), precision=args.precision,
                     torch_threads=threads, ray_cpus=ray_cpus, driver_niceness=nice0, worker_niceness=worker_nice,
                     host_cores=os.cpu_count(), load_average=load_avg,
                     torch=torch.__version__, ray=ray.__version__, images=args.images, scale=args.scale,
                     scale_memory=args.scale_memory, repeats=args.repeats, warmup_images=warm_n,
                     warmup_seconds=warm_s, model_warmup_batches=args.model_warmup,
                     model_build_seconds=model.build_s, decode_seconds_per_image=model.decode_s_per_image,
                     mem_interval=args.mem_interval,
                     weights=args.weights or "random (seeded)", input=args.input or "synthetic",
                     face_size=args.face_size, workflow_args=flow),
        "table": [r.as_dict() for r in table],
        "runs": [r.as_dict() for r in runs],
        "text": "\n".join(header + [render_table(table)] + lines),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

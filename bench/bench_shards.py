#!/usr/bin/env python
"""Shards vs loose files: driver planning cost, object-store requests per image, end-to-end images/s.

    scripts/env.sh python bench/bench_shards.py planning --counts 10000 100000 1000000 --per-shard 1000
    scripts/env.sh python bench/bench_shards.py requests --count 2000 --shard-size 1000
    scripts/env.sh python bench/bench_shards.py throughput --count 48

planning: synthetic placeholder datasets (bench/make_dataset.py) as loose files and as WebDataset tars; each
  figure is taken in a FRESH process (forked from a forkserver that only imported what a workflow's driver
  imports, torch included), so its peak memory is the planning's own: peak_MiB = VmHWM of that process,
  +MiB = VmHWM after the call minus VmRSS before it (a forked process maps fewer shared-library pages: its
  peak_MiB is below a driver's, +MiB is the same). files = tasks.pipeline.plan (lists every file into the
  sample table, resume on, empty output); shards = tasks.units.plan_units (lists the tars). Resume: shards =
  plan_units over an output whose manifest has a committed marker for every chunk (names only: plan_units reads no row);
  files = tasks.manifest.committed_ids over a manifest of real Parquet shards (cluster.manifest-rows rows each,
  the workflow's columns), the read a files-mode resume does before it can skip anything.
requests: loose 32 px PNGs on S3 (SeaweedFS started here, or --endpoint), the augment workflow's own
  build_pipeline (its Chain) run in THIS process by a stand-in for Ray Data (Ray workers are other processes,
  whose requests an in-process counter cannot see), with the workflow's batching: files = plan -> LoadFaces ->
  DR2Stage -> BlurAndWrite + ManifestWriter per cluster.manifest-rows, then the final compaction; webdataset =
  plan_units -> LoadUnits -> per_unit(DR2Stage) -> CommitUnit. Both write _summary.json. Every S3 request of the stages'
  filesystem is counted (bench/count_requests.py), planning and listing included.
throughput: workflows.augment.main twice in this process (one local Ray), same input and tiny random model,
  --write.format files then webdataset; images/s = ok / drain seconds from each <output>/_summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # `python bench/bench_shards.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import HelpFormatter, cpu_name, fmt, load_average, text_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
TINY = ["--dr2.architecture", "tiny", "--image.size", "32", "--dr2.N", "2", "--dr2.tau", "5",
        "--runtime.device", "cpu", "--allow-random-weights", "true", "--seed", "0"]


def host_line() -> str:
    load = load_average()
    return f"host: {cpu_name()}, {os.cpu_count()} cores" + (f", load average {load[0]:.2f}" if load else "")


def ratio(x: float | None, base: float | None) -> str:
    return "-" if x is None or not base else f"{x / base:.3f}"


# ----------------------------------------------------------------------------------------------- planning

def proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(what: str, input: str, output: str, shard_size: int) -> dict:
    """One planning figure in this process: seconds, and peak RSS with its rise above the state before the call
    (the peak is reset first through /proc/self/clear_refs, so earlier transients do not count)."""
    from tasks.load_stage import ImageConfig
    from tasks.manifest import committed_ids
    from tasks.pipeline import ResumeConfig, plan
    from tasks.units import plan_units

    ext = ImageConfig().extensions
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    base = proc_kib("VmRSS")
    t0 = time.perf_counter()
    if what == "files":
        p = plan(input, output, None, ext, ResumeConfig(enabled=True))
        out = {"samples": p.total, "todo": len(p.todo), "skipped": p.skipped}
    elif what == "shards":
        p = plan_units(input, output, None, ext, shard_size, resume=True)
        out = {"shards": p.shards, "todo": len(p.units), "skipped": p.skipped}
    else:  # the committed ids of a files-mode manifest
        ids = committed_ids(output, None)
        out = {"committed": len(ids)}
    seconds = time.perf_counter() - t0
    peak = proc_kib("VmHWM")
    return {**out, "seconds": seconds, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024,
            "base_mib": base / 1024}


# What a workflow's driver has imported before it plans: the forkserver imports them once, each figure runs in
# a new process forked from it (a clean process, without this one's datasets and garbage, and no 8 s of imports).
PRELOAD = ["tasks.pipeline", "tasks.units", "tasks.manifest", "tasks.load_stage", "pyarrow.parquet", "pandas",
           "fsspec.implementations.local"]


def _child(conn, *args) -> None:
    try:
        conn.send(("ok", measure(*args)))
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def measure_fresh(what: str, input: str, output: str, shard_size: int) -> dict:
    """measure() in a new process forked from an import-only forkserver."""
    import multiprocessing

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, what, input, output, shard_size))
    proc.start()
    send.close()
    try:
        status, result = recv.recv()
    except EOFError:
        status, result = "error", f"exit code {proc.join() or proc.exitcode}"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"measuring {what} on {input} failed:\n{result}")
    return result


def write_markers(output: str, shards: int) -> None:
    """Committed markers (names only) for every one-chunk unit faces-<s:05d> of a make_dataset tar input."""
    from tasks.units import chunk_name, marker_path

    root = Path(output) / "manifest"
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        (root / marker_path(chunk_name(f"faces-{s:05d}", 0), last=True)).touch()


def write_files_manifest(output: str, count: int, rows: int) -> int:
    """A files-mode manifest of `count` committed samples as real Parquet shards of `rows` rows (the augment
    workflow's columns), named as the ManifestWriter names them; returns the shards written."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.manifest import ManifestWriter, shard_name

    root = Path(output) / "manifest"
    root.mkdir(parents=True, exist_ok=True)
    n = min(rows, count)
    ids = [f"{i // 1000:06d}/{i:09d}.png" for i in range(n)]
    columns = [("N", pa.int64()), ("tau", pa.int64()), ("omega", pa.int64()), ("sigma", pa.float64()),
               ("lq", pa.string()), ("hq", pa.string())]  # the augment workflow's own columns
    template = ManifestWriter(output, columns, {"job_seed": 0, "code_version": "bench",
                                                         "config_hash": "bench"}).table({
        "id": np.array(ids, dtype=object), "source": np.array([f"/in/{i}" for i in ids], dtype=object),
        "status": np.array(["ok"] * n, dtype=object), "error": np.array([""] * n, dtype=object),
        "error_kind": np.array([""] * n, dtype=object), "weights": np.array(["random-init"] * n, dtype=object),
        "src_format": np.array(["PNG"] * n, dtype=object), "src_width": np.full(n, 32), "src_height": np.full(n, 32),
        "seed": np.arange(n), "N": np.full(n, 2), "tau": np.full(n, 5), "omega": np.full(n, 3),
        "sigma": np.full(n, 2.0), "lq": np.array([f"/out/lq/{i}" for i in ids], dtype=object),
        "hq": np.array([f"/out/hq/{i}" for i in ids], dtype=object)})
    shards = 0
    for start in range(0, count, rows):
        stop = min(count, start + rows)
        part = template.slice(0, stop - start)
        ids = [f"{i // 1000:06d}/{i:09d}.png" for i in range(start, stop)]
        part = part.set_column(0, "id", pa.array(ids, pa.string()))
        buf = io.BytesIO()
        pq.write_table(part, buf, compression="zstd")
        (root / shard_name(ids)).write_bytes(buf.getvalue())
        shards += 1
    return shards


def planning(args: argparse.Namespace) -> dict:
    from bench.make_dataset import make_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_shards_", dir=args.workdir))
    rows: list[dict] = []

    def note(r: dict) -> None:
        rows.append(r)
        print(f"[bench] {r['mode']} {r['samples']}: {r['seconds']:.2f} s, peak {r['peak_mib']:.1f} MiB "
              f"(+{r['delta_mib']:.1f})", file=sys.stderr, flush=True)

    try:
        for count in args.counts:
            shards = -(-count // args.per_shard)
            wds = work / f"wds_{count}"
            t0 = time.perf_counter()
            make_dataset(str(wds), count, "webdataset", args.per_shard, kind="placeholder", workers=args.workers)
            print(f"[bench] {count} placeholder samples as {shards} tars in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
            files = work / f"files_{count}"
            if count <= args.files_max:
                t0 = time.perf_counter()
                make_dataset(str(files), count, "files", args.per_shard, kind="placeholder", workers=args.workers)
                print(f"[bench] {count} placeholder files in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)
                m = measure_fresh("files", str(files), str(work / "out_files"), args.per_shard)
                if m["samples"] != count:
                    raise RuntimeError(f"files plan listed {m['samples']} of {count} samples")
                note({"mode": "files: plan()", "samples": count, "shards": shards, **m})
                shutil.rmtree(files, ignore_errors=True)
            m = measure_fresh("shards", str(wds), str(work / "out_shards"), args.per_shard)
            if m["shards"] != shards or m["todo"] != shards:
                raise RuntimeError(f"plan_units found {m['shards']} shards, {m['todo']} to do, expected {shards}")
            note({"mode": "shards: plan_units()", "samples": count, "shards": shards, **m})
            if count == max(args.counts):  # resume of the largest output, every chunk committed
                out = work / "out_committed"
                write_markers(str(out), shards)
                m = measure_fresh("shards", str(wds), str(out), args.per_shard)
                if m["todo"] or m["skipped"] != shards:
                    raise RuntimeError(f"resume left {m['todo']} of {shards} units to do")
                resume_shards = {"mode": "resume shards: plan_units()", "samples": count, "shards": shards, **m}
            shutil.rmtree(wds, ignore_errors=True)
        t0 = time.perf_counter()
        manifest_shards = write_files_manifest(str(work / "out_ids"), args.resume_files, args.manifest_rows)
        print(f"[bench] files manifest of {args.resume_files} ids in {manifest_shards} Parquet shards in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        m = measure_fresh("ids", "-", str(work / "out_ids"), args.per_shard)
        if m["committed"] != args.resume_files:
            raise RuntimeError(f"committed_ids read {m['committed']} of {args.resume_files} ids")
        note({"mode": "resume files: committed_ids()", "samples": args.resume_files, "shards": manifest_shards,
              **m})
        note(resume_shards)
    finally:
        if args.keep:
            print(f"[bench] kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    files_rows = {r["samples"]: r for r in rows if r["mode"].startswith("files")}
    body = []
    for r in rows:
        if r["mode"].startswith("shards"):
            base = files_rows.get(r["samples"])
        elif r["mode"].startswith("resume shards"):
            base = next((x for x in rows if x["mode"].startswith("resume files")), None)
        else:
            base = r
        r["ratio_s"] = r["seconds"] / base["seconds"] if base else None
        r["ratio_delta"] = r["delta_mib"] / base["delta_mib"] if base and base["delta_mib"] > 0 else None
        body.append([r["mode"], str(r["samples"]), str(r["shards"]), f"{r['seconds']:.3f}",
                     f"{r['peak_mib']:.1f}", f"{r['delta_mib']:.1f}", fmt(r["ratio_s"], ".3f"),
                     fmt(r["ratio_delta"], ".3f")])
    print(f"planning on the driver, placeholder payload, {args.per_shard} samples per tar (and per files folder); "
          f"each figure in a fresh process ({host_line()})")
    print("peak_MiB = VmHWM of that process; +MiB = its rise during the call; ratios: "
          "shards / files at the same count (resume: vs committed_ids)")
    print(text_table(["mode", "samples", "shards", "seconds", "peak_MiB", "+MiB", "ratio_s", "ratio_+MiB"], body))
    shard_rows = [r for r in rows if r["mode"].startswith("shards")]
    lines = []
    if len(shard_rows) > 1:
        lo, hi = shard_rows[0], shard_rows[-1]
        growth = hi["peak_mib"] / lo["peak_mib"]
        flat = "within" if abs(growth - 1) <= 0.2 else "NOT within"
        lines.append(f"shard-mode driver peak {lo['peak_mib']:.1f} MiB at {lo['samples']} -> {hi['peak_mib']:.1f} "
                     f"MiB at {hi['samples']} samples: {growth:.3f}x ({flat} the 20% goal); the planning's own rise "
                     f"{lo['delta_mib']:.1f} -> {hi['delta_mib']:.1f} MiB")
    big = shard_rows[-1] if shard_rows else None
    if big:
        lines.append(f"shard-mode planning of {big['samples']} samples in {big['shards']} shards: "
                     f"{big['seconds']:.2f} s "
                     f"(goal < 10 s: {'met' if big['seconds'] < 10 else 'NOT met'}); resume of it, all committed: "
                     f"{resume_shards['seconds']:.2f} s ({'met' if resume_shards['seconds'] < 10 else 'NOT met'})")
    skipped = [c for c in args.counts if c > args.files_max]
    if skipped:
        lines.append(f"files baseline not run at {skipped} samples (--files-max {args.files_max})")
    print("\n".join(lines))
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------- requests

def augment_config(input: str, output: str, storage_options: dict | None, extra: list[str]):
    """The augment workflow's config (configs/augment.yaml + the tiny random model + extra overrides)."""
    from tasks.config import load
    from workflows.augment import AugmentConfig

    cfg = load(AugmentConfig, ["--input", input, "--output", output, *TINY, *extra], "",
               ROOT / "configs" / "augment.yaml")
    return dataclasses.replace(cfg, storage_options=storage_options or {})


class LocalData:
    """The few Ray Data calls a workflow's Chain makes, run eagerly in this process (no Ray): map_batches with
    batch_size (rows re-batched across blocks, as Ray Data does), task functions, generators and class UDFs."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def map_batches(self, fn, *, batch_size=None, fn_constructor_kwargs=None, **_) -> LocalData:
        import numpy as np

        if fn_constructor_kwargs is not None:  # a class UDF: one instance, like one actor
            fn = fn(**fn_constructor_kwargs)
        whole = {k: np.concatenate([b[k] for b in self.batches]) for k in self.batches[0]} if self.batches else {}
        n = len(next(iter(whole.values()))) if whole else 0
        step = batch_size or max(n, 1)
        out = []
        for i in range(0, n, step):
            r = fn({k: v[i:i + step] for k, v in whole.items()})
            out += [r] if isinstance(r, dict) else list(r)
        return LocalData(out)


class LocalRay:
    """Stands for the `ray` module a workflow's build_pipeline receives."""

    class data:  # noqa: N801 - mirrors ray.data
        @staticmethod
        def from_items(items, **_) -> LocalData:
            import numpy as np

            return LocalData([{k: np.array([it[k] for it in items], dtype=object) for k in items[0]}] if items else [])

        @staticmethod
        def from_pandas(frames) -> LocalData:
            return LocalData([{c: df[c].to_numpy() for c in df.columns} for df in frames if len(df)])

        @staticmethod
        def ActorPoolStrategy(size):  # noqa: N802 - mirrors ray.data
            return None

    @staticmethod
    def cluster_resources() -> dict:
        return {"CPU": 1.0}


def run_in_process(cfg) -> dict:
    """The augment workflow as its process() runs it (plan, its own build_pipeline, compaction in files mode,
    the summary), with every stage in this process: LocalRay instead of Ray."""
    from tasks.manifest import write_summary
    from tasks.pipeline import Plan, compact, plan_work
    from workflows.augment import build_pipeline

    so = cfg.storage_options or None
    p = plan_work(cfg)
    ds = build_pipeline(cfg, p, LocalRay, "bench")
    ok = sum(int(b["ok"].sum()) for b in ds.batches)
    if isinstance(p, Plan):
        compact(cfg.output, so, cfg.retry)
    write_summary(cfg.output, {"ok": ok}, so)
    return {"ok": ok}


def stage_fs(uri: str, storage_options: dict | None):
    """The cached s3fs instance every stage's get_fs returns. The first client an s3fs instance creates
    rewrites the nested `retries` dict of tasks.storage.S3_CLIENT_DEFAULTS (botocore turns max_attempts into
    total_max_attempts), which changes the cache token: the instance made before that is never returned again.
    So connect until get_fs gives the same instance twice."""
    from tasks.storage import get_fs

    fs = get_fs(uri, storage_options)[0]
    for _ in range(3):
        fs.s3  # noqa: B018 - connects (creates the client) outside the counted block
        again = get_fs(uri, storage_options)[0]
        if again is fs:
            return fs
        fs = again
    raise RuntimeError(f"no stable fsspec instance for {uri}")


def requests(args: argparse.Namespace) -> dict:
    import logging

    from bench.count_requests import count_requests
    from bench.make_dataset import make_dataset

    logging.getLogger("tasks.dr2_stage").setLevel(logging.ERROR)  # the random-weights warning, once per mode
    work = Path(tempfile.mkdtemp(prefix="bench_shards_s3_", dir=args.workdir))
    weed = None
    try:
        if args.endpoint:
            from tests.s3server import S3Server

            server = S3Server(args.endpoint, os.environ.get("AWS_ACCESS_KEY_ID", ""),
                              os.environ.get("AWS_SECRET_ACCESS_KEY", ""), region=os.environ.get("AWS_REGION",
                                                                                                 "us-east-1"))
            so = {"endpoint_url": args.endpoint}  # credentials: the environment, as a deployment would
        else:
            from tests.s3server import start_seaweedfs

            server, weed = start_seaweedfs(work)
            so = server.storage_options
        bucket = server.make_bucket(args.bucket or f"bench-shards-{uuid.uuid4().hex[:10]}")
        src = f"s3://{bucket}/faces"
        t0 = time.perf_counter()
        make_dataset(src, args.count, "files", args.per_folder, args.size, "png", storage_options=so,
                     workers=args.workers)
        print(f"[bench] {args.count} {args.size}px PNGs on S3 ({server.endpoint_url}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        results = {}
        for mode in ("files", "webdataset"):
            out = f"s3://{bucket}/out_{mode}"
            extra = ["--write.format", mode, "--write.shard-size", str(args.shard_size),
                     "--runtime.batch-size", str(args.batch_size), "--image.size", str(args.size)]
            cfg = augment_config(src, out, so, extra)
            fs = stage_fs(src, cfg.storage_options or None)
            t0 = time.perf_counter()
            with count_requests(fs) as counts:
                r = run_in_process(cfg)
            seconds = time.perf_counter() - t0
            if r["ok"] != args.count:
                raise RuntimeError(f"{mode}: {r['ok']} of {args.count} images ok")
            results[mode] = {"seconds": seconds, "kinds": dict(counts.by_kind), "ops": dict(counts.by_operation)}
            print(f"[bench] {mode}: {seconds:.1f} s, {dict(counts.by_operation)}", file=sys.stderr, flush=True)
    finally:
        if weed is not None:
            weed.stop()
        shutil.rmtree(work, ignore_errors=True)

    kinds = ["PUT", "GET", "LIST", "HEAD"]
    body = []
    for mode, r in results.items():
        per = [r["kinds"].get(k, 0) / args.count for k in kinds]
        base = [results["files"]["kinds"].get(k, 0) / args.count for k in kinds]
        body.append([mode] + [f"{x:.4f}" for x in per] + [ratio(per[0], base[0]), ratio(per[2], base[2])]
                    + [str(sum(r["kinds"].values()))])
        r["per_image"] = dict(zip(kinds, per))
    shards = -(-args.count // args.shard_size)
    print(f"S3 requests per image, augment stages in-process (no Ray), {args.count} loose {args.size}px PNG inputs, "
          f"webdataset output in {shards} shard(s) of <= {args.shard_size}; planning, listing, summary included "
          f"({'SeaweedFS started here' if weed else args.endpoint})")
    print(text_table(["output", "PUT/img", "GET/img", "LIST/img", "HEAD/img", "ratio_PUT", "ratio_LIST", "requests"],
                     body))
    wds = results["webdataset"]["per_image"]
    k = results["webdataset"]["kinds"]
    put_shard = (k.get("PUT", 0) - 1) / shards  # less the run's one _summary.json
    list_fixed = max(0, k.get("LIST", 0) - -(-args.count // 1000))  # less the input listing's pages of 1000 keys
    print(f"EXTRAPOLATED (not measured) to 10^6 images at shard size 1000: {put_shard:.2f} PUT per shard -> "
          f"{put_shard / 1000 + 1 / 1e6:.4f} PUT/image; LIST = 1 page per 1000 listed inputs + {list_fixed} per run "
          f"-> {1 / 1000 + list_fixed / 1e6:.4f} LIST/image (loose-file input; a tar input lists shards, not images)")
    print(f"webdataset: {wds['PUT']:.4f} PUT and {wds['LIST']:.4f} LIST per image (goal <= 0.01 each: "
          f"{'met' if wds['PUT'] <= 0.01 and wds['LIST'] <= 0.01 else 'NOT met'}; "
          f"{put_shard:.2f} PUT per output shard plus 1 for the run's _summary.json)")
    return results


# ----------------------------------------------------------------------------------------------- throughput

def throughput(args: argparse.Namespace) -> dict:
    import ray

    from bench.make_dataset import make_dataset
    from tasks.pipeline import ClusterConfig, init_ray
    from workflows.augment import main as augment_main

    work = Path(tempfile.mkdtemp(prefix="bench_shards_tp_", dir=args.workdir))
    started = not ray.is_initialized()
    results = {}
    try:
        src = work / "faces"
        make_dataset(str(src), args.count, "files", args.count, args.size, "png", workers=1)
        init_ray(ClusterConfig(num_cpus=args.num_cpus))
        ray.data.DataContext.get_current().enable_progress_bars = False
        common = [*TINY, "--image.size", str(args.size), "--runtime.batch-size", str(args.batch_size),
                  "--write.shard-size", str(args.shard_size)]
        if args.warmup:  # starts Ray's workers and imports: not in either figure
            warm = work / "warm"
            make_dataset(str(warm), args.batch_size, "files", args.batch_size, args.size, "png")
            if augment_main(["--input", str(warm), "--output", str(work / "out_warm"), *common]):
                raise RuntimeError("warm-up run failed")
        for mode in ("files", "webdataset"):
            out = work / f"out_{mode}"
            rc = augment_main(["--input", str(src), "--output", str(out), "--write.format", mode, *common])
            summary = json.loads((out / "_summary.json").read_text())
            if rc or summary["ok"] != args.count:
                raise RuntimeError(f"{mode}: exit {rc}, {summary['ok']} of {args.count} ok")
            results[mode] = {"images_per_s": summary["images_per_s"], "seconds": summary["seconds"]}
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    base = results["files"]["images_per_s"]
    body = [[mode, f"{r['seconds']:.1f}", f"{r['images_per_s']:.3f}", ratio(r["images_per_s"], base)]
            for mode, r in results.items()]
    print(f"augment end to end, local Ray, local files: {args.count} {args.size}px PNGs, tiny random DR2 (N 2, tau 5,"
          f" cpu), batch {args.batch_size}, webdataset shard size {args.shard_size}; images/s = ok / drain seconds "
          f"(_summary.json){'; after an untimed warm-up run' if args.warmup else ''} ({host_line()})")
    print(text_table(["output", "seconds", "images/s", "ratio"], body))
    return results


# ----------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    workdir = dict(default=None, help="where temporary datasets and outputs go (default: system temp)")

    g = sub.add_parser("planning", help="driver planning time and peak memory, files vs shards, and resume",
                       formatter_class=HelpFormatter)
    g.add_argument("--counts", type=int, nargs="+", default=[10000, 100000, 1000000], help="dataset sizes (samples)")
    g.add_argument("--per-shard", type=int, default=1000, help="samples per tar (files: per folder); also the "
                                                               "write.shard-size of the plan")
    g.add_argument("--files-max", type=int, default=100000, help="largest count run as loose files (10^6 files "
                                                                  "take minutes to write and remove)")
    g.add_argument("--resume-files", type=int, default=100000, help="committed ids in the files-mode manifest "
                                                                    "read by the resume baseline")
    g.add_argument("--manifest-rows", type=int, default=256, help="rows per files-mode manifest shard "
                                                                  "(cluster.manifest-rows)")
    g.add_argument("--workers", type=int, default=2, help="processes writing the synthetic datasets")
    g.add_argument("--workdir", **workdir)
    g.add_argument("--keep", action="store_true", help="keep the temporary datasets")

    g = sub.add_parser("requests", help="S3 requests per image, files vs webdataset output",
                       formatter_class=HelpFormatter)
    g.add_argument("--count", type=int, default=64, help="input images (loose PNGs on S3)")
    g.add_argument("--shard-size", type=int, default=32, help="--write.shard-size of the webdataset output")
    g.add_argument("--per-folder", type=int, default=1000, help="input PNGs per folder (make_dataset --per-shard)")
    g.add_argument("--size", type=int, default=32, help="image side (input PNGs and --image.size)")
    g.add_argument("--batch-size", type=int, default=16, help="--runtime.batch-size of the DR2 stage")
    g.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of starting SeaweedFS here "
                                                    "(credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    g.add_argument("--bucket", default=None, help="bucket (created if missing); default a new bench-shards-<random>")
    g.add_argument("--workers", type=int, default=1, help="processes writing the input PNGs")
    g.add_argument("--workdir", **workdir)

    g = sub.add_parser("throughput", help="end-to-end images/s of workflows/augment.py, files vs webdataset",
                       formatter_class=HelpFormatter)
    g.add_argument("--count", type=int, default=48, help="input images (loose PNGs, local)")
    g.add_argument("--shard-size", type=int, default=16, help="--write.shard-size (webdataset: samples per unit "
                                                              "of work and per output shard)")
    g.add_argument("--size", type=int, default=32, help="image side (input PNGs and --image.size)")
    g.add_argument("--batch-size", type=int, default=16, help="--runtime.batch-size of the DR2 stage")
    g.add_argument("--num-cpus", type=int, default=0, help="CPUs of the local Ray (0 = all)")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up run")
    g.add_argument("--workdir", **workdir)

    args = p.parse_args(argv)
    for name in ("count", "per_shard", "shard_size", "size", "batch_size", "per_folder"):
        if getattr(args, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return {"planning": planning, "requests": requests, "throughput": throughput}[args.command](args)


if __name__ == "__main__":
    main()

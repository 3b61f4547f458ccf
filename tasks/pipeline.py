"""What every workflow shares: resume planning, Ray start-up, actor-pool sizing, and the run summary.

A workflow is: plan (list inputs, drop committed ids) -> a Ray Data chain of stages ending in the
ManifestWriter -> drain its per-shard stats (Ray shows progress bars) -> write the summary last.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.config import opt, shown_config
from tasks.faults import RetryConfig, TransientError, retry_call
from tasks.listing import InputNotFoundError, list_inputs
from tasks.manifest import BASE_SCHEMA, BUSY_COLUMN, committed_ids, compact_manifest, manifest_prefix, write_summary
from tasks.stage import check_chain
from tasks.storage import join_under, redact
from tasks.weights import WeightsError, WeightsNotFoundError

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
NETWORK_PREFIX = "network:"  # busy-column entries of diffusion-network time (the rest: stage wall time)


@dataclass(frozen=True)
class ResumeConfig:
    enabled: bool = opt(True, "skip samples already committed in <output>/manifest (a rerun finishes the rest)")
    retry_errors: bool = opt(False, "on resume, also redo samples whose committed row has status 'error'")


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = opt(None, "Ray cluster address; unset: RAY_ADDRESS if set (ray job submit sets it), "
                                    "else a local Ray started by this process")
    num_cpus: int = opt(0, "CPUs for a local Ray (0 = all); ignored when joining a cluster")
    num_gpus: int = opt(-1, "GPUs to declare for a local Ray (-1 = autodetect); ignored on a cluster")
    block_rows: int = opt(64, "input rows per Ray block (the unit of read parallelism)")
    manifest_rows: int = opt(256, "rows per manifest shard (the unit of commit: smaller = less redone after a crash)")


def code_version() -> str:
    """git commit (+dirty) when available, and always a hash of the source files that ran."""
    h = hashlib.sha256()
    for p in sorted(ROOT.glob("*/*.py")) + sorted(ROOT.glob("configs/*.yaml")):
        if p.parts[-2] in ("models", "tasks", "workflows", "configs"):
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    version = f"src-{h.hexdigest()[:12]}"
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            version = f"git-{sha}{'+dirty' if dirty else ''}/{version}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def config_hash(cfg) -> str:
    """Hash of the resolved config with secrets redacted: changing only a credential keeps the hash."""
    return hashlib.sha256(json.dumps(shown_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Plan:
    todo: pd.DataFrame
    total: int
    skipped: int
    ignored: int
    duplicates: int


def plan(input_spec: str, output: str, storage_options: dict | None, extensions, resume: ResumeConfig,
         retry: RetryConfig | None = None) -> Plan:
    """The samples still to do. Listing and the resume read are retried like any I/O; they run on the driver,
    before Ray starts, so an unreachable store fails here with the URI it was waiting on."""
    log.info("listing %s", input_spec)
    listing = retry_call(lambda: list_inputs(input_spec, storage_options, tuple(extensions)),
                         f"listing {input_spec}", retry)
    df = listing.samples
    done: set[str] = set()
    if resume.enabled:
        log.info("reading committed ids from %s", manifest_prefix(output))
        compact(output, storage_options, retry)  # a run that died between commit and compaction
        done = retry_call(lambda: committed_ids(output, storage_options, retry_errors=resume.retry_errors),
                          f"reading {manifest_prefix(output)}", retry)
    todo = df[~df["id"].isin(done)].reset_index(drop=True)
    return Plan(todo=todo, total=len(df), skipped=len(df) - len(todo), ignored=listing.ignored,
                duplicates=listing.duplicates)


def init_ray(cluster: ClusterConfig):
    """Join a cluster (explicit address or RAY_ADDRESS, as inside `ray job submit`) or start a local one."""
    import ray

    if ray.is_initialized():
        return ray
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        kwargs = {}
        if cluster.num_cpus:
            kwargs["num_cpus"] = cluster.num_cpus
        if cluster.num_gpus >= 0:
            kwargs["num_gpus"] = cluster.num_gpus
        # Workers import models/ and tasks/ from this checkout. address="local": a fresh Ray of this process,
        # never a cluster that happens to run on this machine (join one with cluster.address or RAY_ADDRESS).
        ray.init(address="local", runtime_env={"env_vars": env}, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    return ray


def actor_pool(runtime, ray) -> tuple[int, float]:
    """(pool size, GPUs per actor): one actor per GPU by default, CPU actors when there is none.

    device=cuda always asks for GPUs, so an autoscaling cluster that has none yet adds them instead of
    the job silently running on CPU.
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    if runtime.device == "cpu" or (runtime.device == "auto" and gpus == 0):
        return max(1, runtime.num_actors or 1), 0.0
    per = runtime.gpus_per_actor
    return max(1, runtime.num_actors or int(gpus // per) or 1), per


def as_task(stage_cls, **kwargs):
    """Run a cheap-to-build stage class as stateless Ray tasks (a class UDF would become an actor pool)."""

    def run(batch):
        return stage_cls(**kwargs)(batch)

    run.__name__ = run.__qualname__ = stage_cls.__name__
    return run


def write_and_commit(ds, writer: tuple[type, dict], manifest: tuple[type, dict], rows: int):
    """The pipeline's tail as one CPU task per `rows` samples: write their images, then commit their manifest
    shard. As two operators, Ray Data's resource budget kept the manifest operator backpressured on a
    2-CPU machine until the model had finished every sample: nothing was committed during the run."""
    (write_cls, write_kwargs), (manifest_cls, manifest_kwargs) = writer, manifest

    def run(batch):
        return manifest_cls(**manifest_kwargs)(write_cls(**write_kwargs)(batch))

    run.__name__ = run.__qualname__ = f"{write_cls.__name__}+{manifest_cls.__name__}"
    return ds.map_batches(run, batch_size=rows, num_cpus=1)


class Chain:
    """A workflow's stages, from its plan to the manifest, as Ray Data operators. A workflow declares its
    chain once; it runs per sample (loose files written as files: rows of samples, manifest shards of
    cluster.manifest-rows) or per unit (shard inputs or outputs: one row per unit, see tasks/units.py).

        chain = Chain(ray, plan, cfg, LoadFaces, dict(...))   # read + decode (CPU tasks)
        chain.cpu(Degrade, ...)                                # more CPU stages
        chain.model(DR2Stage, dict(...), pool=..., gpus=...)  # a model stage (actor pool)
        ds = chain.commit((WriteImages, {...}), (ManifestWriter, {...}))
    """

    def __init__(self, ray, plan, cfg, load_cls: type, load_kwargs: dict, batch_rows: int | None = None):
        from tasks.units import UNIT_SOURCE, LoadUnits, UnitPlan

        self.ray, self.cfg, self.units = ray, cfg, isinstance(plan, UnitPlan)
        self.source = list(UNIT_SOURCE) if self.units else list(plan.todo.columns)
        self.stages: list[tuple[type, dict]] = []
        self.declare(load_cls, load_kwargs)
        so, block_rows = cfg.storage_options or None, batch_rows or cfg.cluster.block_rows
        self.block_rows = block_rows  # rows per CPU-stage batch (whole photos: a few per batch)
        if self.units:
            items = [{"unit": u.to_json()} for u in plan.units]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            self.ds = ds.map_batches(as_task(
                LoadUnits, load_cls=load_cls, load_kwargs=load_kwargs, shard_size=cfg.write.shard_size,
                storage_options=so, retry=cfg.retry, image_member=cfg.image.member, image_column=cfg.image.column,
                output=cfg.output, extensions=tuple(cfg.image.extensions)),
                batch_size=1, num_cpus=1)
        else:
            ds = ray.data.from_pandas(blocks(plan.todo, block_rows))
            self.ds = ds.map_batches(as_task(load_cls, **load_kwargs), batch_size=block_rows, num_cpus=1)

    def declare(self, stage_cls: type, kwargs: dict) -> list[tuple[str, object]]:
        """Add a stage to the chain's contract; refuses (ContractError) a stage reading a column no earlier
        stage adds, when the pipeline is built, before any data moves. Returns the chain's typed columns."""
        self.stages.append((stage_cls, kwargs))
        return check_chain(self.source, self.stages)

    def cpu(self, stage_cls: type, **kwargs) -> Chain:
        from tasks.units import per_unit

        self.declare(stage_cls, kwargs)
        if self.units:
            self.ds = self.ds.map_batches(as_task(per_unit(stage_cls), **kwargs), batch_size=1, num_cpus=1)
        else:
            self.ds = self.ds.map_batches(as_task(stage_cls, **kwargs), batch_size=self.block_rows, num_cpus=1)
        return self

    def cpu_actors(self, stage_cls: type, kwargs: dict, compute) -> Chain:
        """A CPU stage with state worth keeping (a face detector): an actor pool of one CPU each."""
        if self.units:
            raise ValueError(f"{stage_cls.__name__}: CPU actor stages run per sample only")
        self.declare(stage_cls, kwargs)
        self.ds = self.ds.map_batches(stage_cls, fn_constructor_kwargs=kwargs, batch_size=self.block_rows,
                                      num_cpus=1, compute=compute)
        return self

    def model(self, stage_cls: type, kwargs: dict, *, pool: int, gpus: float, batch_size: int | None = None) -> Chain:
        """A model stage on an actor pool (Ray restarts dead actors and retries their batches), timed;
        batch_size: rows per call (default runtime.batch-size; whole photos: photos.batch-size)."""
        from tasks.units import per_unit

        self.declare(stage_cls, kwargs)
        rt = self.cfg.runtime
        cls, batch_size = timed(stage_cls), batch_size or rt.batch_size
        if self.units:  # one unit per call, run in slices of the model's batch size
            cls, batch_size = per_unit(cls, rows=rt.batch_size), 1
        self.ds = self.ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=batch_size, num_gpus=gpus,
                                      num_cpus=rt.cpus_per_actor, compute=self.ray.data.ActorPoolStrategy(size=pool))
        return self

    def commit(self, writer: tuple[type, dict], manifest: tuple[type, dict], rows: int | None = None):
        """The tail: write the images, then commit the manifest shard; returns the dataset of shard stats.
        The manifest's columns are the typed columns the chain's stages declare (tasks/stage.py), plus the
        per-job constants and, per unit, the shard columns."""
        from tasks.units import UNIT_COLUMNS, CommitUnit

        typed = self.declare(*writer)
        self.declare(*manifest)
        constants = manifest[1].get("constants", {})
        columns = [(n, t) for n, t in typed if n not in BASE_SCHEMA.names] + [
            (n, pa.int64() if isinstance(v, int) else pa.string()) for n, v in constants.items()
            if n not in BASE_SCHEMA.names and n not in dict(typed)] + (UNIT_COLUMNS if self.units else [])
        manifest = (manifest[0], {**manifest[1], "columns": columns})
        if not self.units:
            return write_and_commit(self.ds, writer, manifest, rows or self.cfg.cluster.manifest_rows)
        so = self.cfg.storage_options or None
        return self.ds.map_batches(as_task(
            CommitUnit, writer=writer, manifest=manifest,
            output=self.cfg.output, format=self.cfg.write.format, storage_options=so, retry=self.cfg.retry),
            batch_size=1, num_cpus=1)


def timed(stage_cls):
    """The stage class with each call's wall time recorded on its rows (BUSY_COLUMN), per actor.

    The manifest writer sums them and the run's summary reports how busy the model actors were: time inside
    the stage / (actors x wall time). Below ~90% the model waits for the CPU stages (or for start-up).
    """

    class Timed(stage_cls):
        def __call__(self, batch):
            # imported here: this local class travels to the actor by value, and a global it referenced
            # would travel as a copy, not the actor's own clock that the network writes to
            from tasks.runtime import NETWORK_CLOCK

            NETWORK_CLOCK.take()  # drop anything before this call (start-up)
            t0 = time.perf_counter()
            out = super().__call__(batch)  # outputs are host arrays: device work has finished
            n = len(out["id"])
            per_row = (time.perf_counter() - t0) / max(n, 1)
            actor = f"{stage_cls.__name__}@{socket.gethostname()}:{os.getpid()}"
            tag = f"{actor}={per_row!r}"
            network = NETWORK_CLOCK.take()
            if network:
                tag += f";{NETWORK_PREFIX}{actor}={network / max(n, 1)!r}"
            prev = out.get(BUSY_COLUMN)
            out[BUSY_COLUMN] = np.array([tag if prev is None or not prev[k] else f"{prev[k]};{tag}" for k in range(n)],
                                        dtype=object)
            return out

    Timed.__name__ = Timed.__qualname__ = stage_cls.__name__  # Ray Data names the operator after it
    return Timed


def absolute_output(uri: str) -> str:
    """Local outputs become absolute paths, so manifest URIs stay valid from any working directory."""
    return uri if "://" in uri else os.path.abspath(uri)


def blocks(df: pd.DataFrame, rows: int) -> list[pd.DataFrame]:
    return [df.iloc[i:i + rows] for i in range(0, len(df), rows)] or [df]


@dataclass
class Summary:
    workflow: str
    output: str
    total: int = 0
    skipped: int = 0
    ignored: int = 0
    ok: int = 0
    error: int = 0
    transient: int = 0  # failed on every retry (storage down, throttled): not committed, a rerun redoes them
    input_shards: int = 0  # shard mode: units of work (input shards or listing chunks) in all
    skipped_shards: int = 0  # of them already committed
    duplicates: int = 0  # input-list rows dropped for repeating an id
    error_kinds: dict[str, int] = field(default_factory=dict)  # error_kind -> samples (transient included)
    shards: int = 0
    pool_size: int = 0  # model actors per timed stage; more seen = restarted actors
    seconds: float = 0.0
    weights: str = ""
    code_version: str = ""
    config_hash: str = ""
    busy: dict[str, float] = field(default_factory=dict)  # model actor -> seconds inside its stage
    network: dict[str, float] = field(default_factory=dict)  # model actor -> seconds in diffusion-network forwards
    notes: list[str] = field(default_factory=list)

    @property
    def model_actors(self) -> int:
        """Model actors that ran at once: per timed stage, the pool size (an actor restarted after a crash
        shows up under a new pid and is not counted twice)."""
        per_stage: dict[str, int] = {}
        for actor in self.busy:
            stage = actor.split("@", 1)[0]
            per_stage[stage] = per_stage.get(stage, 0) + 1
        return sum(min(n, self.pool_size) if self.pool_size else n for n in per_stage.values())

    @property
    def restarted_actors(self) -> int:
        return len(self.busy) - self.model_actors

    @property
    def actor_utilisation(self) -> float:
        """Time the model actors spent inside their stage / (actors x wall time)."""
        actors = self.model_actors
        return sum(self.busy.values()) / (actors * self.seconds) if actors and self.seconds > 0 else 0.0

    @property
    def network_share(self) -> float:
        """Diffusion-network forward time / the model actors' time inside their stage."""
        total = sum(self.busy.values())
        return sum(self.network.values()) / total if total > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["images_per_s"] = round(self.images_per_s, 4)
        d["actor_utilisation"] = round(self.actor_utilisation, 4)
        d["network_share"] = round(self.network_share, 4)
        d["model_actors"], d["restarted_actors"] = self.model_actors, self.restarted_actors
        d["manifest"] = manifest_prefix(self.output)
        d["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return d

    def text(self) -> str:
        lines = [
            f"{self.workflow}: {self.ok} ok, {self.error} error, {self.transient} transient, {self.skipped} skipped "
            f"(already committed), " + (f"{self.total} inputs" if self.total or not self.input_shards else
                                        "sample count known per shard as it is read")
            + (f", {self.ignored} non-image files ignored" if self.ignored else "")
            + (f", {self.duplicates} repeated list rows dropped" if self.duplicates else "")
            + (f"; {self.input_shards} units of work, {self.skipped_shards} already committed"
               if self.input_shards else ""),
            f"  {self.images_per_s:.3f} images/s over {self.seconds:.1f} s, {self.shards} manifest shards written",
            f"  manifest: {manifest_prefix(self.output)}",
            f"  weights: {self.weights}   code: {self.code_version}",
        ]
        if self.error_kinds:
            lines.append("  errors by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(self.error_kinds.items())))
        if self.transient:
            lines.append(f"  INCOMPLETE: {self.transient} samples failed transiently (storage unreachable or "
                         "throttled beyond the retries) and were NOT committed: rerun the same command to finish "
                         "them")
        if self.busy:
            restarted = f" (+{self.restarted_actors} restarted after a crash)" if self.restarted_actors else ""
            lines.append(f"  model actors: {self.model_actors}{restarted}, busy {100 * self.actor_utilisation:.0f}% "
                         "of the run "
                         f"({sum(self.busy.values()):.1f} actor-s inside their stage; below ~90% they wait for "
                         "the CPU stages or start-up)")
        if self.network and self.busy:
            lines.append(f"  diffusion network: {100 * self.network_share:.0f}% of the actors' stage time "
                         f"({sum(self.network.values()):.1f} s of forwards; the rest is the sampler around it, "
                         "transfers and the enhancer)")
        lines += [f"  NOTE: {n}" for n in self.notes]
        return "\n".join(lines)


HEARTBEAT_S = 30.0


def drain(ds, summary: Summary, heartbeat_s: float = HEARTBEAT_S) -> Summary:
    """Run the dataset to the end, counting the ManifestWriter's per-shard stats; a line of progress at least
    every heartbeat_s (also while nothing commits: a stalled store or a starved stage shows up in the log)."""
    t0 = time.perf_counter()
    done = threading.Event()

    def heartbeat():
        while not done.wait(heartbeat_s):
            log.info("running %.0f s: %d committed (%d ok, %d error), %d transient, %d manifest shards; "
                     "waiting on the pipeline's stages (Ray Data's progress shows which)",
                     time.perf_counter() - t0, summary.ok + summary.error, summary.ok, summary.error,
                     summary.transient, summary.shards)

    threading.Thread(target=heartbeat, name="progress", daemon=True).start()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            summary.ok += int(batch["ok"].sum())
            summary.error += int(batch["error"].sum())
            summary.transient += int(batch["transient"].sum())
            summary.shards += sum(1 for uri in batch["shard"] if uri)
            for kinds in batch["kinds"]:
                for kind, n in json.loads(kinds).items():
                    summary.error_kinds[kind] = summary.error_kinds.get(kind, 0) + n
            for stats in batch.get("busy", []):
                for actor, seconds in json.loads(stats).items():
                    into = summary.network if actor.startswith(NETWORK_PREFIX) else summary.busy
                    actor = actor.removeprefix(NETWORK_PREFIX)
                    into[actor] = into.get(actor, 0.0) + seconds
    finally:
        done.set()
    summary.seconds = time.perf_counter() - t0
    return summary


def finish(summary: Summary, storage_options: dict | None) -> int:
    """Write the summary last and print it; the workflow's exit code: 0, or 3 when samples were left
    uncommitted by transient failures (a rerun finishes them)."""
    uri = write_summary(summary.output, summary.as_dict(), storage_options)
    print(summary.text(), file=sys.stderr, flush=True)
    log.info("summary written to %s", uri)
    if summary.transient:
        log.error("%d samples failed transiently and were not committed: rerun the same command to finish them",
                  summary.transient)
        return 3
    return 0


def load_config(cls, argv: list[str] | None, doc: str, name: str):
    """A workflow's config (configs/<name>.yaml + CLI overrides), output made absolute, logging set up."""
    from tasks.config import load

    cfg = load(cls, argv, doc, ROOT / "configs" / f"{name}.yaml")
    cfg = dataclasses.replace(cfg, output=absolute_output(cfg.output))
    setup_logging()
    log.info("input %s -> output %s (storage options %s)", cfg.input, cfg.output,
             describe_storage(cfg.storage_options or None))
    return cfg


def refuse_on_driver(main):
    """A workflow's main(): what the driver can tell is wrong before Ray starts (a missing input or checkpoint,
    a checkpoint refused as code, an option no sample can run with) ends the job with one line and exit 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (InputNotFoundError, WeightsError, WeightsNotFoundError, DriverRefusal, TransientError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2

    return wrapper


class DriverRefusal(ValueError):
    """An option or input the driver refuses before any work starts."""


def warn_random(summary: Summary, banner: str) -> None:
    """Say loudly, in the log and in the summary, that outputs come from an untrained network."""
    log.warning("%s\n%s\n%s", "!" * 100, banner, "!" * 100)
    summary.notes.append(banner)


def process(cfg, summary: Summary, build_pipeline, version: str) -> None:
    """Plan (drop committed ids), then run the pipeline over what is left, counting into the summary; the
    manifest is compacted before (a crashed run's leftovers) and after (superseded rows of retried errors)."""
    so = cfg.storage_options or None
    p = plan_work(cfg)
    summary.total, summary.ignored, summary.duplicates = p.total, p.ignored, p.duplicates
    if p.duplicates:
        summary.notes.append(f"{p.duplicates} rows of the input list repeat an id listed before them: "
                             "each id was processed once")
    if isinstance(p, Plan):
        summary.skipped, todo = p.skipped, len(p.todo)
        log.info("%d inputs, %d already committed, %d to process", p.total, p.skipped, todo)
    else:
        summary.input_shards, summary.skipped_shards, todo = p.shards, p.skipped, len(p.units)
        log.info("%d units of work (input shards or listing chunks), %d already committed, %d to process",
                 p.shards, p.skipped, todo)
    if todo:
        ray = init_ray(cfg.cluster)
        summary.pool_size = actor_pool(cfg.runtime, ray)[0]
        drain(build_pipeline(cfg, p, ray, version), summary)
    if isinstance(p, Plan):
        compact(cfg.output, so, cfg.retry)


def input_shard_kind(cfg) -> str | None:
    """"tar" or "parquet" when --input names shards, else None (one probe of the input)."""
    from tasks.units import shard_input_kind

    return retry_call(lambda: shard_input_kind(cfg.input, cfg.storage_options or None), f"listing {cfg.input}",
                      cfg.retry)


def sharded(cfg, kind: str | None = "probe") -> bool:
    """Shards are the unit of work when the output is written as shards or the input is shards (`kind`, the
    input's shard kind, when known already)."""
    write = getattr(cfg, "write", None)
    if write is not None and write.sharded:
        return True
    return (input_shard_kind(cfg) if kind == "probe" else kind) is not None


def plan_work(cfg):
    """The work left: a Plan of samples, or a UnitPlan of shards (tasks/units.py)."""
    from tasks.units import plan_units

    kind = input_shard_kind(cfg)
    if not sharded(cfg, kind):
        return plan(cfg.input, cfg.output, cfg.storage_options or None, cfg.image.extensions, cfg.resume, cfg.retry)
    if cfg.resume.retry_errors:
        raise DriverRefusal("--resume.retry-errors: not supported with shard inputs or --write.format "
                            "webdataset/parquet (rerun into a new --output to redo errors)")
    shard_size = cfg.write.shard_size if getattr(cfg, "write", None) is not None else 1000
    return plan_units(cfg.input, cfg.output, cfg.storage_options or None, cfg.image.extensions, shard_size,
                      cfg.resume.enabled, cfg.retry, kind=kind)


def compact(output: str, storage_options: dict | None, retry) -> None:
    for prefix in (output, join_under(output, "faces")):  # photos mode keeps its face rows in faces/manifest
        try:
            removed = retry_call(lambda prefix=prefix: compact_manifest(prefix, storage_options, retry),
                                 f"compacting {manifest_prefix(prefix)}", retry)
        except TransientError as e:  # nothing is lost: the next run compacts before it plans
            log.warning("manifest compaction deferred to the next run: %s", e)
            continue
        if removed:
            log.info("manifest compacted: %d superseded rows removed under %s", removed, manifest_prefix(prefix))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def describe_storage(options: dict | None) -> str:
    return json.dumps(redact(options or {}))

"""The Parquet manifest: one row per sample, written in shards that are the commit marker.

A sample counts as done when its row is in a readable shard under <output>/manifest/. Its images are
written before the shard, under deterministic names, so a rerun after a crash recomputes exactly the
uncommitted samples and overwrites (never duplicates) their partial outputs. A shard's name is a hash
of the ids it holds, so a retried task rewrites the same file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.faults import TRANSIENT, RetryConfig, TransientError, retry_call
from tasks.stage import Declared
from tasks.storage import get_fs, join_under, write_bytes
from tasks.weights import RANDOM_INIT

log = logging.getLogger(__name__)

MANIFEST_DIR = "manifest"
BUSY_COLUMN = "actor_busy"  # per row: "actor=seconds;..." from the timed model stages it went through
SUMMARY_FILE = "_summary.json"

# Columns every workflow writes; workflows add their own (typed at write time from the batch).
BASE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),          # "ok" or "error" (a "transient" failure is never committed)
    ("error_kind", pa.string()),      # the cause, for status "error": one of tasks.faults.ERROR_KINDS
    ("error", pa.string()),           # the reason in words, for status "error"
    ("src_format", pa.string()),
    ("src_width", pa.int64()),
    ("src_height", pa.int64()),
    ("src_converted", pa.string()),   # conversions applied on decode (gray->rgb, 16bit->8bit, ...)
    ("job_seed", pa.int64()),
    ("seed", pa.int64()),             # the sample's seed, derived from (job seed, id)
    ("weights", pa.string()),         # weights identity, or "random-init"
    ("random_weights", pa.bool_()),
    ("code_version", pa.string()),
    ("config_hash", pa.string()),
    ("processed_at", pa.timestamp("ms", tz="UTC")),
])


def manifest_prefix(output: str) -> str:
    return join_under(output, MANIFEST_DIR)


def ids_digest(ids: Iterable[str]) -> str:
    """24 hex digits naming a set of sample ids (the same ids, the same name, in any order)."""
    h = hashlib.blake2b(digest_size=12)
    for i in sorted(set(ids)):
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()


def shard_name(ids: Iterable[str]) -> str:
    return f"part-{ids_digest(ids)}.parquet"


def write_shard(table: pa.Table, output: str, storage_options: dict | None = None,
                retry: RetryConfig | None = None, name: str | None = None) -> str:
    """Write one manifest shard atomically (retrying transient failures); returns its URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    uri = join_under(manifest_prefix(output), name or shard_name(table.column("id").to_pylist()))
    fs, path = get_fs(uri, storage_options)
    write_bytes(fs, path, buf.getvalue(), retry)
    return uri


def _shard_paths(output: str, storage_options: dict | None) -> tuple[object, list[str]]:
    fs, root = get_fs(manifest_prefix(output), storage_options)
    # fsspec instances are cached per process: drop listings and ETags from an earlier read, or a shard
    # rewritten since (a retried batch) would be refused as "no longer exists" and its rows lost.
    fs.invalidate_cache(root)
    try:
        paths = [p for p in fs.find(root) if p.rsplit("/", 1)[-1].startswith("part-")
                 and p.endswith(".parquet")]
    except FileNotFoundError:
        paths = []
    return fs, sorted(paths)


def _read_shards(output: str, storage_options: dict | None, columns: list[str] | None) -> list[pd.DataFrame]:
    """Every manifest shard's rows (only `columns`), read concurrently: on an object store a resume of 10^5
    shards is bound by request latency, not bandwidth."""
    fs, paths = _shard_paths(output, storage_options)

    def one(p: str) -> pd.DataFrame | None:
        try:
            with fs.open(p, "rb") as f:
                return pq.read_table(f, columns=columns).to_pandas().assign(_shard=p)
        except Exception as e:  # an unreadable shard commits nothing: its samples are redone
            log.warning("ignoring unreadable manifest shard %s: %s", p, e)
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [df for df in pool.map(one, paths) if df is not None]


def _row_key(df: pd.DataFrame) -> list[str]:
    return ["id", "method"] if "method" in df.columns else ["id"]  # benchmark rows: one per (sample, method)


def read_manifest(output: str, storage_options: dict | None = None, columns: list[str] | None = None
                  ) -> pd.DataFrame:
    """All committed rows; a row that appears in several shards (before compaction) keeps its latest version."""
    frames = _read_shards(output, storage_options, columns)
    if not frames:
        return pd.DataFrame(columns=columns or [f.name for f in BASE_SCHEMA])
    df = pd.concat(frames, ignore_index=True).drop(columns="_shard")
    if "processed_at" in df.columns:
        df = df.sort_values("processed_at", kind="stable")
    return df.drop_duplicates(_row_key(df), keep="last").reset_index(drop=True)


def compact_manifest(output: str, storage_options: dict | None = None, retry: RetryConfig | None = None) -> int:
    """Rewrite every shard holding a superseded row (a sample committed again later: --resume.retry-errors)
    without it, so that a plain Parquet read sees each sample once. The newer row is committed before the
    older one is removed, so no committed sample is ever without a row. Returns the rows removed."""
    fs, paths = _shard_paths(output, storage_options)
    if not paths:
        return 0
    with fs.open(paths[0], "rb") as f:  # only the key columns are read to find superseded rows
        key = ["id", "method"] if "method" in pq.read_schema(f).names else ["id"]
    probe = _read_shards(output, storage_options, [*key, "processed_at"])
    if not probe:
        return 0
    df = pd.concat(probe, ignore_index=True).sort_values(["processed_at", "_shard"], kind="stable")
    stale = df[df.duplicated(key, keep="last")]
    for path, rows in stale.groupby("_shard"):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        shard = table.to_pandas()
        drop = set(map(tuple, rows[key].astype(str).to_numpy()))
        keep = shard[[tuple(r) not in drop for r in shard[key].astype(str).to_numpy()]]
        if len(keep):
            write_shard(pa.Table.from_pandas(keep, schema=table.schema, preserve_index=False), output,
                        storage_options, retry, name=path.rsplit("/", 1)[-1])
        else:
            retry_call(lambda path=path: fs.rm(path), f"removing {path}", retry, kind="write_transient")
        log.info("manifest compaction: %d superseded row(s) removed from %s", len(rows), path)
    return len(stale)


def committed_ids(output: str, storage_options: dict | None = None, retry_errors: bool = False) -> set[str]:
    df = read_manifest(output, storage_options, columns=["id", "status", "processed_at"])
    if retry_errors:
        df = df[df["status"] == "ok"]
    return set(df["id"])


def write_summary(output: str, summary: dict, storage_options: dict | None = None) -> str:
    uri = join_under(output, SUMMARY_FILE)
    fs, path = get_fs(uri, storage_options)
    write_bytes(fs, path, json.dumps(summary, indent=2, default=str).encode())
    return uri


def now_ms() -> pd.Timestamp:
    return pd.Timestamp(time.time_ns() // 1_000_000, unit="ms", tz="UTC")


def busy_by_actor(values) -> dict[str, float]:
    """Sum a BUSY_COLUMN over rows: {actor: seconds}."""
    busy: dict[str, float] = {}
    for v in values:
        for part in str(v or "").split(";"):
            if "=" in part:
                actor, _, seconds = part.rpartition("=")
                busy[actor] = busy.get(actor, 0.0) + float(seconds)
    return busy


class ManifestWriter(Declared):
    """Ray Data batch function, the pipeline's last stage: one shard per batch; returns shard stats.

    `columns` adds the workflow's own typed columns to BASE_SCHEMA; `constants` fills per-job columns.
    Rows whose status is "transient" are counted, not written: a rerun redoes them.
    """

    READS = ("id", "source", "status", "error_kind", "error")

    def __init__(self, output: str, columns: list[tuple[str, pa.DataType]], constants: dict,
                 storage_options: dict | None = None, retry: RetryConfig | None = None):
        self.output, self.constants, self.storage_options, self.retry = output, constants, storage_options, retry
        self.schema = pa.schema(list(BASE_SCHEMA) + [pa.field(n, t) for n, t in columns])

    def table(self, batch: dict) -> pa.Table:
        n = len(batch["id"])
        cols = {}
        for f in self.schema:
            if f.name in self.constants:
                values = [self.constants[f.name]] * n
            elif f.name == "processed_at":
                values = [now_ms()] * n
            elif f.name not in batch and f.name != "random_weights":
                values = [None] * n  # an optional output that this run did not produce
            elif f.name == "random_weights":
                values = [RANDOM_INIT in str(w) for w in batch["weights"]] if "weights" in batch else [None] * n
            else:
                values = [None if v is None or (isinstance(v, str) and v == "" and f.name in ("error", "error_kind"))
                          else v for v in list(batch[f.name])]
                values = [v.item() if isinstance(v, np.generic) else v for v in values]
            cols[f.name] = pa.array(values, type=f.type)
        return pa.Table.from_pydict(cols, schema=self.schema)

    def __call__(self, batch: dict, name: str | None = None) -> dict:
        """Commit the batch as one shard (named after its ids, or `name`); returns its stats."""
        status = np.asarray(batch["status"])
        kinds = np.asarray(batch.get("error_kind", np.array([""] * len(status), dtype=object)))
        committed = np.flatnonzero(status != TRANSIENT)
        uri, transient = "", len(status) - len(committed)
        if len(committed):
            rows = {k: (np.asarray(v)[committed] if len(v) == len(status) else v) for k, v in batch.items()}
            try:
                uri = write_shard(self.table(rows), self.output, self.storage_options, self.retry, name=name)
            except TransientError as e:  # the storage is down for longer than the retries: nothing committed
                log.warning("manifest shard not written, %d samples left for a rerun: %s", len(committed), e)
                kinds = np.where(status == "ok", "write_transient", kinds)
                status = np.full(len(status), TRANSIENT, dtype=object)
                committed, transient = committed[:0], len(status)
        histogram: dict[str, int] = {}
        for k in np.flatnonzero(status != "ok"):
            histogram[str(kinds[k]) or "other"] = histogram.get(str(kinds[k]) or "other", 0) + 1
        busy = busy_by_actor(batch.get(BUSY_COLUMN, []))
        return {"shard": np.array([uri], dtype=object), "rows": np.array([len(committed)]),
                "ok": np.array([int((status == "ok").sum())]),
                "error": np.array([int((status == "error").sum())]), "transient": np.array([transient]),
                "kinds": np.array([json.dumps(histogram)], dtype=object),
                "busy": np.array([json.dumps(busy)], dtype=object)}

"""Shards as the unit of work (write.format webdataset/parquet, or shard inputs).

A unit is an input shard (a WebDataset tar or a Parquet file of image bytes) or a chunk of a loose-file
listing. It flows through the pipeline as ONE Ray Data row carrying its samples as a packed batch, so the
same stage classes run on it (per_unit) and nothing can split it: a unit chunk of at most write.shard-size
samples becomes exactly one output shard (<output>/shards/<chunk>.tar|.parquet) and one manifest shard,
written after it as the commit marker (manifest/part-<chunk>.parquet; the last chunk of a unit says so in
its name). Planning lists shards, never samples; resume lists the marker names (no row is read).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from tasks.faults import TRANSIENT, RetryConfig, TransientError, retry_call, row_failure
from tasks.listing import IMAGE_EXTENSIONS, InputNotFoundError, list_inputs, output_stems, protocol_prefix
from tasks.manifest import ids_digest, manifest_prefix
from tasks.shards import ShardSample, iter_parquet, iter_tar, parquet_bytes, tar_bytes
from tasks.storage import get_fs, join_under, write_bytes
from tasks.write_stage import PNG_PREFIX

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
SHARD_INPUTS = {".tar": "tar", ".parquet": "parquet"}
UNIT_COLUMNS = [("shard", pa.string()), ("key", pa.string()), ("meta", pa.string())]  # manifest columns
UNIT_SOURCE = ("id", "source", "key", "stem", "key_error", "key_error_kind", "meta")  # what LoadUnits hands on
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")
_LAST = "-last"


@dataclass(frozen=True)
class Unit:
    name: str                 # output shard name without extension (chunks add -<k:05d>)
    kind: str                 # "tar" | "parquet" | "files"
    source: str = ""          # the input shard's URI
    rel: str = ""             # its path relative to the input root: the prefix of its samples' ids
    rows: tuple = ()          # files: (id, source) of each sample
    done: tuple = ()          # chunk indices already committed

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Unit:
        d = json.loads(text)
        return cls(**{**d, "rows": tuple(map(tuple, d["rows"])), "done": tuple(d["done"])})


def chunk_name(unit: str, k: int) -> str:
    return f"{unit}-{k:05d}"


def marker_path(chunk: str, last: bool) -> str:
    """A chunk's manifest shard, relative to manifest/: part-<chunk>[-last].parquet (in the chunk's folder)."""
    folder, base = posixpath.split(chunk)
    return posixpath.join(folder, f"part-{base}{_LAST if last else ''}.parquet")


def expand_braces(pattern: str) -> list[str]:
    """webdataset's brace patterns: {00000..00999} (zero-padded ranges) and {a,b} alternatives."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    if m.group(1) is not None:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        options = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        options = m.group(3).split(",")
    return [p for o in options for p in expand_braces(pattern[:m.start()] + o + pattern[m.end():])]


def shard_input_kind(spec: str, storage_options: dict | None) -> str | None:
    """"tar" or "parquet" when --input names shards (a shard, a brace pattern, or a folder/glob of them),
    None for loose images and URI lists (a .parquet with a `uri` column)."""
    fs, path = get_fs(spec, storage_options)
    for ext, kind in SHARD_INPUTS.items():
        if path.endswith(ext) or path.endswith(ext + "}"):
            if kind == "parquet" and fs.isfile(path) and _is_uri_list(fs, path):
                return None
            return kind
    if any(c in path for c in "*?[{"):
        return None
    if fs.isdir(path):  # the first level with files decides (folders of shards are common); bounded probes
        for _ in range(4):
            entries = fs.ls(path, detail=True)[:1000]
            names = [e["name"] for e in entries if e["type"] != "directory"]
            folders = [e["name"] for e in entries if e["type"] == "directory"]
            if names or not folders:
                break
            path = sorted(folders)[0]
        kinds = {kind for p in names for ext, kind in SHARD_INPUTS.items() if p.endswith(ext)}
        images = [p for p in names if p.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
        if len(kinds) == 1 and not images:
            kind = kinds.pop()
            first = next(p for p in names if p.endswith("." + kind))
            return None if kind == "parquet" and _is_uri_list(fs, first) else kind
    return None


def _is_uri_list(fs, path: str) -> bool:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return "uri" in pq.read_schema(f).names


def list_shards(spec: str, kind: str, storage_options: dict | None) -> tuple[str, list[str], str]:
    """(root, shard paths sorted, URI prefix) of the shards --input names."""
    fs, path = get_fs(spec, storage_options)
    proto = protocol_prefix(fs, spec)
    ext = "." + kind
    if "{" in path:
        paths = expand_braces(path)
        root = path.split("{", 1)[0].rsplit("/", 1)[0]
        missing = [p for p in paths[:1] if not fs.exists(p)]  # one probe: listing 10^3 shards is the workers' job
        if missing:
            raise InputNotFoundError(f"--input {spec}: {proto}{missing[0]} not found")
    elif any(c in path for c in "*?["):
        paths, root = fs.glob(path), path.split("*")[0].rsplit("/", 1)[0]
    elif fs.isdir(path):
        paths, root = fs.find(path), path.rstrip("/")
    elif fs.isfile(path):
        paths, root = [path], posixpath.dirname(path)
    else:
        raise InputNotFoundError(f"--input {spec}: not found (no such shard, folder, prefix or pattern)")
    return root, sorted(p for p in paths if p.endswith(ext)), proto


def committed_chunks(output: str, storage_options: dict | None) -> dict[str, tuple[set[int], int | None]]:
    """unit name -> (committed chunk indices, index of its last chunk if committed), from marker names only."""
    fs, root = get_fs(manifest_prefix(output), storage_options)
    fs.invalidate_cache(root)
    try:
        names = fs.find(root)
    except FileNotFoundError:
        names = []
    seen: dict[str, tuple[set[int], int | None]] = {}
    for p in names:
        rel = posixpath.relpath(p, root)
        folder, base = posixpath.split(rel)
        m = re.fullmatch(r"part-(.+)-(\d{5})(-last)?\.parquet", base)
        if not m:
            continue
        unit = posixpath.join(folder, m.group(1))
        chunks, last = seen.get(unit, (set(), None))
        chunks.add(int(m.group(2)))
        seen[unit] = (chunks, int(m.group(2)) if m.group(3) else last)
    return seen


def is_complete(chunks: set[int], last: int | None) -> bool:
    return last is not None and chunks >= set(range(last + 1))


@dataclass
class UnitPlan:
    units: list[Unit]
    shards: int           # input shards (or listing chunks) in all
    skipped: int          # of them already committed
    total: int = 0        # samples, where the plan knows them (loose files); shard inputs count as they run
    ignored: int = 0
    duplicates: int = 0


def plan_units(spec: str, output: str, storage_options: dict | None, extensions, shard_size: int,
               resume: bool, retry: RetryConfig | None = None, kind: str | None = "probe") -> UnitPlan:
    """The units still to do: input shards (or chunks of a loose-file listing) without a complete set of
    committed markers. Shard inputs are listed as shards; no shard is opened on the driver. kind: the input's
    shard_input_kind when the caller has it already (else it is probed here)."""
    if kind == "probe":
        kind = retry_call(lambda: shard_input_kind(spec, storage_options), f"listing {spec}", retry)
    done = (retry_call(lambda: committed_chunks(output, storage_options), f"listing {manifest_prefix(output)}",
                       retry) if resume else {})
    if kind:
        root, paths, proto = retry_call(lambda: list_shards(spec, kind, storage_options), f"listing {spec}", retry)
        if not paths:
            raise InputNotFoundError(f"--input {spec}: no .{kind} shards found")
        units = []
        for p in paths:
            rel = posixpath.relpath(p, root)
            name = rel[: -len(kind) - 1]
            units.append(Unit(name=name, kind=kind, source=proto + p, rel=rel))
        listing, folders = None, []
    else:
        folders = retry_call(lambda: _top_folders(spec, storage_options), f"listing {spec}", retry)
        listing = retry_call(lambda: list_inputs(spec, storage_options, tuple(extensions), recursive=not folders),
                             f"listing {spec}", retry)
        units = [Unit(name=rel, kind="prefix", source=uri, rel=rel) for rel, uri in folders]  # listed by workers
        units += files_units(listing.samples["id"].tolist(), listing.samples["source"].tolist(), shard_size)
    todo = []
    for u in units:
        chunks, last = done.get(u.name, (set(), None))
        if is_complete(chunks, last):
            continue
        todo.append(Unit(**{**asdict(u), "done": tuple(sorted(chunks))}) if chunks else u)
    return UnitPlan(units=todo, shards=len(units), skipped=len(units) - len(todo),
                    total=len(listing.samples) if listing is not None and not folders else 0,  # else: as they run
                    ignored=listing.ignored if listing else 0, duplicates=listing.duplicates if listing else 0)


def _top_folders(spec: str, storage_options: dict | None) -> list[tuple[str, str]]:
    """(relative path, URI) of the folders right under a folder input: each is listed by a worker, so the
    driver never holds the whole listing. Empty for a glob, a list file or a single image."""
    fs, path = get_fs(spec, storage_options)
    if any(c in path for c in "*?[") or not fs.isdir(path):
        return []
    proto = protocol_prefix(fs, spec)
    root = path.rstrip("/")
    return sorted((posixpath.relpath(e["name"], root), proto + e["name"]) for e in fs.ls(root, detail=True)
                  if e["type"] == "directory")


def files_units(ids: list[str], sources: list[str], shard_size: int) -> list[Unit]:
    """Loose files in chunks of shard_size, each named by the hash of its ids (the same ids, the same name)."""
    return [Unit(name=f"chunk-{ids_digest(ids[i:i + shard_size])}", kind="files",
                 rows=tuple(zip(ids[i:i + shard_size], sources[i:i + shard_size])))
            for i in range(0, len(ids), shard_size)]


def pack(batch: dict[str, np.ndarray]) -> bytes:
    """A unit's sample batch as one value of a Ray Data row (numpy arrays travel as pickle-5 buffers)."""
    return pickle.dumps(batch, protocol=5)


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    return pickle.loads(blob)  # noqa: S301 - our own pipeline's rows, never user input


def take(batch: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    n = len(batch["id"])
    return {k: (v[rows] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in batch.items()}


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class LoadUnits:
    """Ray Data batch function (CPU tasks), a generator: each unit row -> one row per chunk of at most
    `shard_size` samples, loaded by the workflow's load stage (`load`: a LoadFaces-like instance, whose
    load(batch, data) decodes given bytes). A shard is read whole with retries (one GET); a shard that
    cannot be read for good is one error row, one that stays unreachable leaves its unit uncommitted."""

    def __init__(self, load_cls: type, load_kwargs: dict, shard_size: int, storage_options: dict | None = None,
                 retry: RetryConfig | None = None, image_member: str = "", image_column: str = "",
                 output: str = "", extensions: tuple[str, ...] = ()):
        self.load = load_cls(**load_kwargs)
        self.output, self.extensions = output, tuple(extensions)
        self.shard_size, self.storage_options, self.retry = shard_size, storage_options, retry
        self.image_member, self.image_column = image_member, image_column

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for text in batch["unit"]:
            unit = Unit.from_json(str(text))
            if unit.kind == "prefix":  # a folder of loose files: listed here, in chunks not yet committed
                for chunk in self.list_prefix(unit):
                    yield from self(dict(unit=np.array([chunk.to_json()], dtype=object)))
                continue
            for k, last, samples in self.chunks(unit):
                if k in unit.done:
                    continue
                yield {"unit": np.array([chunk_name(unit.name, k)], dtype=object), "last": np.array([last]),
                       "samples": np.array([pack(samples)], dtype=object)}

    def list_prefix(self, unit: Unit) -> list[Unit]:
        listing = retry_call(lambda: list_inputs(unit.source, self.storage_options, self.extensions),
                             f"listing {unit.source}", self.retry).samples
        ids = [f"{unit.rel}/{i}" for i in listing["id"]]
        chunks = files_units(ids, listing["source"].tolist(), self.shard_size)
        fs, root = get_fs(manifest_prefix(self.output), self.storage_options)
        return [c for c in chunks if not retry_call(
            lambda c=c: fs.exists(f"{root}/{marker_path(chunk_name(c.name, 0), True)}"), f"checking {c.name}",
            self.retry)]

    def chunks(self, unit: Unit) -> Iterator[tuple[int, bool, dict]]:
        if unit.kind == "files":
            ids = [r[0] for r in unit.rows]
            stems, errors, kinds = output_stems(ids)
            keys = [f"{i:06d}" for i in range(len(ids))]  # a loose file's key in its output shard: its position
            batch = _sample_batch(ids, [r[1] for r in unit.rows], keys, stems, errors, kinds)
            yield 0, True, self.load.load(batch, None)
            return
        try:
            fs, path = get_fs(unit.source, self.storage_options)
            raw = retry_call(lambda: fs.cat_file(path), f"reading {unit.source}", self.retry)
        except TransientError as e:
            yield -1, False, _unit_failure(unit, TRANSIENT, e.kind, str(e))
            return
        except Exception as e:
            status, kind, msg = row_failure(e, "read")
            yield 0, True, _unit_failure(unit, status, kind if status == TRANSIENT else "bad_shard",
                                         f"cannot read shard {unit.source}: {msg}")
            return
        samples = (iter_tar(io.BytesIO(raw), self.image_member) if unit.kind == "tar" else
                   iter_parquet(io.BytesIO(raw), self.image_column))
        held: list[ShardSample] | None = None
        k, chunk = 0, []
        try:
            for s in samples:
                chunk.append(s)
                if len(chunk) == self.shard_size:
                    if held is not None:  # held back one chunk: only at the end is it known to be the last
                        yield k, False, self._load(unit, held)
                        k += 1
                    held, chunk = chunk, []
        except ValueError as e:  # a Parquet file without a usable image column
            yield 0, True, _unit_failure(unit, "error", "bad_shard", f"shard {unit.source}: {e}")
            return
        if held is not None and chunk:
            yield k, False, self._load(unit, held)
            k, held = k + 1, None
        yield k, True, self._load(unit, held if held is not None else chunk)

    def _load(self, unit: Unit, samples: list[ShardSample]) -> dict[str, np.ndarray]:
        ids = [f"{unit.rel}/{s.key}" for s in samples]
        stems, errors, kinds = output_stems(ids)
        errors = [s.error or e for s, e in zip(samples, errors)]
        kinds = [s.kind or k for s, k in zip(samples, kinds)]
        batch = _sample_batch(ids, [f"{unit.source}#{s.key}" for s in samples], [s.key for s in samples], stems,
                              errors, kinds)
        batch["meta"] = np.array([json.dumps(s.meta, sort_keys=True) if s.meta else "" for s in samples],
                                 dtype=object)
        return self.load.load(batch, [None if s.error else s.data for s in samples])


def _sample_batch(ids, sources, keys, stems, errors, kinds) -> dict[str, np.ndarray]:
    obj = lambda v: np.array(list(v), dtype=object)  # noqa: E731
    return {"id": obj(ids), "source": obj(sources), "key": obj(keys), "stem": obj(stems), "key_error": obj(errors),
            "key_error_kind": obj(kinds)}


def _unit_failure(unit: Unit, status: str, kind: str, message: str) -> dict[str, np.ndarray]:
    """The one row standing for a shard whose samples are unknown (its id: the shard's relative path)."""
    return {"id": np.array([unit.rel or unit.name], dtype=object), "source": np.array([unit.source], dtype=object),
            "key": np.array([""], dtype=object), "stem": np.array([""], dtype=object),
            "status": np.array([status], dtype=object), "error_kind": np.array([kind], dtype=object),
            "error": np.array([message], dtype=object), "unit_failed": np.array([True])}


def per_unit(stage_cls: type, rows: int | None = None) -> type:
    """The stage class applied to each unit row's samples (in slices of `rows` for the model's batch size);
    a unit that failed as a whole passes through."""

    class PerUnit:
        def __init__(self, **kwargs):
            self.stage = stage_cls(**kwargs)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = []
            for blob in batch["samples"]:
                samples = unpack(blob)
                n = len(samples["id"])
                if "unit_failed" in samples or n == 0:
                    out.append(blob)
                    continue
                step = rows or n
                out.append(pack(concat([self.stage(take(samples, slice(i, i + step))) for i in range(0, n, step)])))
            return {**batch, "samples": np.array(out, dtype=object)}

    PerUnit.__name__ = PerUnit.__qualname__ = stage_cls.__name__
    return PerUnit


class CommitUnit:
    """Ray Data batch function (CPU tasks), the unit pipeline's tail: encode the chunk's images (the workflow's
    writer), write its data shard, then its manifest shard (the commit marker). A chunk with a transient row is
    not committed at all (every row of it counts as transient): a rerun redoes the chunk."""

    def __init__(self, writer: tuple[type, dict], manifest: tuple[type, dict], output: str, format: str,
                 storage_options: dict | None = None, retry: RetryConfig | None = None):
        (write_cls, write_kwargs), (manifest_cls, manifest_kwargs) = writer, manifest
        self.write, self.manifest = write_cls(**write_kwargs), manifest_cls(**manifest_kwargs)
        self.output, self.format, self.storage_options, self.retry = output, format, storage_options, retry

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = [self.commit(str(u), bool(last), unpack(blob))
                 for u, last, blob in zip(batch["unit"], batch["last"], batch["samples"])]
        return {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}

    def commit(self, chunk: str, last: bool, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "unit_failed" in samples:
            samples = {k: v for k, v in samples.items() if k != "unit_failed"}
        else:
            samples = self.write(samples)
        status = np.asarray(samples["status"])
        if (status == TRANSIENT).any():  # the whole chunk waits for a rerun, under the cause's kind
            kind = str(np.asarray(samples["error_kind"])[status == TRANSIENT][0])
            return self.manifest(_all_transient(samples, kind))  # counts them; writes nothing
        if self.format != "files":
            try:
                self.write_data(chunk, samples)
            except TransientError as e:
                log.warning("shard %s not written, %d samples left for a rerun: %s", chunk, len(status), e)
                return self.manifest(_all_transient(samples, e.kind))
        return self.manifest(samples, name=marker_path(chunk, last))

    def write_data(self, chunk: str, samples: dict[str, np.ndarray]) -> None:
        names = [k[len(PNG_PREFIX):] for k in samples if k.startswith(PNG_PREFIX)]
        ext = "tar" if self.format == "webdataset" else "parquet"
        uri = join_under(join_under(self.output, SHARDS_DIR), f"{chunk}.{ext}")
        n = len(samples["id"])
        keys = [str(k) or f"{i:06d}" for i, k in enumerate(samples.get("key", [""] * n))]
        samples["key"], samples["shard"] = np.array(keys, dtype=object), np.array([uri] * n, dtype=object)
        members = member_names(keys, samples.get("method"), {name: samples[PNG_PREFIX + name] for name in names})
        for name in names:
            samples[name] = np.array([f"{uri}#{keys[i]}.{m}" if m else "" for i, m in enumerate(members[name])],
                                     dtype=object)
        table = self.manifest.table(samples)
        if ext == "tar":
            rows, grouped = table.to_pylist(), {}
            method = samples.get("method")
            for i in range(n):
                group = grouped.setdefault(keys[i], {})
                for name in names:
                    if members[name][i]:
                        group.setdefault(members[name][i], samples[PNG_PREFIX + name][i])
                row_json = "json" if method is None else f"{method[i]}.json"
                group[row_json] = json.dumps(rows[i], default=str, sort_keys=True).encode()
            data = tar_bytes(grouped.items())
        else:
            data = parquet_bytes(table, {name: list(samples[PNG_PREFIX + name]) for name in names},
                                 {name: [f"{keys[i]}.{m}" for i, m in enumerate(members[name])] for name in names})
        fs, path = get_fs(uri, self.storage_options)
        write_bytes(fs, path, data, self.retry)


def _all_transient(samples: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    n = len(samples["status"])
    return {**samples, "status": np.full(n, TRANSIENT, dtype=object), "error_kind": np.full(n, kind, dtype=object)}


def member_names(keys: list[str], method, images: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """The member (after "<key>.") of each row's image: "<name>.png"; where a sample has several rows (one per
    benchmark method) an image they all share (gt, lq) is stored once, the others as "<method>.<name>.png"."""
    out = {}
    for name, png in images.items():
        shared = method is None or len({(k, p) for k, p in zip(keys, png) if p is not None}) == len(
            {k for k, p in zip(keys, png) if p is not None})
        out[name] = ["" if p is None else f"{name}.png" if shared else f"{method[i]}.{name}.png"
                     for i, p in enumerate(png)]
    return out


def read_output_image(uri: str, storage_options: dict | None = None) -> bytes:
    """The bytes of an output image from its manifest URI: a file, or "<shard>#<member>" inside a tar or
    Parquet shard (the whole shard is read: for reports and spot checks, not bulk reads)."""
    if "#" not in uri:
        fs, path = get_fs(uri, storage_options)
        return fs.cat_file(path)
    shard, member = uri.rsplit("#", 1)
    fs, path = get_fs(shard, storage_options)
    with fs.open(path, "rb") as f:
        if shard.endswith(".tar"):
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    if info.name == member:
                        return tar.extractfile(info).read()
            raise FileNotFoundError(f"{member} not in {shard}")
        import pyarrow.parquet as pq

        key, name = member.split(".", 1)
        column = name.rsplit(".", 2)[-2] if name.count(".") else name
        table = pq.read_table(f, columns=["key", column])
    for k, cell in zip(table.column("key").to_pylist(), table.column(column).to_pylist()):
        if k == key and cell and cell.get("path") == member:
            return cell["bytes"]
    raise FileNotFoundError(f"{member} not in {shard}")


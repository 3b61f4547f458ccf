"""Export an augment.py training set to the paired-folder layout of BasicSR-family trainers.

    python workflows/export_basicsr.py --input s3://train/dr2aug/ --dest /data/dr2aug_basicsr

writes <dest>/hq/<name>.png, <dest>/lq/<name>.png and <dest>/meta_info.txt, one line per pair in BasicSR's
meta_info format ("<name>.png (h,w,c)": BasicSR's paired_paths_from_meta_info_file keeps the text before the
first space as the GT file name, relative to the GT folder, and looks for the same name in the LQ folder).
A BasicSR / GFPGAN / CodeFormer PairedImageDataset then reads it with
    dataroot_gt: <dest>/hq   dataroot_lq: <dest>/lq   meta_info_file: <dest>/meta_info.txt   filename_tmpl: '{}'
(or io_backend disk without meta_info: the two folders hold the same names).

The input is an augment output in any --write.format: its Parquet manifest (<input>/manifest/) names the
committed samples; rows with status "ok" are exported. Images come from
  files:      the manifest's hq / lq columns (file URIs)
  webdataset: the row's `shard` tar, members "<key>.hq.png" / "<key>.lq.png"; each tar is streamed once
  parquet:    the row's `shard` .parquet, its hq / lq columns (Hugging Face Image structs {bytes, path}) at the
              row with the same id
PNG bytes are copied as they are (pixel-exact); any other encoding is decoded and written as PNG. <name> is
the sample id made a safe single file name ("/" -> "__", image extension dropped, anything outside
[A-Za-z0-9._-] -> "_"); ids that would share a name get "~<hash of the id>" appended. meta_info.txt is
written last and sorted by name: a run that stopped early leaves no meta_info.txt, and an export from the
same input is byte-identical. Images of an earlier export to the same dest that this one does not list stay
on disk but are not in meta_info.txt.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import struct
import sys
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.config import load, opt
from tasks.manifest import read_manifest
from tasks.storage import get_fs, join_under, read_sources, write_bytes

log = logging.getLogger("export_basicsr")

PAIR = ("hq", "lq")  # BasicSR's gt and lq
META_INFO = "meta_info.txt"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> channels as cv2.imread(UNCHANGED) gives
_IMAGE_EXT = re.compile(r"\.(png|jpe?g|webp|bmp|tiff?)$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 200  # bytes of a name before ".png": far below the usual 255-byte file-name limit


@dataclass(frozen=True)
class ExportConfig:
    input: str = opt("out/augment", "an augment.py output prefix (its manifest/ says what to export)")
    dest: str = opt("out/basicsr", "destination folder or fsspec URI: hq/, lq/ and meta_info.txt go under it")
    storage_options: dict = opt({}, "fsspec options for input and dest, e.g. {endpoint_url: ...}; credentials "
                                    "come from the environment")
    fetch_batch: int = opt(64, "files layout: images fetched per concurrent request batch")
    write_threads: int = opt(8, "threads writing the exported files (object-store puts overlap)")


def pair_names(ids: list[str]) -> dict[str, str]:
    """{sample id: file name without .png}: safe, unique, and a function of the id set only."""
    def digest(i: str) -> str:
        return hashlib.blake2b(i.encode(), digest_size=4).hexdigest()

    base = {}
    for i in ids:
        name = _UNSAFE.sub("_", _IMAGE_EXT.sub("", i).replace("/", "__")).lstrip(".") or "_"
        base[i] = name if len(name) <= MAX_NAME else f"{name[:MAX_NAME]}~{digest(i)}"
    shared = Counter(base.values())
    # "~" is never in a sanitised name, so a suffixed name cannot collide with a plain one
    return {i: n if shared[n] == 1 else f"{n}~{digest(i)}" for i, n in base.items()}


def png_shape(data: bytes) -> tuple[int, int, int]:
    """(h, w, c) from a PNG's IHDR, without decoding."""
    width, height, _, colour = struct.unpack(">IIBB", data[16:26])
    return height, width, PNG_CHANNELS[colour]


def as_png(data: bytes, what: str) -> bytes:
    if data[:8] == PNG_SIGNATURE:
        return data
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{what}: not a decodable image")
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"{what}: PNG encoding failed")
    return buf.tobytes()


def _ref(row, name: str) -> str:
    """What follows "#" in a shard-format row's image reference "<shard uri>#<member or column>", else ""."""
    ref = row.get(name)
    return ref.rsplit("#", 1)[1] if isinstance(ref, str) and "#" in ref else ""


def _from_files(rows: pd.DataFrame, so: dict | None, batch: int) -> Iterator[tuple[str, dict | Exception]]:
    for start in range(0, len(rows), batch):
        chunk = rows.iloc[start:start + batch]
        got = read_sources([u for n in PAIR for u in chunk[n]], so)
        for k, sid in enumerate(chunk["id"]):
            pair = {n: got[j * len(chunk) + k] for j, n in enumerate(PAIR)}
            bad = [v for v in pair.values() if isinstance(v, Exception)]
            yield sid, bad[0] if bad else pair


def _from_tar(shard: str, rows: pd.DataFrame, so: dict | None) -> Iterator[tuple[str, dict | Exception]]:
    """One sequential pass over the tar; a pair is handed on as soon as both members were seen."""
    wanted = {}  # member name -> (id, image name)
    for _, row in rows.iterrows():
        for n in PAIR:
            wanted[_ref(row, n) or f"{row['key']}.{n}.png"] = (row["id"], n)
    found: dict[str, dict] = defaultdict(dict)
    fs, path = get_fs(shard, so)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            hit = wanted.pop(info.name, None) if info.isfile() else None
            if hit:
                found[hit[0]][hit[1]] = tar.extractfile(info).read()
                if len(found[hit[0]]) == len(PAIR):
                    yield hit[0], found.pop(hit[0])
    for sid in sorted({sid for sid, _ in wanted.values()}):
        yield sid, FileNotFoundError(f"{shard}: no member(s) {sorted(m for m, w in wanted.items() if w[0] == sid)}")


def _from_parquet(shard: str, rows: pd.DataFrame, so: dict | None) -> Iterator[tuple[str, dict | Exception]]:
    todo = set(rows["id"])
    fs, path = get_fs(shard, so)
    with fs.open(path, "rb") as f:
        shard_file = pq.ParquetFile(f)
        # the reference may name the column ("#hq") or the image's member-style path ("#<key>.hq.png")
        names = set(shard_file.schema_arrow.names)
        columns = {n: ref if (ref := _ref(rows.iloc[0], n)) in names else n for n in PAIR}
        for batch in shard_file.iter_batches(batch_size=256, columns=["id", *columns.values()]):
            ids = batch.column("id").to_pylist()
            images = {n: batch.column(c).to_pylist() for n, c in columns.items()}
            for k, sid in enumerate(ids):
                if sid in todo:
                    todo.discard(sid)
                    cells = {n: images[n][k] for n in PAIR}
                    if all(isinstance(c, dict) and c.get("bytes") for c in cells.values()):
                        yield sid, {n: c["bytes"] for n, c in cells.items()}
                    else:
                        yield sid, ValueError(f"{shard}: empty image cell for id {sid}")
    for sid in sorted(todo):
        yield sid, FileNotFoundError(f"{shard}: no row with id {sid}")


def pairs(manifest: pd.DataFrame, so: dict | None, fetch_batch: int) -> Iterator[tuple[str, dict | Exception]]:
    """(id, {"hq": bytes, "lq": bytes}) or (id, the reason it cannot be read) for every row."""
    sharded = manifest["shard"].notna() & (manifest["shard"] != "") if "shard" in manifest else None
    loose = manifest if sharded is None else manifest[~sharded]
    yield from _from_files(loose, so, fetch_batch)
    if sharded is not None:
        for shard, rows in manifest[sharded].groupby("shard", sort=True):
            reader = _from_tar if str(shard).endswith(".tar") else _from_parquet
            yield from reader(str(shard), rows, so)


def export(cfg: ExportConfig) -> tuple[int, list[str]]:
    """Write the pairs and meta_info.txt; returns (pairs exported, reasons of the ok rows not exported)."""
    so = cfg.storage_options or None
    manifest = read_manifest(cfg.input, so)
    missing_cols = [c for c in ("id", "status", *PAIR) if c not in manifest.columns]
    if manifest.empty or missing_cols:
        raise FileNotFoundError(f"no augment manifest under {join_under(cfg.input, 'manifest')}"
                                + (f" (columns {missing_cols} missing)" if missing_cols and not manifest.empty else ""))
    ok = manifest[manifest["status"] == "ok"].sort_values("id").reset_index(drop=True)
    names = pair_names(ok["id"].tolist())
    dest = {n: join_under(cfg.dest, n) for n in PAIR}
    lines, failures = {}, []

    def put(sid: str, pair: dict) -> tuple[str, str]:
        data = {n: as_png(pair[n], f"{sid} {n}") for n in PAIR}
        for n in PAIR:
            fs, path = get_fs(join_under(dest[n], names[sid] + ".png"), so)
            write_bytes(fs, path, data[n])
        h, w, c = png_shape(data["hq"])
        return names[sid], f"{names[sid]}.png ({h},{w},{c})"

    with ThreadPoolExecutor(max(1, cfg.write_threads)) as pool:
        pending = []
        for sid, pair in pairs(ok, so, cfg.fetch_batch):
            if isinstance(pair, Exception):
                failures.append(f"{sid}: {pair}")
            else:
                pending.append((sid, pool.submit(put, sid, pair)))
            if len(pending) >= 4 * cfg.write_threads:  # bound the bytes held in memory
                pending = _drain(pending, lines, failures, keep=cfg.write_threads)
        _drain(pending, lines, failures, keep=0)
    fs, path = get_fs(join_under(cfg.dest, META_INFO), so)
    write_bytes(fs, path, "".join(lines[k] + "\n" for k in sorted(lines)).encode())
    return len(lines), failures


def _drain(pending: list, lines: dict, failures: list, keep: int) -> list:
    while len(pending) > keep:
        sid, fut = pending.pop(0)
        try:
            name, line = fut.result()
            lines[name] = line
        except Exception as e:  # an undecodable image: reported, not exported
            failures.append(f"{sid}: {e}")
    return pending


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: ExportConfig = load(ExportConfig, argv, __doc__)
    if cfg.fetch_batch < 1 or cfg.write_threads < 1:
        log.error("--fetch-batch and --write-threads must be >= 1, got %d and %d", cfg.fetch_batch,
                  cfg.write_threads)
        return 2
    try:
        exported, failures = export(cfg)
    except FileNotFoundError as e:
        log.error("%s: pass --input, the output prefix of an augment.py run", e)
        return 2
    for f in failures[:20]:
        log.error("not exported: %s", f)
    log.info("exported %d pair(s) to %s (%s); %d ok sample(s) not exported", exported, cfg.dest,
             posixpath.join(cfg.dest, META_INFO), len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

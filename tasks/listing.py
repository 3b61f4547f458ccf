"""Turn an input spec into the sample table (id, source URI, output stem).

The input is a directory/prefix (listed recursively), a glob, or a .parquet/.csv list with a `uri`
column (and optionally `id`). A sample's id is its path relative to the input root (or the list's id),
so it is stable across runs and machines: seeds, output names and resume all key on it.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from tasks.storage import get_fs, join_under

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
PER_SAMPLE_COLUMNS = ("N", "tau")


class InputNotFoundError(FileNotFoundError):
    """--input names nothing that exists."""


@dataclass
class Listing:
    samples: pd.DataFrame   # columns: id, source, stem, key_error, key_error_kind (+ N, tau from a list)
    ignored: int            # files skipped for their extension
    duplicates: int = 0     # list rows dropped for repeating an id


def protocol_prefix(fs, uri: str) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return "" if proto in ("file", "local") or "://" not in uri else f"{proto}://"


def _output_stem(sample_id: str) -> str:
    stem, _ = posixpath.splitext(sample_id)
    return stem


def list_inputs(spec: str, storage_options: dict | None = None,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS, recursive: bool = True) -> Listing:
    """The sample table of an input; recursive=False lists a folder's own files only (its subfolders are
    listed elsewhere: tasks/units.py)."""
    fs, path = get_fs(spec, storage_options)
    prefix = protocol_prefix(fs, spec)
    exts = tuple("." + e.lower().lstrip(".") for e in extensions)
    if path.endswith((".parquet", ".csv")) and fs.isfile(path):
        with fs.open(path, "rb") as f:
            table = pd.read_parquet(f) if path.endswith(".parquet") else pd.read_csv(f)
        if "uri" not in table.columns:
            raise ValueError(f"input list {spec} needs a 'uri' column (has {list(table.columns)})")
        uris = table["uri"].astype(str).tolist()
        ids = (table["id"].astype(str).tolist() if "id" in table.columns
               else [u.split("://", 1)[-1].lstrip("/") for u in uris])
        df = pd.DataFrame({"id": ids, "source": uris})
        for col in PER_SAMPLE_COLUMNS:  # per-sample settings given in the list override the config
            if col in table.columns:
                df[col] = table[col].to_numpy()
        ignored = 0
    else:
        if any(c in path for c in "*?["):
            files = fs.glob(path)
            root = path.split("*")[0].rsplit("/", 1)[0]
        elif fs.isdir(path):
            root = path.rstrip("/")
            files = fs.find(path) if recursive else [e["name"] for e in fs.ls(root, detail=True)
                                                      if e["type"] != "directory"]
        elif fs.isfile(path):
            files, root = [path], posixpath.dirname(path)
        else:
            raise InputNotFoundError(f"--input {spec}: not found (no such file, folder, prefix or matching glob)")
        files = sorted(f for f in files if not fs.isdir(f))
        keep = [f for f in files if f.lower().endswith(exts)]
        ignored = len(files) - len(keep)
        df = pd.DataFrame({"id": [posixpath.relpath(f, root) for f in keep],
                           "source": [prefix + f for f in keep]})
    duplicates = int(df["id"].duplicated().sum())
    if duplicates:  # a list naming a sample twice: process it once, say how many rows were dropped
        log.warning("%d input rows repeat an id already listed in %s (e.g. %r): each id is processed once",
                    duplicates, spec, df["id"][df["id"].duplicated()].iloc[0])
        df = df[~df["id"].duplicated()]
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    df["stem"], df["key_error"], df["key_error_kind"] = output_stems(df["id"].tolist())
    return Listing(df, ignored, duplicates)


def output_stems(ids: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(stem, key_error, key_error_kind) per id. An output is <folder>/<stem>.png: the id without its
    extension, or the whole id where several inputs share a stem (a.png and a.jpg -> a.png.png, a.jpg.png),
    so that neither wins and the names do not depend on listing order. Unsafe ids get an error instead."""
    plain = [_output_stem(i) for i in ids]
    shared = {s for s, n in Counter(plain).items() if n > 1}
    taken: set[str] = set()

    def one(sid: str, stem: str) -> tuple[str, str, str]:
        try:
            stem = join_under("x", sid if stem in shared else stem)[2:]  # validated relative stem
        except ValueError as e:
            return "", f"unsafe output key derived from id {sid!r}: {e}", "unsafe_key"
        if stem in taken:  # only a contrived id set gets here (a.png, a.jpg and a literal a.png.png)
            return "", f"output name {stem}.png is already taken by another input", "duplicate_name"
        taken.add(stem)
        return stem, "", ""

    rows = [one(sid, stem) for sid, stem in zip(ids, plain)]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

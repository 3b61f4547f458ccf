"""Turn an input spec into the sample table (id, source URI, output stem).

The input is a directory/prefix (listed recursively), a glob, or a .parquet/.csv list with a `uri`
column (and optionally `id`). A sample's id is its path relative to the input root (or the list's id),
so it is stable across runs and machines: seeds, output names and resume all key on it.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import pandas as pd

from tasks.storage import get_fs, join_under

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
PER_SAMPLE_COLUMNS = ("N", "tau")


@dataclass
class Listing:
    samples: pd.DataFrame   # columns: id, source, stem, key_error (+ N, tau when a list gives them)
    ignored: int            # files skipped for their extension


def _protocol_prefix(fs, uri: str) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return "" if proto in ("file", "local") or "://" not in uri else f"{proto}://"


def _output_stem(sample_id: str) -> str:
    stem, _ = posixpath.splitext(sample_id)
    return stem


def list_inputs(spec: str, storage_options: dict | None = None,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Listing:
    fs, path = get_fs(spec, storage_options)
    prefix = _protocol_prefix(fs, spec)
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
            files, root = fs.find(path), path.rstrip("/")
        elif fs.isfile(path):
            files, root = [path], posixpath.dirname(path)
        else:
            raise FileNotFoundError(f"input not found: {spec}")
        files = sorted(f for f in files if not fs.isdir(f))
        keep = [f for f in files if f.lower().endswith(exts)]
        ignored = len(files) - len(keep)
        df = pd.DataFrame({"id": [posixpath.relpath(f, root) for f in keep],
                           "source": [prefix + f for f in keep]})
    if df["id"].duplicated().any():
        dup = df["id"][df["id"].duplicated()].iloc[0]
        raise ValueError(f"input ids must be unique; {dup!r} appears more than once in {spec}")
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    stems, errors = [], []
    for sid in df["id"]:
        try:
            stems.append(join_under("x", _output_stem(sid))[2:])  # validated relative stem
            errors.append("")
        except ValueError as e:
            stems.append("")
            errors.append(f"unsafe output key derived from id {sid!r}: {e}")
    df["stem"], df["key_error"] = stems, errors
    # Two inputs that differ only in extension would write the same output: the first (by id) wins.
    clash = df["stem"].ne("") & df["stem"].duplicated(keep="first")
    df.loc[clash, "key_error"] = [f"output name {s}.png is already taken by another input with the same stem"
                                  for s in df.loc[clash, "stem"]]
    df.loc[clash, "stem"] = ""
    return Listing(df, ignored)

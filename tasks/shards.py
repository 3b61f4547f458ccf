"""Shard formats: read samples out of WebDataset tars and Parquet files, write output shards in both.

Readers stream: a tar is read front to back (`tarfile` stream mode, no seeks, one GET on an object store)
and grouped by key as the `webdataset` library groups it; a Parquet file is read batch by batch. A bad
member is one sample's error, never the shard's. Writers build a whole shard in memory and hand back its
bytes, so that tasks.storage.write_bytes can make it visible atomically (a partial tar is never seen).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's rule: key = up to the basename's first dot
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face datasets' Image storage


@dataclass
class ShardSample:
    """One sample read out of a shard: its image bytes, or why there are none (error, error_kind)."""

    key: str
    data: bytes | None = None
    error: str = ""
    kind: str = ""
    meta: dict[str, str] = field(default_factory=dict)  # the sample's other members / scalar columns, as text


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, or None for names webdataset skips (no extension)."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def choose_image(key: str, members: dict[str, bytes], image_member: str = "",
                 extensions: Iterable[str] = SHARD_IMAGE_EXTENSIONS) -> ShardSample:
    """The sample of a group of members: the one image member (by `image_member` if given), the rest as meta."""
    exts = {e.lower() for e in extensions}
    if image_member:
        names = [image_member] if image_member in members else []
    else:
        names = [n for n in members if n.rsplit(".", 1)[-1].lower() in exts]
        if len(names) > 1:  # "png" beats "hq.png": a plain image extension names the sample's own image
            names = [n for n in names if n.lower() in exts] or names
    meta = {n: _text(b) for n, b in members.items() if n not in names[:1]}
    if len(names) == 1:
        return ShardSample(key, members[names[0]], meta=meta)
    have = ", ".join(sorted(members)) or "nothing"
    if not names:
        want = f"a member .{image_member}" if image_member else f"a member with an image extension {sorted(exts)}"
        return ShardSample(key, error=f"sample {key!r} has no image: {want} is missing (has {have})",
                           kind="no_image", meta=meta)
    return ShardSample(key, error=f"sample {key!r} has several image members ({have}): choose one with "
                                  "--image.member", kind="no_image", meta=meta)


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(data)} bytes>"


def iter_tar(fileobj, image_member: str = "", extensions: Iterable[str] = SHARD_IMAGE_EXTENSIONS
             ) -> Iterator[ShardSample]:
    """Samples of a WebDataset tar in file order. Consecutive members with the same key form a sample; a
    truncated tar yields its complete samples, then one error sample for the member it was cut in."""
    exts = tuple(extensions)
    key, members = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                parsed = split_key(info.name) if info.isfile() else None
                if parsed is None:
                    continue
                k, ext = parsed
                if k != key and key is not None:
                    yield choose_image(key, members, image_member, exts)
                    members = {}
                key = k
                members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError) as e:  # a broken tar; a network failure propagates to the caller's retry
        # the group being read when the tar broke has not been yielded yet: it becomes the error sample
        yield ShardSample(key or "<tar>", error=f"truncated or corrupt tar in sample {key!r}: {e}", kind="decode")
        return
    if key is not None:
        yield choose_image(key, members, image_member, exts)


def image_column(schema: pa.Schema, column: str = "") -> str:
    """The column holding image bytes: `column` if given, else the one Hugging Face Image struct
    ({bytes, path}) or binary column. ValueError naming the columns when there is none or several."""
    if column:
        if column not in schema.names:
            raise ValueError(f"--image.column {column!r} is not a column of this Parquet file (has {schema.names})")
        return column
    found = [f.name for f in schema if _is_image_type(f.type)]
    if len(found) != 1:
        raise ValueError(f"cannot tell which column holds the images ({'none' if not found else found} of "
                         f"{schema.names} are binary or {{bytes, path}} structs): name it with --image.column")
    return found[0]


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def iter_parquet(fileobj, column: str = "", batch_rows: int = 256) -> Iterator[ShardSample]:
    """Samples of a Parquet file in row order, keyed by their 8-digit row index; scalar columns are meta."""
    pf = pq.ParquetFile(fileobj)
    name = image_column(pf.schema_arrow, column)
    scalar = [f.name for f in pf.schema_arrow if f.name != name and
              (pa.types.is_string(f.type) or pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[name, *scalar]):
        images = batch.column(name)
        if pa.types.is_struct(images.type):
            images = images.field("bytes")
        meta_rows = batch.select(scalar).to_pylist() if scalar else [{}] * len(batch)
        for data, meta in zip(images.to_pylist(), meta_rows):
            meta = {k: str(v) for k, v in meta.items() if v is not None}
            yield (ShardSample(f"{row:08d}", data, meta=meta) if data else
                   ShardSample(f"{row:08d}", error=f"row {row}: no image bytes in column {name!r}", kind="no_image",
                               meta=meta))
            row += 1


def tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of `<key>.<ext>` members, in the given order, with fixed metadata (same input, same bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(rows: pa.Table, images: dict[str, list[bytes | None]], paths: dict[str, list[str]]) -> bytes:
    """The manifest rows with each output image's column (its URI there) holding the image itself, as a
    Hugging Face Image struct, with the `features` metadata `datasets` reads (Dataset.from_parquet decodes them)."""
    table = rows.drop_columns([n for n in images if n in rows.column_names])
    for name, data in images.items():
        table = table.append_column(pa.field(name, HF_IMAGE), pa.array(
            [None if d is None else {"bytes": d, "path": p} for d, p in zip(data, paths[name])], type=HF_IMAGE))
    features = {f.name: ({"_type": "Image"} if f.name in images else {"dtype": _hf_dtype(f.type), "_type": "Value"})
                for f in table.schema}
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=256)
    return buf.getvalue()


def _hf_dtype(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}" + (f", tz={t.tz}]" if t.tz else "]")
    return {"string": "string", "int64": "int64", "double": "float64", "bool": "bool"}.get(str(t), str(t))

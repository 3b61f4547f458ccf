#!/usr/bin/env python
"""Synthetic face-dataset generator for benchmarks and tests: loose files, WebDataset tars or Parquet shards.

    scripts/env.sh python bench/make_dataset.py --out /tmp/faces_wds --count 1000 --format webdataset --per-shard 100
    scripts/env.sh python bench/make_dataset.py --out s3://bench/faces_pq --count 1000000 --format parquet \\
        --per-shard 1000 --payload placeholder --storage-options '{"endpoint_url": "http://127.0.0.1:8333"}'

Sample i (0 <= i < count) lies in shard i // per-shard:
  files:      <out>/<shard:06d>/<i:09d>.png  (per-shard bounds the files in one folder)
  webdataset: <out>/faces-<shard:05d>.tar, members <i:09d>.png and <i:09d>.json ({"index": i})
  parquet:    <out>/faces-<shard:05d>.parquet, columns image (Hugging Face Image struct {bytes, path}, with the
              `huggingface` features metadata so datasets decodes it) and index (int64)
Payload png: an S x S RGB PNG, a smooth two-colour gradient plus noise, a function of (seed, i) only, so a
rerun, or the same sample in another format or shard size, is byte-identical. Payload placeholder: a fixed
short byte string per sample (not an image), for listing/planning benchmarks at 10^6 samples where decoding
does not matter. Everything is written through fsspec (local paths or s3://...); shards are independent
and are spread over --workers processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

if __package__ in (None, ""):  # `python bench/make_dataset.py` without scripts/env.sh's PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

FORMATS = ("files", "webdataset", "parquet")
PAYLOADS = ("png", "placeholder")
# Hugging Face `datasets` reads its column types from this schema metadata: `image` decodes to a PIL image.
HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"}, "index": {"dtype": "int64", "_type": "Value"}}}}


@lru_cache(maxsize=4)
def _ramp(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    return x, y


def face_pixels(index: int, size: int, seed: int = 0) -> np.ndarray:
    """RGB uint8 (size, size, 3) of sample `index`: depends on (seed, index) only."""
    rng = np.random.default_rng((seed, index))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    x, y = _ramp(size)
    t = np.cos(angle) * x + np.sin(angle) * y
    t -= t.min()
    level = (t * (255 / max(float(t.max()), 1e-6))).astype(np.uint8)  # gradient position 0..255
    palette = (c0 + np.linspace(0, 1, 256)[:, None] * (c1 - c0)).astype(np.int16)  # a colour per position
    # integer noise and a palette lookup: ~10x faster than float blending plus normal noise
    rgb = palette[level] + rng.integers(-10, 11, (size, size, 3), dtype=np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def payload(index: int, kind: str, size: int, seed: int) -> bytes:
    if kind == "placeholder":
        return b"placeholder %09d" % index
    import cv2

    ok, buf = cv2.imencode(".png", face_pixels(index, size, seed)[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"PNG encoding of sample {index} failed")
    return buf.tobytes()


def shard_uri(out: str, fmt: str, shard: int) -> str:
    if fmt == "files":
        return f"{out.rstrip('/')}/{shard:06d}"
    return f"{out.rstrip('/')}/faces-{shard:05d}.{'tar' if fmt == 'webdataset' else 'parquet'}"


def tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar member header, as tarfile writes it for TarInfo(name) with size, mode 0o644, mtime 0.

    Written by hand because tarfile.addfile costs ~35 us a member: 70 s for 10^6 samples (2 members each)."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    head = b"%s%s0000644\x000000000\x000000000\x00%011o\x0000000000000\x00" % (raw, bytes(100 - len(raw)), size)
    tail = b"0" + bytes(100) + b"ustar\x0000" + bytes(64 + 16 + 167)  # no device numbers
    checksum = sum(head) + sum(tail) + 8 * 32  # the checksum field itself counts as 8 spaces
    return head + b"%06o\x00 " % checksum + tail


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A whole uncompressed tar (ustar headers, end-of-archive blocks, padded to tarfile's 10240-byte record)."""
    parts = []
    for name, data in members:
        parts += [tar_header(name, len(data)), data, bytes(-len(data) % 512)]
    body = b"".join(parts) + bytes(1024)
    return body + bytes(-len(body) % tarfile.RECORDSIZE)


def write_shard(args: tuple) -> int:
    """Write shard `shard` (samples [start, stop)); returns the samples written. Runs in a worker process."""
    out, fmt, shard, start, stop, kind, size, seed, storage_options = args
    import fsspec

    from tasks.storage import is_object_store

    uri = shard_uri(out, fmt, shard)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    folders = not is_object_store(fs)  # s3fs.makedirs would cost a HeadBucket request per shard for nothing
    if fmt == "files":
        if folders:
            fs.makedirs(path, exist_ok=True)
        for i in range(start, stop):
            fs.pipe_file(f"{path}/{i:09d}.png", payload(i, kind, size, seed))
        return stop - start
    if folders:
        fs.makedirs(fs._parent(path), exist_ok=True)
    if fmt == "webdataset":
        members = []
        for i in range(start, stop):
            members += [(f"{i:09d}.png", payload(i, kind, size, seed)), (f"{i:09d}.json", b'{"index": %d}' % i)]
        with fs.open(path, "wb") as f:
            f.write(tar_bytes(members))
        return stop - start
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array([{"bytes": payload(i, kind, size, seed), "path": f"{i:09d}.png"} for i in range(start, stop)],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "index": pa.array(range(start, stop), pa.int64())})
    table = table.replace_schema_metadata({"huggingface": json.dumps(HF_FEATURES)})
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="none" if kind == "png" else "zstd")  # PNG bytes do not compress
    return stop - start


def make_dataset(out: str, count: int, fmt: str = "webdataset", per_shard: int = 1000, size: int = 64,
                 kind: str = "png", seed: int = 0, storage_options: dict | None = None, workers: int = 1) -> int:
    """Write the dataset; returns the number of shards (folders for files)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if kind not in PAYLOADS:
        raise ValueError(f"--payload must be one of {list(PAYLOADS)}, got {kind!r}")
    if count < 0 or per_shard < 1 or size < 1 or workers < 1:
        raise ValueError("--count must be >= 0 and --per-shard, --size, --workers >= 1")
    jobs = [(out, fmt, s, s * per_shard, min(count, (s + 1) * per_shard), kind, size, seed, storage_options)
            for s in range(-(-count // per_shard))]
    if workers == 1 or len(jobs) < 2:
        written = sum(map(write_shard, jobs))
    else:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            written = sum(pool.map(write_shard, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    assert written == count, (written, count)
    return len(jobs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder or fsspec URI prefix (s3://bucket/prefix)")
    p.add_argument("--count", type=int, required=True, help="number of samples")
    p.add_argument("--format", default="webdataset", choices=FORMATS, help="layout (default: webdataset)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar/parquet shard, or files per "
                                                               "folder for files (default: 1000)")
    p.add_argument("--size", type=int, default=64, help="image side S of the S x S PNGs (default: 64)")
    p.add_argument("--payload", default="png", choices=PAYLOADS, help="png: real images; placeholder: a fixed "
                                                                      "short byte string per sample (default: png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pixels (default: 0)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default: 1)")
    p.add_argument("--storage-options", default="{}", help="fsspec options as JSON, e.g. "
                                                           "'{\"endpoint_url\": \"http://127.0.0.1:8333\"}'")
    a = p.parse_args(argv)
    try:
        options = json.loads(a.storage_options)
    except json.JSONDecodeError as e:
        p.error(f"--storage-options is not JSON: {e}")
    t0 = time.perf_counter()
    try:
        shards = make_dataset(a.out, a.count, a.format, a.per_shard, a.size, a.payload, a.seed, options, a.workers)
    except ValueError as e:
        p.error(str(e))
    dt = time.perf_counter() - t0
    print(f"wrote {a.count} {a.payload} samples in {shards} {a.format} shard(s) to {a.out} in {dt:.2f} s "
          f"({a.count / max(dt, 1e-9):.0f} samples/s, {a.workers} worker(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The image-writing stage (CPU tasks): PNG-encode pixel columns and write them under the output prefix.

write.format files: <output>/<name>/<stem>.png, deterministic per sample, so a retried or rerun sample
overwrites its own files; the column <name> gets the URI. Shard formats (webdataset, parquet): the PNG
bytes go into the column png:<name> and tasks/units.py writes them into the unit's output shard.
Pixel columns are dropped here: what flows on is one small row per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tasks.config import opt
from tasks.faults import RetryConfig, row_failure
from tasks.images import encode_png
from tasks.stage import Contract, Declared
from tasks.storage import get_fs, join_under, write_bytes

PIXEL_COLUMNS = ("image", "dr2", "restored", "lq_pixels")
PNG_PREFIX = "png:"  # shard formats: column png:<name> holds the encoded image until the shard is written
WRITE_FORMATS = ("files", "webdataset", "parquet")


@dataclass(frozen=True)
class WriteConfig:
    format: str = opt("files", "files: one PNG per image under <output>/<name>/ | webdataset: tar shards under "
                               "<output>/shards/ (members <key>.<name>.png and <key>.json) | parquet: Parquet shards "
                               "under <output>/shards/ with the images as Hugging Face Image columns")
    shard_size: int = opt(1000, "webdataset/parquet: samples per output shard and per unit of work (an input shard "
                                "larger than this is split into several output shards); keep it across reruns")
    png_compression: int = opt(3, "PNG compression level 0-9 (lossless at every level; higher = smaller, slower)")

    def __post_init__(self):
        if self.format not in WRITE_FORMATS:
            raise ValueError(f"write.format must be one of {list(WRITE_FORMATS)}, got {self.format!r}")
        if self.shard_size < 1:
            raise ValueError(f"write.shard-size must be at least 1, got {self.shard_size}")

    @property
    def sharded(self) -> bool:
        return self.format != "files"


def put_png(root: str, stem: str, rgb: np.ndarray, compression: int, storage_options: dict | None,
            retry: RetryConfig | None = None) -> str:
    """Write rgb as <root>/<stem>.png (never outside root); returns its URI."""
    uri = join_under(root, stem + ".png")
    fs, path = get_fs(uri, storage_options)
    write_bytes(fs, path, encode_png(rgb, compression), retry)
    return uri


class WriteImages(Declared):
    """Ray Data batch function. `images` maps an output name (dir and manifest column) to a pixel column."""

    @classmethod
    def contract(cls, images: dict[str, str], **kwargs) -> Contract:
        return Contract(("id", "status", "error", "stem", *images.values()),
                        tuple((name, pa.string()) for name in images))  # each image's URI

    def __init__(self, output: str, images: dict[str, str], png_compression: int = 3,
                 storage_options: dict | None = None, keep_pixels: bool = False, retry: RetryConfig | None = None,
                 format: str = "files"):
        self.output, self.images, self.storage_options, self.retry = output, images, storage_options, retry
        self.keep_pixels = keep_pixels  # a later stage still needs the arrays
        self.png_compression, self.format = png_compression, format
        self.roots = {name: join_under(output, name) for name in images}

    def pixels(self, batch: dict[str, np.ndarray], k: int, name: str) -> np.ndarray:
        """Row k's image for output `name` (override to transform, e.g. blur)."""
        return batch[self.images[name]][k]

    def _put(self, name: str, stem: str, rgb: np.ndarray) -> str:
        return put_png(self.roots[name], stem, rgb, self.png_compression, self.storage_options, self.retry)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        if self.format != "files":
            return self.encode(batch)
        uris = {name: [""] * n for name in self.images}
        status, kind, error = list(batch["status"]), list(batch.get("error_kind", [""] * n)), list(batch["error"])
        for k in range(n):
            if status[k] != "ok":
                continue
            try:
                for name in self.images:
                    uris[name][k] = self._put(name, str(batch["stem"][k]), self.pixels(batch, k, name))
            except Exception as e:  # transient after the retries: left uncommitted; else this sample's error row
                status[k], kind[k], error[k] = row_failure(e, "write")
                error[k] = f"write failed: {error[k]}"
        out = {k: v for k, v in batch.items() if self.keep_pixels or k not in PIXEL_COLUMNS}
        out.update({name: np.array(v, dtype=object) for name, v in uris.items()})
        out.update(status=np.array(status, dtype=object), error_kind=np.array(kind, dtype=object),
                   error=np.array(error, dtype=object))
        return out

    def encode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Shard formats: the PNG bytes of each ok row's images in png:<name> (encoding cannot fail for
        pixels a stage produced; the URI columns are filled when the shard is written)."""
        n = len(batch["id"])
        ok = batch["status"] == "ok"
        png = {name: np.array([encode_png(self.pixels(batch, k, name), self.png_compression) if ok[k] else None
                               for k in range(n)], dtype=object) for name in self.images}
        out = {k: v for k, v in batch.items() if self.keep_pixels or k not in PIXEL_COLUMNS}
        out.update({PNG_PREFIX + name: v for name, v in png.items()})
        out.update({name: np.array([""] * n, dtype=object) for name in self.images})
        return out

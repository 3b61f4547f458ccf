"""The image-writing stage (CPU tasks): PNG-encode pixel columns and write them under the output prefix.

Files go to <output>/<name>/<stem>.png, deterministic per sample, so a retried or rerun sample
overwrites its own files. Pixel columns are dropped here: what flows on to the manifest writer is
one small row per sample, with the written URI in the column <name>.
"""

from __future__ import annotations

import numpy as np

from tasks.faults import RetryConfig, row_failure
from tasks.images import encode_png
from tasks.storage import get_fs, join_under, write_bytes

PIXEL_COLUMNS = ("image", "dr2", "restored", "lq_pixels")


def put_png(root: str, stem: str, rgb: np.ndarray, compression: int, storage_options: dict | None,
            retry: RetryConfig | None = None) -> str:
    """Write rgb as <root>/<stem>.png (never outside root); returns its URI."""
    uri = join_under(root, stem + ".png")
    fs, path = get_fs(uri, storage_options)
    write_bytes(fs, path, encode_png(rgb, compression), retry)
    return uri


class WriteImages:
    """Ray Data batch function. `images` maps an output name (dir and manifest column) to a pixel column."""

    def __init__(self, output: str, images: dict[str, str], png_compression: int = 3,
                 storage_options: dict | None = None, keep_pixels: bool = False, retry: RetryConfig | None = None):
        self.output, self.images, self.storage_options, self.retry = output, images, storage_options, retry
        self.keep_pixels = keep_pixels  # a later stage still needs the arrays
        self.png_compression = png_compression
        self.roots = {name: join_under(output, name) for name in images}

    def pixels(self, batch: dict[str, np.ndarray], k: int, name: str) -> np.ndarray:
        """Row k's image for output `name` (override to transform, e.g. blur)."""
        return batch[self.images[name]][k]

    def _put(self, name: str, stem: str, rgb: np.ndarray) -> str:
        return put_png(self.roots[name], stem, rgb, self.png_compression, self.storage_options, self.retry)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
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

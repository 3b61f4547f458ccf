"""The augmentation's last image stage (CPU tasks): LQ = DR2(HQ) blurred by k_sigma, PNG-encoded and written.

Outputs go to deterministic names under the output prefix (<output>/lq/<stem>.png, <output>/hq/<stem>.png),
so a retried or rerun sample overwrites its own files. Image arrays are dropped here: what flows on to
the manifest writer is one small row per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tasks.config import Sampled, opt
from tasks.images import encode_png
from tasks.storage import get_fs, join_under, write_bytes


@dataclass(frozen=True)
class BlurConfig:
    sigma: Sampled = opt(Sampled(low=1.0, high=3.0),
                         "Gaussian blur sigma (pixels, at the model size) applied to DR2's output per sample; "
                         "0 = none. The DR2 paper never published its range: tune it here")


@dataclass(frozen=True)
class WriteConfig:
    hq: bool = opt(True, "also write the HQ target (the input resized to the model size) under hq/")
    png_compression: int = opt(3, "PNG compression level 0-9 (lossless at every level; higher = smaller, slower)")


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """k_sigma (*) rgb in float32 with OpenCV's kernel (size from sigma, reflect-101 borders), rounded."""
    if sigma <= 0:
        return rgb
    out = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), sigmaX=float(sigma), sigmaY=float(sigma),
                           borderType=cv2.BORDER_REFLECT_101)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class BlurAndWrite:
    """Ray Data batch function: dr2 (+ image) arrays -> written PNGs; returns rows without pixels."""

    def __init__(self, output: str, write: WriteConfig, storage_options: dict | None = None):
        self.output, self.write, self.storage_options = output, write, storage_options
        self.lq_root = join_under(output, "lq")
        self.hq_root = join_under(output, "hq")

    def _put(self, root: str, stem: str, rgb: np.ndarray) -> str:
        uri = join_under(root, stem + ".png")
        fs, path = get_fs(uri, self.storage_options)
        write_bytes(fs, path, encode_png(rgb, self.write.png_compression))
        return uri

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        lq, hq = [""] * n, [""] * n
        status, error = list(batch["status"]), list(batch["error"])
        for k in range(n):
            if status[k] != "ok":
                continue
            try:
                lq[k] = self._put(self.lq_root, str(batch["stem"][k]),
                                  gaussian_blur(batch["dr2"][k], float(batch["sigma"][k])))
                if self.write.hq:
                    hq[k] = self._put(self.hq_root, str(batch["stem"][k]), batch["image"][k])
            except Exception as e:  # a failed write is this sample's error row (--resume.retry-errors redoes it)
                status[k], error[k] = "error", f"write failed: {type(e).__name__}: {e}"
        out = {k: v for k, v in batch.items() if k not in ("image", "dr2")}
        out.update(lq=np.array(lq, dtype=object), hq=np.array(hq, dtype=object),
                   status=np.array(status, dtype=object), error=np.array(error, dtype=object))
        return out

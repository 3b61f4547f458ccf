"""The augmentation's image stage (CPU tasks): LQ = DR2(HQ) blurred by k_sigma, written as
<output>/lq/<stem>.png next to the HQ target <output>/hq/<stem>.png (see tasks/write_stage.py)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tasks.config import Sampled, opt
from tasks.faults import RetryConfig
from tasks.stage import Contract
from tasks.write_stage import WriteConfig, WriteImages


@dataclass(frozen=True)
class BlurConfig:
    sigma: Sampled = opt(Sampled(low=1.0, high=3.0),
                         "Gaussian blur sigma (pixels, at the model size) applied to DR2's output per sample; "
                         "0 = none. The DR2 paper never published its range: tune it here")


@dataclass(frozen=True)
class AugmentWriteConfig(WriteConfig):
    hq: bool = opt(True, "also write the HQ target (the input resized to the model size) as hq")


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """k_sigma (*) rgb in float32 with OpenCV's kernel (size from sigma, reflect-101 borders), rounded."""
    if sigma <= 0:
        return rgb
    out = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), sigmaX=float(sigma), sigmaY=float(sigma),
                           borderType=cv2.BORDER_REFLECT_101)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class BlurAndWrite(WriteImages):
    """Writes lq = blur_sigma(DR2 output) and, if configured, hq = the resized input."""

    @classmethod
    def contract(cls, write: AugmentWriteConfig, **kwargs) -> Contract:
        images = super().contract(images=cls.images_of(write))
        return Contract((*images.reads, "sigma"), images.adds)

    @staticmethod
    def images_of(write: AugmentWriteConfig) -> dict[str, str]:
        return {"lq": "dr2", "hq": "image"} if write.hq else {"lq": "dr2"}

    def __init__(self, output: str, write: AugmentWriteConfig, storage_options: dict | None = None,
                 retry: RetryConfig | None = None):
        super().__init__(output, self.images_of(write), write.png_compression, storage_options, retry=retry,
                         format=write.format)

    def pixels(self, batch: dict[str, np.ndarray], k: int, name: str) -> np.ndarray:
        rgb = super().pixels(batch, k, name)
        return gaussian_blur(rgb, float(batch["sigma"][k])) if name == "lq" else rgb

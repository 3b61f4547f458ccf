"""Landmark distance (LMD): how far a restored face's landmarks moved from the ground truth's.

LMD of one pair = the mean over landmarks of the Euclidean distance (pixels at the compared size) between
the landmarks found on the restored image and those found on the ground truth, each image's most confident
face. Lower is better; identical images give 0. A pair where either image has no face is NaN (counted apart,
not averaged as 0).

Detectors:
- `lmd_mtcnn5`: the bundled MTCNN (facenet-pytorch, weights in its wheel), 5 points: left eye, right eye, nose,
  mouth left, mouth right (tasks.detect). The name says the detector and the point count because LMDs of
  different landmark sets are not comparable (papers often use 68-point FAN landmarks).
- a plug-in (metrics.plugins: {lmd_<name>: {class: pkg.module:Class, weights: ..., kwargs: ...}}): a class
  built as Class(weights, device, **kwargs) with `kind = "landmarks"` and `landmarks(images) -> list of (K, 2)
  float arrays (x, y) or None` per RGB uint8 (H, W, 3) image, e.g. a FAN-68 wrapper loading its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LMD_MTCNN5", "LandmarkDistance", "MTCNNLandmarks", "landmark_distance"]

LMD_MTCNN5 = "lmd_mtcnn5"


def landmark_distance(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Mean Euclidean distance between corresponding (K, 2) landmarks; NaN when either set is missing."""
    if a is None or b is None:
        return float("nan")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"landmark sets must both be (K, 2), got {a.shape} and {b.shape}")
    return float(np.sqrt(((a - b) ** 2).sum(axis=1)).mean())


class MTCNNLandmarks:
    """The bundled MTCNN's 5 landmarks of each image's most confident face (None where it finds none).

    min_score 0.9 is tasks.detect's MTCNN default (O-Net face probability); min_face_size is a fraction of the
    image side because the inputs are aligned faces, where the face fills most of the image.
    """

    kind = "landmarks"

    def __init__(self, device: str = "cpu", min_score: float | None = None, min_face_fraction: float = 0.25):
        from tasks.detect import MTCNNDetector

        self.device, self.min_score, self.min_face_fraction = device, min_score, float(min_face_fraction)
        self._detectors: dict[int, Any] = {}
        self._make = lambda size: MTCNNDetector(device=str(device), min_score=min_score, min_face_size=size,
                                                max_side=0)
        self.weights_identity = self._detector(20).identity

    def _detector(self, min_face: int):
        if min_face not in self._detectors:
            self._detectors[min_face] = self._make(min_face)
        return self._detectors[min_face]

    def landmarks(self, images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for img in images:
            min_face = max(12, int(self.min_face_fraction * min(img.shape[:2])))
            faces = self._detector(min_face).detect([np.ascontiguousarray(img)])[0]
            out.append(np.asarray(faces[0].landmarks, np.float64) if faces else None)
        return out


class LandmarkDistance:
    """LMD with one landmark detector: `compare(restored, gt)` -> float64 (B,) (NaN where a face is missing).

    detector: anything with `landmarks(list of RGB uint8 (H, W, 3)) -> list of (K, 2) arrays or None`.
    """

    def __init__(self, name: str, detector: Any, weights_identity: str = ""):
        if not callable(getattr(detector, "landmarks", None)):
            raise ValueError(f"{name}: the landmark detector has no landmarks(images) method")
        self.name, self.detector = name, detector
        self.weights_identity = weights_identity or getattr(detector, "weights_identity", name)

    def _landmarks(self, images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        found = list(self.detector.landmarks(list(images)))
        if len(found) != len(images):
            raise ValueError(f"{self.name}: detector returned {len(found)} landmark sets for {len(images)} images")
        return [None if p is None else np.asarray(p, np.float64) for p in found]

    def compare(self, restored: Sequence[np.ndarray], gt: Sequence[np.ndarray]) -> np.ndarray:
        """Per pair LMD in pixels; restored and gt are RGB uint8 (H, W, 3) images of equal sizes."""
        if len(restored) != len(gt):
            raise ValueError(f"{len(restored)} restored images but {len(gt)} gt images")
        a, b = self._landmarks(restored), self._landmarks(gt)
        return np.array([landmark_distance(x, y) for x, y in zip(a, b)], dtype=np.float64)

"""Landmark distance: zero for identical images, equal to a direct computation on shifted landmarks, with the
bundled MTCNN (lmd_mtcnn5) and with a landmark-detector plug-in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks import metrics as M
from tasks.detect import MTCNNDetector
from tasks.lmd import landmark_distance

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, img.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def faces():
    return np.stack([cv2.resize(cv2.imread(str(p)), (128, 128), interpolation=cv2.INTER_AREA)[..., ::-1]
                     for p in sorted(SAMPLES.glob("*.png"))[:2]])


def test_lmd_mtcnn5_zero_and_equal_to_direct_computation(faces):
    suite = M.MetricSuite(["lmd_mtcnn5", "psnr_rgb"])
    assert suite.weights_identity["lmd_mtcnn5"].startswith("mtcnn:facenet-pytorch")
    same = suite(faces, faces)
    np.testing.assert_array_equal(same.values["lmd_mtcnn5"], [0.0, 0.0])
    shifts = [(6.0, 4.0), (-3.0, 5.0)]
    moved = np.stack([_shift(f, dx, dy) for f, (dx, dy) in zip(faces, shifts)])
    got = suite(moved, faces).values["lmd_mtcnn5"]
    # direct: MTCNN's five points on each image (its most confident face), mean Euclidean distance
    det = MTCNNDetector(device="cpu", min_face_size=32, max_side=0)
    for k, (dx, dy) in enumerate(shifts):
        a, b = (det.detect([np.ascontiguousarray(im)])[0][0].landmarks.astype(np.float64)
                for im in (moved[k], faces[k]))
        assert got[k] == pytest.approx(np.sqrt(((a - b) ** 2).sum(axis=1)).mean(), abs=1e-9)
        assert got[k] == pytest.approx(math.hypot(dx, dy), abs=1.5)  # MTCNN follows the shift to ~1 px
    # no face (flat grey) -> NaN, not 0; without ground truth the metric is not applicable
    grey = np.full_like(faces[:1], 128)
    assert np.isnan(suite(grey, faces[:1]).values["lmd_mtcnn5"][0])
    assert "lmd_mtcnn5" in suite(faces, None).not_applicable


def test_landmark_plugin(tmp_path):
    (tmp_path / "dots.json").write_text(json.dumps({"offset": 0.5}))
    plugins = {"lmd_dots4": {"class": "tests.plugins:DotLandmarks", "weights": str(tmp_path / "dots.json")}}
    suite = M.MetricSuite(["lmd_dots4"], plugins=plugins)
    assert suite.weights_identity["lmd_dots4"] == "dots:dots.json" and "landmark" in suite.plugin_info["lmd_dots4"][3]

    def dots(offsets):
        img = np.zeros((64, 64, 3), np.uint8)
        for (y0, x0), (dy, dx) in zip(((10, 10), (10, 40), (40, 10), (40, 40)), offsets):
            img[y0 + dy, x0 + dx] = 255
        return img

    base = dots([(0, 0)] * 4)
    moved = dots([(3, 4), (0, 0), (-4, 3), (0, 0)])  # two points moved by 5 px
    out = suite(np.stack([base, moved]), np.stack([base, base])).values["lmd_dots4"]
    assert out[0] == 0.0 and out[1] == pytest.approx((5 + 0 + 5 + 0) / 4)
    assert landmark_distance(None, np.zeros((4, 2))) != landmark_distance(None, np.zeros((4, 2)))  # NaN
    with pytest.raises(ValueError, match="K, 2"):
        landmark_distance(np.zeros((5, 2)), np.zeros((4, 2)))

"""Face detection on whole photos: boxes, five landmarks and a score per face.

Detectors (`DetectorConfig.name`):

- `mtcnn` (default): facenet-pytorch's MTCNN (P-Net/R-Net/O-Net, weights bundled in its wheel, ~2 MB).
  Real landmarks and a calibrated face probability. Images of equal size are batched into one call
  (MTCNN's batched path needs equal sizes); the others run one at a time.
- `haar`: OpenCV's frontal-face Haar cascade. CPU only, no network weights; slower than MTCNN on one
  thread here (358 vs 227 ms/photo), with lower recall and more false positives (bench/bench_detect.py).
  Its landmarks are APPROXIMATE (see `HaarDetector`).
- a plug-in class named by dotted path (`pkg.module:Class` or `pkg.module.Class`), constructed as
  `Class(weights, device, **kwargs)` and exposing `detect(images) -> list[list[Face]]` (a RetinaFace wrapper
  loading its weights from a path, say). build_detector wraps it: inputs are checked, outputs validated,
  filtered by min_score / min_face_size and sorted; no downscaling is applied for it.

Every detector takes a list of RGB uint8 (H, W, 3) arrays of any sizes and returns, per image, the faces
sorted by score (descending), in the coordinates of that input image. Landmarks are (x, y) pixels in the
order of the FFHQ alignment template (`FFHQ_TEMPLATE_512`): left eye, right eye, nose, mouth left, mouth
right, where left/right are AS SEEN IN THE IMAGE (image-left first), which is also MTCNN's output order.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from tasks.align import FFHQ_TEMPLATE_512, eye_distance
from tasks.config import opt
from tasks.plugins import import_plugin

__all__ = [
    "FFHQ_TEMPLATE_512",
    "DetectorConfig",
    "Face",
    "FaceDetector",
    "HaarDetector",
    "MTCNNDetector",
    "PluginDetector",
    "box_iou",
    "build_detector",
    "check_image",
]

@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in the pixel coordinates of the image it was found in.

    box: (x0, y0, x1, y1) floats; may reach slightly outside the image (MTCNN regresses past borders).
    landmarks: (5, 2) float32 (x, y): left eye, right eye, nose, mouth left, mouth right, image-left first.
    score: detector confidence in [0, 1]; comparable only between faces of the same detector.
    Frozen; the landmarks array is made read-only. Equality is identity (eq=False): arrays do not compare
    as a single bool.
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float

    def __post_init__(self):
        box = tuple(float(v) for v in self.box)
        if len(box) != 4:
            raise ValueError(f"Face.box must be (x0, y0, x1, y1), got {self.box!r}")
        lm = np.array(self.landmarks, dtype=np.float32).reshape(-1, 2) if self.landmarks is not None else None
        if lm is None or lm.shape != (5, 2):
            raise ValueError(f"Face.landmarks must be 5 (x, y) points, got shape "
                             f"{None if self.landmarks is None else np.shape(self.landmarks)}")
        if not (np.isfinite(lm).all() and all(math.isfinite(v) for v in box)):
            raise ValueError("Face.box and Face.landmarks must be finite")
        lm.setflags(write=False)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "landmarks", lm)
        object.__setattr__(self, "score", float(self.score))

    @property
    def eye_distance(self) -> float:
        """Distance in pixels between the two eye landmarks."""
        return eye_distance(self.landmarks)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    def scaled(self, sx: float, sy: float | None = None) -> Face:
        """The same face with x multiplied by sx and y by sy (default sx)."""
        sy = sx if sy is None else sy
        x0, y0, x1, y1 = self.box
        return Face((x0 * sx, y0 * sy, x1 * sx, y1 * sy), self.landmarks * np.float32([sx, sy]), self.score)

    def to_dict(self) -> dict:
        """Plain lists and floats (JSON / Arrow friendly)."""
        return {"box": list(self.box), "landmarks": self.landmarks.tolist(), "score": self.score}

    def __repr__(self) -> str:
        b = ", ".join(f"{v:.1f}" for v in self.box)
        return f"Face(box=({b}), score={self.score:.4f}, eye_distance={self.eye_distance:.1f})"


@runtime_checkable
class FaceDetector(Protocol):
    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Per RGB uint8 (H, W, 3) image, its faces sorted by score (descending)."""
        ...


@dataclass(frozen=True)
class DetectorConfig:
    name: str = opt("mtcnn", "face detector: mtcnn (facenet-pytorch MTCNN, weights in its wheel; real "
                             "landmarks) | haar (OpenCV Haar cascade, CPU; approximate landmarks, lower "
                             "recall) | a plug-in class 'pkg.module:Class' or 'pkg.module.Class' constructed "
                             "as Class(weights, device, **kwargs) with detect(list of RGB uint8 images) -> "
                             "per image a list of tasks.detect.Face (e.g. a RetinaFace wrapper)")
    weights: str | None = opt(None, "detector weights, path or fsspec URI: passed as is to a plug-in; for haar "
                                    "an alternative cascade XML (default: OpenCV's "
                                    "haarcascade_frontalface_default.xml); mtcnn takes none (uses the "
                                    "weights bundled in facenet-pytorch)")
    device: str = opt("auto", "where the detector runs: auto (cuda when visible) | cpu | cuda | cuda:N; "
                              "haar always runs on the CPU")
    min_score: float | None = opt(None, "drop faces scoring below this; scores are per detector (mtcnn: face "
                                        "probability, haar: neighbour-count proxy, see tasks/detect.py). "
                                        "null = the detector's default (mtcnn 0.9, haar 0.5, plug-in 0.0)")
    min_face_size: int = opt(20, "smallest face to look for, in pixels of the input photo: faces whose box's "
                                 "shorter side is smaller are dropped (and MTCNN's image pyramid starts there)")
    max_side: int = opt(1600, "mtcnn/haar: photos whose longer side exceeds this are downscaled (area "
                              "filter) for detection and the boxes/landmarks mapped back to the input; "
                              "0 = never. Faces smaller than min_face_size * max_side / long side can be "
                              "missed on such photos")
    batch_size: int = opt(1, "mtcnn: at most this many equal-size images per batched network call. 1 (default) "
                             "keeps a photo's landmarks, hence its restoration, independent of the photos beside "
                             "it (batched convolutions differ in the last bits); on CPU batching is not faster "
                             "either. Raise it on a GPU detector for throughput")
    kwargs: dict = opt({}, "extra constructor arguments: for a plug-in anything it takes; mtcnn: thresholds "
                           "(3 stage thresholds, default [0.6, 0.7, 0.7]), factor (pyramid step, 0.709); "
                           "haar: scale_factor (1.1), min_neighbors (5), equalize (true)")


def check_image(img: Any, i: int = 0) -> np.ndarray:
    """Return img if it is an RGB uint8 (H, W, 3) numpy array, else raise ValueError saying what it is."""
    if not isinstance(img, np.ndarray):
        raise ValueError(f"image {i}: expected a numpy array (RGB uint8, H x W x 3), got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"image {i}: expected dtype uint8 (RGB 0..255), got {img.dtype}; convert it first")
    if img.ndim != 3 or img.shape[2] != 3:
        hint = {1: " (single channel: replicate it to RGB first)", 2: " (grayscale: replicate it to RGB first)",
                4: " (RGBA: drop the alpha channel first)"}
        extra = hint[2] if img.ndim == 2 else hint.get(img.shape[2], "") if img.ndim == 3 else ""
        raise ValueError(f"image {i}: expected shape (H, W, 3) RGB, got {img.shape}{extra}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image {i}: empty image {img.shape}")
    return img


def _check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"detect() takes a list of images (or an (N, H, W, 3) array), got one array of "
                             f"shape {images.shape}; pass [image]")
        images = list(images)
    return [check_image(img, i) for i, img in enumerate(images)]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _keep(faces: list[Face], min_score: float, min_face_size: float) -> list[Face]:
    faces = [f for f in faces if f.score >= min_score and min(f.width, f.height) >= min_face_size]
    return sorted(faces, key=lambda f: -f.score)


class _ScaledDetector:
    """Shared logic of the built-in detectors: checks, downscaling of large photos, grouping, filtering.

    Subclasses implement `_detect_group(images, min_size)`: equal-size images, min_size in their pixels.
    """

    default_min_score = 0.0
    identity = ""

    def __init__(self, min_score: float | None, min_face_size: int, max_side: int):
        if min_face_size < 1:
            raise ValueError(f"detector.min_face_size must be >= 1 pixel, got {min_face_size}")
        if max_side < 0:
            raise ValueError(f"detector.max_side must be >= 0 (0 = never downscale), got {max_side}")
        self.min_score = self.default_min_score if min_score is None else float(min_score)
        self.min_face_size = int(min_face_size)
        self.max_side = int(max_side)

    def _detect_group(self, images: list[np.ndarray], min_size: float) -> list[list[Face]]:
        raise NotImplementedError

    def _prepare(self, img: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(image to detect on, sx, sy): multiply detection coordinates by (sx, sy) to get input ones."""
        h, w = img.shape[:2]
        if not self.max_side or max(h, w) <= self.max_side:
            return img, 1.0, 1.0
        s = self.max_side / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA), w / nw, h / nh

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        images = _check_images(images)
        out: list[list[Face]] = [[] for _ in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if min(img.shape[:2]) >= self.min_face_size:  # else no face of the minimum size fits
                groups.setdefault(img.shape[:2], []).append(i)
        for idx in groups.values():
            prepared = [self._prepare(images[i]) for i in idx]
            sx, sy = prepared[0][1], prepared[0][2]  # equal input sizes -> equal factors
            min_size = self.min_face_size / max(sx, sy)
            found = self._detect_group([p[0] for p in prepared], min_size)
            for i, faces in zip(idx, found):
                if sx != 1.0 or sy != 1.0:
                    faces = [f.scaled(sx, sy) for f in faces]
                out[i] = _keep(faces, self.min_score, self.min_face_size)
        return out


class MTCNNDetector(_ScaledDetector):
    """facenet-pytorch's MTCNN (keep_all=True, landmarks=True), batched over equal-size images.

    Scores are O-Net face probabilities. Landmark order (checked on skimage.data.astronaut()): left eye,
    right eye, nose, mouth left, mouth right, image-left first, as the FFHQ template.
    Concurrent detect() calls on one instance are serialised by a lock (MTCNN's min_face_size is set per call).
    """

    default_min_score = 0.9

    def __init__(self, device: str = "auto", min_score: float | None = None, min_face_size: int = 20,
                 max_side: int = 1600, batch_size: int = 1, thresholds: Sequence[float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709):
        super().__init__(min_score, min_face_size, max_side)
        import torch
        from facenet_pytorch import MTCNN

        from tasks.runtime import resolve_device

        if batch_size < 1:
            raise ValueError(f"detector.batch_size must be >= 1, got {batch_size}")
        if len(thresholds) != 3 or not 0 < factor < 1:
            raise ValueError(f"mtcnn needs 3 thresholds and 0 < factor < 1, got {thresholds!r}, {factor!r}")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self._torch = torch
        self._mtcnn = MTCNN(keep_all=True, select_largest=False, min_face_size=self.min_face_size,
                            thresholds=[float(t) for t in thresholds], factor=float(factor),
                            device=self.device).eval()
        self._lock = threading.Lock()
        self.identity = "mtcnn:facenet-pytorch-" + _version("facenet-pytorch")

    def _detect_group(self, images: list[np.ndarray], min_size: float) -> list[list[Face]]:
        out: list[list[Face]] = []
        # P-Net's 12 px window is the smallest face MTCNN can see at all.
        min_size = max(12.0, min_size)
        if min(images[0].shape[:2]) < min_size:  # no pyramid level at all (a downscaled sliver of a photo)
            return [[] for _ in images]
        for start in range(0, len(images), self.batch_size):
            chunk = np.stack(images[start:start + self.batch_size])
            with self._lock, self._torch.inference_mode():
                self._mtcnn.min_face_size = min_size
                boxes, probs, points = self._mtcnn.detect(chunk, landmarks=True)
            for b, p, pts in zip(boxes, probs, points):
                if b is None:
                    out.append([])
                    continue
                b = np.asarray(b, np.float64).reshape(-1, 4)
                pts = np.asarray(pts, np.float32).reshape(-1, 5, 2)
                p = np.asarray(p, np.float64).reshape(-1)
                out.append([Face(tuple(bb), pp, float(sc)) for bb, pp, sc in zip(b, pts, p)])
        return out


# Mean position of the five landmarks relative to the Haar frontal-face box ((x - x0) / w, (y - y0) / h),
# measured with MTCNN's landmarks on the 8 faces both detectors find in bench/bench_detect.py's photos
# (astronaut, grace_hopper, 00.jpg x2, 10045.png x3, Blake_Lively.jpg adult); std 0.02-0.05 box widths.
HAAR_PRIOR = np.array([[0.331, 0.371], [0.719, 0.382], [0.528, 0.607], [0.333, 0.761], [0.681, 0.775]],
                      np.float32)
_DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"


class HaarDetector(_ScaledDetector):
    """OpenCV's Haar cascade frontal-face detector (Viola-Jones), CPU only.

    Landmarks are APPROXIMATE: when OpenCV's eye cascade finds one eye in each upper half of the face box,
    the eyes are their centres and nose/mouth come from the FFHQ template mapped onto those eyes by a
    similarity transform; otherwise all five points come from a fixed mean-face prior relative to the box
    (`HAAR_PRIOR`). Good enough for a coarse crop, not for precise alignment.

    Score: the cascade has no probability. The proxy is n / (n + 10), n = the number of overlapping raw
    detections merged into the box (OpenCV's `numDetections` from detectMultiScale2, >= min_neighbors),
    so it lies in [0, 1). It grows with face size and with finer scale steps (smaller scale_factor); on the
    bench photos true faces scored >= 0.65 (n >= 19) and false positives <= 0.55 (n <= 12).
    """

    default_min_score = 0.5

    def __init__(self, weights: str | None = None, min_score: float | None = None, min_face_size: int = 20,
                 max_side: int = 1600, scale_factor: float = 1.1, min_neighbors: int = 5, equalize: bool = True,
                 storage_options: dict | None = None):
        super().__init__(min_score, min_face_size, max_side)
        if not scale_factor > 1 or min_neighbors < 0:
            raise ValueError(f"haar needs scale_factor > 1 and min_neighbors >= 0, got {scale_factor}, "
                             f"{min_neighbors}")
        self.scale_factor, self.min_neighbors, self.equalize = float(scale_factor), int(min_neighbors), equalize
        path = weights or os.path.join(cv2.data.haarcascades, _DEFAULT_CASCADE)
        self._face = _load_cascade(path, storage_options)
        self._eyes = _load_cascade(os.path.join(cv2.data.haarcascades, "haarcascade_eye.xml"))
        self.identity = f"haar:opencv-{cv2.__version__}:{os.path.basename(path)}"

    def _detect_group(self, images: list[np.ndarray], min_size: float) -> list[list[Face]]:
        return [self._detect_one(img, min_size) for img in images]

    def _detect_one(self, img: np.ndarray, min_size: float) -> list[Face]:
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        if self.equalize:
            gray = cv2.equalizeHist(gray)
        m = max(1, int(min_size))
        rects, counts = self._face.detectMultiScale2(gray, scaleFactor=self.scale_factor,
                                                     minNeighbors=self.min_neighbors, minSize=(m, m))
        faces = []
        for (x, y, w, h), n in zip(np.reshape(rects, (-1, 4)), np.ravel(counts)):
            x, y, w, h = float(x), float(y), float(w), float(h)
            lm = self._landmarks(gray, x, y, w, h)
            faces.append(Face((x, y, x + w, y + h), lm, n / (n + 10.0)))
        return faces

    def _landmarks(self, gray: np.ndarray, x: float, y: float, w: float, h: float) -> np.ndarray:
        prior = HAAR_PRIOR * np.float32([w, h]) + np.float32([x, y])
        # Eyes lie in the box's upper part: search rows [0.1h, 0.6h).
        x0, y0 = int(x), int(y + 0.1 * h)
        roi = gray[y0:int(y + 0.6 * h), x0:int(x + w)]
        if roi.size == 0 or w < 40:
            return prior
        eyes = self._eyes.detectMultiScale(roi, scaleFactor=1.1, minNeighbors=3,
                                           minSize=(max(1, int(w / 10)),) * 2, maxSize=(int(w / 2.5),) * 2)
        centres = [(x0 + ex + ew / 2, y0 + ey + eh / 2) for ex, ey, ew, eh in np.reshape(eyes, (-1, 4))]
        left = [c for c in centres if c[0] < x + w / 2]
        right = [c for c in centres if c[0] >= x + w / 2]
        best, best_d = None, math.inf
        for le in left:
            for re_ in right:
                dx, dy = re_[0] - le[0], re_[1] - le[1]
                if not (0.25 * w <= dx <= 0.65 * w and abs(dy) <= 0.2 * w):
                    continue
                d = math.dist(le, prior[0]) + math.dist(re_, prior[1])
                if d < best_d:
                    best, best_d = (le, re_), d
        if best is None:
            return prior
        # Similarity transform (complex a*z + b) taking the template's eyes onto the detected ones.
        t = FFHQ_TEMPLATE_512[:, 0] + 1j * FFHQ_TEMPLATE_512[:, 1]
        e0, e1 = complex(*best[0]), complex(*best[1])
        a = (e1 - e0) / (t[1] - t[0])
        z = a * (t - t[0]) + e0
        return np.stack([z.real, z.imag], axis=1).astype(np.float32)


def _load_cascade(path: str, storage_options: dict | None = None) -> cv2.CascadeClassifier:
    if "://" in path:  # fsspec URI: CascadeClassifier reads only local files
        from tasks.storage import get_fs

        fs, p = get_fs(path, storage_options)
        data = fs.cat_file(p)
        with tempfile.NamedTemporaryFile(suffix=".xml", delete=False) as f:
            f.write(data)
        try:
            return _load_cascade(f.name)
        finally:
            os.unlink(f.name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Haar cascade file not found: {path}")
    cc = cv2.CascadeClassifier(path)
    if cc.empty():
        raise ValueError(f"not a usable OpenCV cascade XML: {path}")
    return cc


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


class PluginDetector:
    """Wraps a plug-in detector: checks inputs, validates and filters outputs, sorts by score."""

    def __init__(self, plugin: Any, name: str, weights: str | None, min_score: float | None, min_face_size: int):
        if not callable(getattr(plugin, "detect", None)):
            raise ValueError(f"detector plug-in {name!r} has no detect(images) method")
        self.plugin = plugin
        self.min_score = 0.0 if min_score is None else float(min_score)
        self.min_face_size = int(min_face_size)
        self.identity = f"{name}:{os.path.basename(weights.rstrip('/'))}" if weights else name

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        images = _check_images(images)
        found = list(self.plugin.detect(images))
        if len(found) != len(images):
            raise ValueError(f"detector plug-in returned {len(found)} results for {len(images)} images")
        out = []
        for faces in found:
            faces = list(faces)
            bad = [type(f).__name__ for f in faces if not isinstance(f, Face)]
            if bad:
                raise ValueError(f"detector plug-in must return tasks.detect.Face objects, got {bad[0]}")
            out.append(_keep(faces, self.min_score, self.min_face_size))
        return out


def build_detector(cfg: DetectorConfig, storage_options: dict | None = None) -> FaceDetector:
    """The detector a config names. Built-ins load in ~0.1 s (MTCNN) / ~0.05 s (Haar); every returned
    object has `detect(images)` and an `identity` string for manifests (detector and weights)."""
    kind = cfg.name.strip().lower()
    kwargs = dict(cfg.kwargs)
    common = dict(min_score=cfg.min_score, min_face_size=cfg.min_face_size, max_side=cfg.max_side)
    try:
        if kind == "mtcnn":
            if cfg.weights:
                raise ValueError("detector.weights is not used by mtcnn (its weights ship in facenet-pytorch); "
                                 "leave it unset")
            return MTCNNDetector(device=cfg.device, batch_size=cfg.batch_size, **common, **kwargs)
        if kind == "haar":
            return HaarDetector(weights=cfg.weights, storage_options=storage_options, **common, **kwargs)
    except TypeError as e:  # unknown kwargs
        raise ValueError(f"detector.kwargs {kwargs!r} not accepted by {kind}: {e}") from None
    cls = import_plugin(cfg.name, "detector.name", "mtcnn, haar")
    device = cfg.device
    if device == "auto":
        from tasks.runtime import resolve_device

        device = str(resolve_device(device))
    plugin = cls(cfg.weights, device, **kwargs)
    return PluginDetector(plugin, cfg.name, cfg.weights, cfg.min_score, cfg.min_face_size)

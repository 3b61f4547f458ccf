"""Whole photos: align detected faces to the FFHQ template, and paste restored crops back.

Geometry conventions (all OpenCV's):
- points are (x, y) in pixel-centre coordinates: pixel (i, j) has its centre at x = j, y = i;
- a matrix M is 2x3 float64 and maps *photo* coordinates to *crop* coordinates (`crop = M @ [x, y, 1]`),
  so `cv2.warpAffine(photo, M, (F, F))` is the aligned crop and landmarks map onto the template by M;
- the template is FFHQ's 5-point template at 512 scaled linearly (x * F / 512), as facexlib does.

Alignment is a least-squares similarity (rotation, uniform scale, translation) from the 5 landmarks to the
template. The default solves it exactly (linear least squares in (a, b, tx, ty), the same solution as
Umeyama's method without reflection). facexlib's `cv2.estimateAffinePartial2D(method=LMEDS)` is available
as `estimator: lmeds`: it fits a 2-point model and then stops its Levenberg-Marquardt refinement around 1e-4
(an exact similarity comes back off by ~8e-5), and on noisy landmarks it is slightly further from the truth
than the least-squares fit (mean landmark error 1.94 vs 1.80 px at 3 px noise, 200 trials).

Paste-back warps each restored crop into a region of interest around its footprint only (the cost follows
the face, not the photo) and blends it with a soft mask: ones at crop size, warped back, eroded and Gaussian-
feathered by fractions of the face's side in the photo. Pixels where the mask is 0 keep the photo's bytes.
Everything here is pure (no I/O) and works on uint8 (H, W, C) arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from tasks.config import opt

__all__ = [
    "BORDERS",
    "FFHQ_TEMPLATE_512",
    "AlignConfig",
    "align_faces",
    "FaceLayer",
    "FacePlan",
    "border_fraction",
    "composite",
    "crop_corners",
    "eye_distance",
    "face_layer",
    "inverse_matrix",
    "matrix_scale",
    "paste_back",
    "plan_faces",
    "similarity_to_template",
    "template",
    "warp_face",
]

# FFHQ 5-point template at 512 (left eye, right eye, nose, mouth left, mouth right), as facexlib/GFPGAN.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98, 239.95], [318.90, 240.19], [256.63, 314.02], [201.26, 371.41], [313.09, 371.15]], dtype=np.float64
)

BORDERS = {
    "reflect_101": cv2.BORDER_REFLECT_101,
    "reflect": cv2.BORDER_REFLECT,
    "replicate": cv2.BORDER_REPLICATE,
    "constant": cv2.BORDER_CONSTANT,
}
ESTIMATORS = ("lstsq", "lmeds")
ENLARGE_INTERPS = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "lanczos4": cv2.INTER_LANCZOS4}
RANKS = ("score", "size")
# Supersampling factor cap for shrinking warps: 4x4 samples per pixel already suppress visible aliasing.
_MAX_SUPERSAMPLE = 4


@dataclass(frozen=True)
class AlignConfig:
    face_size: int = opt(512, "side of the aligned crop in px; the FFHQ template (given at 512) is scaled to it "
                              "(restore.py sets it to image.size: faces are aligned at the model's input size)")
    min_eye_distance: float = opt(20.0, "faces whose eye centres are closer than this (px, in the photo) are "
                                        "skipped with status too_small")
    max_faces: int = opt(16, "at most this many faces restored per photo (0 = no cap); the rest get status "
                             "over_cap")
    rank: str = opt("score", "which faces survive max_faces: score (detector score, then size) or size "
                             "(eye distance, then score)")
    estimator: str = opt("lstsq", "landmarks -> template fit: lstsq (exact least-squares similarity) or lmeds "
                                  "(cv2.estimateAffinePartial2D LMEDS, as facexlib)")
    border: str = opt("reflect_101", "how crop pixels outside the photo are filled: reflect_101 | reflect | "
                                     "replicate | constant (border_value)")
    border_value: list[int] = opt([135, 133, 132], "fill colour for border=constant (GFPGAN's grey)")
    antialias: bool = opt(True, "box-filter supersampling when a warp shrinks (big face -> crop, crop -> small "
                                "face) instead of plain bilinear sampling, which aliases")
    erode_fraction: float = opt(0.05, "paste mask: its edge is pulled in by this fraction of the face's side "
                                      "in the photo (facexlib: 1/20)")
    feather_fraction: float = opt(0.05, "paste mask: Gaussian feather radius as a fraction of the face's side "
                                        "in the photo (facexlib: 1/20); capped at the erosion so the mask stays "
                                        "inside the crop's footprint")
    enlarge_interp: str = opt("cubic", "interpolation when a restored crop is enlarged onto the photo (face "
                                       "larger than the crop): linear | cubic | lanczos4 (4-10x slower than "
                                       "cubic for about the same fidelity)")
    upscale: int = opt(1, "background upscale factor for paste-back (1 = the photo keeps its size; k > 1 "
                          "resizes it with enlarge_interp and pastes faces at k times their size)")

    def __post_init__(self):
        if int(self.face_size) != self.face_size or self.face_size < 16:
            raise ValueError(f"face_size must be an integer >= 16, got {self.face_size!r}")
        if self.min_eye_distance < 0:
            raise ValueError(f"min_eye_distance must be >= 0, got {self.min_eye_distance}")
        if self.max_faces < 0:
            raise ValueError(f"max_faces must be >= 0 (0 = no cap), got {self.max_faces}")
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, got {self.rank!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.border not in BORDERS:
            raise ValueError(f"border must be one of {tuple(BORDERS)}, got {self.border!r}")
        if not (0 <= self.erode_fraction < 0.5 and 0 <= self.feather_fraction < 0.5):
            raise ValueError(f"erode_fraction and feather_fraction must be in [0, 0.5), got "
                             f"{self.erode_fraction}, {self.feather_fraction}")
        if self.enlarge_interp not in ENLARGE_INTERPS:
            raise ValueError(f"enlarge_interp must be one of {tuple(ENLARGE_INTERPS)}, got {self.enlarge_interp!r}")
        if int(self.upscale) != self.upscale or self.upscale < 1:
            raise ValueError(f"upscale must be an integer >= 1, got {self.upscale!r}")


# ---------------------------------------------------------------------------------------------- geometry


def template(face_size: int) -> np.ndarray:
    """The FFHQ template (5, 2) float64 for a face_size crop (linear scaling of the 512 one)."""
    return FFHQ_TEMPLATE_512 * (face_size / 512.0)


def _h(M: np.ndarray) -> np.ndarray:
    """2x3 -> 3x3 homogeneous."""
    return np.vstack([np.asarray(M, np.float64), [0.0, 0.0, 1.0]])


def _rescale(k: float) -> np.ndarray:
    """3x3 map from an image to the same image resized by k (pixel centres: u = (x + 0.5) k - 0.5)."""
    return np.array([[k, 0.0, 0.5 * k - 0.5], [0.0, k, 0.5 * k - 0.5], [0.0, 0.0, 1.0]])


def matrix_scale(M: np.ndarray) -> float:
    """Uniform scale of a similarity (crop px per photo px)."""
    return float(math.sqrt(abs(np.linalg.det(np.asarray(M, np.float64)[:, :2]))))


def inverse_matrix(M: np.ndarray) -> np.ndarray:
    """Crop -> photo matrix (2x3 float64)."""
    return cv2.invertAffineTransform(np.asarray(M, np.float64))


def eye_distance(landmarks: np.ndarray) -> float:
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    return float(np.hypot(*(lm[1] - lm[0])))


def similarity_to_template(landmarks: np.ndarray, face_size: int, estimator: str = "lstsq") -> np.ndarray:
    """2x3 float64 similarity mapping the 5 photo landmarks onto the template of a face_size crop.

    Raises ValueError for non-finite or degenerate (coincident) landmarks.
    """
    src = np.asarray(landmarks, np.float64).reshape(5, 2)
    if not np.isfinite(src).all():
        raise ValueError("non-finite landmarks")
    dst = template(face_size)
    if estimator == "lmeds":
        M, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
        if M is None:
            raise ValueError("degenerate landmarks: no similarity found")
        M = M.astype(np.float64)
    elif estimator == "lstsq":
        # Not in OpenCV: its estimators refine iteratively and stop ~1e-4 short of the exact fit.
        x, y = src[:, 0], src[:, 1]
        one, zero = np.ones(5), np.zeros(5)
        A = np.empty((10, 4))
        A[0::2] = np.stack([x, -y, one, zero], 1)
        A[1::2] = np.stack([y, x, zero, one], 1)
        (a, b, tx, ty), _, rank, _ = np.linalg.lstsq(A, dst.reshape(-1), rcond=None)
        if rank < 4:  # all points coincide: lstsq would return a minimum-norm, meaningless fit
            raise ValueError("degenerate landmarks: coincident points")
        M = np.array([[a, -b, tx], [b, a, ty]])
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not np.isfinite(M).all() or matrix_scale(M) < 1e-9:
        raise ValueError("degenerate landmarks: coincident points")
    return M


def crop_corners(M: np.ndarray, face_size: int) -> np.ndarray:
    """The crop's outline (pixel edges, clockwise from top-left) in photo coordinates, (4, 2) float64."""
    e = face_size - 0.5
    corners = np.array([[-0.5, -0.5], [e, -0.5], [e, e], [-0.5, e]])
    Minv = inverse_matrix(M)
    return corners @ Minv[:, :2].T + Minv[:, 2]


def border_fraction(photo_shape: tuple, M: np.ndarray, face_size: int) -> float:
    """Share of the aligned crop's area that falls outside the photo (0 = fully inside)."""
    h, w = photo_shape[:2]
    quad = crop_corners(M, face_size)
    if (quad >= -0.5).all() and (quad[:, 0] <= w - 0.5).all() and (quad[:, 1] <= h - 0.5).all():
        return 0.0  # exact test first: the float32 intersection leaves ~1e-8 residues
    quad = quad.astype(np.float32)
    rect = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]], np.float32)
    inside, _ = cv2.intersectConvexConvex(quad, rect)
    total = (face_size / matrix_scale(M)) ** 2
    return float(min(1.0, max(0.0, 1.0 - inside / total)))


def _supersample(shrink: float) -> int:
    """Samples per output pixel side for a warp that shrinks by `shrink` (> 1); 1 = plain bilinear."""
    return int(min(_MAX_SUPERSAMPLE, max(1, math.floor(shrink + 0.5))))


def _warp(src: np.ndarray, M: np.ndarray, size: tuple[int, int], k: int, flags: int, border: int,
          value=0) -> np.ndarray:
    """warpAffine to size (w, h); with k > 1 warp at k times the size and box-average back (INTER_AREA
    on an integer factor is an exact k x k mean)."""
    if k == 1:
        return cv2.warpAffine(src, M, size, flags=flags, borderMode=border, borderValue=value)
    Mk = (_rescale(k) @ _h(M))[:2]
    big = cv2.warpAffine(src, Mk, (size[0] * k, size[1] * k), flags=flags, borderMode=border, borderValue=value)
    return cv2.resize(big, size, interpolation=cv2.INTER_AREA)


def warp_face(photo: np.ndarray, M: np.ndarray, face_size: int, border: str = "reflect_101",
              border_value=(135, 133, 132), antialias: bool = True) -> np.ndarray:
    """The aligned crop (face_size, face_size, C) uint8 of `photo` under M; outside the photo per `border`."""
    if photo.dtype != np.uint8:
        raise ValueError(f"warp_face expects a uint8 photo, got {photo.dtype}")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {tuple(BORDERS)}, got {border!r}")
    s = matrix_scale(M)
    k = _supersample(1.0 / s) if antialias and s < 1 else 1
    value = tuple(float(v) for v in border_value) if border == "constant" else 0
    return _warp(photo, M, (face_size, face_size), k, cv2.INTER_LINEAR, BORDERS[border], value)


# ---------------------------------------------------------------------------------------------- paste-back


@dataclass
class FaceLayer:
    """A restored face warped back onto the canvas: rows y0:y0+h, columns x0:x0+w of the (upscaled) photo."""

    x0: int
    y0: int
    face: np.ndarray  # (h, w, C) uint8, the warped-back restored crop
    mask: np.ndarray  # (h, w) float32 in [0, 1]; 0 = keep the photo


def _canvas_matrix(M: np.ndarray, face_size: int, crop_size: int, upscale: int) -> np.ndarray:
    """Canvas -> restored-crop matrix, from the photo -> aligned-crop M.

    The restored crop may have another size than the aligned one (DR2's 256, an enhancer's 512): that is a
    resize of the crop, and the canvas is the photo resized by `upscale`.
    """
    return (_rescale(crop_size / face_size) @ _h(M) @ np.linalg.inv(_rescale(upscale)))[:2]


def face_layer(photo_shape: tuple, face: np.ndarray, M: np.ndarray, cfg: AlignConfig,
               roi: tuple[int, int, int, int] | None = None,
               face_mask: np.ndarray | None = None) -> FaceLayer | None:
    """Warp one restored crop back and build its soft mask over the crop's footprint.

    photo_shape: the original photo's shape; M: its photo -> aligned-crop matrix (for cfg.face_size); face:
    the restored square crop, any size. Coordinates of the result are in the canvas (photo x cfg.upscale).
    roi (x0, y0, x1, y1) overrides the region (tests compare it with the whole canvas). None when the
    footprint misses the canvas.
    """
    if face.dtype != np.uint8 or face.ndim not in (2, 3) or face.shape[0] != face.shape[1]:
        raise ValueError(f"restored face must be a square uint8 image, got {face.dtype} {face.shape}")
    crop = face.shape[0]
    H, W = photo_shape[0] * cfg.upscale, photo_shape[1] * cfg.upscale
    Mc = _canvas_matrix(M, cfg.face_size, crop, cfg.upscale)
    Minv = inverse_matrix(Mc)
    s = matrix_scale(Mc)
    side = crop / s  # the face's side on the canvas, px
    if roi is None:
        quad = crop_corners(Mc, crop)
        # 2 px margin: the warped mask's bilinear edge and the zeros that erosion/feathering must see.
        x0, y0 = (np.floor(quad.min(0)) - 2).astype(int)
        x1, y1 = (np.ceil(quad.max(0)) + 3).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    else:
        x0, y0, x1, y1 = roi
    if x1 <= x0 or y1 <= y0:
        return None
    size = (x1 - x0, y1 - y0)
    to_roi = Minv.copy()
    to_roi[:, 2] -= (x0, y0)

    mask = cv2.warpAffine(np.ones((crop, crop), np.float32), to_roi, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    erode = max(1, round(cfg.erode_fraction * side))
    # Feather no wider than the erosion: the blurred mask then never leaves the crop's footprint.
    feather = min(round(cfg.feather_fraction * side), erode)
    mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * erode + 1, 2 * erode + 1)))
    if feather > 0:
        mask = cv2.GaussianBlur(mask, (2 * feather + 1, 2 * feather + 1), 0)
    # float32 weights (warp, blur) sum to 1 - 2^-24: snap the interior back to exactly 1 (= restored face)
    mask[mask > 1.0 - 1e-6] = 1.0
    np.clip(mask, 0.0, 1.0, out=mask)
    if face_mask is not None:  # CodeFormer's use_parse: the parsing mask where it is below the soft one
        if face_mask.shape != (crop, crop):
            raise ValueError(f"face mask {face_mask.shape} does not match the restored crop {face.shape[:2]}")
        parse = cv2.warpAffine(face_mask.astype(np.float32), to_roi, size, flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        np.minimum(mask, np.clip(parse, 0.0, 1.0), out=mask)

    # Replicated edges: the blend never mixes in a fill colour where the mask is still soft.
    if s < 1 or not cfg.antialias:  # s < 1: the face is enlarged; bilinear would look soft
        flags, k = (ENLARGE_INTERPS[cfg.enlarge_interp] if s < 1 else cv2.INTER_LINEAR), 1
    else:
        flags, k = cv2.INTER_LINEAR, _supersample(s)
    warped = _warp(face, to_roi, size, k, flags, cv2.BORDER_REPLICATE)
    return FaceLayer(int(x0), int(y0), warped, mask)


def _upscaled(photo: np.ndarray, cfg: AlignConfig) -> np.ndarray:
    if cfg.upscale == 1:
        return photo.copy()
    h, w = photo.shape[:2]
    return cv2.resize(photo, (w * cfg.upscale, h * cfg.upscale), interpolation=ENLARGE_INTERPS[cfg.enlarge_interp])


def composite(canvas: np.ndarray, layer: FaceLayer) -> None:
    """Blend a layer into canvas in place: mask * face + (1 - mask) * canvas, in float, rounded.

    Weight 0 gives the canvas's bytes and weight 1 the face's exactly (cv2.blendLinear, ~4x numpy's speed).
    """
    h, w = layer.mask.shape
    region = canvas[layer.y0 : layer.y0 + h, layer.x0 : layer.x0 + w]
    region[...] = cv2.blendLinear(layer.face, region, layer.mask, 1.0 - layer.mask).reshape(region.shape)


def paste_back(photo: np.ndarray, restored_faces: list[np.ndarray], matrices: list[np.ndarray],
               cfg: AlignConfig, canvas: np.ndarray | None = None,
               masks: list[np.ndarray | None] | None = None) -> np.ndarray:
    """The photo (uint8 (H, W, C); x cfg.upscale) with each restored crop blended in, in list order.

    matrices[i] is the photo -> aligned-crop matrix (for cfg.face_size) the i-th face was aligned with;
    restored crops may be any square size (e.g. 512 from a 256 alignment). canvas: the background at
    cfg.upscale (an upsampler's output), blended into in place; default the photo resized with
    enlarge_interp. masks[i]: an optional (S, S) float blend mask in the restored crop's frame (a parsing
    mask, tasks/parsing.py); the paste then uses min(it warped back, the soft eroded mask). The photo is
    not modified.
    """
    if photo.dtype != np.uint8:
        raise ValueError(f"paste_back expects a uint8 photo, got {photo.dtype}")
    if len(restored_faces) != len(matrices) or (masks is not None and len(masks) != len(matrices)):
        raise ValueError(f"{len(restored_faces)} restored faces but {len(matrices)} matrices"
                         + ("" if masks is None else f" and {len(masks)} masks"))
    want = (photo.shape[0] * cfg.upscale, photo.shape[1] * cfg.upscale) + photo.shape[2:]
    if canvas is None:
        canvas = _upscaled(photo, cfg)
    elif canvas.shape != want or canvas.dtype != np.uint8:
        raise ValueError(f"background {canvas.dtype} {canvas.shape} is not the photo at upscale {cfg.upscale}: "
                         f"uint8 {want}")
    for i, (face, M) in enumerate(zip(restored_faces, matrices)):
        if face.ndim != photo.ndim or (face.ndim == 3 and face.shape[2] != photo.shape[2]):
            raise ValueError(f"restored face {face.shape} does not match the photo's channels {photo.shape}")
        layer = face_layer(photo.shape, face, M, cfg, face_mask=None if masks is None else masks[i])
        if layer is not None:
            composite(canvas, layer)
    return canvas


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class FacePlan:
    """One detected face's alignment decision: a manifest row via row()."""

    index: int  # detection order within the photo
    status: str  # ok | too_small | over_cap | invalid
    reason: str  # why it is not ok, or a note for ok faces ("" if none)
    score: float
    landmarks: np.ndarray  # (5, 2) float32, photo coordinates
    box: tuple[float, float, float, float] | None
    eye_distance: float  # px in the photo (nan when invalid)
    matrix: np.ndarray | None  # 2x3 float64 photo -> crop; None when invalid
    face_side: float  # side of the aligned crop in photo px (nan when invalid)
    border_fraction: float  # share of the crop outside the photo (nan when invalid)
    face_size: int = field(default=512)

    def row(self) -> dict:
        """Plain Python values for a Parquet manifest (landmarks x0,y0,...,x4,y4; affine row-major 6)."""
        def f(v):
            return None if v is None or not math.isfinite(v) else float(v)

        return {
            "face_index": self.index,
            "status": self.status,
            "reason": self.reason,
            "score": f(self.score),
            "box": None if self.box is None else [float(v) for v in self.box],
            "landmarks": [float(v) for v in np.asarray(self.landmarks, np.float64).reshape(-1)],
            "eye_distance": f(self.eye_distance),
            "face_side": f(self.face_side),
            "border_fraction": f(self.border_fraction),
            "affine": None if self.matrix is None else [float(v) for v in self.matrix.reshape(-1)],
            "face_size": self.face_size,
        }


def plan_faces(landmarks_list: list[np.ndarray], scores: list[float] | None, photo_shape: tuple,
               cfg: AlignConfig, boxes: list | None = None) -> list[FacePlan]:
    """Decide, per detected face (in detection order), ok / too_small / over_cap / invalid.

    Each face gets its matrix, eye distance, crop side in the photo and border fraction. Faces below
    min_eye_distance are too_small; of the rest, the best max_faces by cfg.rank are ok, the others over_cap.
    Faces partly outside the photo stay ok (their crops use reflected pixels); the fraction is recorded.
    """
    n = len(landmarks_list)
    scores = [float("nan")] * n if scores is None else [float(s) for s in scores]
    if len(scores) != n or (boxes is not None and len(boxes) != n):
        raise ValueError(f"{n} landmark sets but {len(scores)} scores / {None if boxes is None else len(boxes)} "
                         "boxes")
    plans = []
    for i, lm in enumerate(landmarks_list):
        lm = np.asarray(lm, np.float64).reshape(5, 2)
        box = None if boxes is None else tuple(float(v) for v in np.asarray(boxes[i]).reshape(4))
        nan = float("nan")
        plan = FacePlan(i, "ok", "", scores[i], lm.astype(np.float32), box, nan, None, nan, nan, cfg.face_size)
        try:
            M = similarity_to_template(lm, cfg.face_size, cfg.estimator)
        except ValueError as e:
            plan.status, plan.reason = "invalid", str(e)
            plans.append(plan)
            continue
        plan.matrix = M
        plan.eye_distance = eye_distance(lm)
        plan.face_side = cfg.face_size / matrix_scale(M)
        plan.border_fraction = border_fraction(photo_shape, M, cfg.face_size)
        if plan.eye_distance < cfg.min_eye_distance:
            plan.status = "too_small"
            plan.reason = f"eye distance {plan.eye_distance:.1f} px < min_eye_distance {cfg.min_eye_distance:g}"
        elif plan.border_fraction > 0:
            plan.reason = f"{100 * plan.border_fraction:.1f}% of the crop outside the photo ({cfg.border} fill)"
        plans.append(plan)

    eligible = [p for p in plans if p.status == "ok"]
    if cfg.max_faces and len(eligible) > cfg.max_faces:
        def key(p: FacePlan):
            score = p.score if math.isfinite(p.score) else -math.inf
            return (-score, -p.eye_distance, p.index) if cfg.rank == "score" else (-p.eye_distance, -score, p.index)

        for rank, p in enumerate(sorted(eligible, key=key)):
            if rank >= cfg.max_faces:
                p.status = "over_cap"
                p.reason = f"rank {rank + 1} of {len(eligible)} by {cfg.rank}; max_faces={cfg.max_faces}"
    return plans


def align_faces(photo: np.ndarray, plans: list[FacePlan], cfg: AlignConfig) -> list[np.ndarray]:
    """The aligned crops of the plans whose status is ok, in plan order (warp_face with cfg's options)."""
    return [warp_face(photo, p.matrix, cfg.face_size, cfg.border, cfg.border_value, cfg.antialias)
            for p in plans if p.status == "ok"]

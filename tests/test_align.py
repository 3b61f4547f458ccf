"""Alignment to the FFHQ template and paste-back geometry (tasks/align.py), on synthetic photos."""

import json
import math

import cv2
import numpy as np
import pytest

from tasks.align import (
    FFHQ_TEMPLATE_512,
    AlignConfig,
    align_faces,
    border_fraction,
    composite,
    face_layer,
    inverse_matrix,
    paste_back,
    plan_faces,
    similarity_to_template,
    template,
    warp_face,
)


def similarity(deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(math.radians(deg)), scale * math.sin(math.radians(deg))
    return np.array([[c, -s, tx], [s, c, ty]])


def face_at(deg: float, scale: float, cx: float, cy: float, face_size: int = 512) -> np.ndarray:
    """Crop -> photo similarity putting the template's landmark centroid at (cx, cy); scale in photo px per
    512-crop px (so the face looks the same at every face_size)."""
    T = similarity(deg, scale * 512 / face_size, 0, 0)
    T[:, 2] = np.array([cx, cy]) - apply(T, template(face_size).mean(0, keepdims=True))[0]
    return T


def apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, np.float64) @ M[:, :2].T + M[:, 2]


def landmarks_for(T: np.ndarray, face_size: int) -> np.ndarray:
    """Photo landmarks of a face whose crop -> photo map is T."""
    return apply(T, template(face_size))


def smooth_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Band-limited texture: survives a round trip through a smaller crop."""
    rng = np.random.default_rng(seed)
    small = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    img = cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), (0, 0), 6)
    return np.clip(128 + img / img.std() * 40, 0, 255).astype(np.uint8)


def blob_photo(h: int, w: int, points: np.ndarray, sigma: float) -> np.ndarray:
    """Black photo with a Gaussian blob at each (sub-pixel) point: a face drawn by its 5 landmarks."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w), np.float64)
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(np.rint(img * 250), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def centroids(img: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """Intensity-weighted centroid of each blob in a window around its expected position."""
    g = img[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0 : g.shape[0], 0 : g.shape[1]]
    out = []
    for x, y in points:
        w = g * (((xx - x) ** 2 + (yy - y) ** 2) <= radius**2)
        out.append([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    return np.array(out)


def full_mask(shape, layer) -> np.ndarray:
    m = np.zeros(shape[:2], np.float32)
    h, w = layer.mask.shape
    m[layer.y0 : layer.y0 + h, layer.x0 : layer.x0 + w] = layer.mask
    return m


# ---------------------------------------------------------------------------------------------- template / fit


def test_template_scales_linearly():
    np.testing.assert_allclose(template(512), FFHQ_TEMPLATE_512)
    np.testing.assert_allclose(template(256), FFHQ_TEMPLATE_512 / 2)
    # landmarks at the 512 template, aligned for a 256 crop: a pure scale by 1/2
    M = similarity_to_template(FFHQ_TEMPLATE_512, 256)
    np.testing.assert_allclose(M, [[0.5, 0, 0], [0, 0.5, 0]], atol=1e-9)


@pytest.mark.parametrize("face_size", [256, 512])
def test_recovers_known_similarity_exactly(face_size):
    T = similarity(15, 1.7, 311.3, 205.8)  # crop -> photo
    lm = landmarks_for(T, face_size)
    M = similarity_to_template(lm, face_size)
    np.testing.assert_allclose(M, cv2.invertAffineTransform(T), atol=1e-6)
    np.testing.assert_allclose(inverse_matrix(M), T, atol=1e-6)
    np.testing.assert_allclose(apply(M, lm), template(face_size), atol=1e-6)
    # LMEDS (facexlib's estimator) stops its refinement short of the exact fit: close, not 1e-6
    M_lmeds = similarity_to_template(lm, face_size, "lmeds")
    np.testing.assert_allclose(apply(M_lmeds, lm), template(face_size), atol=0.05)


def test_least_squares_fit_on_noisy_landmarks():
    """With noise, the fit is the least-squares similarity: residuals are orthogonal to its 4 parameters."""
    rng = np.random.default_rng(1)
    lm = landmarks_for(similarity(-30, 0.8, 90, 140), 512) + rng.normal(0, 2, (5, 2))
    M = similarity_to_template(lm, 512)
    r = apply(M, lm) - template(512)
    x, y = lm[:, 0], lm[:, 1]
    # d(residual)/d(a, b, tx, ty) . residual == 0 at the optimum
    grads = [(x * r[:, 0] + y * r[:, 1]).sum(), (-y * r[:, 0] + x * r[:, 1]).sum(), r[:, 0].sum(), r[:, 1].sum()]
    np.testing.assert_allclose(grads, 0, atol=1e-6)


def test_degenerate_landmarks_raise():
    with pytest.raises(ValueError, match="degenerate"):
        similarity_to_template(np.full((5, 2), 10.0), 512)
    bad = FFHQ_TEMPLATE_512.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        similarity_to_template(bad, 512)


@pytest.mark.parametrize("face_size", [256, 512])
@pytest.mark.parametrize("scale", [1.7, 0.6])  # face larger than the crop (supersampled) / smaller
def test_synthetic_face_lands_on_template(face_size, scale):
    """Blobs drawn at the photo landmarks end up at the template in the warped crop (sub-pixel)."""
    T = face_at(15, scale, 330.4, 320.7, face_size)
    lm = landmarks_for(T, face_size)
    photo = blob_photo(640, 660, lm, sigma=6 * scale)
    M = similarity_to_template(lm, face_size)
    crop = warp_face(photo, M, face_size)
    assert crop.shape == (face_size, face_size, 3) and crop.dtype == np.uint8
    found = centroids(crop, template(face_size), radius=18 * face_size / 512)
    np.testing.assert_allclose(found, template(face_size), atol=0.5)
    # and back: pasted on a black photo, the blobs return to the landmarks
    out = paste_back(np.zeros_like(photo), [crop], [M], AlignConfig(face_size=face_size))
    np.testing.assert_allclose(centroids(out, lm, radius=18 * scale), lm, atol=0.5)


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("face_size", [256, 512])
@pytest.mark.parametrize("scale", [1.7, 0.6])
def test_round_trip_reproduces_the_face_region(face_size, scale):
    photo = smooth_photo(900, 1000)
    T = face_at(15, scale, 500, 450, face_size)
    M = similarity_to_template(landmarks_for(T, face_size), face_size)
    cfg = AlignConfig(face_size=face_size)
    crop = warp_face(photo, M, face_size)
    out = paste_back(photo, [crop], [M], cfg)
    mask = full_mask(photo.shape, face_layer(photo.shape, crop, M, cfg))
    interior, outside = mask == 1.0, mask == 0.0
    assert interior.sum() > 0.3 * (512 * scale) ** 2  # the eroded face, not a sliver
    diff = np.abs(out.astype(int) - photo)
    # band-limited but still detailed at 3.4x shrink (256 crop): rare pixels miss by more
    assert diff[interior].mean() < 1.0 and np.percentile(diff[interior], 99.9) <= 6 and diff[interior].max() <= 16
    assert np.array_equal(out[outside], photo[outside])


def test_restored_crop_of_another_size_and_upscaled_background():
    """Aligned at 256, restored at 512 (bicubic hand-over), pasted on a 2x background: blobs stay put."""
    T = face_at(-20, 0.9, 300.2, 280.6, 256)
    lm = landmarks_for(T, 256)
    photo = blob_photo(560, 600, lm, sigma=7)
    M = similarity_to_template(lm, 256)
    crop512 = cv2.resize(warp_face(photo, M, 256), (512, 512), interpolation=cv2.INTER_CUBIC)
    black = np.zeros_like(photo)
    out = paste_back(black, [crop512], [M], AlignConfig(face_size=256))
    np.testing.assert_allclose(centroids(out, lm, 20), lm, atol=0.3)
    out2 = paste_back(black, [crop512], [M], AlignConfig(face_size=256, upscale=2))
    assert out2.shape == (1120, 1200, 3)
    np.testing.assert_allclose(centroids(out2, 2 * lm + 0.5, 40), 2 * lm + 0.5, atol=0.3)


# ---------------------------------------------------------------------------------------------- paste-back


# face enlarged (cubic / Lanczos warp-back) or shrunk (supersampled) on the photo
@pytest.mark.parametrize("scale, interp", [(1.3, "cubic"), (1.3, "lanczos4"), (0.5, "cubic")])
def test_paste_is_photo_outside_mask_and_restored_inside(scale, interp):
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, (500, 560, 3), dtype=np.uint8)
    restored = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    M = similarity_to_template(landmarks_for(face_at(10, scale, 280, 260), 512), 512)
    cfg = AlignConfig(enlarge_interp=interp)
    out = paste_back(photo, [restored], [M], cfg)
    layer = face_layer(photo.shape, restored, M, cfg)
    mask = full_mask(photo.shape, layer)
    assert (mask == 0).any() and (mask == 1).sum() > 1000 and ((mask > 0) & (mask < 1)).sum() > 1000
    footprint = cv2.warpAffine(np.ones((512, 512), np.float32), inverse_matrix(M), (560, 500))
    assert not ((mask > 0) & (footprint == 0)).any()  # the feather stays on the crop
    assert np.array_equal(out[mask == 0], photo[mask == 0])
    warped = np.zeros_like(photo)
    h, w = layer.mask.shape
    warped[layer.y0 : layer.y0 + h, layer.x0 : layer.x0 + w] = layer.face
    assert np.array_equal(out[mask == 1], warped[mask == 1])
    soft = (mask > 0) & (mask < 1)
    lo, hi = np.minimum(photo, warped).astype(int), np.maximum(photo, warped).astype(int)
    assert ((out[soft] >= lo[soft]) & (out[soft] <= hi[soft])).all()  # a blend of the two
    if scale > 1:  # no supersampling: the warped content is OpenCV's warp of the crop
        flags = {"cubic": cv2.INTER_CUBIC, "lanczos4": cv2.INTER_LANCZOS4}[interp]
        ref = cv2.warpAffine(restored, inverse_matrix(M), (560, 500), flags=flags,
                             borderMode=cv2.BORDER_REPLICATE)
        inner = cv2.erode((mask == 1).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert np.abs(warped[inner].astype(int) - ref[inner]).max() <= 1


def test_input_photo_is_not_modified():
    photo = smooth_photo(300, 300)
    before = photo.copy()
    M = similarity_to_template(landmarks_for(face_at(0, 0.4, 150, 150), 512), 512)
    paste_back(photo, [np.zeros((512, 512, 3), np.uint8)], [M], AlignConfig())
    assert np.array_equal(photo, before)


@pytest.mark.parametrize("scale", [1.3, 0.5])
def test_region_of_interest_equals_whole_canvas(scale):
    """Working on the footprint only changes nothing against warping onto the whole photo."""
    photo = smooth_photo(420, 460, seed=3)
    restored = smooth_photo(512, 512, seed=6)
    M = similarity_to_template(landmarks_for(face_at(25, scale, 230, 60), 512), 512)  # cut by the top
    cfg = AlignConfig()
    a, b = photo.copy(), photo.copy()
    composite(a, face_layer(photo.shape, restored, M, cfg))
    composite(b, face_layer(photo.shape, restored, M, cfg, roi=(0, 0, 460, 420)))
    diff = np.abs(a.astype(int) - b)
    # OpenCV's warp quantises source positions to 1/32 px, rounding differs by the region's offset
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2
    assert not np.array_equal(a, photo)


def test_two_faces_both_change_rest_untouched():
    photo = smooth_photo(500, 900, seed=4)
    Ms = [similarity_to_template(landmarks_for(face_at(d, s, x, y), 512), 512)
          for d, s, x, y in [(-10, 0.6, 220, 250), (20, 0.5, 650, 250)]]
    colours = [(250, 20, 20), (20, 20, 250)]
    faces = [np.full((512, 512, 3), c, np.uint8) for c in colours]
    cfg = AlignConfig()
    out = paste_back(photo, faces, Ms, cfg)
    masks = [full_mask(photo.shape, face_layer(photo.shape, f, M, cfg)) for f, M in zip(faces, Ms)]
    assert not ((masks[0] > 0) & (masks[1] > 0)).any()
    for m, c in zip(masks, colours):
        assert (m == 1).sum() > 5000
        assert (out[m == 1] == c).all()  # a flat crop warps back to itself exactly
    rest = (masks[0] == 0) & (masks[1] == 0)
    assert np.array_equal(out[rest], photo[rest])
    # each face alone changes only its own region
    one = paste_back(photo, faces[:1], Ms[:1], cfg)
    assert np.array_equal(one[masks[1] == 1], photo[masks[1] == 1])


def test_overlapping_faces_composite_in_order():
    photo = np.zeros((400, 400, 3), np.uint8)
    Ms = [similarity_to_template(landmarks_for(face_at(0, 0.5, x, 200), 512), 512) for x in (150, 230)]
    red, blue = np.full((512, 512, 3), (255, 0, 0), np.uint8), np.full((512, 512, 3), (0, 0, 255), np.uint8)
    cfg = AlignConfig()
    m_blue = full_mask(photo.shape, face_layer(photo.shape, blue, Ms[1], cfg))
    m_red = full_mask(photo.shape, face_layer(photo.shape, red, Ms[0], cfg))
    both = (m_red == 1) & (m_blue == 1)
    assert both.sum() > 1000
    assert (paste_back(photo, [red, blue], Ms, cfg)[both] == (0, 0, 255)).all()
    assert (paste_back(photo, [blue, red], Ms[::-1], cfg)[both] == (255, 0, 0)).all()


def test_face_entirely_outside_is_a_no_op():
    photo = smooth_photo(200, 200)
    M = similarity_to_template(landmarks_for(face_at(0, 0.3, 900, 900), 512), 512)
    assert border_fraction(photo.shape, M, 512) == 1.0
    assert np.array_equal(paste_back(photo, [np.zeros((512, 512, 3), np.uint8)], [M], AlignConfig()), photo)


# ---------------------------------------------------------------------------------------------- planning


def test_plan_decisions_and_manifest_rows():
    shape = (800, 1200, 3)
    # (deg, scale, centre x, y, score); the template's eye distance is 125.9 px at scale 1
    faces = [
        (0, 0.5, 150, 180, 0.99),  # ok
        (5, 0.1, 600, 600, 0.995),  # eye distance 12.6 px: too_small even with the best score
        (0, 0.6, 450, 200, 0.90),  # ok
        (0, 0.7, 800, 250, 0.80),  # over cap by score, survives by size
        (0, 0.4, 1000, 550, 0.95),  # ok by score, over cap by size
    ]
    lms = [landmarks_for(face_at(d, s, x, y), 512) for d, s, x, y, _ in faces]
    scores = [f[-1] for f in faces]
    boxes = [(*lm.min(0), *lm.max(0)) for lm in lms]
    plans = plan_faces(lms, scores, shape, AlignConfig(max_faces=3, min_eye_distance=20), boxes)
    assert [p.status for p in plans] == ["ok", "too_small", "ok", "over_cap", "ok"]
    assert "eye distance 12.6 px < min_eye_distance 20" in plans[1].reason
    assert "max_faces=3" in plans[3].reason
    by_size = plan_faces(lms, scores, shape, AlignConfig(max_faces=3, rank="size"))
    assert [p.status for p in by_size] == ["ok", "too_small", "ok", "ok", "over_cap"]
    assert [p.status for p in plan_faces(lms, scores, shape, AlignConfig(max_faces=0))].count("ok") == 4

    p = plans[0]
    np.testing.assert_allclose(p.eye_distance, 0.5 * 125.92, atol=0.01)
    np.testing.assert_allclose(p.face_side, 256, atol=1e-6)
    assert p.border_fraction == 0.0 and p.reason == ""
    np.testing.assert_allclose(p.matrix, cv2.invertAffineTransform(face_at(0, 0.5, 150, 180)), atol=1e-6)
    row = p.row()
    json.dumps(row)  # plain Python values only
    assert row["face_index"] == 0 and row["status"] == "ok" and len(row["landmarks"]) == 10
    assert len(row["affine"]) == 6 and len(row["box"]) == 4 and row["face_size"] == 512
    assert row["landmarks"][:2] == pytest.approx(list(lms[0][0]), abs=1e-4)


def test_plan_invalid_and_missing_scores():
    lms = [np.full((5, 2), 3.0), landmarks_for(similarity(0, 1, 0, 0), 512)]
    plans = plan_faces(lms, None, (600, 600, 3), AlignConfig())
    assert [p.status for p in plans] == ["invalid", "ok"]
    row = plans[0].row()
    assert row["affine"] is None and row["eye_distance"] is None and row["score"] is None
    json.dumps(row)
    with pytest.raises(ValueError):
        plan_faces(lms, [0.9], (600, 600, 3), AlignConfig())


@pytest.mark.parametrize("border", ["reflect_101", "constant"])
def test_face_at_the_border_is_restored_and_pasted(border):
    photo = smooth_photo(400, 500, seed=5)
    T = face_at(10, 0.6, 40, 200)  # left part of the crop hangs off the photo
    lm = landmarks_for(T, 512)
    cfg = AlignConfig(border=border)
    (plan,) = plan_faces([lm], [0.9], photo.shape, cfg)
    assert plan.status == "ok" and 0.1 < plan.border_fraction < 0.5 and "outside the photo" in plan.reason
    # the analytic fraction matches counting crop pixels whose source lies outside the photo
    inside = cv2.warpAffine(np.ones(photo.shape[:2], np.float32), plan.matrix, (512, 512),
                            flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    assert plan.border_fraction == pytest.approx(1 - inside.mean(), abs=0.005)
    crop = warp_face(photo, plan.matrix, 512, border=cfg.border, border_value=cfg.border_value)
    assert np.array_equal(align_faces(photo, [plan], cfg)[0], crop)
    off = cv2.erode((inside == 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # no edge mix
    if border == "constant":
        assert (crop[off] == (135, 133, 132)).all()
    else:  # reflected pixels: the crop's off-photo part is a mirror of real content, not a flat fill
        assert crop[off].std() > 10
    out = paste_back(photo, [255 - crop], [plan.matrix], cfg)
    mask = full_mask(photo.shape, face_layer(photo.shape, crop, plan.matrix, cfg))
    assert out.shape == photo.shape and (mask[:, 0] == 1).any()  # reaches the photo's edge
    assert np.array_equal(out[mask == 0], photo[mask == 0])
    assert not np.array_equal(out[mask == 1], photo[mask == 1])


def test_config_validation():
    for bad in [dict(border="wrap"), dict(face_size=8), dict(max_faces=-1), dict(upscale=0),
                dict(estimator="ransac"), dict(rank="area"), dict(erode_fraction=0.6), dict(enlarge_interp="area")]:
        with pytest.raises(ValueError):
            AlignConfig(**bad)

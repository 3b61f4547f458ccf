"""Background upsampling of whole photos (--photos.upscale): geometry of the paste at S x, what comes from the
upsampler, the pixel budget, the plug-in interface, and the driver's fallback decision."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models.rrdbnet import RRDBNet
from tasks.align import AlignConfig, crop_corners, paste_back, similarity_to_template, warp_face
from tasks.photo_stage import PasteAndWrite, PlannedFace, RestoredFace, _objects, encode_faces
from tasks.upsample import TiledUpsampler, UpsamplerConfig, resolve_upscale
from tests.test_align import blob_photo, centroids, face_at, landmarks_for
from tests.test_rrdbnet import photo as textured

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}


def tiny_upsampler(upscale: int, scale: int = 4, **kw) -> TiledUpsampler:
    cfg = UpsamplerConfig(scale=scale, kwargs=TINY, allow_random_weights=True, tile=48, pad=8, **kw)
    return TiledUpsampler(cfg, upscale, torch.device("cpu"))


def footprint(shape: tuple, M: np.ndarray, face_size: int, upscale: int, grow: int = 5) -> np.ndarray:
    """The aligned crop's outline on the upscaled canvas (pixel centres: u = (x + 0.5) S - 0.5), dilated."""
    corners = (crop_corners(M, face_size) + 0.5) * upscale - 0.5
    mask = np.zeros((shape[0] * upscale, shape[1] * upscale), np.uint8)
    cv2.fillConvexPoly(mask, np.round(corners).astype(np.int32), 1)
    return cv2.dilate(mask, np.ones((grow, grow), np.uint8)) > 0


@pytest.mark.parametrize("upscale", [2, 4])
def test_faces_land_on_the_scaled_landmarks_and_the_rest_is_the_upsamplers(upscale):
    lm = landmarks_for(face_at(15, 0.3, 110.3, 95.7, 128), 128)
    photo = blob_photo(180, 220, lm, sigma=3)
    M = similarity_to_template(lm, 128)
    restored = cv2.resize(warp_face(photo, M, 128), (256, 256), interpolation=cv2.INTER_CUBIC)  # "restored" at 2x
    restored[..., 2] = 200  # a mark of the face in the channel the centroids do not read
    up = tiny_upsampler(upscale)
    background = up([photo])[0]
    assert background.shape == (180 * upscale, 220 * upscale, 3)
    out = paste_back(photo, [restored], [M], AlignConfig(face_size=128, upscale=upscale), canvas=background.copy())
    # face positions: the landmark blobs sit at the landmarks scaled about pixel centres
    scaled = (lm + 0.5) * upscale - 0.5
    np.testing.assert_allclose(centroids(out, scaled, 4 * upscale), scaled, atol=0.25 * upscale)
    # everything off the face's footprint is the upsampler's output, byte for byte; the face replaced it
    foot = footprint(photo.shape, M, 128, upscale)
    assert 0.05 < foot.mean() < 0.8
    assert np.array_equal(out[~foot], background[~foot])
    assert (out[foot][:, 2] > 100).mean() > 0.3
    with pytest.raises(ValueError, match="not the photo at upscale"):
        paste_back(photo, [restored], [M], AlignConfig(face_size=128, upscale=upscale), canvas=photo)


def test_pixel_budget_bounds_every_forward_and_plugins_plug_in():
    from tests.plugins import NearestUpsampler

    img = textured(301, 411)
    for budget, tile in [(10_000, 400), (50_000, 64), (10**8, 0)]:
        cfg = UpsamplerConfig(name="tests.plugins:NearestUpsampler", kwargs={"scale": 2}, tile=tile, pad=6,
                              pixel_budget=budget)
        up = TiledUpsampler(cfg, 2, torch.device("cpu"))
        assert isinstance(up.model, NearestUpsampler) and up.identity == cfg.name  # parameter-free: no weights
        out = up([img, img[:100, :77]])
        assert up.model.max_pixels <= budget
        assert np.array_equal(out[0], cv2.resize(img, (822, 602), interpolation=cv2.INTER_NEAREST))
        assert out[1].shape == (200, 154, 3)


def test_weights_load_strictly_under_params_ema(tmp_path):
    model = RRDBNet(scale=2, **TINY)
    path = tmp_path / "RealESRGAN_x2plus_tiny.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    up = TiledUpsampler(UpsamplerConfig(weights=str(path), scale=2, kwargs=TINY), 2, torch.device("cpu"))
    assert up.identity.startswith("sha256:") and up.identity.endswith(path.name)
    assert torch.equal(up.model.conv_first.weight, model.conv_first.weight)
    with pytest.raises(RuntimeError, match="photos.upsampler.weights"):
        TiledUpsampler(UpsamplerConfig(scale=2, kwargs=TINY), 2, torch.device("cpu"))


def test_driver_resolves_the_upscale_and_refuses_wrong_options():
    assert resolve_upscale(UpsamplerConfig(), 1) == (1, "none", "")
    up, label, note = resolve_upscale(UpsamplerConfig(), 2)  # realesrgan without weights: bicubic, said
    assert (up, label) == (2, "bicubic") and "no upsampler weights" in note
    up, label, note = resolve_upscale(UpsamplerConfig(fallback="none"), 4)
    assert (up, label) == (1, "none") and "kept at its size" in note
    assert resolve_upscale(UpsamplerConfig(weights="x.pth", scale=4), 2) == (2, "realesrgan-x4", "")
    assert resolve_upscale(UpsamplerConfig(name="bicubic"), 3) == (3, "bicubic", "")
    with pytest.raises(ValueError, match="photos.upscale 3 must divide photos.upsampler.scale 4"):
        resolve_upscale(UpsamplerConfig(weights="x.pth", scale=4), 3)
    with pytest.raises(ValueError, match="photos.upsampler.name"):
        resolve_upscale(UpsamplerConfig(name="esrgan"), 2)
    with pytest.raises(ValueError, match="photos.upscale must be"):
        resolve_upscale(UpsamplerConfig(), 0)
    with pytest.raises(ValueError, match="fallback"):
        UpsamplerConfig(fallback="lanczos")


def test_paste_and_write_rows_record_the_upscale_and_upsampler(tmp_path):
    """The fallback path (no network): paste-back resizes the photo; every photo row says what happened."""
    lm = landmarks_for(face_at(0, 0.3, 100, 90, 64), 64)
    photo = blob_photo(170, 200, lm, sigma=3)
    M = similarity_to_template(lm, 64)
    align = AlignConfig(face_size=64, upscale=2)
    plan = [PlannedFace(face_index=0, status="ok", affine=M.reshape(-1).tolist(), face_size=64)]
    batch = {"id": np.array(["a.png", "b.png"], dtype=object), "source": np.array(["a", "b"], dtype=object),
             "stem": np.array(["a", "b"], dtype=object), "status": np.array(["ok", "ok"], dtype=object),
             "error": np.array(["", ""], dtype=object), "kind": np.array(["photo", "photo"], dtype=object),
             "photo": _objects([photo, photo]), "plans": np.array([encode_faces(plan), "[]"], dtype=object),
             "restored_faces": _objects([warp_face(photo, M, 64)[None], np.zeros((0, 64, 64, 3), np.uint8)]),
             "faces_info": np.array([encode_faces([RestoredFace(0)]), "[]"], dtype=object),
             "detector": np.array(["d", "d"], dtype=object)}
    writer = PasteAndWrite(str(tmp_path), align, write_faces=False, png_compression=1, constants={},
                           upsampler="bicubic", upsampler_note="no upsampler weights: bicubic background")
    out = writer(batch)
    assert out["upscale"].tolist() == [2, 2] and out["upsampler"].tolist() == ["bicubic", "bicubic"]
    assert out["upsampler_weights"].tolist() == ["bicubic", "bicubic"]
    assert out["status"].tolist() == ["ok", "ok"], out["error"]
    assert all("no upsampler weights" in n for n in out["note"]) and "only upscaled x2" in out["note"][1]
    b = cv2.cvtColor(cv2.imread(out["restored"][1]), cv2.COLOR_BGR2RGB)
    assert np.array_equal(b, cv2.resize(photo, (400, 340), interpolation=cv2.INTER_CUBIC))
    a = cv2.imread(out["restored"][0])
    assert a.shape == (340, 400, 3)

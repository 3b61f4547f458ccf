"""Face detection (tasks/detect.py) on real photos that ship in packages: MTCNN, Haar, plug-ins."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tasks.config import build
from tasks.detect import (
    FFHQ_TEMPLATE_512,
    DetectorConfig,
    Face,
    FaceDetector,
    box_iou,
    build_detector,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

skimage_data = pytest.importorskip("skimage.data")


def grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {"astronaut": skimage_data.astronaut(), "grace_hopper": grace_hopper()}


@pytest.fixture(scope="module")
def mtcnn() -> FaceDetector:
    return build_detector(DetectorConfig(name="mtcnn", device="cpu"))


@pytest.fixture(scope="module")
def haar() -> FaceDetector:
    return build_detector(DetectorConfig(name="haar"))


@pytest.fixture(scope="module")
def mtcnn_faces(mtcnn, photos) -> dict[str, list[Face]]:
    return {k: mtcnn.detect([v])[0] for k, v in photos.items()}


def assert_plausible(face: Face, shape: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = face.box
    lm = face.landmarks
    assert lm.shape == (5, 2) and lm.dtype == np.float32
    assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]
    assert ((lm[:, 0] > x0) & (lm[:, 0] < x1) & (lm[:, 1] > y0) & (lm[:, 1] < y1)).all(), (face.box, lm)
    le, re, nose, ml, mr = lm
    assert le[0] < re[0] and ml[0] < mr[0], "left/right as seen in the image, image-left first"
    assert max(le[1], re[1]) < nose[1] < min(ml[1], mr[1]), "eyes above the nose above the mouth"
    assert le[0] < nose[0] < re[0]
    assert 0.2 * face.width < face.eye_distance < 0.8 * face.width


# Boxes read off the photos by eye (x0, y0, x1, y1): forehead to chin.
EXPECTED_BOX = {"astronaut": (175, 60, 270, 175), "grace_hopper": (170, 110, 360, 345)}


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_mtcnn_finds_the_one_face_with_landmarks_in_ffhq_order(mtcnn_faces, photos, name):
    faces = mtcnn_faces[name]
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.99
    assert_plausible(face, photos[name].shape)
    assert box_iou(face.box, EXPECTED_BOX[name]) > 0.6


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_haar_finds_the_face_mtcnn_finds(haar, mtcnn_faces, photos, name):
    faces = haar.detect([photos[name]])[0]
    assert len(faces) == 1
    face = faces[0]
    assert 0.5 <= face.score < 1
    assert box_iou(face.box, mtcnn_faces[name][0].box) >= 0.3
    assert_plausible(face, photos[name].shape)
    # approximate landmarks: within a quarter of the eye distance of MTCNN's
    ref = mtcnn_faces[name][0]
    assert np.linalg.norm(face.landmarks - ref.landmarks, axis=1).max() < 0.3 * ref.eye_distance


def test_haar_takes_another_cascade_as_weights(photos, mtcnn_faces):
    path = cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml"
    det = build_detector(DetectorConfig(name="haar", weights=path))
    assert det.identity.endswith(":haarcascade_frontalface_alt2.xml")
    faces = det.detect([photos["astronaut"]])[0]
    assert len(faces) == 1 and box_iou(faces[0].box, mtcnn_faces["astronaut"][0].box) >= 0.3


def test_haar_cascade_from_s3_uses_the_job_storage_options(s3_server, photos, mtcnn_faces):
    path = cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml"
    bucket = s3_server.new_bucket("cascades")
    with open(path, "rb") as f:
        s3_server.fs().pipe_file(f"{bucket}/haar/alt2.xml", f.read())
    det = build_detector(DetectorConfig(name="haar", weights=f"s3://{bucket}/haar/alt2.xml"),
                         storage_options=s3_server.storage_options)
    assert det.identity.endswith(":alt2.xml")
    faces = det.detect([photos["astronaut"]])[0]
    assert len(faces) == 1 and box_iou(faces[0].box, mtcnn_faces["astronaut"][0].box) >= 0.3


def test_batches_of_equal_size_give_the_faces_found_one_at_a_time(mtcnn, mtcnn_faces, photos):
    astro = photos["astronaut"]
    flipped = np.ascontiguousarray(astro[:, ::-1])
    gray = np.full_like(astro, 128)
    # two sizes: the three 512x512 images go through one batched call, grace_hopper (600x512) alone
    batched = build_detector(DetectorConfig(name="mtcnn", device="cpu", batch_size=8))
    batch = batched.detect([astro, photos["grace_hopper"], flipped, gray])
    single_flipped = mtcnn.detect([flipped])[0]
    assert [len(f) for f in batch] == [1, 1, 1, 0]
    for got, want in [(batch[0], mtcnn_faces["astronaut"]), (batch[1], mtcnn_faces["grace_hopper"]),
                      (batch[2], single_flipped)]:
        np.testing.assert_allclose(got[0].box, want[0].box, atol=0.5)
        np.testing.assert_allclose(got[0].landmarks, want[0].landmarks, atol=0.5)
        assert abs(got[0].score - want[0].score) < 1e-4
    # the mirrored face: mirrored box (MTCNN is not exactly mirror-symmetric), and the landmark order still
    # starts at the image-left eye
    x0, y0, x1, y1 = mtcnn_faces["astronaut"][0].box
    assert box_iou(batch[2][0].box, (512 - x1, y0, 512 - x0, y1)) > 0.85
    assert_plausible(batch[2][0], flipped.shape)


@pytest.mark.parametrize("detector", ["mtcnn", "haar"])
def test_photos_without_faces_give_no_faces(request, detector):
    det = request.getfixturevalue(detector)
    gray = np.full((300, 400, 3), 128, np.uint8)
    tiny = np.zeros((8, 8, 3), np.uint8)  # smaller than min_face_size
    assert det.detect([skimage_data.coffee(), gray, tiny]) == [[], [], []]
    assert det.detect([]) == []


def test_large_photos_are_downscaled_and_coordinates_mapped_back(mtcnn_faces, photos):
    astro = photos["astronaut"]
    big = cv2.resize(astro, (1536, 1280), interpolation=cv2.INTER_CUBIC)  # x3 wide, x2.5 high
    det = build_detector(DetectorConfig(name="mtcnn", device="cpu", max_side=614))  # -> 614 x 512
    faces = det.detect([big])[0]
    assert len(faces) == 1
    ref = mtcnn_faces["astronaut"][0].scaled(3.0, 2.5)
    assert box_iou(faces[0].box, ref.box) > 0.8
    assert np.linalg.norm(faces[0].landmarks - ref.landmarks, axis=1).max() < 0.1 * ref.eye_distance
    assert_plausible(faces[0], big.shape)


def test_min_face_size_drops_smaller_faces(photos):
    det = build_detector(DetectorConfig(name="mtcnn", device="cpu", min_face_size=200))
    assert det.detect([photos["astronaut"]]) == [[]]  # its face is ~90 px wide


@pytest.mark.parametrize("name", ["tests.plugins:CentreFaceDetector", "tests.plugins.CentreFaceDetector"])
def test_plugin_detector_by_dotted_path(name):
    cfg = build(DetectorConfig, {"name": name, "weights": "/models/retina.pth", "device": "cpu",
                                 "kwargs": {"score": 0.7}})
    det = build_detector(cfg)
    assert isinstance(det, FaceDetector)
    assert det.plugin.weights == "/models/retina.pth" and det.plugin.device == "cpu"
    img = np.zeros((200, 300, 3), np.uint8)
    faces = det.detect([img, img[:40]])
    assert [len(f) for f in faces] == [2, 1], "faces below min_face_size (20 px) are dropped"
    assert [f.score for f in faces[0]] == [0.7, 0.3], "sorted by score, descending"
    np.testing.assert_allclose(faces[0][0].box, (100, 50, 200, 150))
    np.testing.assert_allclose(faces[0][0].landmarks, FFHQ_TEMPLATE_512 / 512 * 100 + [100, 50], rtol=1e-6)
    filtered = build_detector(DetectorConfig(name=name, min_score=0.5)).detect([img])
    assert [f.score for f in filtered[0]] == [0.8]
    assert det.identity == f"{name}:retina.pth"


class NotADetector:
    def __init__(self, weights, device):
        pass


@pytest.mark.parametrize("cfg, message", [
    (DetectorConfig(name="retinaface"), "unknown detector.name 'retinaface'"),
    (DetectorConfig(name="tests.plugins:NoSuchDetector"), "has no attribute 'NoSuchDetector'"),
    (DetectorConfig(name="no_such_pkg.mod:Detector"), "cannot import module 'no_such_pkg.mod'"),
    (DetectorConfig(name="tests.test_detect:NotADetector"), "no detect"),
    (DetectorConfig(name="haar", kwargs={"nms": 0.4}), "not accepted by haar"),
    (DetectorConfig(name="mtcnn", weights="/x/mtcnn.pt"), "not used by mtcnn"),
    (DetectorConfig(name="haar", weights="/no/such/cascade.xml"), "cascade file not found"),
    (DetectorConfig(name="haar", min_face_size=0), "min_face_size"),
])
def test_bad_configs_raise_clear_errors(cfg, message):
    with pytest.raises((ValueError, FileNotFoundError, TypeError), match=message):
        build_detector(cfg)


@pytest.mark.parametrize("image, message", [
    (np.zeros((64, 64), np.uint8), "grayscale"),
    (np.zeros((64, 64, 4), np.uint8), "RGBA"),
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    ([[0, 0, 0]], "numpy array"),
])
def test_images_that_are_not_rgb_uint8_are_refused(haar, image, message):
    with pytest.raises(ValueError, match=message):
        haar.detect([image])


def test_one_array_instead_of_a_list_is_refused_but_a_4d_batch_is_accepted(haar):
    with pytest.raises(ValueError, match="pass \\[image\\]"):
        haar.detect(np.zeros((64, 64, 3), np.uint8))
    assert haar.detect(np.zeros((2, 64, 64, 3), np.uint8)) == [[], []]


def test_face_record():
    lm = FFHQ_TEMPLATE_512 / 4
    face = Face((40, 50, 100, 120), lm, 0.9)
    assert face.box == (40.0, 50.0, 100.0, 120.0) and isinstance(face.score, float)
    assert face.eye_distance == pytest.approx(np.hypot(*(lm[1] - lm[0])), rel=1e-6)
    assert not face.landmarks.flags.writeable
    d = face.to_dict()
    assert d["box"] == [40.0, 50.0, 100.0, 120.0] and len(d["landmarks"]) == 5
    with pytest.raises(ValueError, match="5"):
        Face((0, 0, 1, 1), np.zeros((4, 2)), 1.0)

"""Whole photos through workflows/restore.py on a real local Ray: detect -> align -> restore -> paste back."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from models.noise import sample_seed
from tasks.align import crop_corners
from tasks.manifest import read_manifest
from workflows.restore import main as restore

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--allow-random-weights", "true", "--dr2.architecture", "tiny", "--image.size", "32", "--dr2.N", "2",
        "--dr2.tau", "5", "--runtime.batch-size", "4", "--runtime.device", "cpu", "--enhancer.name", "bicubic",
        "--enhancer.size", "64", "--photos.detector.device", "cpu", "--seed", "7"]


def _rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photo_run(ray_local, tmp_path_factory):
    """One photos-mode run over two faces, one face, no face, and a broken file (shared by the tests below)."""
    root = tmp_path_factory.mktemp("photos")
    src = root / "in"
    src.mkdir()
    (src / "blake.jpg").write_bytes((ROOT / "data" / "photos" / "Blake_Lively.jpg").read_bytes())
    Image.fromarray(skimage_data.astronaut()).save(src / "astronaut.png")
    Image.fromarray(skimage_data.coffee()).save(src / "coffee.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out = root / "out"
    assert restore([*FAST, "--photos.mode", "photos", "--photos.batch-size", "4", "--input", str(src),
                    "--output", str(out)]) == 0
    return src, out, read_manifest(str(out)).set_index("id"), read_manifest(str(out / "faces")).set_index("id")


def test_one_row_per_photo_and_per_face(photo_run):
    _, _, photos, faces = photo_run
    assert sorted(photos.index) == ["astronaut.png", "blake.jpg", "broken.jpg", "coffee.png"]
    assert photos.loc["broken.jpg", "status"] == "error" and photos.loc["broken.jpg", "error"]
    ok = photos[photos.status == "ok"]
    assert ok[["faces_detected", "faces_restored", "faces_skipped"]].loc[["blake.jpg", "astronaut.png",
                                                                         "coffee.png"]].values.tolist() \
        == [[2, 2, 0], [1, 1, 0], [0, 0, 0]]
    assert photos.loc["coffee.png", "note"].startswith("no faces detected")
    assert (ok["weights"] == "random-init:tiny").all() and (ok["detector"].str.startswith("mtcnn")).all()
    assert sorted(faces.index) == ["astronaut.png#f00", "blake.jpg#f00", "blake.jpg#f01"]
    for fid, row in faces.iterrows():
        assert row.status == "ok" and row.score > 0.9 and row.photo_id == fid.split("#")[0]
        assert len(row.box) == 4 and len(row.landmarks) == 10 and len(row.affine) == 6
        x0, y0, x1, y1 = row.box
        lm = np.asarray(row.landmarks).reshape(5, 2)
        assert (lm[:, 0] > x0 - 1).all() and (lm[:, 0] < x1 + 1).all() and (lm[:, 1] > y0 - 1).all()
        assert lm[0, 0] < lm[1, 0]  # image-left eye first, as the FFHQ template
        assert row.seed == sample_seed(7, fid)  # a face's noise depends only on (job seed, face id)
        assert _rgb(row.restored).shape == (64, 64, 3)


def test_paste_back_changes_each_face_and_nothing_outside_the_crops(photo_run):
    src, out, photos, faces = photo_run
    before, after = _rgb(src / "blake.jpg"), _rgb(photos.loc["blake.jpg", "restored"])
    assert before.shape == after.shape == (464, 700, 3)  # the photo keeps its size
    footprint = np.zeros(before.shape[:2], np.uint8)
    for fid in ("blake.jpg#f00", "blake.jpg#f01"):
        row = faces.loc[fid]
        M = np.asarray(row.affine).reshape(2, 3)
        corners = crop_corners(M, int(row.face_size))
        cv2.fillConvexPoly(footprint, np.round(corners).astype(np.int32), 1)
        x0, y0, x1, y1 = (int(round(v)) for v in row.box)
        inside = (slice(max(y0, 0), y1), slice(max(x0, 0), x1))
        assert np.abs(after[inside].astype(int) - before[inside].astype(int)).mean() > 10  # both faces replaced
    grown = cv2.dilate(footprint, np.ones((5, 5), np.uint8))  # interpolation reaches a pixel past the polygon
    assert grown.mean() < 0.9
    assert np.array_equal(after[grown == 0], before[grown == 0])
    # A photo without faces passes through unchanged.
    assert np.array_equal(_rgb(photos.loc["coffee.png", "restored"]), skimage_data.coffee())


def test_results_do_not_depend_on_batching_and_a_rerun_skips_committed_photos(photo_run, tmp_path):
    src, out, photos, faces = photo_run
    other = tmp_path / "one_by_one"
    assert restore([*FAST, "--photos.mode", "photos", "--photos.batch-size", "1", "--runtime.batch-size", "1",
                    "--input", str(src), "--output", str(other)]) == 0
    again = read_manifest(str(other)).set_index("id")
    for pid in ("blake.jpg", "astronaut.png", "coffee.png"):
        assert np.array_equal(_rgb(again.loc[pid, "restored"]), _rgb(photos.loc[pid, "restored"]))
    assert restore([*FAST, "--photos.mode", "photos", "--input", str(src), "--output", str(out)]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped"] == 4 and summary["ok"] == 0  # all four committed (the error row too)
    assert len(read_manifest(str(out / "faces"))) == 3


def test_auto_mode_caps_and_plugin_detector(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "aligned.png").write_bytes((ROOT / "data" / "samples" / "20595.png").read_bytes())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(src / "wide.png")
    out = tmp_path / "out"
    # The plug-in "finds" a weak small face in the corner and a strong one in the centre of every photo.
    assert restore([*FAST, "--photos.mode", "auto", "--photos.detector.name", "tests.plugins:CentreFaceDetector",
                    "--photos.align.max-faces", "1", "--photos.align.min-eye-distance", "5", "--input", str(src),
                    "--output", str(out)]) == 0
    photos = read_manifest(str(out)).set_index("id")
    faces = read_manifest(str(out / "faces")).set_index("id")
    assert photos.loc["aligned.png", "kind"] == "aligned" and photos.loc["wide.png", "kind"] == "photo"
    assert "photos.mode auto takes every square input as an aligned face crop" in photos.loc["aligned.png", "note"]
    assert _rgb(photos.loc["aligned.png", "restored"]).shape == (64, 64, 3)  # an aligned crop stays a crop
    assert _rgb(photos.loc["wide.png", "restored"]).shape == (300, 400, 3)
    # Detectors return faces by score: f00 is the strong one and wins the single slot.
    assert faces.loc["wide.png#f00", "status"] == "ok" and faces.loc["wide.png#f00", "score"] == 0.8
    assert faces.loc["wide.png#f01", "status"] == "over_cap" and "max_faces=1" in faces.loc["wide.png#f01", "error"]
    assert faces.loc["aligned.png#f00", "status"] == "ok"
    assert photos.loc["wide.png", ["faces_detected", "faces_restored", "faces_skipped"]].tolist() == [2, 1, 1]

    # Faces too small for the configured eye distance are recorded and the photo passes through unchanged.
    out2 = tmp_path / "out2"
    assert restore([*FAST, "--photos.mode", "photos", "--photos.detector.name", "tests.plugins:CentreFaceDetector",
                    "--photos.align.min-eye-distance", "500", "--input", str(src / "wide.png"),
                    "--output", str(out2)]) == 0
    faces2 = read_manifest(str(out2 / "faces"))
    assert (faces2["status"] == "too_small").all() and faces2["error"].str.contains("eye distance").all()
    photo = read_manifest(str(out2)).iloc[0]
    assert photo["faces_restored"] == 0 and "passed through unchanged" in photo["note"]
    assert np.array_equal(_rgb(photo["restored"]), _rgb(src / "wide.png"))


def test_s3_photos_and_a_crash_before_the_commit(ray_local, s3_server, tmp_path):
    fs = s3_server.fs()
    bucket = s3_server.new_bucket("photos")
    fs.pipe(f"{bucket}/in/party/blake.jpg", (ROOT / "data" / "photos" / "Blake_Lively.jpg").read_bytes())
    out, so = f"s3://{bucket}/out", {"endpoint_url": s3_server.endpoint_url}
    args = [*FAST, "--photos.mode", "photos", "--input", f"s3://{bucket}/in/", "--output", out,
            "--storage-options", json.dumps(so)]
    assert restore(args) == 0
    photo = read_manifest(out, so).set_index("id").loc["party/blake.jpg"]
    faces = read_manifest(f"{out}/faces", so).set_index("id")
    assert photo["faces_restored"] == 2 and photo["restored"] == f"s3://{bucket}/out/restored/party/blake.png"
    assert sorted(faces.index) == ["party/blake.jpg#f00", "party/blake.jpg#f01"]
    assert faces["restored"].str.startswith(f"s3://{bucket}/out/faces/restored/party/blake_f0").all()
    assert all(k.startswith(f"{bucket}/out/") for k in fs.find(f"{bucket}/out"))
    first = fs.cat(f"{bucket}/out/restored/party/blake.png")

    # A crash after the images and face rows were written but before the photo's row: the photo is not
    # committed, so the rerun redoes it, with the same bytes and without duplicating its face rows.
    for shard in fs.find(f"{bucket}/out/manifest"):
        fs.rm(shard)
    assert restore(args) == 0
    assert json.loads(fs.cat(f"{bucket}/out/_summary.json"))["ok"] == 1
    assert fs.cat(f"{bucket}/out/restored/party/blake.png") == first
    again = read_manifest(f"{out}/faces", so)
    assert sorted(again["id"]) == sorted(faces.index) and (again["status"] == "ok").all()


def test_dynamic_method_on_whole_photos(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(src / "astronaut.png")
    out = tmp_path / "out"
    assert restore(["--method", "dynamic", "--dynamic.prior", "tiny", "--dynamic.allow-random-weights", "true",
                    "--dynamic.max-start", "6", "--image.size", "32", "--enhancer.name", "bicubic",
                    "--enhancer.size", "64", "--runtime.device", "cpu", "--photos.mode", "photos",
                    "--photos.detector.device", "cpu", "--input", str(src), "--output", str(out)]) == 0
    photo = read_manifest(str(out)).iloc[0]
    face = read_manifest(str(out / "faces")).iloc[0]
    assert photo["faces_restored"] == 1 and photo["weights"] == "random-init:tiny"
    # the dynamic method's per-face parameters reach the face rows
    assert face["restore_method"] == "dynamic" and 0 <= face["start_t"] <= 24
    assert len(face["guide_sigmas"].split(",")) == 3 and face["eta"] >= 0
    after = _rgb(photo["restored"])
    x0, y0, x1, y1 = (int(round(v)) for v in face["box"])
    assert np.abs(after[y0:y1, x0:x1].astype(int) - skimage_data.astronaut()[y0:y1, x0:x1].astype(int)).mean() > 10


def test_upscaled_photo_background_from_the_upsampler(ray_local, tmp_path):
    """--photos.upscale 2 with a (tiny, random) RRDBNet: 2x photo, faces at 2x geometry, the rest upsampled;
    faces blended through a (plug-in) parser's mask."""
    import torch

    from tasks.upsample import TiledUpsampler, UpsamplerConfig

    src = tmp_path / "in"
    src.mkdir()
    (src / "blake.jpg").write_bytes((ROOT / "data" / "photos" / "Blake_Lively.jpg").read_bytes())
    out = tmp_path / "out"
    tiny = {"num_feat": 4, "num_block": 1, "num_grow_ch": 4}
    assert restore([*FAST, "--photos.mode", "photos", "--photos.upscale", "2", "--photos.upsampler.scale", "2",
                    "--photos.upsampler.kwargs", json.dumps(tiny), "--photos.upsampler.allow-random-weights", "true",
                    "--photos.upsampler.tile", "200", "--photos.upsampler.pixel-budget", "100000",
                    "--photos.parser.name", "tests.plugins:DiscParser", "--input", str(src), "--output", str(out)]) == 0
    photo = read_manifest(str(out)).iloc[0]
    faces = read_manifest(str(out / "faces"))
    assert photo["upscale"] == 2 and photo["upsampler"] == "realesrgan-x2"
    assert photo["upsampler_weights"] == "random-init:realesrgan" and photo["faces_restored"] == 2, photo.to_dict()
    assert photo["parser"] == "tests.plugins:DiscParser"
    after = _rgb(photo["restored"])
    assert after.shape == (928, 1400, 3)
    cfg = UpsamplerConfig(scale=2, kwargs=tiny, allow_random_weights=True, tile=200, pixel_budget=100_000)
    expected = TiledUpsampler(cfg, 2, torch.device("cpu"))([_rgb(src / "blake.jpg")])[0]
    foot = np.zeros(after.shape[:2], np.uint8)
    for _, row in faces.iterrows():
        corners = (crop_corners(np.asarray(row.affine).reshape(2, 3), int(row.face_size)) + 0.5) * 2 - 0.5
        cv2.fillConvexPoly(foot, np.round(corners).astype(np.int32), 1)
        lm = (np.asarray(row.landmarks).reshape(5, 2) + 0.5) * 2 - 0.5  # the face sits at the 2x landmarks
        x, y = np.round(lm.mean(0)).astype(int)
        near = (slice(y - 5, y + 5), slice(x - 5, x + 5))
        assert np.abs(after[near].astype(int) - expected[near].astype(int)).mean() > 5
    foot = cv2.dilate(foot, np.ones((5, 5), np.uint8)) > 0
    diff = np.abs(after[~foot].astype(int) - expected[~foot].astype(int))  # another process: float order only
    assert foot.mean() < 0.9 and diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_faces_travel_as_typed_records_matched_by_face_index(tmp_path):
    """Plans and restored-face annotations are read by name: a stage that lists its restored faces in another
    order pastes and reports exactly the same photo; an unknown field is refused, not dropped."""
    import pandas as pd

    from tasks.align import AlignConfig, similarity_to_template, warp_face
    from tasks.photo_stage import PasteAndWrite, PlannedFace, RestoredFace, _objects, decode_faces, encode_faces
    from tests.test_align import blob_photo, face_at, landmarks_for

    lms = [landmarks_for(face_at(0, 0.3, x, 90, 64), 64) for x in (60, 150)]
    photo = blob_photo(180, 220, np.concatenate(lms), sigma=3)
    Ms = [similarity_to_template(lm, 64) for lm in lms]
    plans = [PlannedFace(face_index=0, status="ok", affine=Ms[0].reshape(-1).tolist(), face_size=64),
             PlannedFace(face_index=1, status="too_small", reason="eye distance"),
             PlannedFace(face_index=2, status="ok", affine=Ms[1].reshape(-1).tolist(), face_size=64)]
    assert decode_faces(PlannedFace, encode_faces(plans)) == plans
    faces = [255 - warp_face(photo, M, 64) for M in Ms]  # inverted: a wrong match pastes visibly wrong pixels
    infos = [RestoredFace(0, seed=10, weights="w", omega=3), RestoredFace(2, seed=12, weights="w", omega=5)]

    def run(order: list[int], out: str):
        batch = {"id": np.array(["p.png"], dtype=object), "source": np.array(["p"], dtype=object),
                 "stem": np.array(["p"], dtype=object), "status": np.array(["ok"], dtype=object),
                 "error": np.array([""], dtype=object), "kind": np.array(["photo"], dtype=object),
                 "photo": _objects([photo]), "plans": np.array([encode_faces(plans)], dtype=object),
                 "restored_faces": _objects([np.stack([faces[j] for j in order])]),
                 "faces_info": np.array([encode_faces([infos[j] for j in order])], dtype=object),
                 "detector": np.array(["d"], dtype=object)}
        writer = PasteAndWrite(str(tmp_path / out), AlignConfig(face_size=64), write_faces=True, png_compression=1,
                               constants={})
        result = writer(batch)
        assert result["status"].tolist() == ["ok"], result["error"]
        assert (result["faces_restored"][0], result["faces_skipped"][0]) == (2, 1)
        return _rgb(result["restored"][0]), read_manifest(str(tmp_path / out / "faces")).set_index("id")

    in_order, rows = run([0, 1], "a")
    reversed_, rows_reversed = run([1, 0], "b")
    assert np.array_equal(in_order, reversed_) and not np.array_equal(in_order, photo)
    assert rows.loc["p.png#f02", "seed"] == 12 and rows.loc["p.png#f02", "omega"] == 5
    assert rows.loc["p.png#f01", "error"] == "eye distance" and pd.isna(rows.loc["p.png#f01", "omega"])
    for face in ("p.png#f00", "p.png#f02"):
        assert rows.loc[face, "seed"] == rows_reversed.loc[face, "seed"]
        assert np.array_equal(_rgb(rows.loc[face, "restored"]), _rgb(rows_reversed.loc[face, "restored"]))
    with pytest.raises(TypeError, match="unexpected keyword argument 'scores'"):
        decode_faces(PlannedFace, json.dumps([{"face_index": 0, "status": "ok", "scores": 1.0}]))

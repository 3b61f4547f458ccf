"""The augmentation workflow end to end on a real local Ray, local files and a real S3 server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tasks.manifest import read_manifest
from tests.test_images import _png_with_header as png_with_header
from workflows.augment import main as augment

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
FAST = ["--allow-random-weights", "true", "--dr2.architecture", "tiny", "--image.size", "32",
        "--dr2.N", "2", "--dr2.tau", "5", "--blur.sigma", "0.5:1.5", "--runtime.batch-size", "4",
        "--cluster.block-rows", "4", "--cluster.manifest-rows", "4", "--runtime.device", "cpu"]


def _png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def make_corpus(root: Path) -> dict[str, str | None]:
    """Good and bad inputs; value = expected error fragment (None for inputs that must succeed)."""
    rng = np.random.default_rng(0)
    face = cv2.resize(cv2.imread(str(SAMPLES / "256.png")), (64, 64), interpolation=cv2.INTER_AREA)
    expect: dict[str, str | None] = {}
    _png(root / "good/a.png", face)
    _png(root / "good/b.png", face[::-1].copy())
    cv2.imwrite(str(root / "good/c.jpg"), face)
    expect.update({"good/a.png": None, "good/b.png": None, "good/c.jpg": None})
    _png(root / "conv/gray.png", cv2.cvtColor(face, cv2.COLOR_BGR2GRAY))
    _png(root / "conv/rgba.png", cv2.cvtColor(face, cv2.COLOR_BGR2BGRA))
    _png(root / "conv/16bit.png", face.astype(np.uint16) * 257)
    expect.update({"conv/gray.png": None, "conv/rgba.png": None, "conv/16bit.png": None})
    (root / "bad").mkdir()
    (root / "bad/empty.png").write_bytes(b"")
    good_png = (root / "good/a.png").read_bytes()
    (root / "bad/truncated.png").write_bytes(good_png[: len(good_png) // 2])
    good_jpg = (root / "good/c.jpg").read_bytes()
    (root / "bad/truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    (root / "bad/text.png").write_text("this is not an image\n")
    (root / "bad/huge.png").write_bytes(png_with_header(100_000, 100_000))
    _png(root / "bad/wide.png", rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    expect.update({"bad/empty.png": "empty", "bad/truncated.png": "trunc", "bad/truncated.jpg": "trunc",
                   "bad/text.png": "not recognised", "bad/huge.png": "too large", "bad/wide.png": "square"})
    (root / "notes.txt").write_text("not an image extension: ignored and counted\n")
    return expect


ERROR_KINDS_EXPECTED = {"bad/empty.png": "decode", "bad/truncated.png": "decode", "bad/truncated.jpg": "decode",
                        "bad/text.png": "decode", "bad/huge.png": "too_large", "bad/wide.png": "not_square"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def test_every_input_accounted_for_and_outputs_stay_under_prefix(ray_local, corpus, tmp_path):
    root, expect = corpus
    out = tmp_path / "out"
    assert augment(["--input", str(root), "--output", str(out), *FAST]) == 0
    df = read_manifest(str(out)).set_index("id")
    assert sorted(df.index) == sorted(expect)
    for sid, fragment in expect.items():
        row = df.loc[sid]
        if fragment is None:
            assert row.status == "ok", (sid, row.error)
            lq = cv2.imread(row.lq, cv2.IMREAD_UNCHANGED)
            assert lq.shape == (32, 32, 3) and lq.dtype == np.uint8
            assert cv2.imread(row.hq).shape == (32, 32, 3)
            assert row.N == 2 and row.tau == 5 and row.omega == 15 and 0.5 <= row.sigma <= 1.5
            assert pd.isna(row.error_kind)
        else:
            assert row.status == "error" and fragment in row.error.lower(), (sid, row.error)
            assert row.error_kind == ERROR_KINDS_EXPECTED[sid], (sid, row.error_kind)
            assert pd.isna(row.lq) or row.lq == ""
    assert df.loc["conv/16bit.png", "src_converted"] and df.loc["conv/rgba.png", "src_converted"]
    assert (df["weights"] == "random-init:tiny").all() and df["random_weights"].all()
    assert df["code_version"].nunique() == 1 and df["seed"].nunique() == len(df)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert all(str(p.resolve()).startswith(str(out.resolve()) + os.sep) for p in written)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["ok"] == 6 and summary["error"] == 6 and summary["ignored"] == 1 and summary["total"] == 12
    assert summary["error_kinds"] == {"decode": 4, "too_large": 1, "not_square": 1} and summary["transient"] == 0


def test_rerun_finishes_exactly_the_missing_samples(ray_local, corpus, tmp_path):
    root, expect = corpus
    out = tmp_path / "out"
    assert augment(["--input", str(root), "--output", str(out), *FAST]) == 0
    first = read_manifest(str(out)).set_index("id")
    lq_before = {i: Path(first.loc[i, "lq"]).read_bytes() for i in first.index if first.loc[i, "status"] == "ok"}
    # a second run has nothing to do
    assert augment(["--input", str(root), "--output", str(out), *FAST]) == 0
    s = json.loads((out / "_summary.json").read_text())
    assert (s["ok"], s["error"], s["skipped"]) == (0, 0, 12)
    # lose one shard (as if the job died before committing it): only its samples are redone
    shards = sorted((out / "manifest").glob("part-*.parquet"))
    lost = pd.read_parquet(shards[0])["id"].tolist()
    shards[0].unlink()
    assert augment(["--input", str(root), "--output", str(out), *FAST]) == 0
    s = json.loads((out / "_summary.json").read_text())
    assert s["ok"] + s["error"] == len(lost) and s["skipped"] == 12 - len(lost)
    raw = pd.concat([pd.read_parquet(p) for p in (out / "manifest").glob("part-*.parquet")])
    assert sorted(raw["id"]) == sorted(expect)  # exactly once, without relying on de-duplication
    again = read_manifest(str(out)).set_index("id")
    for i, data in lq_before.items():  # a sample's result depends on (seed, id) only
        assert Path(again.loc[i, "lq"]).read_bytes() == data


def test_unsafe_ids_from_a_list_never_escape_the_prefix(ray_local, corpus, tmp_path):
    root, _ = corpus
    good = str(root / "good/a.png")
    listing = tmp_path / "list.csv"
    pd.DataFrame({"uri": [good, good, good], "id": ["ok/x.png", "../../escape.png", "/abs/y.png"]}).to_csv(
        listing, index=False)
    out = tmp_path / "out"
    assert augment(["--input", str(listing), "--output", str(out), *FAST]) == 0
    df = read_manifest(str(out)).set_index("id")
    assert df.loc["ok/x.png", "status"] == "ok"
    for bad in ("../../escape.png", "/abs/y.png"):
        assert df.loc[bad, "status"] == "error" and "unsafe output key" in df.loc[bad, "error"]
    assert not (tmp_path / "escape.png").exists() and not list(tmp_path.glob("*.png"))


def test_s3_input_and_output(ray_local, s3_server, corpus):
    root, expect = corpus
    fs = s3_server.fs()
    bucket = s3_server.new_bucket("aug")
    for sid in ("good/a.png", "good/c.jpg", "bad/text.png", "conv/gray.png"):
        fs.pipe(f"{bucket}/in/{sid}", (root / sid).read_bytes())
    out = f"s3://{bucket}/out"
    so = json.dumps({"endpoint_url": s3_server.endpoint_url})
    assert augment(["--input", f"s3://{bucket}/in/", "--output", out, "--storage-options", so, *FAST]) == 0
    df = read_manifest(out, {"endpoint_url": s3_server.endpoint_url}).set_index("id")
    assert sorted(df.index) == ["bad/text.png", "conv/gray.png", "good/a.png", "good/c.jpg"]
    assert (df["status"] == "ok").sum() == 3 and df.loc["bad/text.png", "status"] == "error"
    assert df.loc["good/a.png", "lq"] == f"s3://{bucket}/out/lq/good/a.png"
    keys = fs.find(f"{bucket}/out")
    assert all(k.startswith(f"{bucket}/out/") for k in keys)
    img = cv2.imdecode(np.frombuffer(fs.cat(f"{bucket}/out/lq/good/c.png"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (32, 32, 3)
    assert fs.exists(f"{bucket}/out/_summary.json")


def test_actor_killed_mid_run_is_restarted_and_nothing_is_lost(ray_local, corpus, tmp_path, monkeypatch):
    import workflows.augment as workflow
    from tasks.dr2_stage import DR2Stage

    root, expect = corpus
    marker = tmp_path / "died"
    out = tmp_path / "out"

    class DiesOnce(DR2Stage):  # travels to the actor by value: the first call there kills its process
        def __call__(self, batch):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # a crash mid-batch: Ray must restart the actor and retry the batch
            return super().__call__(batch)

    monkeypatch.setattr(workflow, "DR2Stage", DiesOnce)
    assert augment(["--input", str(root / "good"), "--output", str(out), *FAST, "--runtime.batch-size", "1"]) == 0
    monkeypatch.undo()
    assert marker.exists()  # an actor really died
    df = read_manifest(str(out))
    assert sorted(df["id"]) == ["a.png", "b.png", "c.jpg"] and (df["status"] == "ok").all()
    ref = tmp_path / "ref"
    assert augment(["--input", str(root / "good"), "--output", str(ref), *FAST, "--runtime.batch-size", "1"]) == 0
    for name in ("a.png", "b.png", "c.png"):  # the retried batch gives the same bytes
        assert (out / "lq" / name).read_bytes() == (ref / "lq" / name).read_bytes()
    shutil.rmtree(ref)


def test_missing_weights_fail_fast_with_the_file_name(tmp_path, capsys):
    assert augment(["--input", str(SAMPLES), "--output", str(tmp_path / "o"),
                    "--dr2.weights", str(tmp_path / "DR2_FFHQ.pkl")]) == 2
    err = capsys.readouterr().err
    assert "DR2_FFHQ.pkl" in err and "Traceback" not in err
    assert augment(["--input", str(SAMPLES), "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()

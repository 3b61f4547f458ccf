"""Shard formats and shards as the unit of work: readers checked against the `webdataset` and `datasets`
libraries, outputs read back as a training loader would, per-shard commit and resume, a killed actor on S3."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.manifest import read_manifest
from tasks.shards import iter_parquet, iter_tar, parquet_bytes, tar_bytes
from tasks.units import committed_chunks, expand_braces, is_complete, plan_units, read_output_image
from workflows.augment import main as augment

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
FAST = ["--allow-random-weights", "true", "--dr2.architecture", "tiny", "--image.size", "32",
        "--dr2.N", "2", "--dr2.tau", "5", "--blur.sigma", "0.5:1.5", "--runtime.batch-size", "2",
        "--runtime.device", "cpu"]


def _face_png(k: int, size: int = 48) -> bytes:
    face = cv2.resize(cv2.imread(str(SAMPLES / "256.png")), (size, size), interpolation=cv2.INTER_AREA)
    face = np.roll(face, k * 3, axis=1)  # distinct pixels per sample
    return cv2.imencode(".png", face)[1].tobytes()


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(samples))
    return path


# --- readers -----------------------------------------------------------------------------------------------


def test_tar_samples_are_grouped_by_key_as_webdataset_groups_them(tmp_path):
    import webdataset as wds

    samples = [(f"dir/{k:04d}", {"png": _face_png(k), "json": json.dumps({"k": k}).encode(), "cls": b"3"})
               for k in range(5)]
    path = _tar(tmp_path / "s.tar", samples)
    ours = list(iter_tar(io.BytesIO(path.read_bytes())))
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s.key for s in ours] == [t["__key__"] for t in theirs] == [k for k, _ in samples]
    for s, t in zip(ours, theirs):
        assert s.data == t["png"] and not s.error
        assert s.meta == {"json": t["json"].decode(), "cls": "3"}


def test_bad_members_are_one_sample_s_error_and_the_shard_goes_on(tmp_path):
    good = _face_png(0)
    samples = [("a", {"png": good}), ("b", {"json": b"{}"}), ("c", {"png": good, "jpg": good}),
               ("d", {"hq.png": good, "png": good}), ("e", {"png": good})]
    data = tar_bytes(samples)
    got = {s.key: s for s in iter_tar(io.BytesIO(data))}
    assert [k for k, s in got.items() if not s.error] == ["a", "d", "e"]  # "png" beats "hq.png"
    assert got["b"].kind == got["c"].kind == "no_image"
    assert "no image" in got["b"].error and "--image.member" in got["c"].error
    assert {s.key: s.error for s in iter_tar(io.BytesIO(data), image_member="jpg")}["c"] == ""
    # cut inside sample "c": a and b come out, c is the error, nothing raises
    cut = data[: data.index(b"c.jpg") + 700]
    tail = list(iter_tar(io.BytesIO(cut)))
    assert [s.key for s in tail] == ["a", "b", "c"] and tail[-1].kind == "decode" and "truncated" in tail[-1].error


def test_parquet_images_in_the_datasets_layout_or_a_binary_column(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((20, 20, 3), k * 40, np.uint8)) for k in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [7, 8, 9]}).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    got = list(iter_parquet(open(tmp_path / "hf.parquet", "rb")))
    assert [s.key for s in got] == ["00000000", "00000001", "00000002"] and [s.meta for s in got][1] == {"label": "8"}
    assert [np.asarray(Image.open(io.BytesIO(s.data)))[0, 0, 0] for s in got] == [0, 40, 80]

    pq.write_table(pa.table({"jpg": pa.array([b"x", None], pa.binary())}), tmp_path / "bin.parquet")
    plain = list(iter_parquet(open(tmp_path / "bin.parquet", "rb")))
    assert plain[0].data == b"x" and plain[1].kind == "no_image"
    pq.write_table(pa.table({"a": [b"1"], "b": [b"2"]}), tmp_path / "two.parquet")
    with pytest.raises(ValueError, match="--image.column"):
        list(iter_parquet(open(tmp_path / "two.parquet", "rb")))
    assert list(iter_parquet(open(tmp_path / "two.parquet", "rb"), column="b"))[0].data == b"2"


def test_parquet_output_decodes_as_images_with_datasets(tmp_path):
    import datasets

    rows = pa.table({"id": ["x/0", "x/1"], "status": ["ok", "ok"]})
    png = [_face_png(0, 24), _face_png(1, 24)]
    (tmp_path / "o.parquet").write_bytes(parquet_bytes(rows, {"lq": png}, {"lq": ["0.lq.png", "1.lq.png"]}))
    ds = datasets.Dataset.from_parquet(str(tmp_path / "o.parquet"))
    assert ds.features["lq"] == datasets.Image() and ds[1]["id"] == "x/1"
    assert ds[1]["lq"].size == (24, 24) and pq.read_table(tmp_path / "o.parquet").num_rows == 2


def test_brace_patterns_and_marker_names():
    assert expand_braces("s3://b/f-{000..002}.tar") == [f"s3://b/f-{k:03d}.tar" for k in range(3)]
    assert expand_braces("a{x,y}-{1..2}") == ["ax-1", "ax-2", "ay-1", "ay-2"]
    assert is_complete({0, 1, 2}, 2) and not is_complete({0, 2}, 2) and not is_complete({0, 1}, None)


# --- planning and resume from marker names ------------------------------------------------------------------


def test_plan_lists_shards_not_samples_and_resume_reads_marker_names_only(tmp_path):
    for s in range(3):
        _tar(tmp_path / "in" / "sub" / f"f-{s:03d}.tar", [(f"{k}", {"png": b"not opened by the plan"})
                                                          for k in range(4)])
    (tmp_path / "out" / "manifest" / "sub").mkdir(parents=True)
    for name in ("part-f-000-00000", "part-f-000-00001-last", "part-f-001-00001-last"):
        (tmp_path / "out" / "manifest" / "sub" / f"{name}.parquet").write_bytes(b"")  # names alone decide
    plan = plan_units(str(tmp_path / "in"), str(tmp_path / "out"), None, ["png"], shard_size=2, resume=True)
    assert committed_chunks(str(tmp_path / "out"), None)["sub/f-000"] == ({0, 1}, 1)
    assert (plan.shards, plan.skipped) == (3, 1)
    assert [(u.name, u.done) for u in plan.units] == [("sub/f-001", (1,)), ("sub/f-002", ())]
    assert plan.units[0].source.endswith("in/sub/f-001.tar") and plan.units[0].rel == "sub/f-001.tar"


# --- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_corpus(tmp_path_factory):
    """Two input tars: 5 good samples; 3 good, one that is not an image and one without an image member."""
    root = tmp_path_factory.mktemp("shards")
    _tar(root / "in" / "faces-00000.tar", [(f"{k:03d}", {"png": _face_png(k), "txt": f"caption {k}".encode()})
                                           for k in range(5)])
    _tar(root / "in" / "faces-00001.tar", [("100", {"jpg": _face_png(10)}), ("101", {"png": b"not an image"}),
                                           ("102", {"json": b"{}"}), ("103", {"png": _face_png(13)}),
                                           ("104", {"png": _face_png(14)})])
    return root


def test_webdataset_in_and_out_one_row_per_sample_and_a_rerun_redoes_exactly_the_lost_shard(ray_local, shard_corpus,
                                                                                           tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    args = ["--input", str(shard_corpus / "in"), "--output", str(out), "--write.format", "webdataset",
            "--write.shard-size", "3", *FAST]
    assert augment(args) == 0
    df = read_manifest(str(out)).set_index("id")
    assert sorted(df.index) == [f"faces-00000.tar/{k:03d}" for k in range(5)] + [
        f"faces-00001.tar/{k}" for k in range(100, 105)]
    assert df.loc["faces-00001.tar/101", "error_kind"] == "decode"
    assert df.loc["faces-00001.tar/102", "error_kind"] == "no_image"
    assert json.loads(df.loc["faces-00000.tar/002", "meta"]) == {"txt": "caption 2"}
    tars = sorted((out / "shards").glob("*.tar"))
    assert [t.name for t in tars] == ["faces-00000-00000.tar", "faces-00000-00001.tar", "faces-00001-00000.tar",
                                      "faces-00001-00001.tar"]
    loaded = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("rgb8"))
    ok = df[df["status"] == "ok"]
    assert sorted(s["json"]["id"] for s in loaded) == sorted(df.index)  # error rows travel too
    with_images = {s["json"]["id"]: s for s in loaded if "lq.png" in s}
    assert sorted(with_images) == sorted(ok.index)
    assert all(s["lq.png"].shape == s["hq.png"].shape == (32, 32, 3) for s in with_images.values())
    lq_uri = ok.loc["faces-00000.tar/004", "lq"]
    assert lq_uri.endswith("faces-00000-00001.tar#004.lq.png")
    first = read_output_image(lq_uri)
    assert cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).shape == (32, 32, 3)

    # a job killed before the last chunk of a shard committed: the rerun redoes exactly that chunk
    (out / "manifest" / "part-faces-00000-00001-last.parquet").unlink()
    (out / "shards" / "faces-00000-00001.tar").unlink()
    assert augment(args) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["ok"], summary["input_shards"], summary["skipped_shards"]) == (2, 2, 1)
    assert read_output_image(lq_uri) == first  # same id, same seed: the same bytes
    assert len(read_manifest(str(out))) == 10
    assert augment(args) == 0 and json.loads((out / "_summary.json").read_text())["skipped_shards"] == 2


def test_parquet_output_matches_files_output_pixel_for_pixel(ray_local, tmp_path):
    import datasets

    (tmp_path / "in").mkdir()
    for k in range(5):
        (tmp_path / "in" / f"{k}.png").write_bytes(_face_png(k))
    assert augment(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "files"), *FAST]) == 0
    assert augment(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "pq"), *FAST,
                    "--write.format", "parquet", "--write.shard-size", "2"]) == 0
    shards = sorted((tmp_path / "pq" / "shards").glob("*.parquet"))
    assert len(shards) == 3 and len(list((tmp_path / "pq" / "manifest").glob("part-*.parquet"))) == 3
    ds = datasets.concatenate_datasets([datasets.Dataset.from_parquet(str(p)) for p in shards])
    assert sorted(ds["id"]) == [f"{k}.png" for k in range(5)] and set(ds["status"]) == {"ok"}
    for row in ds:
        files_lq = cv2.cvtColor(cv2.imread(str(tmp_path / "files" / "lq" / row["id"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(np.asarray(row["lq"]), files_lq)  # reproducible whatever the format
    assert pq.read_table(shards[0], columns=["id", "weights"]).column("weights")[0].as_py().startswith("random-init")


@pytest.mark.slow
def test_webdataset_output_on_s3_with_a_killed_actor_commits_every_sample_once(ray_local, s3_server, tmp_path,
                                                                              monkeypatch):
    import workflows.augment as workflow
    from tasks.dr2_stage import DR2Stage

    bucket = s3_server.new_bucket("shards")
    fs = s3_server.fs()
    for s in range(2):
        fs.pipe(f"{bucket}/in/f-{s}.tar", tar_bytes([(f"{k}", {"png": _face_png(k + 5 * s)}) for k in range(4)]))
    marker = tmp_path / "died"

    class DiesOnce(DR2Stage):  # the first call on an actor kills its process mid-unit
        def __call__(self, batch):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    monkeypatch.setattr(workflow, "DR2Stage", DiesOnce)
    so = json.dumps(s3_server.storage_options)
    assert augment(["--input", f"s3://{bucket}/in/f-{{0..1}}.tar", "--output", f"s3://{bucket}/out/",
                    "--storage-options", so, "--write.format", "webdataset", *FAST]) == 0
    assert marker.exists()
    keys = fs.find(f"{bucket}/out/")
    assert all(k.startswith(f"{bucket}/out/") for k in keys)
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if "/shards/" in k) == ["f-0-00000.tar", "f-1-00000.tar"]
    ids = []
    for k in sorted(k for k in keys if k.endswith(".tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat(k))) as tar:
            ids += [json.loads(tar.extractfile(m).read())["id"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(ids) == sorted(f"f-{s}.tar/{k}" for s in range(2) for k in range(4))
    df = read_manifest(f"s3://{bucket}/out/", s3_server.storage_options)
    assert len(df) == 8 and (df["status"] == "ok").all()


def test_loose_folders_are_listed_by_workers_and_a_rerun_skips_every_committed_chunk(ray_local, tmp_path):
    for rel in ("top.png", "a/0.png", "a/1.png", "a/2.png", "b/deep/3.png"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_bytes(_face_png(len(rel)))
    plan = plan_units(str(tmp_path / "in"), str(tmp_path / "out"), None, ["png"], shard_size=2, resume=True)
    assert sorted((u.kind, u.name) for u in plan.units if u.kind == "prefix") == [("prefix", "a"), ("prefix", "b")]
    assert [u.rows for u in plan.units if u.kind == "files"] == [(("top.png", str(tmp_path / "in" / "top.png")),)]
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--write.format", "webdataset",
            "--write.shard-size", "2", *FAST]
    assert augment(args) == 0
    df = read_manifest(str(tmp_path / "out"))
    assert sorted(df["id"]) == ["a/0.png", "a/1.png", "a/2.png", "b/deep/3.png", "top.png"]
    assert len(list((tmp_path / "out" / "shards").glob("*.tar"))) == 4  # a: 2 chunks, b: 1, the top level: 1
    assert augment(args) == 0
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["ok"] == 0  # every chunk found committed
    assert len(read_manifest(str(tmp_path / "out"))) == 5


def test_a_chunk_with_a_transient_row_is_not_committed_at_all(tmp_path):
    from tasks.manifest import ManifestWriter
    from tasks.units import CommitUnit, pack
    from tasks.write_stage import WriteImages

    n = 3
    samples = {"id": np.array(["s/0", "s/1", "s/2"], dtype=object), "source": np.array(["x"] * n, dtype=object),
               "stem": np.array(["0", "1", "2"], dtype=object), "key": np.array(["0", "1", "2"], dtype=object),
               "status": np.array(["ok", "transient", "error"], dtype=object),
               "error_kind": np.array(["", "read_transient", "decode"], dtype=object),
               "error": np.array(["", "gave up", "bad"], dtype=object), "dr2": np.zeros((n, 8, 8, 3), np.uint8)}
    commit = CommitUnit((WriteImages, {"output": str(tmp_path), "images": {"lq": "dr2"}, "format": "webdataset"}),
                        (ManifestWriter, {"output": str(tmp_path), "columns": [], "constants": {}}),
                        str(tmp_path), "webdataset")
    stats = commit({"unit": np.array(["s-00000"], dtype=object), "last": np.array([True]),
                    "samples": np.array([pack(samples)], dtype=object)})
    assert (stats["transient"][0], stats["ok"][0], stats["rows"][0]) == (3, 0, 0)
    assert json.loads(stats["kinds"][0]) == {"read_transient": 3}  # under the cause's kind, for the summary
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("*.parquet"))
    samples["status"][1], samples["error_kind"][1] = "ok", ""
    stats = commit({"unit": np.array(["s-00000"], dtype=object), "last": np.array([True]),
                    "samples": np.array([pack(samples)], dtype=object)})
    assert (stats["ok"][0], stats["error"][0]) == (2, 1)
    assert [p.name for p in tmp_path.rglob("*.tar")] == ["s-00000.tar"]
    assert [p.name for p in tmp_path.rglob("part-*.parquet")] == ["part-s-00000-last.parquet"]

"""bench/make_dataset.py: the synthetic datasets read back with the libraries their users read them with."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.make_dataset import face_pixels, main, make_dataset, tar_bytes

COUNT, PER_SHARD, SIZE = 23, 10, 32  # 3 shards, the last one partial


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for fmt in ("files", "webdataset", "parquet"):
        assert main(["--out", str(root / fmt), "--count", str(COUNT), "--format", fmt,
                     "--per-shard", str(PER_SHARD), "--size", str(SIZE), "--seed", "7"]) == 0
    return root


def test_pixels_depend_on_seed_and_index_only():
    a = face_pixels(5, SIZE, seed=7)
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, face_pixels(5, SIZE, seed=7))
    assert not np.array_equal(a, face_pixels(6, SIZE, seed=7))
    assert not np.array_equal(a, face_pixels(5, SIZE, seed=8))
    assert a.std() > 5  # an image, not a flat fill


def test_files_are_decodable_pngs_in_bounded_folders(datasets_dir):
    root = datasets_dir / "files"
    folders = sorted(p.name for p in root.iterdir())
    assert folders == ["000000", "000001", "000002"]
    pngs = sorted(root.rglob("*.png"))
    assert [p.name for p in pngs] == [f"{i:09d}.png" for i in range(COUNT)]
    assert max(len(list((root / f).iterdir())) for f in folders) == PER_SHARD
    for p in pngs[:3] + pngs[-2:]:
        bgr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        i = int(p.stem)
        assert np.array_equal(bgr[..., ::-1], face_pixels(i, SIZE, seed=7)), p


def test_webdataset_tars_read_by_webdataset(datasets_dir):
    import webdataset as wds

    shards = sorted((datasets_dir / "webdataset").glob("faces-*.tar"))
    assert [s.name for s in shards] == ["faces-00000.tar", "faces-00001.tar", "faces-00002.tar"]
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(COUNT)]
    for s in samples:
        i = int(s["__key__"])
        assert json.loads(s["json"]) == {"index": i}
        rgb = cv2.imdecode(np.frombuffer(s["png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert np.array_equal(rgb, face_pixels(i, SIZE, seed=7))


def test_tar_writer_matches_tarfile():
    """The hand-written headers are byte-for-byte what tarfile writes (so any tar reader takes them)."""
    members = [("000000001.png", b"\x89PNG" * 200), ("000000001.json", b'{"index": 1}'), ("a" * 100, b"")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    assert tar_bytes(members) == buf.getvalue()
    with pytest.raises(ValueError, match="longer than 100"):
        tar_bytes([("b" * 101, b"")])


def test_parquet_read_by_datasets_and_pyarrow(datasets_dir):
    import datasets

    files = sorted((datasets_dir / "parquet").glob("faces-*.parquet"))
    assert len(files) == 3
    table = pq.read_table(files)
    assert table.column("index").to_pylist() == list(range(COUNT))
    assert table.schema.field("image").type.names == ["bytes", "path"]
    ds = datasets.Dataset.from_parquet([str(f) for f in files])
    assert len(ds) == COUNT and isinstance(ds.features["image"], datasets.Image)
    row = ds[COUNT - 1]
    assert row["image"].size == (SIZE, SIZE) and row["image"].mode == "RGB"
    assert np.array_equal(np.asarray(row["image"]), face_pixels(COUNT - 1, SIZE, seed=7))


def test_deterministic_across_runs(datasets_dir, tmp_path):
    for fmt in ("files", "webdataset", "parquet"):
        make_dataset(str(tmp_path / fmt), COUNT, fmt, PER_SHARD, SIZE, "png", seed=7, workers=2)
        assert tree_digest(tmp_path / fmt) == tree_digest(datasets_dir / fmt), fmt


def test_placeholder_payload_counts(tmp_path):
    shards = make_dataset(str(tmp_path / "wds"), 2500, "webdataset", 1000, kind="placeholder")
    assert shards == 3
    with tarfile.open(tmp_path / "wds" / "faces-00002.tar") as tar:
        names = tar.getnames()
        assert len(names) == 2 * 500 and names[0] == "000002000.png"
        assert tar.extractfile(names[0]).read() == b"placeholder 000002000"
    make_dataset(str(tmp_path / "pq"), 2500, "parquet", 1000, kind="placeholder")
    assert pq.read_table(tmp_path / "pq").num_rows == 2500


def test_wrong_options_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--count", "3", "--format", "zip"])
    assert e.value.code == 2 and "--format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--count", "3", "--per-shard", "0"])
    assert not any(tmp_path.iterdir())


def test_writes_to_s3(s3_server):
    import fsspec

    from bench.count_requests import count_requests

    fs, bucket = s3_server.fs(), s3_server.new_bucket("synthetic")
    writer_fs = fsspec.core.url_to_fs(f"s3://{bucket}/wds", **s3_server.storage_options)[0]  # the cached instance
    with count_requests(writer_fs) as counts:
        make_dataset(f"s3://{bucket}/wds", 12, "webdataset", 5, 16, storage_options=s3_server.storage_options)
    assert dict(counts.by_operation) == {"PutObject": 3}  # one put per small shard, nothing else
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/wds", refresh=True)) == \
        ["faces-00000.tar", "faces-00001.tar", "faces-00002.tar"]
    with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{bucket}/wds/faces-00002.tar"))) as tar:
        assert tar.getnames() == ["000000010.png", "000000010.json", "000000011.png", "000000011.json"]

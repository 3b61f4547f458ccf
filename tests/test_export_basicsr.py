"""workflows/export_basicsr.py: augment outputs of each --write.format -> BasicSR paired folders + meta_info.txt.

The fake augment outputs are built here from /work/notes/SHARD_FORMAT.md (files: hq/ lq/ URIs in the manifest;
webdataset: shards/<unit>.tar with <key>.hq.png / <key>.lq.png; parquet: shards/<unit>.parquet with hq / lq
Hugging Face Image structs), and the export is read back by BasicSR's rule (paired_paths_from_meta_info_file:
the text before the first space of each line is the GT name, the LQ file has the same name).
"""

from __future__ import annotations

import hashlib
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

from bench.count_requests import count_requests
from tasks.manifest import write_shard
from tasks.storage import get_fs
from workflows.export_basicsr import ExportConfig, export, main, pair_names

# (id, status): the two ids that sanitise to the same name, an error row (never exported), a nested id
IDS = [("a/b.png", "ok"), ("a__b.png", "ok"), ("bad.png", "error"), ("sub/dir/x y.jpg", "ok"), ("z.png", "ok")]
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def pixels(sid: str, which: str, size: int = 24) -> np.ndarray:
    seed = int(hashlib.sha256(f"{sid}/{which}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)  # h != w on purpose


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()


def manifest_rows(output: str, rows: list[dict], storage_options: dict | None = None) -> None:
    cols = {c: [r.get(c) for r in rows] for c in ("id", "status", "hq", "lq", "shard", "key")}
    write_shard(pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()}), output, storage_options)


def make_files_output(root: Path) -> str:
    rows = []
    for sid, status in IDS:
        row = {"id": sid, "status": status, "hq": "", "lq": ""}
        if status == "ok":
            stem = os.path.splitext(sid)[0]
            for which in ("hq", "lq"):
                p = root / which / f"{stem}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(png(pixels(sid, which)))
                row[which] = str(p)
        rows.append(row)
    manifest_rows(str(root), rows)
    return str(root)


def write_tar(path: Path, shard: str) -> list[dict]:
    """The tar of a webdataset-format augment output at path; returns its manifest rows (shard URI `shard`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(path, "w") as tar:
        for k, (sid, status) in enumerate(IDS):
            key = f"{k:06d}"
            row = {"id": sid, "status": status, "shard": str(shard), "key": key}
            members = {f"{key}.json": json.dumps(row).encode()}
            if status == "ok":
                for which in ("hq", "lq"):
                    members[f"{key}.{which}.png"] = png(pixels(sid, which))
                    row[which] = f"{shard}#{key}.{which}.png"
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            rows.append(row)
    return rows


def make_webdataset_output(root: Path) -> str:
    shard = root / "shards" / "faces-00000-00000.tar"
    manifest_rows(str(root), write_tar(shard, str(shard)))
    return str(root)


def make_parquet_output(root: Path) -> str:
    """Manifest columns in the shards (id, status) plus hq / lq Image structs, as tasks/units.py writes them."""
    shards = [root / "shards" / f"chunk-{k}.parquet" for k in range(2)]  # two shards: rows spread over both
    shards[0].parent.mkdir(parents=True)
    rows, by_shard = [], {0: [], 1: []}
    for k, (sid, status) in enumerate(IDS):
        s = k % 2
        row = {"id": sid, "status": status, "shard": str(shards[s]), "key": f"{k:06d}"}
        if status == "ok":  # references name the column in one shard, the member-style path in the other
            ref = "{}" if s else f"{row['key']}.{{}}.png"
            row.update(hq=f"{shards[s]}#{ref.format('hq')}", lq=f"{shards[s]}#{ref.format('lq')}")
        rows.append(row)
        by_shard[s].append(row)
    for s, shard_rows in by_shard.items():
        def images(which, shard_rows=shard_rows):
            return pa.array([{"bytes": png(pixels(r["id"], which)) if r["status"] == "ok" else None,
                              "path": None} for r in shard_rows], IMAGE_TYPE)
        pq.write_table(pa.table({"id": [r["id"] for r in shard_rows], "status": [r["status"] for r in shard_rows],
                                 "hq": images("hq"), "lq": images("lq")}), shards[s])
    manifest_rows(str(root), rows)
    return str(root)


LAYOUTS = {"files": make_files_output, "webdataset": make_webdataset_output, "parquet": make_parquet_output}


def basicsr_pairs(dest: Path) -> list[tuple[Path, Path]]:
    """BasicSR's paired_paths_from_meta_info_file with filename_tmpl '{}': (gt, lq) paths per line."""
    gt_names = [line.split(" ")[0] for line in (dest / "meta_info.txt").open()]
    return [(dest / "hq" / name, dest / "lq" / os.path.basename(name)) for name in gt_names]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_round_trip(layout, tmp_path):
    output = LAYOUTS[layout](tmp_path / "augment")
    dest = tmp_path / "basicsr"
    assert main(["--input", output, "--dest", str(dest)]) == 0
    names = pair_names([sid for sid, status in IDS if status == "ok"])
    pairs = basicsr_pairs(dest)
    assert [gt.name for gt, _ in pairs] == sorted(n + ".png" for n in names.values())  # sorted, one per ok row
    by_name = {n + ".png": sid for sid, n in names.items()}
    for gt, lq in pairs:
        sid = by_name[gt.name]
        for path, which in ((gt, "hq"), (lq, "lq")):
            rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]  # BasicSR reads with cv2, 'color'
            assert np.array_equal(rgb, pixels(sid, which)), (layout, sid, which)
    h, w = pixels("z.png", "hq").shape[:2]
    assert (dest / "meta_info.txt").read_text().splitlines()[-1] == f"z.png ({h},{w},3)"
    assert sorted(p.name for p in (dest / "hq").iterdir()) == sorted(p.name for p in (dest / "lq").iterdir())
    again = tmp_path / "again"
    export(ExportConfig(input=output, dest=str(again)))
    assert tree_digest(again) == tree_digest(dest)


def test_names_are_safe_unique_and_deterministic():
    ids = ["a/b.png", "a__b.png", "sub/dir/x y.jpg", "../up.png", "z.PNG", "é.png", "ü.png", "x" * 300]
    names = pair_names(ids)
    assert names == pair_names(list(reversed(ids)))
    assert len(set(names.values())) == len(ids)
    assert names["sub/dir/x y.jpg"] == "sub__dir__x_y" and names["z.PNG"] == "z"
    assert names["a/b.png"].startswith("a__b~") and names["a__b.png"].startswith("a__b~")
    for n in names.values():
        assert "/" not in n and " " not in n and not n.startswith(".") and len(n) < 255


def test_missing_images_are_reported_not_exported(tmp_path):
    output = make_webdataset_output(tmp_path / "augment")
    shard = tmp_path / "augment" / "shards" / "faces-00000-00000.tar"
    with tarfile.open(shard) as tar:  # drop z.png's lq member
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "000004.lq.png"]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    assert main(["--input", output, "--dest", str(tmp_path / "out")]) == 1
    names = [gt.name for gt, _ in basicsr_pairs(tmp_path / "out")]
    assert len(names) == 3 and "z.png" not in names


def test_missing_manifest_refused(tmp_path, caplog):
    assert main(["--input", str(tmp_path / "nothing"), "--dest", str(tmp_path / "out")]) == 2
    assert "no augment manifest under" in caplog.text
    assert not (tmp_path / "out").exists()


def test_webdataset_output_on_s3(s3_server, tmp_path):
    fs, bucket = s3_server.fs(), s3_server.new_bucket("export")
    uri = f"s3://{bucket}/augment"
    shard = f"{uri}/shards/faces-00000-00000.tar"
    rows = write_tar(tmp_path / "faces-00000-00000.tar", shard)
    fs.put(str(tmp_path / "faces-00000-00000.tar"), shard)
    manifest_rows(uri, rows, s3_server.storage_options)
    dest = tmp_path / "basicsr"
    reader = get_fs(uri, s3_server.storage_options)[0]  # the cached instance export() reads through
    with count_requests(reader) as counts:
        exported, failures = export(ExportConfig(input=uri, dest=str(dest), storage_options=s3_server.storage_options))
    assert (exported, failures) == (4, [])
    # one listing of manifest/, one GET of its shard and ONE of the tar (streamed, not fetched per member)
    assert counts.by_kind["LIST"] == 1 and counts.by_operation["GetObject"] == 2, counts.by_operation
    for gt, lq in basicsr_pairs(dest):
        assert gt.is_file() and lq.is_file()

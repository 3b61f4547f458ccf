"""The benchmark workflow end to end: degradation, methods, metrics, FID from shards, report, resume."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from skimage.metrics import peak_signal_noise_ratio

from tasks.benchmark_stage import fid_scores
from tasks.degradation import degrade, draw_degradation
from tasks.manifest import read_manifest
from tasks.metrics import load_fid_reference
from tests.helpers import calibrated_fid_inception
from workflows.benchmark import main as benchmark
from workflows.fid_stats import main as fid_stats
from workflows.niqe_params import main as niqe_params

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
METHODS = [{"name": "input"}, {"name": "dr2", "N": 2, "tau": 5, "enhancer": "none"},
           {"name": "dr2+bicubic", "N": 2, "tau": 5, "enhancer": "bicubic"}]


def test_benchmark_end_to_end(ray_local, tmp_path):
    src = tmp_path / "hq"
    src.mkdir()
    for p in sorted(SAMPLES.glob("*.png"))[:3]:
        cv2.imwrite(str(src / p.name), cv2.resize(cv2.imread(str(p)), (64, 64), interpolation=cv2.INTER_AREA))
    out = tmp_path / "out"
    # reference statistics of the ground-truth set itself, through the fid_stats command (same network, same size)
    assert fid_stats(["--input", str(src), "--output", str(tmp_path / "gtref.npz"), "--weights", "random-init",
                      "--image.size", "64"]) == 0
    args = ["--input", str(src), "--output", str(out), "--allow-random-weights", "true",
            "--dr2.architecture", "tiny", "--image.size", "32", "--image.gt-size", "64", "--enhancer.size", "64",
            "--methods", json.dumps(METHODS), "--degradation.custom", '{base: gfpgan, scale: "2:4"}',
            "--metrics.names", "[psnr_rgb, ssim_y, lpips_alex, ids, fid_tf_inception]",
            "--metrics.weights", "{lpips_alex: random-init, fid_tf_inception: random-init}",
            "--metrics.fid-reference", json.dumps({"gtref": str(tmp_path / "gtref.npz")}),
            "--runtime.device", "cpu", "--runtime.batch-size", "2", "--cluster.block-rows", "2"]
    assert benchmark(args) == 0
    df = read_manifest(str(out))
    assert len(df) == 9 and sorted(df["method"].unique()) == ["dr2", "dr2+bicubic", "input"]
    # the summary names the same random-init DR2 network as its rows ("<dr2 identity>+<enhancer identity>")
    label = json.loads((out / "_summary.json").read_text())["weights"]
    assert label == "random-init:tiny"
    assert all(w.split("+")[0] == label for w in df.loc[df["method"] != "input", "weights"])
    assert (df["status"] == "ok").all() and df["ids"].isna().all()  # no ArcFace weights: no number
    # the input row's PSNR equals an independent computation on the written images
    for _, row in df[df["method"] == "input"].iterrows():
        lq, gt = cv2.imread(row["lq"])[..., ::-1], cv2.imread(row["gt"])[..., ::-1]
        assert abs(row["psnr_rgb"] - peak_signal_noise_ratio(gt, lq, data_range=255)) < 1e-4
        # the degradation is a pure function of (seed, id): recompute it
        p = draw_degradation({"base": "gfpgan", "scale": "2:4"}, 0, row["id"])
        assert np.array_equal(degrade(gt, p, 0, row["id"]), lq) and 2 <= row["deg_scale"] <= 4
        assert row["restored"] == row["lq"].replace("/lq/", "/restored/input/")
    refs = {"gtref": load_fid_reference("gtref", str(tmp_path / "gtref.npz"))}
    fid = fid_scores(str(out), references=refs)
    assert set(fid) == {"fid_tf_inception@gt", "fid_tf_inception@gtref"}
    vs_gt = fid["fid_tf_inception@gt"]
    assert set(vs_gt) == {"input", "dr2", "dr2+bicubic"} and all(isinstance(v, float) for v in vs_gt.values())
    for method, v in vs_gt.items():  # the reference file holds the same images' statistics: the same FID
        assert fid["fid_tf_inception@gtref"][method] == pytest.approx(v, rel=1e-4, abs=1e-6)
    report = (out / "report" / "report.md").read_text()
    assert "IDS" in report and "no ArcFace" in report and (out / "report" / "report.html").exists()
    assert "FID TF-Inception ↓ vs gtref" in report and "vs gtref: gtref: " in report
    assert list((out / "report" / "grids").glob("*.png")) and list((out / "report" / "plots").glob("*.png"))
    # resume: nothing left to do, the same FID from the committed shards
    assert benchmark(args) == 0
    assert json.loads((out / "_summary.json").read_text())["skipped"] == 3
    assert fid_scores(str(out), references=refs) == fid
    assert len(pd.concat(pd.read_parquet(p) for p in (out / "manifest").glob("*.parquet"))) == 9


def test_benchmark_real_world(ray_local, tmp_path):
    """No ground truth: no degradation, no-reference metrics, identity vs input, FID vs reference statistics,
    ground-truth metrics marked not applicable."""
    src = tmp_path / "lq"
    src.mkdir()
    for p in sorted(SAMPLES.glob("*.png"))[:3]:  # "real-world" inputs: blurred, small faces
        img = cv2.resize(cv2.GaussianBlur(cv2.imread(str(p)), (0, 0), 3), (96, 96), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(src / p.name), img)
    calibrated_fid_inception(tmp_path / "tfinc.pth", np.stack([cv2.imread(str(p))[..., ::-1] for p in src.iterdir()]))
    assert fid_stats(["--input", str(src), "--output", str(tmp_path / "ref.npz"), "--weights",
                      str(tmp_path / "tfinc.pth"), "--image.size", "96"]) == 0
    assert niqe_params(["--input", str(SAMPLES), "--output", str(tmp_path / "niqe.npz"), "--image.size", "512"]) == 0
    (tmp_path / "iqa.json").write_text(json.dumps({"scale": 2.0}))
    out = tmp_path / "out"
    metrics = "[psnr_rgb, lmd_mtcnn5, niqe, meanlevel, ids, deg, fid_tf_inception]"
    args = ["--mode", "real-world", "--input", str(src), "--output", str(out), "--allow-random-weights", "true",
            "--dr2.architecture", "tiny", "--image.size", "32", "--image.gt-size", "96", "--enhancer.size", "96",
            "--methods", json.dumps(METHODS[:2]), "--metrics.names", metrics,
            "--metrics.weights", json.dumps({"fid_tf_inception": str(tmp_path / "tfinc.pth"), "identity": "random-init",
                                             "niqe": str(tmp_path / "niqe.npz")}),
            "--metrics.plugins", json.dumps({"meanlevel": {"class": "tests.plugins:MeanLevelIQA",
                                                           "weights": str(tmp_path / "iqa.json")}}),
            "--metrics.fid-reference", json.dumps({"lqref": str(tmp_path / "ref.npz")}),
            "--runtime.device", "cpu", "--runtime.batch-size", "3", "--cluster.block-rows", "3"]
    assert benchmark(args) == 0
    df = read_manifest(str(out))
    assert len(df) == 6 and (df["status"] == "ok").all() and (df["deg_level"] == "real-world").all()
    assert df["psnr_rgb"].isna().all() and df["lmd_mtcnn5"].isna().all()  # no ground truth: no number
    assert "gt" not in df.columns and not (out / "gt").exists()  # no ground truth: not declared
    assert df["niqe"].notna().all() and df["meanlevel"].notna().all()
    inp = df[df["method"] == "input"]
    np.testing.assert_allclose(inp["ids"], 1.0, atol=1e-6)  # identity vs the input: the input itself scores 1
    for _, row in inp.iterrows():  # the NR plug-in's number equals a direct computation on the written image
        assert row["meanlevel"] == pytest.approx(cv2.imread(row["lq"]).mean() / 255 * 2.0, rel=1e-9)
    refs = {"lqref": load_fid_reference("lqref", str(tmp_path / "ref.npz"))}
    fid = fid_scores(str(out), references=refs)
    assert set(fid) == {"fid_tf_inception@lqref"}  # no ground truth: against the reference only
    vs_ref = fid["fid_tf_inception@lqref"]
    assert vs_ref["dr2"] > 1.0 and 0 <= vs_ref["input"] < 1e-4 * vs_ref["dr2"]  # the reference: the same images
    report = (out / "report" / "report.md").read_text()
    assert "## Not applicable" in report and "no ground truth" in report
    assert "FID TF-Inception ↓ vs lqref" in report and "the method's input (no ground truth)" in report
    assert "meanlevel" in report and "NIQE ↓" in report


def test_wrong_metric_options_refused_before_ray(tmp_path, caplog):
    out = str(tmp_path / "out")
    assert benchmark(["--output", out, "--metrics.names", "[psnr_y, fid]"]) == 2
    assert "fid_tf_inception" in caplog.text and "fid_tv_inception" in caplog.text
    assert benchmark(["--output", out, "--mode", "wild"]) == 2 and "real-world" in caplog.text
    assert benchmark(["--output", out, "--metrics.fid-reference", json.dumps({"ffhq": str(tmp_path / "no.npz")})]) == 2
    assert "no.npz" in caplog.text and not (tmp_path / "out").exists()


def test_benchmark_webdataset_output_one_sample_per_key_with_every_method(ray_local, tmp_path):
    import webdataset as wds

    src = tmp_path / "hq"
    src.mkdir()
    for p in sorted(SAMPLES.glob("*.png"))[:3]:
        cv2.imwrite(str(src / p.name), cv2.resize(cv2.imread(str(p)), (64, 64), interpolation=cv2.INTER_AREA))
    out = tmp_path / "out"
    assert benchmark(["--input", str(src), "--output", str(out), "--allow-random-weights", "true",
                      "--dr2.architecture", "tiny", "--image.size", "32", "--image.gt-size", "64",
                      "--enhancer.size", "64", "--methods", json.dumps(METHODS), "--metrics.names",
                      "[psnr_rgb, fid_tf_inception]", "--metrics.weights", "{fid_tf_inception: random-init}",
                      "--runtime.device", "cpu", "--runtime.batch-size", "3", "--write.format", "webdataset",
                      "--write.shard-size", "2"]) == 0
    df = read_manifest(str(out))
    assert len(df) == 9 and (df["status"] == "ok").all()
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert len(tars) == 2 and not (out / "gt").exists()
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    methods = [m["name"] for m in METHODS]
    assert len(samples) == 3  # one webdataset sample per face, its ground truth and input stored once
    for s in samples:
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {"gt.png", "lq.png", *(
            f"{m}.restored.png" for m in methods), *(f"{m}.json" for m in methods)}
        rows = {m: json.loads(s[f"{m}.json"]) for m in methods}
        assert {r["method"] for r in rows.values()} == set(methods) and len({r["id"] for r in rows.values()}) == 1
        gt = cv2.imdecode(np.frombuffer(s["gt.png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        restored = cv2.imdecode(np.frombuffer(s["input.restored.png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert abs(rows["input"]["psnr_rgb"] - peak_signal_noise_ratio(gt, restored, data_range=255)) < 1e-4
    fid = fid_scores(str(out))
    assert set(fid["fid_tf_inception@gt"]) == set(methods)  # features of committed shards only
    assert list((out / "report" / "grids").glob("*.png"))  # the report reads its images out of the tars

"""FID as the literature computes it, against the pytorch-fid package itself: the TF Inception network (same
random weights, same pool3 features), the Frechet distance, and reference statistics written by
workflows/fid_stats.py equal to pytorch-fid's own statistics of the same folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pytorch_fid import fid_score
from pytorch_fid import inception as pfi

from models.fid_inception import fid_inception_v3
from tasks import metrics as M
from tasks.weights import RANDOM_INIT, WeightsError
from tests.helpers import calibrated_fid_inception
from workflows.fid_stats import main as fid_stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.fixture(scope="module")
def tf_inception(tmp_path_factory):
    """A random FID Inception (BN statistics from real faces, see calibrated_fid_inception) saved as a file."""
    faces = [cv2.resize(cv2.imread(str(p))[..., ::-1], (96, 96), interpolation=cv2.INTER_AREA)
             for p in sorted(SAMPLES.glob("*.png"))[:4]]
    path = tmp_path_factory.mktemp("tfinc") / "pt_inception_random.pth"
    model = calibrated_fid_inception(path, np.stack(faces))
    return model.state_dict(), path


@pytest.fixture(scope="module")
def pytorch_fid_model(tf_inception):
    """pytorch-fid's InceptionV3 (use_fid_inception=True) given the same weights instead of downloading them."""
    sd, _ = tf_inception
    mp = pytest.MonkeyPatch()
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: {k2: v.clone() for k2, v in sd.items()})
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # strict load_state_dict
        full = pfi.fid_inception_v3()
    finally:
        mp.undo()
    return model, full


def test_layout_is_pytorch_fids(pytorch_fid_model):
    _, full = pytorch_fid_model
    ours = fid_inception_v3().state_dict()
    theirs = full.state_dict()
    assert list(ours) == list(theirs)  # same keys in the same order (pt_inception-2015-12-05 layout)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert ours["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in ours)
    assert len(ours) == 566


def test_pool3_features_equal_pytorch_fid(tf_inception, pytorch_fid_model, tmp_path, monkeypatch):
    _, path = tf_inception
    ref, _ = pytorch_fid_model
    feat = M.TFInceptionFeatures(str(path))
    assert feat.weights_identity.endswith("pt_inception_random.pth")
    g = torch.Generator().manual_seed(5)
    for shape in ((2, 3, 64, 80), (1, 3, 299, 299)):  # resized bilinear, and already at 299 (no resize)
        x = torch.rand(shape, generator=g)
        ours = feat(x)
        with torch.no_grad():
            theirs = ref(x)[0].flatten(1).double()
        assert ours.shape == (shape[0], 2048) and ours.dtype == torch.float64
        assert theirs.abs().max() > 0.1 and theirs.std() > 1e-3  # the features carry signal
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()
    faces = np.stack([cv2.imread(str(p))[..., ::-1] for p in sorted(SAMPLES.glob("*.png"))[:2]])
    faces = torch.from_numpy(faces.copy()).permute(0, 3, 1, 2).float() / 255
    f = feat(faces)
    with torch.no_grad():
        assert torch.allclose(f, ref(faces)[0].flatten(1).double(), rtol=1e-5, atol=1e-5)
    assert (f[0] - f[1]).norm() > 0.2 * f[0].norm()  # features depend on the face: the equality means something
    assert (feat(faces[:, [2, 1, 0]]) - f).norm() > 0.05 * f.norm()  # channel order matters: RGB
    # torchvision's checkpoint is refused (1000-class fc, AuxLogits); no weights and an empty hub cache: unavailable
    from torchvision.models import inception_v3

    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(WeightsError):
        M.TFInceptionFeatures(str(tmp_path / "tv.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(M.MetricUnavailableError, match="pt_inception-2015-12-05-6726825d.pth"):
        M.TFInceptionFeatures()


@pytest.mark.parametrize("n", [300, 40])  # full-rank and rank-deficient covariances (64-d)
def test_distance_equals_pytorch_fid(n):
    rng = np.random.default_rng(n)
    f1 = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3
    f2 = rng.normal(0.2, 1.0, size=(n + 17, 64)) @ rng.normal(size=(64, 64)) * 0.3
    ours = M.fid_from_stats(M.FIDStats(64).update(f1), M.FIDStats(64).update(f2))
    mu1, s1 = f1.mean(axis=0), np.cov(f1, rowvar=False)
    theirs = fid_score.calculate_frechet_distance(mu1, s1, f2.mean(axis=0), np.cov(f2, rowvar=False))
    assert ours == pytest.approx(theirs, rel=1e-7)
    ref = M.FIDReference("r", "mem", f2.mean(axis=0), np.cov(f2, rowvar=False))
    assert M.fid_against_reference(M.FIDStats(64).update(f1), ref) == pytest.approx(theirs, rel=1e-7)


def test_suite_names_the_network(tf_inception):
    suite = M.MetricSuite(["psnr_y", "fid_tf_inception"], weights={"fid_tf_inception": str(tf_inception[1])})
    assert list(suite.fid) == ["fid_tf_inception"] and suite.weights_identity["fid_tf_inception"].endswith(".pth")
    rng = np.random.default_rng(0)
    r8, g8 = (rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8) for _ in range(2))
    out = suite(r8, g8)
    assert set(out.fid_features) == {"fid_tf_inception"} and set(out.fid_features["fid_tf_inception"]) == {
        "restored", "gt"}
    direct = suite.fid["fid_tf_inception"](torch.from_numpy(g8).permute(0, 3, 1, 2).float() / 255).numpy()
    np.testing.assert_allclose(out.fid_features["fid_tf_inception"]["gt"], direct, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="fid_tf_inception"):
        M.MetricSuite(["fid"])


def test_fid_stats_command_equals_pytorch_fid_statistics(tf_inception, pytorch_fid_model, tmp_path):
    src = tmp_path / "faces"
    src.mkdir()
    for p in sorted(SAMPLES.glob("*.png"))[:4]:
        cv2.imwrite(str(src / p.name), cv2.resize(cv2.imread(str(p)), (64, 64), interpolation=cv2.INTER_AREA))
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "stats" / "ref.npz"
    assert fid_stats(["--input", str(src), "--output", str(out), "--weights", str(tf_inception[1]),
                      "--image.size", "64", "--batch-size", "3"]) == 0
    files = sorted(str(p) for p in src.glob("*.png") if p.name != "broken.png")
    ref_model, _ = pytorch_fid_model
    mu, sigma = fid_score.calculate_activation_statistics(files, ref_model, batch_size=4, dims=2048, device="cpu",
                                                          num_workers=0)
    with np.load(out) as z:  # the file pytorch-fid reads (mu, sigma) ...
        # float32 convolutions batched differently: ~1e-5 of the largest value (the 4-sample covariance of
        # nearly equal features amplifies it ~10x)
        assert np.abs(z["mu"] - mu).max() < 1e-4 * np.abs(mu).max()
        assert np.abs(z["sigma"] - sigma).max() < 1e-3 * np.abs(sigma).max()
        assert M.frechet_distance(z["mu"], z["sigma"], mu, sigma) < 1e-6 * np.trace(sigma)
    ref = M.load_fid_reference("faces", str(out))  # ... and ours, with its provenance
    assert ref.protocol == "fid_tf_inception" and ref.count == 4 and ref.source == str(src)
    assert "faces" in ref.describe and "4 images" in ref.describe
    # a pytorch-fid file (mu and sigma only) is read as fid_tf_inception; other files are refused clearly
    np.savez_compressed(tmp_path / "pf.npz", mu=mu, sigma=sigma)
    plain = M.load_fid_reference("pf", str(tmp_path / "pf.npz"))
    assert plain.protocol == "fid_tf_inception" and plain.count == -1
    np.testing.assert_array_equal(plain.sigma, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="lacks"):
        M.load_fid_reference("bad", str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        M.load_fid_reference("x", str(tmp_path / "absent.npz"))
    assert fid_stats(["--input", str(src), "--output", str(out), "--protocol", "fid"]) == 2
    assert fid_stats(["--input", str(src), "--output", str(tmp_path / "r.npz"), "--weights", RANDOM_INIT,
                      "--image.size", "64"]) == 0
    assert "random-init" in M.load_fid_reference("r", str(tmp_path / "r.npz")).source


def test_fid_scores_from_shards_new_and_old_layout(tmp_path):
    """fid_scores merges committed feature shards per (network, source); an uncommitted shard is ignored, and a
    shard of the old layout (no metric column) is read as torchvision-Inception features."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.benchmark_stage import fid_scores

    rng = np.random.default_rng(0)
    (tmp_path / "fid").mkdir()
    (tmp_path / "manifest").mkdir()
    feats = {s: rng.normal(loc, 1.0, (6, 2048)) for s, loc in (("gt", 0.0), ("dr2", 0.3))}

    def shard(name, rows, metric=True, commit=True):
        cols = {"id": [r[0] for r in rows], "source": [r[1] for r in rows]}
        if metric:
            cols["metric"] = [r[2] for r in rows]
        cols["features"] = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([r[3][None] for r in rows])
                                                                      .astype(np.float32).ravel()), 2048)
        pq.write_table(pa.table(cols), tmp_path / "fid" / name)
        if commit:
            (tmp_path / "manifest" / name).write_bytes(b"")

    rows = [(str(i), s, "fid_tf_inception", feats[s][i]) for s in feats for i in range(6)]
    shard("a.parquet", rows[:3] + rows[6:9])
    shard("b.parquet", rows[3:6] + rows[9:12])
    shard("c.parquet", [(str(i), "dr2", "fid_tf_inception", np.zeros(2048)) for i in range(4)], commit=False)
    shard("d.parquet", [(r[0], r[1], "", r[3]) for r in rows], metric=False)
    ref = M.FIDReference("set", "mem", feats["gt"].mean(axis=0), np.cov(feats["gt"], rowvar=False))
    out = fid_scores(str(tmp_path), references={"set": ref})
    assert set(out) == {"fid_tf_inception@gt", "fid_tf_inception@set", "fid_tv_inception@gt"}
    f32 = {s: f.astype(np.float32).astype(np.float64) for s, f in feats.items()}
    # (frechet_distance equals pytorch-fid's above; its 2048-d sqrtm is too slow to repeat here)
    expected = M.frechet_distance(f32["dr2"].mean(0), np.cov(f32["dr2"], rowvar=False), f32["gt"].mean(0),
                                  np.cov(f32["gt"], rowvar=False))
    assert out["fid_tf_inception@gt"]["dr2"] == pytest.approx(expected, rel=1e-6)
    assert out["fid_tv_inception@gt"]["dr2"] == pytest.approx(expected, rel=1e-6)
    assert out["fid_tf_inception@set"]["dr2"] == pytest.approx(expected, rel=1e-4)  # reference from float64 feats

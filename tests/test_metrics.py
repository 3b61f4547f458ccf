"""tasks.metrics against independent references: skimage, the lpips package, numpy/scipy, torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tasks import metrics as M
from tasks.weights import RANDOM_INIT, WeightsError

# lpips builds its trunk with torchvision's deprecated `pretrained=` argument
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:torchvision.models._utils"),
              pytest.mark.usefixtures("one_torch_thread")]


def _pairs(seed=0, n=3, h=37, w=45):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    sigma = np.linspace(5, 25, n).reshape(n, 1, 1, 1)  # increasing noise along the batch
    restored = np.clip(np.round(gt + rng.normal(size=gt.shape) * sigma), 0, 255).astype(np.uint8)
    return restored, gt


def _t(a: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(a).permute(0, 3, 1, 2).to(dtype) / 255.0


def _y_np(a: np.ndarray) -> np.ndarray:
    """BT.601 studio-swing Y in [16, 235] / 255 of uint8 RGB, written independently in numpy."""
    rgb = a.astype(np.float64) / 255.0
    return (16.0 + rgb @ np.array([65.481, 128.553, 24.966])) / 255.0


def _sk_ssim(a, b, channel_axis=-1):
    # skimage's Gaussian-weighted SSIM filters with reflect padding, then crops (win_size - 1) // 2 = 5 px per side:
    # that is exactly the 'valid' region, so it must equal our valid filtering.
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=channel_axis, K1=0.01, K2=0.03)


# ------------------------------------------------------------------------------------------- PSNR / SSIM


def test_y_channel_convention():
    x = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    assert M.rgb_to_y(x).flatten().tolist() == pytest.approx([16 / 255, 235 / 255], abs=1e-12)
    r, g = _pairs(1)
    assert torch.allclose(M.rgb_to_y(_t(r))[:, 0], torch.from_numpy(_y_np(r)), atol=1e-12)


def test_psnr_matches_skimage_rgb_and_y():
    r, g = _pairs(0)
    ours_rgb = M.psnr(_t(r), _t(g))
    ours_y = M.psnr(_t(r), _t(g), y_channel=True)
    assert ours_rgb.dtype == torch.float64 and ours_rgb.shape == (3,)
    for i in range(3):
        ref = peak_signal_noise_ratio(g[i] / 255.0, r[i] / 255.0, data_range=1.0)
        assert abs(ours_rgb[i].item() - ref) < 1e-4
        ref_y = peak_signal_noise_ratio(_y_np(g[i]), _y_np(r[i]), data_range=1.0)
        assert abs(ours_y[i].item() - ref_y) < 1e-4
    assert ours_rgb[0] > ours_rgb[1] > ours_rgb[2]  # more noise, lower PSNR
    assert torch.isinf(M.psnr(_t(g), _t(g))).all()


def test_ssim_matches_skimage_rgb_and_y():
    r, g = _pairs(2)
    ours_rgb = M.ssim(_t(r), _t(g))
    ours_y = M.ssim(_t(r), _t(g), y_channel=True)
    for i in range(3):
        assert abs(ours_rgb[i].item() - _sk_ssim(r[i] / 255.0, g[i] / 255.0)) < 1e-4
        assert abs(ours_y[i].item() - _sk_ssim(_y_np(r[i]), _y_np(g[i]), channel_axis=None)) < 1e-4
    assert torch.allclose(M.ssim(_t(g), _t(g)), torch.ones(3, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(_t(r[:, :10]), _t(g[:, :10]))


def test_psnr_ssim_match_skimage_on_a_natural_image():
    from skimage.data import astronaut

    gt = astronaut()[40:200, 150:310]  # 160x160 face crop
    rng = np.random.default_rng(9)
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(gt).permute(2, 0, 1).float()[None], 3, 1, 1)
    res = np.clip(blurred[0].permute(1, 2, 0).numpy() + rng.normal(0, 4, gt.shape), 0, 255).round().astype(np.uint8)
    r, g = _t(res[None]), _t(gt[None])
    assert abs(M.ssim(r, g).item() - _sk_ssim(res / 255.0, gt / 255.0)) < 1e-10
    assert abs(M.ssim(r, g, y_channel=True).item() - _sk_ssim(_y_np(res), _y_np(gt), channel_axis=None)) < 1e-10
    assert abs(M.psnr(r, g).item() - peak_signal_noise_ratio(gt / 255.0, res / 255.0, data_range=1.0)) < 1e-10
    assert abs(M.psnr(r, g, y_channel=True).item()
               - peak_signal_noise_ratio(_y_np(gt), _y_np(res), data_range=1.0)) < 1e-10


def test_ssim_is_valid_filtering_not_padded():
    """The score is the mean of the (H-10) x (W-10) map of a direct 2-D 11x11 'valid' correlation (no padding)."""
    r, g = _pairs(3, n=1, h=24, w=20)
    x, y = _t(r)[:, :1], _t(g)[:, :1]
    half = np.arange(11) - 5
    w1 = np.exp(-(half**2) / (2 * 1.5**2))
    win = torch.from_numpy(np.outer(w1, w1) / np.outer(w1, w1).sum()).view(1, 1, 11, 11)
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx, syy, sxy = F.conv2d(x * x, win) - mu_x**2, F.conv2d(y * y, win) - mu_y**2, F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = 1e-4, 9e-4
    smap = (2 * mu_x * mu_y + c1) * (2 * sxy + c2) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    assert smap.shape[-2:] == (14, 10)
    ours = M.ssim(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1))
    assert abs(ours.item() - smap.mean().item()) < 1e-12


def test_batched_equals_per_image_chunked_and_uint8(monkeypatch):
    r, g = _pairs(4, n=4)
    r8, g8 = torch.from_numpy(r).permute(0, 3, 1, 2), torch.from_numpy(g).permute(0, 3, 1, 2)
    for fn in (M.psnr, M.ssim):
        for yc in (False, True):
            batched = fn(_t(r), _t(g), y_channel=yc)
            single = torch.cat([fn(_t(r[i : i + 1]), _t(g[i : i + 1]), y_channel=yc) for i in range(4)])
            assert torch.allclose(batched, single, rtol=0, atol=1e-12)
            assert torch.allclose(fn(r8, g8, y_channel=yc), batched, rtol=0, atol=1e-12)  # uint8 = value / 255
            with monkeypatch.context() as m:  # tiny chunks: one image, one plane and 2-row bands at a time
                m.setitem(M._CHUNK_ELEMS, "cpu", 1)
                m.setattr(M, "_SSIM_BAND_ELEMS_CPU", 100)
                assert torch.allclose(fn(_t(r), _t(g), y_channel=yc), batched, rtol=0, atol=1e-12)
    x = _t(r)
    before, threads = x.clone(), torch.get_num_threads()
    M.psnr(x, _t(g))
    M.ssim(x, _t(g), y_channel=True)
    assert torch.equal(x, before)  # inputs are never modified in place
    assert torch.get_num_threads() == threads  # the single-threaded CPU section restores the setting


# ------------------------------------------------------------------------------------------- LPIPS


def _face_batch(n=2, size=64, seed=0):
    from skimage.data import astronaut

    face = torch.from_numpy(astronaut()[20:276, 120:376].copy()).permute(2, 0, 1).float()[None] / 255.0
    face = F.interpolate(face, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    g = torch.Generator().manual_seed(seed)
    noisy = (face + 0.1 * torch.randn((n, 3, size, size), generator=g)).clamp(0, 1)
    return noisy, face.expand(n, -1, -1, -1).contiguous()


def test_lpips_random_backbone_equals_package():
    import lpips

    metric = M.LPIPSMetric("alex", RANDOM_INIT)
    assert metric.name == "lpips_alex" and metric.weights_identity == RANDOM_INIT
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    ref.load_state_dict(metric.model.state_dict())  # same random backbone, the package's linear heads
    x, y = _face_batch(3)
    ours = metric(x, y)
    with torch.no_grad():
        expected = ref(x * 2 - 1, y * 2 - 1).flatten()
    assert ours.shape == (3,)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(metric(y, y), torch.zeros(3), atol=1e-7)


@pytest.fixture(scope="module")
def alexnet_state(tmp_path_factory):
    import torchvision

    torch.manual_seed(123)
    sd = torchvision.models.alexnet().state_dict()
    path = tmp_path_factory.mktemp("tv") / "alexnet_random.pth"
    torch.save(sd, path)
    return sd, path


def test_lpips_backbone_from_configured_path(alexnet_state, monkeypatch):
    import lpips
    import torchvision

    sd, path = alexnet_state
    metric = M.LPIPSMetric("alex", str(path))
    assert metric.weights_identity.startswith("sha256:") and metric.weights_identity.endswith("alexnet_random.pth")
    x, y = _face_batch(2, seed=1)
    assert not torch.allclose(metric(x, y), M.LPIPSMetric("alex", RANDOM_INIT)(x, y))  # the file's weights are used
    tv_alexnet = torchvision.models.alexnet

    def alexnet_with_sd(*args, **kwargs):  # lpips builds its trunk from torchvision's alexnet(pretrained=True)
        model = tv_alexnet()
        model.load_state_dict(sd)
        return model

    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", alexnet_with_sd)
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False).eval()
    with torch.no_grad():
        expected = ref(x, y, normalize=True).flatten()
    assert torch.allclose(metric(x, y), expected, rtol=1e-6, atol=1e-7)


def test_lpips_unavailable_without_weights_and_hub_cache(alexnet_state, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(M.MetricUnavailableError, match="alexnet-owt-7be5be79.pth"):
        M.LPIPSMetric("alex")
    with pytest.raises(M.MetricUnavailableError, match="weights not found"):
        M.LPIPSMetric("alex", str(tmp_path / "missing.pth"))
    # the torch hub cache route: the same file under $TORCH_HOME/hub/checkpoints is picked up
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "alexnet-owt-7be5be79.pth").write_bytes(alexnet_state[1].read_bytes())
    x, y = _face_batch(2, seed=2)
    assert torch.equal(M.LPIPSMetric("alex")(x, y), M.LPIPSMetric("alex", str(alexnet_state[1]))(x, y))
    with pytest.raises(ValueError, match="net must be"):
        M.LPIPSMetric("squeeze", RANDOM_INIT)


def test_lpips_vgg_backbone_mapping():
    """torchvision vgg16 `features.<i>` lands in lpips' `slice<k>.<i>` for every layer lpips uses (0..29)."""
    import torchvision

    metric = M.LPIPSMetric("vgg", RANDOM_INIT)
    assert metric.name == "lpips_vgg"
    with torch.device("meta"):
        features = torchvision.models.vgg16().features
    features = features.to_empty(device="cpu")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in features.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    M._copy_backbone(metric.model.net, features)
    lp = dict(metric.model.net.named_parameters())
    tv = dict(features.named_parameters())
    assert len(lp) == 26 and len(tv) == 26  # 13 convs, weight + bias
    for name, p in lp.items():
        slice_name, idx, what = name.split(".")
        assert torch.equal(p, tv[f"{idx}.{what}"]), name
    x, y = _face_batch(2, size=32, seed=6)
    assert (metric(x, y) > 0).all()


# ------------------------------------------------------------------------------------------- FID


def test_fid_stats_batched_equals_single_pass():
    rng = np.random.default_rng(0)
    d = 16
    feats = rng.gamma(2.0, 0.3, (300, d)) @ rng.normal(size=(d, d))
    single = M.FIDStats(d).update(feats)
    # batch by batch, as the benchmark accumulates it: any split equals the single pass
    batched = M.FIDStats(d)
    for a, b in ((0, 7), (7, 150), (150, 151), (151, 300)):
        batched.update(feats[a:b])
    assert batched.count == single.count == 300
    assert np.allclose(batched.mean, single.mean, rtol=0, atol=1e-10)
    assert np.allclose(batched.cov, single.cov, rtol=0, atol=1e-10)
    assert np.allclose(single.mean, feats.mean(axis=0), rtol=0, atol=1e-10)
    assert np.allclose(single.cov, np.cov(feats, rowvar=False), rtol=0, atol=1e-10)
    with pytest.raises(ValueError):
        M.FIDStats(d).update(feats[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        _ = M.FIDStats(d).update(feats[:1]).cov


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_references():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-10, abs=1e-10)
    # symmetric form: Tr sqrtm(S1 S2) = Tr sqrtm(sqrt(S1) S2 sqrt(S1))
    r1 = linalg.sqrtm(s1)
    sym = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(np.real(sym), rel=1e-8)
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12, abs=1e-12)
    # stats from features: identical sets give 0, and fid_from_stats is frechet_distance of mean/cov
    feats = rng.normal(size=(50, d))
    st = M.FIDStats(d).update(feats)
    assert abs(M.fid_from_stats(st, M.FIDStats(d).update(feats))) < 1e-9
    # a rank-deficient covariance (fewer samples than dimensions) still gives a finite real number
    low = M.FIDStats(d).update(rng.normal(size=(5, d)))
    assert np.isfinite(M.fid_from_stats(low, st))


def _sqrtm_fid(mu1, s1, mu2, s2):
    """The textbook computation the eigh form replaced: scipy sqrtm of the non-symmetric product."""
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2)))


def _features_fid(f1, f2):
    """Exact from the features: Tr sqrtm(S1 S2) = nuclear norm of X1c X2c^T / sqrt((n1 - 1)(n2 - 1))."""
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    dmu = f1.mean(0) - f2.mean(0)
    tr = linalg.svdvals(x1 @ x2.T).sum() / np.sqrt((len(f1) - 1) * (len(f2) - 1))
    return dmu @ dmu + np.trace(np.cov(f1, rowvar=False)) + np.trace(np.cov(f2, rowvar=False)) - 2 * tr


@pytest.mark.parametrize("n1, n2", [(400, 500), (100, 150), (60, 300)], ids=["full-rank", "rank-def", "rank-def-1"])
def test_frechet_distance_256d_against_scipy_sqrtm(n1, n2):
    """256-d pool3-like statistics (ReLU-ish features through a random, ill-conditioned mixing).

    With fewer samples than dimensions both covariances are singular; scipy's sqrtm of the singular product
    then carries ~6e-8 relative error from the square roots of round-off eigenvalues, which the eigh form
    zeroes (it matches the exact nuclear-norm value from the features to ~1e-13) when the lower-rank
    covariance comes first.
    """
    rng = np.random.default_rng(n1)
    d = 256
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    f1 = np.abs(rng.normal(size=(n1, d))) @ mix
    f2 = np.abs(rng.normal(size=(n2, d))) @ mix + 0.05
    a, b = M.FIDStats(d).update(f1), M.FIDStats(d).update(f2)
    got = M.frechet_distance(a.mean, a.cov, b.mean, b.cov)  # lower-rank covariance first: exact
    assert got == pytest.approx(_sqrtm_fid(a.mean, a.cov, b.mean, b.cov), rel=1e-6 if n1 < d else 1e-8)
    assert got == pytest.approx(_features_fid(f1, f2), rel=1e-10)
    # the other order: round-off in A's null space, ~1e-8 relative like sqrtm; fid_from_stats reorders
    assert M.frechet_distance(b.mean, b.cov, a.mean, a.cov) == pytest.approx(got, rel=1e-6)
    assert M.fid_from_stats(b, a) == M.fid_from_stats(a, b) == got
    # identical statistics: 0 up to round-off and never negative (clamped), also when accumulated differently
    for x, f in ((a, f1), (b, f2)):
        for y in (x, M.FIDStats(d).update(f[::-1])):
            assert 0.0 <= M.fid_from_stats(x, y) < 1e-8


def test_frechet_distance_rejects_non_covariances():
    rng = np.random.default_rng(3)
    d = 8
    mu, s = rng.normal(size=d), _random_spd(rng, d)
    with pytest.raises(ValueError, match="positive semi-definite"):
        M.frechet_distance(mu, -s, mu, s)
    with pytest.raises(ValueError, match="positive semi-definite"):
        M.frechet_distance(mu, s, mu, s - 2 * np.eye(d) * np.linalg.eigvalsh(s).max())
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(mu, np.full((d, d), np.nan), mu, s)
    with pytest.raises(ValueError, match="shape"):
        M.frechet_distance(mu, s, mu[:-1], s[:-1, :-1])
    # zero covariance (one repeated feature): the distance is the squared mean difference plus Tr(S2)
    assert M.frechet_distance(mu, np.zeros((d, d)), mu + 1, s) == pytest.approx(d + np.trace(s), rel=1e-12)


@pytest.fixture(scope="module")
def inception_state(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(7)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inc") / "inception_random.pth"
    torch.save(model.state_dict(), path)
    return model.state_dict(), path


def test_inception_features_pool3(inception_state, tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    sd, path = inception_state
    feat = M.InceptionFeatures(str(path))
    x, _ = _face_batch(1, size=48, seed=3)
    ours = feat(x)
    assert ours.shape == (1, 2048) and ours.dtype == torch.float64
    # reference: torchvision's model with the same state_dict, avgpool output captured by a hook
    ref = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True).eval()
    ref.load_state_dict(sd)
    pooled = {}
    ref.avgpool.register_forward_hook(lambda m, i, o: pooled.setdefault("x", o.flatten(1)))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x299 = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref((x299 - mean) / std)
    assert torch.allclose(ours.float(), pooled["x"], rtol=1e-5, atol=1e-12)
    assert (ours > 0).any()  # random-init features are tiny (~1e-8) but not all zero
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(M.MetricUnavailableError, match="inception_v3_google"):
        M.InceptionFeatures()


# ------------------------------------------------------------------------------------------- identity


@pytest.fixture(scope="module")
def arcface_checkpoint(tmp_path_factory):
    torch.manual_seed(11)
    model = M.iresnet50()
    with torch.no_grad():  # non-trivial BN statistics so that every tensor matters
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("arc") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_iresnet50_layout_matches_arcface_torch():
    sd = M.iresnet50().state_dict()
    # key names / shapes of insightface recognition/arcface_torch/backbones/iresnet.py (iresnet50: 3, 4, 14, 3)
    expected = {
        "conv1.weight": (64, 3, 3, 3),
        "bn1.running_var": (64,),
        "prelu.weight": (64,),
        "layer1.0.bn1.weight": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.0.prelu.weight": (64,),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer1.0.downsample.1.running_mean": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.3.bn3.weight": (128,),
        "layer3.13.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.2.conv2.weight": (512, 512, 3, 3),
        "bn2.weight": (512,),
        "fc.weight": (512, 512 * 7 * 7),
        "fc.bias": (512,),
        "features.weight": (512,),
        "features.running_var": (512,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    for absent in ("layer3.14.bn1.weight", "layer2.4.bn1.weight", "layer1.1.downsample.0.weight"):
        assert absent not in sd
    assert not any(k.startswith("AuxLogits") or "se." in k for k in sd)


def test_identity_strict_load_and_self_similarity(arcface_checkpoint, tmp_path):
    model, path = arcface_checkpoint
    emb = M.IdentityEmbedder(str(path))
    assert emb.weights_identity.endswith("backbone.pth")
    loaded, saved = emb.model.state_dict(), model.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    x, face = _face_batch(1, size=112, seed=4)
    e = emb.embed(x)
    with torch.no_grad():  # the checkpoint's network on (x - 0.5) / 0.5, L2-normalised
        expected = F.normalize(model((x - 0.5) / 0.5), dim=1)
    assert e.shape == (1, 512) and torch.allclose(e.norm(dim=1), torch.ones(1), atol=1e-5)
    assert torch.allclose(e, expected, atol=1e-5)
    cos, deg = emb.compare(torch.cat([face, x]), torch.cat([face, face]))
    assert cos[0].item() == pytest.approx(1.0, abs=1e-9) and abs(deg[0].item()) < 1e-2  # a face vs itself
    assert cos[1] < 1 - 1e-6 and deg[1] > 0.05  # vs a noisy copy
    assert torch.allclose(torch.rad2deg(torch.arccos(cos)), deg)
    # strict: a checkpoint with other keys is refused; a missing file makes the metric unavailable
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="missing"):
        M.IdentityEmbedder(str(tmp_path / "partial.pth"))
    with pytest.raises(M.MetricUnavailableError, match="weights not found"):
        M.IdentityEmbedder(str(tmp_path / "absent.pth"))
    with pytest.raises(M.MetricUnavailableError, match="no ArcFace"):
        M.IdentityEmbedder(None)


# ------------------------------------------------------------------------------------------- suite


def test_suite_all_metrics(tmp_path, monkeypatch, arcface_checkpoint, inception_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache: lpips_vgg is unavailable
    suite = M.MetricSuite(
        list(M.METRIC_NAMES), "cpu",
        weights={"lpips_alex": RANDOM_INIT, "identity": str(arcface_checkpoint[1]),
                 "fid_tv_inception": str(inception_state[1])},
    )
    # empty hub cache, nothing configured: unavailable, with the reason
    assert set(suite.unavailable) == {"lpips_vgg", "fid_tf_inception", "niqe"}
    assert "pt_inception-2015-12-05" in suite.unavailable["fid_tf_inception"]
    assert "vgg16-397923af.pth" in suite.unavailable["lpips_vgg"]
    assert suite.weights_identity["ids"].endswith("backbone.pth")
    assert suite.weights_identity["lpips_alex"] == RANDOM_INIT
    x, y = _face_batch(2, size=64, seed=5)
    r8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    g8 = (y * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = suite(r8, g8)
    assert set(out.values) == {"psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips_alex", "ids", "deg", "lmd_mtcnn5"}
    assert out.unavailable == suite.unavailable
    for name, v in out.values.items():
        assert v.shape == (2,) and v.dtype == np.float64
        assert np.isfinite(v).all() or name == "lmd_mtcnn5"  # (no face found on a noisy 64 px crop: NaN)
    np.testing.assert_allclose(out.values["psnr_rgb"], M.psnr(_t(r8), _t(g8)).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.values["ssim_y"], M.ssim(_t(r8), _t(g8), y_channel=True).numpy(), atol=1e-12)
    lp = suite.lpips["lpips_alex"](_t(r8, torch.float32), _t(g8, torch.float32)).numpy()
    np.testing.assert_allclose(out.values["lpips_alex"], lp, rtol=1e-6)
    np.testing.assert_allclose(np.rad2deg(np.arccos(out.values["ids"])), out.values["deg"], atol=1e-6)
    tv = out.fid_features["fid_tv_inception"]
    assert set(out.fid_features) == {"fid_tv_inception"} and set(tv) == {"restored", "gt"}
    assert tv["gt"].shape == (2, 2048)
    np.testing.assert_allclose(tv["gt"], suite.fid["fid_tv_inception"](_t(g8, torch.float32)).numpy(), rtol=1e-4)


def test_suite_unavailable_and_ragged_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    suite = M.MetricSuite(["psnr_y", "ssim_rgb", "ids", "deg", "fid_tv_inception"], weights={"identity": None})
    assert set(suite.unavailable) == {"ids", "deg", "fid_tv_inception"} and suite.available == ["psnr_y", "ssim_rgb"]
    rng = np.random.default_rng(6)
    shapes = [(20, 24, 3), (32, 32, 3), (20, 24, 3)]
    gts = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    res = [np.clip(g.astype(int) + rng.integers(-20, 21, g.shape), 0, 255).astype(np.uint8) for g in gts]
    out = suite(res, gts)
    assert set(out.values) == {"psnr_y", "ssim_rgb"} and out.fid_features == {}
    for i in range(3):
        assert out.values["ssim_rgb"][i] == pytest.approx(_sk_ssim(res[i] / 255.0, gts[i] / 255.0), abs=1e-10)
        assert out.values["psnr_y"][i] == pytest.approx(
            peak_signal_noise_ratio(_y_np(gts[i]), _y_np(res[i]), data_range=1.0), abs=1e-10)
    batch = suite(np.stack([res[0], res[2]]), np.stack([gts[0], gts[2]]))  # (B, H, W, 3) numpy ...
    np.testing.assert_array_equal(batch.values["ssim_rgb"], out.values["ssim_rgb"][[0, 2]])
    as_torch = suite(torch.from_numpy(np.stack([res[0], res[2]])), torch.from_numpy(np.stack([gts[0], gts[2]])))
    np.testing.assert_array_equal(as_torch.values["psnr_y"], out.values["psnr_y"][[0, 2]])  # ... or torch uint8
    real_world = suite(res, None)  # no ground truth: full-reference metrics are not applicable, no number
    assert set(real_world.not_applicable) == {"psnr_y", "ssim_rgb"} and "no ground truth" in real_world.not_applicable[
        "psnr_y"]
    assert np.isnan(real_world.values["psnr_y"]).all() and real_world.values["psnr_y"].shape == (3,)
    empty = suite(np.zeros((0, 16, 16, 3), np.uint8), np.zeros((0, 16, 16, 3), np.uint8))
    assert empty.values["psnr_y"].shape == (0,)
    with pytest.raises(ValueError, match="unknown"):
        M.MetricSuite(["psnr"])
    with pytest.raises(ValueError, match="unknown weights keys"):
        M.MetricSuite(["ids"], weights={"arcface": "x.pth"})
    with pytest.raises(TypeError, match="uint8"):
        suite(res[0][None].astype(np.float32), gts[0][None].astype(np.float32))
    with pytest.raises(ValueError, match="differ"):
        suite([res[0]], [gts[1]])


def test_bench_metrics_smoke(tmp_path, capsys):
    import json

    from bench import bench_metrics as bench

    threads = torch.get_num_threads()
    result = bench.main(["--sizes", "24", "--batch", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                         "--metrics", "psnr_y,ssim_rgb", "--json", str(tmp_path / "b.json")])
    assert torch.get_num_threads() == threads
    assert [r["metric"] for r in result["rows"]] == ["psnr_y", "ssim_rgb"]
    assert all(r["batched_ips"] > 0 and r["loop_ips"] > 0 and r["skimage_ips"] > 0 for r in result["rows"])
    assert "batched/loop" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["rows"][1]["size"] == 24


def test_bench_metrics_suite_smoke(capsys):
    from bench import bench_metrics as bench

    result = bench.main(["--suite", "psnr_y", "--new", "niqe,lmd_mtcnn5", "--sizes", "96", "--batch", "2",
                         "--repeats", "1", "--warmup", "0", "--threads", "1"])
    (row,) = result["rows"]
    assert row["base"] == "psnr_y" and row["new"] == "niqe,lmd_mtcnn5"
    assert row["base_ips"] > row["with_new_ips"] > 0 and row["slowdown"] > 1
    assert "img/s" in capsys.readouterr().out

"""RRDBNet (Real-ESRGAN): checkpoint layouts of the released x4plus / x2plus, and tiled == untiled inference."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.rrdbnet import RRDBNet, realesrgan_config, receptive_radius
from models.tiling import plan_windows, tiled_upscale
from tasks.weights import WeightsError, load_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA = Path(__file__).resolve().parent / "data"


def read_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (DATA / name).read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(d) for d in shape.strip("()").replace(" ", "").split(",") if d)))
    return rows


@pytest.mark.parametrize("scale, layout", [(4, "realesrgan_x4plus_keys.tsv"), (2, "realesrgan_x2plus_keys.tsv")])
def test_full_size_layout_loads_a_params_ema_checkpoint_strictly(scale, layout, tmp_path):
    model = RRDBNet(**realesrgan_config(scale))
    rows = read_layout(layout)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == rows
    # ESRGAN's published size; x2plus differs only by conv_first's 12 (unshuffled) input channels.
    assert sum(p.numel() for p in model.parameters()) == 16_697_987 + (scale == 2) * 9 * 64 * 9
    g = torch.Generator().manual_seed(scale)
    sd = {k: torch.randn(shape, generator=g) for k, shape in rows}
    path = tmp_path / f"RealESRGAN_x{scale}plus.pth"
    torch.save({"params_ema": sd, "params": {k: v * 0 for k, v in sd.items()}}, path)
    identity = load_weights(model, str(path), key="params_ema")
    assert identity.startswith("sha256:") and identity.endswith(path.name)
    assert torch.equal(model.conv_first.weight, sd["conv_first.weight"])
    assert torch.equal(model.body[22].rdb3.conv5.bias, sd["body.22.rdb3.conv5.bias"])
    # the other scale's file does not fit: conv_first's input channels differ (3 vs 12)
    other = RRDBNet(**realesrgan_config(6 - scale))
    with pytest.raises(WeightsError, match="conv_first.weight"):
        load_weights(other, str(path), key="params_ema")


def test_x2_input_is_unshuffled_as_basicsr_does():
    """BasicSR's pixel_unshuffle: view (b, c, h, 2, w, 2), permute (0, 1, 3, 5, 2, 4) -> channel c*4 + i*2 + j."""
    torch.manual_seed(0)
    model = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4).eval()
    x = torch.rand(2, 3, 10, 14)
    b, c, h, w = x.shape
    ref = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(ref, model.conv_first.weight, model.conv_first.bias, padding=1)
        got = model.conv_first(torch.nn.functional.pixel_unshuffle(x, 2))
        assert torch.allclose(got, expected, atol=1e-6)
        assert model(x).shape == (2, 3, 20, 28)
    assert RRDBNet(scale=4, num_feat=8, num_block=1, num_grow_ch=4)(torch.rand(1, 3, 5, 7)).shape == (1, 3, 20, 28)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colours plus fine noise: structure at every scale."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    smooth = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def tiny(scale: int) -> RRDBNet:
    """A tiny random RRDBNet whose head is rescaled so its output on photo() has mean 0.5 and std 0.15 (a random
    head either saturates the clamp or is flat, and both would hide tiling errors)."""
    torch.manual_seed(scale)
    model = RRDBNet(scale=scale, num_feat=8, num_block=1, num_grow_ch=4).eval()
    with torch.no_grad():
        y = model(torch.from_numpy(photo(64, 64)).permute(2, 0, 1)[None].float() / 255)
        k = 0.15 / y.std((0, 2, 3))  # per output channel
        model.conv_last.weight.mul_(k[:, None, None, None])
        model.conv_last.bias.copy_(0.5 - k * (y.mean((0, 2, 3)) - model.conv_last.bias))
    return model


def safe_mask(h: int, w: int, tile: int, pad: int, radius: int, scale: int, multiple: int = 1) -> np.ndarray:
    """Output pixels whose receptive field stays inside their window (or reaches only the photo's edge)."""
    hp, wp = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    safe = np.zeros((hp, wp), bool)
    ys, xs = np.arange(hp)[:, None], np.arange(wp)[None, :]
    for win in plan_windows(hp, wp, tile, pad, multiple):
        ok_y = ((ys - win.wy0 >= radius) | (win.wy0 == 0)) & ((win.wy1 - 1 - ys >= radius) | (win.wy1 == hp))
        ok_x = ((xs - win.wx0 >= radius) | (win.wx0 == 0)) & ((win.wx1 - 1 - xs >= radius) | (win.wx1 == wp))
        core = np.zeros((hp, wp), bool)
        core[win.cy0 : win.cy1, win.cx0 : win.cx1] = True
        safe |= core & ok_y & ok_x
    return np.kron(safe[:h, :w], np.ones((scale, scale), bool))


@pytest.mark.parametrize("scale, size", [(4, (96, 112)), (2, (97, 131))])  # x2: odd sides need the mod pad
def test_tiled_equals_untiled_where_the_receptive_field_fits(scale, size):
    model, img = tiny(scale), photo(*size)
    mult = 2 if scale == 2 else 1
    radius = receptive_radius(1, scale)
    whole = tiled_upscale(model, [img], scale, tile=0, multiple=mult)[0]
    assert whole.shape == (size[0] * scale, size[1] * scale, 3) and whole.std() > 20  # not clamped flat

    # pad >= the receptive radius: every pixel is the untiled one (float summation order: <= 1 level, rarely)
    full = tiled_upscale(model, [img], scale, tile=32, pad=radius, batch=3, multiple=mult)[0]
    diff = np.abs(full.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3

    # no pad: visible seams (the check below can see what a pad changes)
    seams = tiled_upscale(model, [img], scale, tile=48, pad=0, batch=4, multiple=mult)[0]
    assert np.abs(seams.astype(int) - whole.astype(int)).max() > 50

    # a small pad: exact away from the inner tile edges, and within a stated tolerance across them
    small = tiled_upscale(model, [img], scale, tile=48, pad=4, batch=4, multiple=mult)[0]
    diff = np.abs(small.astype(int) - whole.astype(int))
    safe = safe_mask(*size, tile=48, pad=4, radius=radius, scale=scale, multiple=mult)
    assert 0.05 < safe.mean() < 0.95
    assert diff[safe].max() <= 1
    # stated tolerance within `radius` of a seam at pad 4 for this network: mean <= 0.5 levels, 99th pct <= 8
    assert diff[~safe].mean() <= 0.5 and np.percentile(diff[~safe], 99) <= 8


def test_batching_across_photos_and_out_scale():
    model = tiny(4)
    imgs = [photo(64, 80, 1), photo(64, 80, 2), photo(40, 30, 3)]
    one_by_one = [tiled_upscale(model, [im], 4, tile=32, pad=16, batch=3)[0] for im in imgs]
    # a photo's forwards are its own (same windows, same chunks) whatever photos come with it: equal bytes
    together = tiled_upscale(model, imgs, 4, tile=32, pad=16, batch=3)
    assert all(np.array_equal(a, b) for a, b in zip(one_by_one, together))
    # across images: fuller forwards, the same up to the last bits of batched convolutions
    shared = tiled_upscale(model, imgs, 4, tile=32, pad=16, batch=5, across_images=True)
    for a, b in zip(one_by_one, shared):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # out_scale 2 from the x4 network: the 2x2 box mean of its output, tile by tile
    half = tiled_upscale(model, imgs[:1], 4, out_scale=2, tile=32, pad=16)[0]
    ref = tiled_upscale(model, imgs[:1], 4, out_scale=4, tile=0)[0].astype(np.float64)
    ref = ref.reshape(64 * 2, 2, 80 * 2, 2, 3).mean((1, 3))
    assert half.shape == (128, 160, 3) and np.abs(half - ref).max() <= 1.01
    with pytest.raises(ValueError, match="must divide"):
        tiled_upscale(model, imgs[:1], 4, out_scale=3)


def test_windows_cover_every_pixel_once_with_equal_sizes():
    for h, w, tile, pad, m in [(100, 37, 16, 5, 1), (64, 64, 0, 8, 1), (98, 130, 30, 7, 2), (10, 12, 64, 8, 2)]:
        wins = plan_windows(h, w, tile, pad, m)
        cover = np.zeros((h, w), int)
        for win in wins:
            cover[win.cy0 : win.cy1, win.cx0 : win.cx1] += 1
            assert win.wy0 <= win.cy0 and win.cy1 <= win.wy1 and win.wx0 <= win.cx0 and win.cx1 <= win.wx1
            assert win.wy0 % m == 0 and win.wx0 % m == 0 and (win.wy1 - win.wy0) % m == 0
        assert (cover == 1).all()
        assert len({(w.wy1 - w.wy0, w.wx1 - w.wx0) for w in wins}) == 1

"""SPARNetHD: checkpoint layout of the released 512 model and equality with the reference's function."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.sparnethd import SPARNetHD, from_config, sparnethd_config

# shared/ inside the checkout when present, else the workspace's copy next to it.
_ROOT = Path(__file__).resolve().parents[1]
from tests.vectors import SHARED  # noqa: E402  (../shared beside the clone)

LAYOUT = SHARED / "checkpoint-layouts" / "sparnethd512.tsv"
VECTORS = SHARED / "test-vectors"


def _layout() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in LAYOUT.read_text().splitlines():
        key, shape = line.split("\t")
        dims = shape.strip("()").replace(" ", "").split(",")
        rows.append((key, tuple(int(d) for d in dims if d)))
    return rows


@pytest.fixture(scope="module")
def full_model() -> SPARNetHD:
    torch.manual_seed(0)
    return from_config(sparnethd_config())


@pytest.fixture(scope="module")
def tiny():
    cfg = json.loads((VECTORS / "tiny_sparnet_config.json").read_text())
    model = from_config(cfg)
    state = torch.load(VECTORS / "tiny_sparnet_state_dict.pt", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    data = np.load(VECTORS / "tiny_sparnet_forward.npz")
    return model, torch.from_numpy(data["x"]), torch.from_numpy(data["out"])


def test_full_layout_matches_checkpoint(full_model):
    layout = _layout()
    sd = full_model.state_dict()
    assert len(layout) == 892
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == layout
    assert sum(p.numel() for p in full_model.parameters()) == 85_793_412
    # u/v of spectral norm are buffers, not parameters.
    params = dict(full_model.named_parameters())
    assert "out_conv.conv2d.weight_orig" in params
    assert "out_conv.conv2d.weight_u" not in params
    assert "res_layers.0.att_func.b1_1.conv2d.weight_orig" in params


def test_full_random_checkpoint_loads_strictly(full_model, tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=g) for k, shape in _layout()}
    path = tmp_path / "sparnethd_random.pth"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    full_model.load_state_dict(loaded, strict=True)
    sd = full_model.state_dict()
    for key in (
        "encoder.0.conv2d.weight_orig",
        "encoder.1.preact_func.0.norm.weight",
        "decoder.3.att_func.out_block.0.conv2d.weight_v",
        "out_conv.conv2d.bias",
    ):
        assert torch.equal(sd[key], state[key])


def test_full_architecture_facts(full_model):
    m = full_model
    assert len(m.encoder) == 5 and len(m.res_layers) == 9 and len(m.decoder) == 4
    assert [blk.att_func.depth for blk in m.encoder[1:]] == [4, 3, 2, 1]
    assert {blk.att_func.depth for blk in m.res_layers} == {1}
    assert [blk.att_func.depth for blk in m.decoder] == [2, 3, 4, 5]
    assert m.encoder[0].conv2d.weight_orig.shape == (102, 3, 3, 3)
    assert m.out_conv.conv2d.weight_orig.shape == (3, 102, 3, 3)


def test_tiny_forward_matches_reference(tiny):
    model, x, ref = tiny
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape == (2, 3, 64, 64)
    err = (out - ref).abs().max().item()
    # float32 agreement relative to the output's scale (|out| reaches ~8): the convolution kernels oneDNN
    # picks differ between CPU models, 1.3e-5 absolute (1.6e-6 relative) on some
    assert err < 1e-5 * max(1.0, ref.abs().max().item()), f"max abs error {err}"


def test_eval_deterministic_and_keeps_spectral_buffers(tiny):
    model, x, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("_u", "_v"))}
    assert before
    with torch.no_grad():
        a = model(x)
        b = model(x)
    assert torch.equal(a, b)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_channels_last_and_bf16_autocast(tiny):
    model, x, ref = tiny
    model_cl = model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
        assert (out_cl - ref).abs().max().item() < 1e-4
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = model_cl(x.contiguous(memory_format=torch.channels_last))
        assert out_bf.shape == ref.shape and torch.isfinite(out_bf).all()
        rel = (out_bf.float() - ref).norm() / ref.norm()
        assert rel < 0.1, f"bf16 relative error {rel}"
    finally:
        model.to(memory_format=torch.contiguous_format)


def test_size_alias_and_no_spectral_norm():
    m = SPARNetHD(min_ch=16, max_ch=32, size=64, min_feat_size=16, res_depth=2, spectral_norm=False)
    assert m.in_size == m.out_size == 64
    keys = m.state_dict().keys()
    assert "encoder.0.conv2d.weight" in keys and not any(k.endswith("weight_orig") for k in keys)
    with torch.no_grad():
        y = m.eval()(torch.zeros(1, 3, 64, 64).uniform_(-1, 1))
    assert y.shape == (1, 3, 64, 64)

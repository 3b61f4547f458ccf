"""models/unet.py: checkpoint layouts, reference outputs, timesteps, precision, batch invariance."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.unet import AttentionBlock, UNetModel, difface_unet_config, dr2_unet_config
from tests.vectors import SHARED  # noqa: E402  (../shared beside the clone)

LAYOUTS = SHARED / "checkpoint-layouts"
VECTORS = SHARED / "test-vectors"



def randomize_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (fixed seed), at scales that keep activations O(1).

    A fresh UNet outputs exactly 0 (zero-initialised output convs), which would make comparisons vacuous.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if isinstance(module, nn.GroupNorm) and name == "weight":
                    r = 1.0 + 0.1 * r
                elif p.ndim > 1:
                    r = r / math.sqrt(p[0].numel())
                else:
                    r = 0.1 * r
                p.copy_(r.to(p.dtype))
    return model


def tiny_model(name: str = "tiny_unet", seed: int = 0) -> UNetModel:
    cfg = json.loads((VECTORS / f"{name}_config.json").read_text())
    model = UNetModel.from_config(cfg, attention_at_feature_sizes="difface" in name).eval()
    return randomize_parameters(model, seed)


def read_layout(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layouts of the real models


@pytest.mark.parametrize(
    "config_fn, layout, n_tensors, n_params",
    [
        (dr2_unet_config, "dr2_ffhq256_unet.tsv", 362, 93_563_910),
        (difface_unet_config, "difface_iddpm_ffhq512_unet.tsv", 630, 159_788_454),
    ],
)
def test_full_size_layout_and_strict_load(config_fn, layout, n_tensors, n_params, tmp_path):
    rows = read_layout(LAYOUTS / layout)
    assert len(rows) == n_tensors

    with torch.device("meta"):
        model = UNetModel(**config_fn())
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == rows  # same keys, shapes and order
    assert sum(v.numel() for v in sd.values()) == n_params

    # The user's path with a real checkpoint: plain state_dict file -> weights_only load -> strict load.
    g = torch.Generator().manual_seed(0)
    fake = {k: torch.randn(shape, generator=g) for k, shape in rows}
    path = tmp_path / "ckpt.pt"
    torch.save(fake, path)
    probe = {k: fake[k].clone() for k in (rows[0][0], rows[len(rows) // 2][0], rows[-1][0])}
    del fake
    loaded = torch.load(path, weights_only=True, mmap=True)
    model = model.to_empty(device="cpu")
    result = model.load_state_dict(loaded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    params = dict(model.state_dict())
    for k, v in probe.items():
        assert torch.equal(params[k], v)


# ---------------------------------------------------------------------------------------------------------
# Reference outputs (guided-diffusion / DifFace code, random weights, CPU fp32)


@pytest.mark.parametrize("name", ["tiny_unet", "tiny_difface_unet"])
def test_tiny_reference_forward(name):
    cfg = json.loads((VECTORS / f"{name}_config.json").read_text())
    # DifFace's UNet takes attention_resolutions as feature-map sizes; guided-diffusion's as factors.
    model = UNetModel.from_config(cfg, attention_at_feature_sizes="difface" in name).eval()
    sd = torch.load(VECTORS / f"{name}_state_dict.pt", weights_only=True)
    model.load_state_dict(sd, strict=True)
    data = np.load(VECTORS / f"{name}_forward.npz")
    x, t, ref = (torch.from_numpy(data[k]) for k in ("x", "timesteps", "out"))
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == ref.shape and out.dtype == torch.float32
    max_abs = (out - ref).abs().max().item()
    assert max_abs < 1e-5 * max(1.0, ref.abs().max().item()), max_abs
    assert rel_err(out, ref) < 1e-5
    # The batched path (no per-sample split) must agree as well.
    model.batch_invariant_cpu = False
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref, atol=1e-5, rtol=1e-5)


def test_tiny_dr2_has_attention_and_updown():
    # Guards the tiny reference test's coverage: it exercises legacy attention and up/down ResBlocks.
    model = tiny_model("tiny_unet")
    assert any(isinstance(m, AttentionBlock) for m in model.input_blocks.modules())
    assert any(getattr(m, "updown", False) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------
# Timesteps


def test_per_sample_timesteps_match_single_runs():
    model = tiny_model()
    model.batch_invariant_cpu = False  # exercise the genuinely batched computation
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([999, 10, 500])
    with torch.no_grad():
        batch = model(x, t)
        singles = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(3)])
        same_t = model(x, torch.full((3,), 10))
    # Batched and single kernels may sum in different orders: float32 rounding only.
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    assert rel_err(batch, singles) < 1e-6
    assert not torch.allclose(batch[0], same_t[0], atol=1e-3)  # the timestep really conditions the output


def test_scalar_timestep_broadcast():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x, torch.tensor([250, 250]))
        for t in (250, 250.0, torch.tensor(250), torch.tensor(250.0), torch.tensor([250])):
            assert torch.equal(model(x, t), ref), t
        with pytest.raises(ValueError):
            model(x, torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------------------------------------------------
# Precision and memory format


@pytest.mark.parametrize("name", ["tiny_unet", "tiny_difface_unet"])
def test_bf16_autocast_close_to_fp32(name):
    model = tiny_model(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700, 3])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert 0 < err < 5e-2, err


def test_bf16_input_and_fp16_autocast():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([100, 900])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.bfloat16(), t)
        assert out.dtype == torch.bfloat16  # output in the input's dtype
        assert rel_err(out, ref) < 5e-2
        with torch.autocast("cpu", dtype=torch.float16):
            out16 = model(x, t)
        assert out16.dtype == torch.float32 and rel_err(out16, ref) < 1e-2


@pytest.mark.parametrize("name", ["tiny_unet", "tiny_difface_unet"])
def test_channels_last_matches_fp32(name):
    model = tiny_model(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([42, 420])
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Batch invariance (CPU fp32): a sample's result must not depend on what it is batched with


@pytest.mark.parametrize("name", ["tiny_unet", "tiny_difface_unet"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_invariance_bit_identical(name, channels_last):
    model = tiny_model(name, seed=7)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([999, 10, 500, 0])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        batch = model(x, t)
        permuted = model(x[perm], t[perm])
        for k in range(4):
            alone = model(x[k : k + 1], t[k : k + 1])
            assert torch.equal(batch[k : k + 1], alone), k
            assert torch.equal(permuted[(perm == k).nonzero().item()], batch[k]), k
        pair = model(x[[3, 1]], t[[3, 1]])
    assert torch.equal(pair, batch[[3, 1]])


# ---------------------------------------------------------------------------------------------------------
# Attention semantics


def _attention_reference(block: AttentionBlock, x: torch.Tensor, legacy: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(ch)) v with the reference's qkv channel order, written independently."""
    b, c, hgt, wid = x.shape
    heads = block.num_heads
    ch = c // heads
    qkv = nn.functional.conv1d(block.norm(x).reshape(b, c, -1), block.qkv.weight, block.qkv.bias)
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, ch, -1) for z in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    h = nn.functional.conv1d(a, block.proj_out.weight, block.proj_out.bias)
    return x + h.reshape(b, c, hgt, wid)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_block_matches_explicit_softmax(legacy):
    block = randomize_parameters(
        AttentionBlock(64, num_head_channels=16, use_new_attention_order=not legacy), 8
    )
    assert block.num_heads == 4
    x = torch.randn(2, 64, 6, 5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(block(x), _attention_reference(block, x, legacy), atol=1e-5, rtol=1e-5)


def test_attention_num_heads_without_head_channels():
    assert AttentionBlock(64, num_heads=2).num_heads == 2
    assert AttentionBlock(512, num_heads=4, num_head_channels=64).num_heads == 8  # head channels win


def test_fresh_model_outputs_zero_and_rejects_unsupported():
    model = UNetModel.from_config({**json.loads((VECTORS / "tiny_unet_config.json").read_text()), "extra": 1})
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([5]))
    assert out.shape == (1, 6, 32, 32) and torch.count_nonzero(out) == 0
    base = dict(dr2_unet_config(), model_channels=32, channel_mult=(1, 2))
    with pytest.raises(ValueError):
        UNetModel(**dict(base, num_classes=10))
    with pytest.raises(ValueError):
        UNetModel(**dict(base, dims=3))
    with pytest.raises(ValueError):
        UNetModel(**dict(base, num_res_blocks=(1, 2, 3)))

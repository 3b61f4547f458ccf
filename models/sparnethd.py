"""SPARNetHD: the face-enhancement generator of Face-SPARNet (Chen et al. 2020), as used by DR2.

A residual encoder / body / decoder network in which every residual block gates its residual branch with
a spatial attention mask predicted by a small hourglass ("SPAR" attention). The configuration used by
DR2 (``SPARNetHD_FFHQ_DR2aug.pth``) is SPARNetHD2D: 512x512, 32..512 channels, 32x32 bottleneck,
instance norm, LeakyReLU(0.2), reflection padding, spectral norm on every Conv2d.

State-dict keys and the order of operations follow the reference (``BaseModel`` / ``SPARNet``) so that
the public checkpoints load with ``strict=True``:

    encoder.0                ConvLayer 3 -> n_ch (conv + bias)
    encoder.1..D             ResidualBlock, stride-2 down, attention hourglass depth 4, 3, ...
    res_layers.*             ResidualBlock at the bottleneck
    decoder.*                ResidualBlock, nearest x2 up, hourglass depths growing again
    out_conv                 ConvLayer n_ch -> 3 (conv + bias), no tanh, no clamp

Spectral norm is the old-style ``torch.nn.utils.spectral_norm`` (keys ``weight_orig``, buffers
``weight_u`` / ``weight_v``). In eval mode it divides by sigma = u . (W v) with the stored vectors and
does no power iteration, which is what reproduces the released checkpoint's function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SPARNetHD", "sparnethd_config", "from_config"]


class NormLayer(nn.Module):
    """Feature normalisation; the wrapped module is named ``norm`` (checkpoint keys ``*.norm.weight``)."""

    def __init__(self, channels: int, norm_type: str = "in"):
        super().__init__()
        norm_type = norm_type.lower()
        self.norm_type = norm_type
        if norm_type == "bn":
            self.norm = nn.BatchNorm2d(channels)
        elif norm_type == "in":
            # Affine, no running stats: always normalises with the current image's statistics.
            self.norm = nn.InstanceNorm2d(channels, affine=True)
        elif norm_type == "gn":
            self.norm = nn.GroupNorm(32, channels, affine=True)
        elif norm_type in ("pixel", "none"):
            self.norm = None
        else:
            raise ValueError(f"unsupported norm_type {norm_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_type == "pixel":
            return F.normalize(x, p=2, dim=1)
        if self.norm is None:
            return x
        return self.norm(x)


class ReluLayer(nn.Module):
    """Activation; PReLU parameters would live under ``func`` as in the reference."""

    def __init__(self, channels: int, relu_type: str = "leakyrelu"):
        super().__init__()
        relu_type = relu_type.lower()
        # Not in-place: with norm 'none' an in-place activation would also overwrite the identity branch.
        if relu_type == "relu":
            self.func = nn.ReLU()
        elif relu_type == "leakyrelu":
            self.func = nn.LeakyReLU(0.2)
        elif relu_type == "prelu":
            self.func = nn.PReLU(channels)
        elif relu_type == "selu":
            self.func = nn.SELU()
        elif relu_type == "none":
            self.func = nn.Identity()
        else:
            raise ValueError(f"unsupported relu_type {relu_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.func(x)


class ConvLayer(nn.Module):
    """[nearest x2 up] -> reflection pad -> conv (stride 2 when 'down') -> norm -> activation.

    The conv has a bias only without a normalisation that would cancel it ('none' / 'pixel').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        scale: str = "none",
        norm_type: str = "none",
        relu_type: str = "none",
        use_pad: bool = True,
    ):
        super().__init__()
        self.scale = scale
        self.use_pad = use_pad
        self.pad = kernel_size // 2
        stride = 2 if scale == "down" else 1
        bias = norm_type in ("pixel", "none")
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride, bias=bias)
        # Registration order relu before norm matches the reference's state_dict order.
        self.relu = ReluLayer(out_channels, relu_type)
        self.norm = NormLayer(out_channels, norm_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_pad and self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return self.relu(self.norm(self.conv2d(x)))


class HourGlassBlock(nn.Module):
    """Attention hourglass: returns ``x * sigmoid(mask(x))`` (mask has ``c_out`` channels, 1 for 'spar').

    Level L (from ``depth`` down to 1): up = b1_L(x); low = b2_L(x) at half resolution, recursed into
    level L-1 (or b2_plus_1 at the bottom); result up + b3_L(low) with b3_L upsampling x2.
    """

    def __init__(
        self,
        depth: int,
        c_in: int,
        c_out: int,
        c_mid: int = 64,
        norm_type: str = "in",
        relu_type: str = "leakyrelu",
    ):
        super().__init__()
        self.depth = depth
        self.c_in, self.c_mid, self.c_out = c_in, c_mid, c_out
        self._nr = {"norm_type": norm_type, "relu_type": relu_type}
        if depth:
            self._build(depth)
            self.out_block = nn.Sequential(
                ConvLayer(c_mid, c_out, norm_type="none", relu_type="none"),
                nn.Sigmoid(),
            )

    def _build(self, level: int) -> None:
        # Same recursion (and so the same module/key order) as the reference.
        c1 = self.c_in if level == self.depth else self.c_mid
        self.add_module(f"b1_{level}", ConvLayer(c1, self.c_mid, **self._nr))
        self.add_module(f"b2_{level}", ConvLayer(c1, self.c_mid, scale="down", **self._nr))
        if level > 1:
            self._build(level - 1)
        else:
            self.add_module(f"b2_plus_{level}", ConvLayer(self.c_mid, self.c_mid, **self._nr))
        self.add_module(f"b3_{level}", ConvLayer(self.c_mid, self.c_mid, scale="up", **self._nr))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        up1 = self._modules[f"b1_{level}"](x)
        low1 = self._modules[f"b2_{level}"](x)
        if level > 1:
            low2 = self._level(level - 1, low1)
        else:
            low2 = self._modules[f"b2_plus_{level}"](low1)
        up2 = self._modules[f"b3_{level}"](low2)
        if up1.shape[2:] != up2.shape[2:]:  # odd sizes: the reference resizes with nearest
            up2 = F.interpolate(up2, size=up1.shape[2:], mode="nearest")
        return up1 + up2

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_block(self._level(self.depth, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.depth:
            return x
        return x * self.attention_map(x)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: shortcut(x) + att(conv2(conv1(act(norm(x))))).

    conv1 carries norm + activation, conv2 only norm. 'down' strides conv2, 'up' upsamples before conv1;
    the shortcut is a plain biased conv with the same rescaling whenever shape changes.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        relu_type: str = "leakyrelu",
        norm_type: str = "in",
        scale: str = "none",
        hg_depth: int = 2,
        att_name: str = "spar",
    ):
        super().__init__()
        nr = {"norm_type": norm_type, "relu_type": relu_type}
        if scale == "none" and c_in == c_out:
            self.shortcut_func: nn.Module = nn.Identity()
        else:
            self.shortcut_func = ConvLayer(c_in, c_out, 3, scale)
        self.preact_func = nn.Sequential(NormLayer(c_in, norm_type), ReluLayer(c_in, relu_type))
        scales = {"down": ("none", "down"), "up": ("up", "none"), "none": ("none", "none")}[scale]
        self.conv1 = ConvLayer(c_in, c_out, 3, scales[0], **nr)
        self.conv2 = ConvLayer(c_out, c_out, 3, scales[1], norm_type=norm_type, relu_type="none")
        att = att_name.lower()
        if att == "spar":
            c_attn = 1
        elif att == "spar3d":
            c_attn = c_out
        else:
            raise ValueError(f"unsupported att_name {att_name!r}")
        self.att_func = HourGlassBlock(hg_depth, c_out, c_attn, **nr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut_func(x)
        out = self.conv2(self.conv1(self.preact_func(x)))
        return identity + self.att_func(out)


class SPARNetHD(nn.Module):
    """SPARNet ``BaseModel`` generator (SPARNetHD2D by default): (B,3,S,S) in [-1,1] -> (B,3,S,S).

    Arguments follow the reference. ``size`` (DR2's name) sets both ``in_size`` and ``out_size``.
    ``spectral_norm`` wraps every Conv2d as in the released checkpoints (needed for their keys).
    """

    def __init__(
        self,
        min_ch: int = 32,
        max_ch: int = 512,
        in_size: int = 512,
        out_size: int | None = None,
        min_feat_size: int = 32,
        res_depth: int = 10,
        relu_type: str = "leakyrelu",
        norm_type: str = "in",
        att_name: str = "spar",
        bottleneck_size: int = 4,
        ch_in: int = 3,
        size: int | None = None,
        spectral_norm: bool = True,
    ):
        super().__init__()
        if size is not None:
            in_size = out_size = size
        if out_size is None:
            out_size = in_size
        self.in_size, self.out_size = in_size, out_size
        nr = {"norm_type": norm_type, "relu_type": relu_type}

        def ch_clip(c: int) -> int:
            return max(min_ch, min(c, max_ch))

        down_steps = (in_size // min_feat_size).bit_length() - 1  # floor(log2)
        up_steps = (out_size // min_feat_size).bit_length() - 1
        n_ch = ch_clip(max_ch // (down_steps + 1))
        hg_depth = int(math.log2(64 / bottleneck_size))

        encoder: list[nn.Module] = [ConvLayer(ch_in, n_ch, 3)]
        for _ in range(down_steps):
            encoder.append(
                ResidualBlock(
                    ch_clip(n_ch), ch_clip(n_ch * 2), scale="down", hg_depth=hg_depth, att_name=att_name, **nr
                )
            )
            n_ch *= 2
            hg_depth -= 1
        hg_depth += 1
        self.encoder = nn.Sequential(*encoder)

        # The reference's body length: res_depth + 3 - down_steps (9 blocks for SPARNetHD).
        self.res_layers = nn.Sequential(
            *[
                ResidualBlock(ch_clip(n_ch), ch_clip(n_ch), hg_depth=hg_depth, att_name=att_name, **nr)
                for _ in range(res_depth + 3 - down_steps)
            ]
        )

        decoder: list[nn.Module] = []
        for _ in range(up_steps):
            hg_depth += 1
            decoder.append(
                ResidualBlock(
                    ch_clip(n_ch), ch_clip(n_ch // 2), scale="up", hg_depth=hg_depth, att_name=att_name, **nr
                )
            )
            n_ch //= 2
        self.decoder = nn.Sequential(*decoder)
        self.out_conv = ConvLayer(ch_clip(n_ch), 3, 3)

        self._init_weights()
        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, nn.Conv2d):
                    nn.utils.spectral_norm(m)

    def _init_weights(self) -> None:
        # The reference's training init: conv weights N(0, 0.02), conv biases 0, norms at their defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x)
        out = self.res_layers(out)
        out = self.decoder(out)
        return self.out_conv(out)


def sparnethd_config() -> dict[str, Any]:
    """SPARNetHD2D as released (Face-SPARNet SPARNetHD, DR2 ``SPARNetHD_FFHQ_DR2aug.pth``)."""
    return {
        "min_ch": 32,
        "max_ch": 512,
        "size": 512,
        "min_feat_size": 32,
        "res_depth": 10,
        "relu_type": "leakyrelu",
        "norm_type": "in",
        "att_name": "spar",
        "bottleneck_size": 4,
    }


def from_config(config: Mapping[str, Any] | None = None) -> SPARNetHD:
    """Build from a dict of constructor arguments (e.g. the tiny test-vector JSON); None = full size."""
    cfg = sparnethd_config() if config is None else dict(config)
    return SPARNetHD(**cfg)

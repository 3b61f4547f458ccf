"""RRDBNet: the ESRGAN / Real-ESRGAN generator (Wang et al. 2018, 2021), as the background upsampler.

Attribute names are the checkpoint's keys, so the public `RealESRGAN_x4plus.pth` and `RealESRGAN_x2plus.pth`
(state_dict under 'params_ema') load with strict=True:

    conv_first                 3x3, num_in_ch (x scale-dependent unshuffle) -> num_feat
    body.{0..num_block-1}      RRDB: rdb1, rdb2, rdb3, each a ResidualDenseBlock conv1..conv5 (dense growth)
    conv_body                  3x3 after the trunk; trunk output is added to conv_first's (long skip)
    conv_up1, conv_up2         nearest x2 then 3x3 + LeakyReLU(0.2), twice: always x4 from the trunk
    conv_hr, conv_last         3x3 + LeakyReLU, 3x3 -> num_out_ch (no activation, no clamp)

Scale 2 and 1 feed the trunk a pixel-unshuffled input (x2: 2x2 -> 12 channels, x1: 4x4 -> 48), so every
scale runs the same x4 head. Inputs are RGB in [0, 1]; outputs are unclamped (callers clamp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RRDB", "RRDBNet", "ResidualDenseBlock", "UNSHUFFLE", "receptive_radius", "realesrgan_config"]

# Pixel-unshuffle factor of the input per output scale (the trunk always upsamples x4).
UNSHUFFLE = {4: 1, 2: 2, 1: 4}
# Residual scaling of ESRGAN's dense blocks and RRDBs (0.2 in the paper and the released models).
RESIDUAL_SCALE = 0.2


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output (dense concatenation)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(num_feat + (i - 1) * num_grow_ch, num_grow_ch, 3, 1, 1))
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks with a scaled skip around them."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """(B, num_in_ch, H, W) in [0, 1] -> (B, num_out_ch, H * scale, W * scale); H, W divisible by the
    unshuffle factor (2 for scale 2, 4 for scale 1)."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        if scale not in UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be one of {tuple(UNSHUFFLE)}, got {scale!r}")
        self.scale = scale
        self.unshuffle = UNSHUFFLE[scale]
        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's pixel_unshuffle orders channels c * r^2 + i * r + j, as BasicSR's view/permute does.
        feat = F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def realesrgan_config(scale: int) -> dict:
    """Constructor arguments of the released Real-ESRGAN general models (x4plus, x2plus)."""
    return {"num_in_ch": 3, "num_out_ch": 3, "scale": scale, "num_feat": 64, "num_block": 23, "num_grow_ch": 32}


def receptive_radius(num_block: int, scale: int) -> int:
    """An upper bound on how far (input px) an output pixel's value reaches into the input.

    Each 3x3 conv reaches one pixel of its own resolution: conv_first, conv_body and 15 per RRDB at the
    trunk's (input / unshuffle); conv_up1 at 2x and conv_up2, conv_hr, conv_last at 4x the trunk's add under
    two trunk pixels with the nearest upsampling's rounding, and the unshuffle grid under one more. A tile
    padded by this much reproduces the whole-image output (up to float summation order).
    """
    return UNSHUFFLE[scale] * (15 * num_block + 5)

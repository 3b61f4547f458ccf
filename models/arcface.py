"""ArcFace identity network: insightface arcface_torch's IResNet (inference only).

Attribute names are the keys of arcface_torch's released `backbone.pth` (e.g. ms1mv3_arcface_r50_fp16), so a
checkpoint loads strictly. Input: 112x112 RGB normalised (x - 0.5) / 0.5; output: a 512-d embedding (not
normalised; callers L2-normalise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["IResNet", "iresnet50"]


class _IBlock(nn.Module):
    """Pre-activation basic block of insightface's IResNet: BN-conv-BN-PReLU-conv(stride)-BN + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """insightface arcface_torch IResNet (inference only) with the key layout of its released `backbone.pth`:
    conv1/bn1/prelu stem at 112x112, four stages of `_IBlock`s (64, 128, 256, 512 channels, each starting with a
    stride-2 block with a conv1x1+BN `downsample`), bn2, fc (512*7*7 -> 512), features (BatchNorm1d).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 14, 3), num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            blocks = [_IBlock(cin, width, 2)] + [_IBlock(width, width, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)  # frozen at 1 in training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet50() -> IResNet:
    """arcface_torch `r50` (layers 3, 4, 14, 3), e.g. ms1mv3_arcface_r50_fp16/backbone.pth."""
    return IResNet((3, 4, 14, 3))

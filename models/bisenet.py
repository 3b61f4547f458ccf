"""BiSeNet face parser (Yu et al. 2018, face-parsing.PyTorch), in facexlib's `parsing_bisenet.pth` layout.

Attribute names are the checkpoint's keys (a flat state_dict, loaded with strict=True):

    cp.resnet                  ResNet-18 trunk (conv1 7x7/2, bn1, maxpool, layer1..layer4 of 2 BasicBlocks):
                               features at 1/8, 1/16, 1/32
    cp.arm16, cp.arm32         attention refinement: ConvBNReLU then a global-pooled 1x1 conv + BN + sigmoid gate
    cp.conv_avg                1x1 ConvBNReLU of the globally pooled 1/32 features (broadcast back)
    cp.conv_head32/16          3x3 ConvBNReLU after each nearest upsampling (1/32 -> 1/16 -> 1/8)
    ffm                        feature fusion of the 1/8 trunk and context features, with a channel gate
    conv_out                   3x3 ConvBNReLU + 1x1 conv -> num_class logits at 1/8, bilinear (align_corners)
                               to the input size
    conv_out16, conv_out32     the training-time auxiliary heads: in the checkpoint, unused at inference

Input: RGB normalised with ImageNet's mean/std (facexlib's inference), 512x512 for the released model.
Labels (CelebAMask-HQ order of face-parsing.PyTorch): see LABELS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LABELS", "BiSeNet"]

LABELS = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r", "nose",
          "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        for i, (cin, cout, stride) in enumerate([(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)], 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3)
        self.conv_head16 = ConvBNReLU(128, 128, 3)
        self.conv_avg = ConvBNReLU(512, 128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(feat32.mean((2, 3), keepdim=True))  # broadcast = nearest upsampling of a 1x1 map
        up32 = self.conv_head32(F.interpolate(self.arm32(feat32) + avg, feat16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest"))
        return feat8, up16


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], 1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
        return feat * gate + feat


class Head(nn.Module):
    def __init__(self, cin: int, mid: int, num_class: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.conv_out = nn.Conv2d(mid, num_class, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """(B, 3, H, W) normalised RGB -> (B, num_class, H, W) logits (the main head only)."""

    def __init__(self, num_class: int = 19):
        super().__init__()
        self.labels = LABELS if num_class == len(LABELS) else tuple(str(i) for i in range(num_class))
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = Head(256, 256, num_class)
        self.conv_out16 = Head(128, 64, num_class)  # auxiliary heads: checkpoint keys, not run
        self.conv_out32 = Head(128, 64, num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, context8 = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)

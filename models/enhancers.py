"""Enhancement modules after DR2: the interface, the built-ins, and DR2's hand-over.

An enhancer is any callable taking a float batch (B, 3, S, S) in [-1, 1] (DR2's x0-hat after the
hand-over) and returning (B, 3, S', S') in [-1, 1]. Plug-ins (CodeFormer, GPEN, VQFR, GFPGAN...) are
classes named by a dotted path in the config (see tasks/enhance.py); they only need that call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.sparnethd import from_config as sparnethd_from_config


class Enhancer(Protocol):
    def __call__(self, x: Tensor) -> Tensor: ...


def handover(x0: Tensor, size: int = 512) -> Tensor:
    """DR2 -> enhancer as the reference: clamp to [-1, 1], bicubic resize (torchvision Resize on a tensor)."""
    x = x0.clamp(-1, 1)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


class NoEnhancer(nn.Module):
    """DR2's output as it is (256): for DR2-only baselines."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class BicubicEnhancer(nn.Module):
    """Only the hand-over's bicubic upsampling (the trivial enhancer baseline)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(-1, 1)


# SPARNetHD is itself an enhancer (no wrapper), so its state_dict keys stay those of the checkpoint.
BUILTIN = {"none": NoEnhancer, "bicubic": BicubicEnhancer, "sparnethd": sparnethd_from_config}


def enhance(enhancer: Enhancer, x0: Tensor, size: int | None) -> Tensor:
    """Hand over DR2's x0-hat (unless size is None: 'none') and run the enhancer; output in [-1, 1]."""
    x = x0.clamp(-1, 1) if size is None else handover(x0, size)
    if x.device.type == "cpu" and x.shape[0] > 1:
        # As UNetModel.batch_invariant_cpu: CPU convolutions change their reduction order with the batch
        # size (SPARNetHD: ~5e-7 relative), so one sample at a time keeps a result independent of its batch.
        return torch.cat([enhancer(x[i : i + 1]).float() for i in range(x.shape[0])]).clamp(-1, 1)
    return enhancer(x).float().clamp(-1, 1)


__all__ = ["BUILTIN", "BicubicEnhancer", "Enhancer", "NoEnhancer", "enhance", "handover"]

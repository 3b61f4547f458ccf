"""Small shared test utilities: tiny random models."""

from __future__ import annotations

import torch

from models.unet import UNetModel


def randomize_parameters(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values: fresh guided-diffusion UNets output exactly 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / max(1.0, p[0].numel() ** 0.5))
    return model


def tiny_unet_config(**overrides) -> dict:
    cfg = dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
               attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=32,
               use_scale_shift_norm=True, resblock_updown=True, dropout=0.0)
    cfg.update(overrides)
    return cfg


def tiny_unet(**overrides) -> UNetModel:
    return UNetModel.from_config(tiny_unet_config(**overrides))


def calibrated_fid_inception(path, faces, seed: int = 3):
    """A random FID Inception whose BN statistics are those of `faces` (uint8 (N, H, W, 3), one train-mode
    pass), saved as a checkpoint at `path`: every layer normalised, so pool3 features depend strongly on the
    image (with default statistics a random net's features barely change with its input). Returns the model."""
    import numpy as np

    from models.fid_inception import fid_inception_v3

    torch.manual_seed(seed)
    model = fid_inception_v3()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the pass sets the statistics exactly
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).float() / 255)
    model.eval()
    torch.save(model.state_dict(), path)
    return model

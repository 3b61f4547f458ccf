"""guided-diffusion / improved-diffusion UNet (openai semantics), checkpoint-compatible.

Attribute names are the checkpoint keys of the public DR2 / P2-weighting / ILVR (FFHQ 256) and
DifFace (FFHQ 512) state_dicts, so ``load_state_dict(strict=True)`` of those files works.

Precision is the caller's business (``torch.autocast``); ``use_fp16`` / ``use_checkpoint`` are accepted
for config compatibility and ignored. Normalisation always runs in float32.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionBlock",
    "Downsample",
    "GroupNorm32",
    "ResBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "difface_unet_config",
    "dr2_unet_config",
    "timestep_embedding",
]


def dr2_unet_config() -> dict[str, Any]:
    """DR2 / P2-weighting / ILVR FFHQ-256 diffusion UNet (`DR2_FFHQ.pkl`, `ffhq_p2.pt`, `ffhq_10m.pt`)."""
    return dict(
        image_size=256,
        in_channels=3,
        model_channels=128,
        out_channels=6,  # eps + learned-range variance
        num_res_blocks=1,
        attention_resolutions=[16],  # downsample factor 16 = the 16x16 map
        dropout=0.0,
        channel_mult=(1, 1, 2, 2, 4, 4),
        conv_resample=True,
        dims=2,
        num_classes=None,
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=False,
    )


def difface_unet_config() -> dict[str, Any]:
    """DifFace FFHQ-512 improved-diffusion UNet (`iddpm_ffhq512_ema500000.pth`)."""
    return dict(
        image_size=512,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=(1, 2, 2, 2, 2, 3, 4),
        # Downsample factors, read off the checkpoint: attention at levels 4-6 (256/512/512 ch), i.e. the
        # 32x32, 16x16 and 8x8 maps of a 512 image. DifFace's own config lists feature-map sizes instead.
        attention_resolutions=[16, 32, 64],
        dropout=0.0,
        channel_mult=(1, 2, 4, 8, 8, 16, 16),
        conv_resample=True,
        dims=2,
        num_classes=None,
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_new_attention_order=False,
    )


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f), sin(t f)], f = exp(-ln(max_period) i / half); float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (stable under fp16/bf16)."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            y = F.group_norm(x.float(), self.num_groups, w, b, self.eps)
        return y.to(x.dtype)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _zero(module: nn.Module) -> nn.Module:
    # The reference zero-initialises the last layer of every residual branch and the output conv, so a
    # fresh model is the identity on each branch (and outputs 0).
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the children that take one (ResBlocks)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2, then an optional 3x3 conv (attribute `conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = _conv3x3(channels, out_channels)
        elif out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling (attribute `op` either way)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = _conv3x3(channels, out_channels, stride=2)
        elif out_channels != channels:
            raise ValueError("Downsample without conv cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (up/down)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), _conv3x3(channels, out_channels))
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(_conv3x3(out_channels, out_channels)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between norm+SiLU and the conv, for both the branch and the skip.
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual: x + proj_out(attn(norm(x))).

    `qkv` / `proj_out` are Conv1d(k=1) for checkpoint compatibility but are applied as linears on the
    (B, L, C) token layout, which is a free view of channels_last activations and the layout SDPA wants.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"channels {channels} not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # (B, L, C)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, L, 3C)
        n = qkv.shape[1]
        if self.use_new_attention_order:
            qkv = qkv.reshape(b, n, 3, heads, ch)  # q/k/v split first, then heads
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:
            qkv = qkv.reshape(b, n, heads, 3, ch)  # legacy: heads split first, then q/k/v
            q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        # (B, H, L, ch); default scale 1/sqrt(ch) = the reference's 1/ch**0.25 on both q and k.
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(b, n, c)
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(b, c, *spatial).to(x.dtype)


class UNetModel(nn.Module):
    """The guided-diffusion UNet with timestep embedding (no class conditioning).

    attention_resolutions are downsample factors (e.g. [16] = attention where the map is 1/16 of the
    input). num_res_blocks is an int or one count per level (improved-diffusion / DifFace).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError("only dims=2 is supported")
        if num_classes is not None:
            raise ValueError("class-conditional UNets are not supported (num_classes must be None)")
        if isinstance(channel_mult, str):
            channel_mult = tuple(int(m) for m in channel_mult.split(","))
        if isinstance(attention_resolutions, str):
            attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r]
        levels = len(channel_mult)
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * levels
        num_res_blocks = list(num_res_blocks)
        if len(num_res_blocks) != levels:
            raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = set(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        # Per-sample execution on CPU for bit-identical results regardless of batching (see forward).
        self.batch_invariant_cpu = True

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, emb_dim, dropout, cout, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(c: int, heads: int) -> AttentionBlock:
            return AttentionBlock(c, heads, num_head_channels, use_new_attention_order)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(_conv3x3(in_channels, ch))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks[level]):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != levels - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks[level] + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks[level]:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zero(_conv3x3(ch, out_channels)))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], attention_at_feature_sizes: bool = False) -> UNetModel:
        """Build from a guided-diffusion style dict, ignoring keys the constructor does not take.

        attention_at_feature_sizes: the dict's attention_resolutions are feature-map sizes, as in DifFace's
        UNet (it counts `ds` down from image_size); they are converted to downsample factors.
        """
        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in config.items() if k in params and k != "self"}
        if attention_at_feature_sizes:
            size = int(kwargs["image_size"])
            res = kwargs.get("attention_resolutions", ())
            if isinstance(res, str):
                res = [int(r) for r in res.split(",") if r]
            kwargs["attention_resolutions"] = [size // int(r) for r in res if size % int(r) == 0]
        return cls(**kwargs)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float | int) -> torch.Tensor:
        """x: (B, in_channels, H, W); timesteps: (B,) or a scalar (broadcast). Returns x's dtype."""
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0 or t.shape == (1,):
            t = t.expand(x.shape[0])
        elif t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        if self.batch_invariant_cpu and x.device.type == "cpu":
            # oneDNN conv (some shapes), channels_last GroupNorm and B=1 Linear (gemv) change their
            # reduction order with the batch size and the memory layout on CPU. One contiguous sample at a
            # time makes each result bit-identical whatever its batch (or the layout that batch arrived in),
            # and costs nothing here: batching does not speed up CPU.
            return torch.cat([self._forward(x[i : i + 1].contiguous(), t[i : i + 1]) for i in range(x.shape[0])])
        return self._forward(x, t)

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)

"""UNet building blocks: timestep embedding, ResBlock, resampling, SpatialTransformer.

Attribute names mirror the original checkpoint keys (``in_layers.0``, ``emb_layers.1``,
``out_layers.3``, ``skip_connection``, ``op``, ``conv``, ``transformer_blocks.N.ff.net.0.proj``),
with empty slots (SiLU, Identity) kept so the indices line up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.model.attention import CrossAttention


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (B,) timesteps, computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (B, dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back, as the original ``normalization()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between; 1x1 skip when channels change."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C, 1, 1) broadcast
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, disable_self_attn: bool = False,
                 backend: str = "sdpa"):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.cross_index = 0  # this block's place in the UNet's cross-attention cache (set by the UNet)
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, backend)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cross: tuple[torch.Tensor, ...] | None = None,
                record: list | None = None) -> torch.Tensor:
        """``cross``: reuse entry ``cross_index`` as the cross-attention output (T-GATE); ``record``: store it there."""
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        a = cross[self.cross_index] if cross is not None else self.attn2(self.norm2(x), context)  # (B, T, C)
        if record is not None:
            record[self.cross_index] = a
        x = a + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over the H*W tokens, project out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, disable_self_attn: bool = False, backend: str = "sdpa"):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, disable_self_attn, backend)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cross: tuple[torch.Tensor, ...] | None = None,
                record: list | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, cross, record)
        if self.use_linear:
            h = self.proj_out(h)
        # (B, C, H, W) made contiguous in x's layout: the transposed view is channels_last, and left so in an NCHW
        # model it makes every following conv reorder its weights on CPU (measured 1.2-1.5x slower); in a
        # channels_last model (ldm.speed.optimize.to_channels_last) it already is the wanted layout, so no copy.
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        h = h.transpose(1, 2).reshape(B, -1, H, W).contiguous(
            memory_format=torch.channels_last if cl else torch.contiguous_format)
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, giving each the inputs it needs (emb for ResBlocks, context for transformers)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                cross: tuple[torch.Tensor, ...] | None = None, record: list | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, cross, record)
            else:
                x = layer(x)
        return x

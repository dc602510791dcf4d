"""The KL autoencoder (VAE) of latent diffusion: Encoder, Decoder, diagonal Gaussian posterior."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ldm.model.config import take_params
from ldm.model.unet_blocks import Upsample  # the same nearest x2 + 3x3 conv, key "conv"


@dataclass(frozen=True)
class VAEConfig:
    """The original ``AutoencoderKL``'s arguments (``embed_dim`` and its ``ddconfig``); a default here is the
    original's default, what a yaml without the key means."""
    embed_dim: int
    z_channels: int
    in_channels: int
    out_ch: int
    ch: int
    num_res_blocks: int
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    double_z: bool = True
    attn: str = "sdpa"

    @classmethod
    def from_params(cls, params: dict) -> "VAEConfig":
        """Map the original ``AutoencoderKL`` yaml params; unknown keys are errors."""
        p = take_params("AutoencoderKL", params, {"monitor", "lossconfig", "ckpt_path", "ignore_keys", "image_key",
                                                  "colorize_nlabels", "ema_decay", "learn_logvar"},
                        {}, known={"ddconfig", "embed_dim"})
        dd = take_params("AutoencoderKL.ddconfig", p.get("ddconfig", {}), {"resolution", "dropout"},
                         {"attn_resolutions": [], "tanh_out": False, "give_pre_end": False,
                          "resamp_with_conv": True, "use_linear_attn": False},
                         known={"double_z", "z_channels", "in_channels", "out_ch", "ch", "ch_mult",
                                "num_res_blocks", "attn_type"})
        attn = {"vanilla": "sdpa", "vanilla-xformers": "sdpa", "none": "none"}.get(dd.pop("attn_type", "vanilla"))
        if attn is None:
            raise ValueError(f"AutoencoderKL: attn_type={params['ddconfig']['attn_type']!r} is not supported")
        required = ("embed_dim", "z_channels", "in_channels", "out_ch", "ch", "num_res_blocks")
        missing = [k for k in required if k not in (p if k == "embed_dim" else dd)]
        if missing:
            raise ValueError(f"AutoencoderKL: missing config key(s) {', '.join(missing)}")
        if "ch_mult" in dd:
            dd["ch_mult"] = tuple(dd["ch_mult"])
        return cls(embed_dim=p["embed_dim"], attn=attn, **dd)  # keys left out take the dataclass defaults


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over H*W with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        seq = lambda t: t.reshape(B, 1, C, H * W).transpose(-1, -2)  # (B, 1, H*W, C)
        h = F.scaled_dot_product_attention(seq(self.q(h)), seq(self.k(h)), seq(self.v(h)))
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Asymmetric (0,1,0,1) padding then a stride-2 3x3 conv, as the original."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _mid(ch: int, attn: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch)
    mid.attn_1 = AttnBlock(ch) if attn else nn.Identity()
    mid.block_2 = ResnetBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * mult
            level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else block_out, block_out)
                                        for j in range(cfg.num_res_blocks))
            level.attn = nn.ModuleList()
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
        ch = cfg.ch * cfg.ch_mult[-1]
        self.mid = _mid(ch, cfg.attn != "none")
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _mid(ch, cfg.attn != "none")
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(ch if j == 0 else block_out, block_out)
                                        for j in range(cfg.num_res_blocks + 1))
            level.attn = nn.ModuleList()
            ch = block_out
            if i != 0:
                level.upsample = Upsample(ch)
            levels.insert(0, level)  # up.0 is the full-resolution level, as in the checkpoint
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """Posterior N(mean, exp(logvar)) from the encoder's moments (B, 2*z, h, w)."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.zeros_like(self.mean) if deterministic else torch.exp(0.5 * self.logvar)
        self.var = self.std * self.std

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


def _blend_weights(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(old, new) fp32 weights (1 - y/n, y/n) for y = 0..n-1, computed in float64 as diffusers' Python floats are."""
    ramp = torch.arange(n, dtype=torch.float64) / n
    return (1 - ramp).to(like.device, torch.float32), ramp.to(like.device, torch.float32)


def _blend_v(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """Fade ``tile``'s first rows in from ``above``'s last rows, in place (tile rows 0..e-1 overlap them)."""
    e = min(above.shape[2], tile.shape[2], extent)
    if e > 0:
        w_old, w_new = (w.view(e, 1) for w in _blend_weights(e, tile))  # (e, 1)
        tile[:, :, :e] = above[:, :, -e:] * w_old + tile[:, :, :e] * w_new


def _blend_h(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """Fade ``tile``'s first columns in from ``left``'s last columns, in place."""
    e = min(left.shape[3], tile.shape[3], extent)
    if e > 0:
        w_old, w_new = _blend_weights(e, tile)  # (e,)
        tile[:, :, :, :e] = left[:, :, :, -e:] * w_old + tile[:, :, :, :e] * w_new


def tiled_map(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, stride: int,
              blend: int, keep: int) -> torch.Tensor:
    """``fn`` over ``tile``-sized windows of x (B, C, H, W) every ``stride`` pixels, outputs blended and stitched.

    diffusers' AutoencoderKL tiling rules: windows start at 0, stride, 2*stride... (the last ones
    may be smaller); in raster order each output fades in linearly over ``blend`` rows from the
    (already blended) one above, then over ``blend`` columns from the one to its left, and
    contributes its first ``keep`` rows and columns. Streamed: only one row of outputs is held.
    Outputs land where their inputs were when ``keep`` = stride * s and ``blend`` = (tile - stride) * s
    for the output/input scale s (as the VAE's callers pass them).
    """
    H, W = x.shape[-2:]
    rows, above = [], None
    for i in range(0, H, stride):
        row = []
        for j in range(0, W, stride):
            out = fn(x[:, :, i:i + tile, j:j + tile])
            if above is not None:
                _blend_v(above[len(row)], out, blend)
            if row:
                _blend_h(row[-1], out, blend)
            row.append(out)
        if above is not None:
            rows.append(torch.cat([t[:, :, :keep, :keep] for t in above], dim=3))
        above = row
    rows.append(torch.cat([t[:, :, :keep, :keep] for t in above], dim=3))
    return torch.cat(rows, dim=2)


class AutoencoderKL(nn.Module):
    """encode(x in [-1,1]) -> posterior over latents; decode(z) -> image in about [-1,1].

    ``set_memory_savers`` makes encode/decode run one image at a time (slicing) and/or in
    overlapping blended tiles (tiling); ``decode_checked`` redoes a reduced-precision decode that
    overflowed in fp32.
    """

    def __init__(self, cfg: VAEConfig | None = None, **params):
        super().__init__()
        cfg = cfg if cfg is not None else VAEConfig.from_params(params)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.factor = 2 ** (len(cfg.ch_mult) - 1)  # image pixels per latent pixel, each side
        self.use_slicing = False
        self.use_tiling = False
        self.tile_latent = 64
        self.tile_overlap = 0.25

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def set_memory_savers(self, slicing: bool = False, tiling: bool = False, tile_latent: int = 64,
                          overlap: float = 0.25) -> None:
        """Slicing: one image of the batch at a time. Tiling: latents wider or taller than ``tile_latent``
        are decoded in ``tile_latent``-sized tiles (images encoded in ``tile_latent * factor`` tiles)
        overlapping by ``int(tile_latent * overlap)`` latents, blended linearly over the overlap."""
        if isinstance(tile_latent, bool) or not isinstance(tile_latent, int) or tile_latent < 1:
            raise ValueError(f"tile_latent must be a positive integer (got {tile_latent!r})")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1) (got {overlap!r})")
        self.use_slicing, self.use_tiling = bool(slicing), bool(tiling)
        self.tile_latent, self.tile_overlap = tile_latent, float(overlap)

    def _tiles(self) -> tuple[int, int]:
        """(tile, overlap) in latent pixels; whole latents keep image tiles aligned with latent tiles."""
        return self.tile_latent, int(self.tile_latent * self.tile_overlap)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2*embed_dim, H/f, W/f) posterior moments of images x (B, C, H, W), tiled when enabled and large."""
        tile, overlap = self._tiles()
        f = self.factor
        if self.use_tiling and max(x.shape[-2:]) > tile * f:
            if x.shape[-2] % f or x.shape[-1] % f:  # else an edge tile can be too small for the encoder
                raise ValueError(f"tiled VAE encode needs image sides that are multiples of {f} (got "
                                 f"{x.shape[-2]}x{x.shape[-1]})")
            return tiled_map(x, self._encode_tile, tile * f, (tile - overlap) * f, overlap, tile - overlap)
        return self._encode_tile(x)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, out_ch, h*f, w*f) images of latents z (B, embed_dim, h, w), tiled when enabled and large."""
        tile, overlap = self._tiles()
        f = self.factor
        if self.use_tiling and max(z.shape[-2:]) > tile:
            return tiled_map(z, self._decode_tile, tile, tile - overlap, overlap * f, (tile - overlap) * f)
        return self._decode_tile(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior over latents of images x (B, C, H, W) in [-1, 1]."""
        x = x.to(self.quant_conv.weight.device, self.dtype)  # the weights' place (with offload: where it runs)
        if self.use_slicing and x.shape[0] > 1:
            return DiagonalGaussianDistribution(torch.cat([self._moments(xi) for xi in x.split(1)]))
        return DiagonalGaussianDistribution(self._moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, out_ch, h*f, w*f) of latents z (B, embed_dim, h, w) (already divided by the scale factor)."""
        z = z.to(self.post_quant_conv.weight.dtype)
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(zi) for zi in z.split(1)])
        return self._decode(z)

    def decode_checked(self, z: torch.Tensor) -> torch.Tensor:
        """``decode(z)``, decoded again in fp32 (with a warning) when fp16/bf16 weights or autocast overflowed."""
        x = self.decode(z)
        if bool(torch.isfinite(x).all()):
            return x
        dtype, device_type = self.post_quant_conv.weight.dtype, z.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if (dtype == torch.float32 and not autocast) or not bool(torch.isfinite(z).all()):
            warnings.warn(f"VAE decode produced non-finite values in {_name(dtype)} from "
                          f"{'finite' if bool(torch.isfinite(z).all()) else 'non-finite'} latents", stacklevel=2)
            return x
        precision = _name(torch.get_autocast_dtype(device_type)) + " autocast" if autocast else _name(dtype)
        warnings.warn(f"VAE decode in {precision} produced non-finite values; decoding again in float32",
                      stacklevel=2)
        with self._float32_decoder():
            x32 = self.decode(z.float())
        if not bool(torch.isfinite(x32).all()):
            warnings.warn("VAE decode produced non-finite values in float32 too", stacklevel=2)
        return x32.to(x.dtype)

    @contextlib.contextmanager
    def _float32_decoder(self) -> Iterator[None]:
        """post_quant_conv and decoder in fp32 with autocast off and compiled graphs run eagerly; restored after."""
        parts = (self.post_quant_conv, self.decoder)
        weight = self.post_quant_conv.weight
        dtype, device_type = weight.dtype, weight.device.type
        try:
            for part in parts:
                part.float()
            with torch.autocast(device_type, enabled=False), torch.compiler.set_stance("force_eager"):
                yield
        finally:
            for part in parts:
                part.to(dtype)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

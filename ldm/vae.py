"""The KL autoencoder (VAE) of latent diffusion: Encoder, Decoder, diagonal Gaussian posterior."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config_utils import take_params
from ldm.unet_blocks import Upsample  # the same nearest x2 + 3x3 conv, key "conv"


@dataclass(frozen=True)
class VAEConfig:
    embed_dim: int = 4
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    double_z: bool = True
    attn: str = "sdpa"

    @classmethod
    def from_params(cls, params: dict) -> "VAEConfig":
        """Map the original ``AutoencoderKL`` yaml params; unknown keys are errors."""
        p = take_params("AutoencoderKL", params, {"monitor", "lossconfig", "ckpt_path", "ignore_keys", "image_key",
                                                  "colorize_nlabels", "ema_decay", "learn_logvar"},
                        {}, known={"ddconfig", "embed_dim"})
        dd = take_params("AutoencoderKL.ddconfig", p["ddconfig"], {"resolution", "dropout"},
                         {"attn_resolutions": [], "tanh_out": False, "give_pre_end": False,
                          "resamp_with_conv": True, "use_linear_attn": False},
                         known={"double_z", "z_channels", "in_channels", "out_ch", "ch", "ch_mult",
                                "num_res_blocks", "attn_type"})
        attn = {"vanilla": "sdpa", "vanilla-xformers": "sdpa", "none": "none"}.get(dd.get("attn_type", "vanilla"))
        if attn is None:
            raise ValueError(f"AutoencoderKL: attn_type={dd['attn_type']!r} is not supported")
        return cls(embed_dim=p["embed_dim"], z_channels=dd["z_channels"], in_channels=dd["in_channels"],
                   out_ch=dd["out_ch"], ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
                   num_res_blocks=dd["num_res_blocks"], double_z=dd.get("double_z", True), attn=attn)


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


class AutoencoderKL(nn.Module):
    """encode(x in [-1,1]) -> posterior over latents; decode(z) -> image in about [-1,1]."""

    def __init__(self, cfg: VAEConfig | None = None, **params):
        super().__init__()
        cfg = cfg if cfg is not None else VAEConfig.from_params(params)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x.to(self.dtype))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

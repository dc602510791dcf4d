"""The latent-diffusion UNet (SD 1.x/2.x), built from a typed config, with no graph breaks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.attention import check_backend
from ldm.config_utils import take_params
from ldm.unet_blocks import (Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, Upsample,
                             normalization, timestep_embedding)

# yaml keys of the original UNetModel that only matter for training or for other model families.
_IGNORED = {"use_checkpoint", "use_fp16", "use_bf16", "image_size", "dropout", "legacy", "use_new_attention_order",
            "num_heads_upsample"}
# yaml keys whose only supported value is given here.
_FIXED = {"dims": 2, "conv_resample": True, "use_spatial_transformer": True, "use_scale_shift_norm": False,
          "resblock_updown": False, "num_classes": None, "n_embed": None, "adm_in_channels": None}
_KNOWN = {"in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks", "channel_mult",
          "num_heads", "num_head_channels", "transformer_depth", "context_dim", "use_linear_in_transformer",
          "disable_self_attentions", "disable_middle_self_attn", "num_attention_blocks", "attention"}


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = -1
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear_in_transformer: bool = True
    disable_self_attentions: tuple[bool, ...] | None = None
    disable_middle_self_attn: bool = False
    num_attention_blocks: tuple[int, ...] | None = None
    attention: str = "sdpa"

    def heads_at(self, ch: int) -> tuple[int, int]:
        """(heads, dim_head) for a transformer over ``ch`` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels

    @classmethod
    def from_params(cls, params: dict) -> "UNetConfig":
        """Map the original ``UNetModel`` yaml params; unknown keys are errors."""
        p = take_params("UNetModel", params, _IGNORED, _FIXED, known=_KNOWN)
        nrb = p.get("num_res_blocks", 2)
        mult = tuple(p.get("channel_mult", (1, 2, 4, 8)))
        if isinstance(nrb, int):
            nrb = (nrb,) * len(mult)
        if isinstance(p.get("context_dim"), (list, tuple)):
            raise ValueError("UNetModel: a list of context_dim per transformer layer is not supported")
        if p.get("num_heads", -1) == -1 and p.get("num_head_channels", -1) == -1:
            raise ValueError("UNetModel: either num_heads or num_head_channels has to be set")
        tup = lambda v: None if v is None else tuple(v)
        return cls(
            in_channels=p["in_channels"], out_channels=p["out_channels"], model_channels=p["model_channels"],
            attention_resolutions=tuple(p["attention_resolutions"]), num_res_blocks=tuple(nrb), channel_mult=mult,
            num_heads=p.get("num_heads", -1), num_head_channels=p.get("num_head_channels", -1),
            transformer_depth=p.get("transformer_depth", 1), context_dim=p["context_dim"],
            use_linear_in_transformer=p.get("use_linear_in_transformer", False),
            disable_self_attentions=tup(p.get("disable_self_attentions")),
            disable_middle_self_attn=p.get("disable_middle_self_attn", False),
            num_attention_blocks=tup(p.get("num_attention_blocks")),
            attention=check_backend(p.get("attention", "sdpa")))


class UNetModel(nn.Module):
    """eps/v-predicting UNet: forward(x (B,C,H,W), timesteps (B,), context (B,S,D)) -> (B,C_out,H,W)."""

    def __init__(self, cfg: UNetConfig | None = None, **params):
        super().__init__()
        cfg = cfg if cfg is not None else UNetConfig.from_params(params)
        self.cfg = cfg
        ch = mc = cfg.model_channels
        emb_dim = mc * 4
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch: int, level: int | None, index: int) -> list[nn.Module]:
            if level is not None and cfg.num_attention_blocks is not None and index >= cfg.num_attention_blocks[level]:
                return []
            heads, dim_head = cfg.heads_at(ch)
            if level is None:
                no_self = cfg.disable_middle_self_attn
            else:
                no_self = bool(cfg.disable_self_attentions[level]) if cfg.disable_self_attentions else False
            return [SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                       cfg.use_linear_in_transformer, no_self, cfg.attention)]

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ds = [mc], 1
        for level, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks[level]):
                layers = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers += transformer(ch, level, i)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim), *transformer(ch, None, 0),
                                                    ResBlock(ch, emb_dim))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers += transformer(ch, level, i)
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # The network runs in its weights' dtype; the output comes back in the input's dtype.
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))  # (B, 4*mc)
        context = context.to(dtype)
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)

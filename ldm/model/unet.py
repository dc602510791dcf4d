"""The latent-diffusion UNet (SD 1.x/2.x and SDXL), built from a typed config, with no graph breaks.

SDXL adds to the SD UNet (generative-models' ``sgm.modules.diffusionmodules.openaimodel.UNetModel``): a
transformer depth per level (the middle block takes the last level's), levels without attention (those not in
``attention_resolutions``), and ``label_emb``, the ADM vector embedding (``num_classes: sequential``), which
adds an MLP of the ``adm_in_channels``-wide vector ``y`` to the timestep embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.model.attention import check_backend
from ldm.model.config import take_params
from ldm.model.unet_blocks import (BasicTransformerBlock, Downsample, ResBlock, SpatialTransformer,
                                   TimestepEmbedSequential, Upsample, normalization, timestep_embedding)

# yaml keys of the original UNetModel that only matter for training or for other model families.
# spatial_transformer_attn_type (sgm) names a kernel: the attention backend is chosen at run time here.
_IGNORED = {"use_checkpoint", "use_fp16", "use_bf16", "image_size", "dropout", "legacy", "use_new_attention_order",
            "num_heads_upsample", "spatial_transformer_attn_type"}
# yaml keys whose only supported value is given here.
_FIXED = {"dims": 2, "conv_resample": True, "use_spatial_transformer": True, "use_scale_shift_norm": False,
          "resblock_updown": False, "n_embed": None, "disable_middle_transformer": False}
NUM_CLASSES = (None, "sequential")  # no class embedding, or SDXL's ADM vector MLP
_REQUIRED = ("in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
             "context_dim")
_KNOWN = {"in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks", "channel_mult",
          "num_heads", "num_head_channels", "transformer_depth", "context_dim", "use_linear_in_transformer",
          "disable_self_attentions", "disable_middle_self_attn", "num_attention_blocks", "attention", "num_classes",
          "adm_in_channels"}


@dataclass(frozen=True)
class UNetConfig:
    """The original ``UNetModel``'s arguments; a default here is the original's default (what a yaml without
    the key means). Presets with the SD shapes are in ``ldm.model.presets``."""
    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: tuple[int, ...]  # per level (the yaml may give one int for all)
    context_dim: int
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_heads: int = -1
    num_head_channels: int = -1
    transformer_depth: int | tuple[int, ...] = 1  # one for all levels, or per level (SDXL base: 1, 2, 10)
    use_linear_in_transformer: bool = False
    disable_self_attentions: tuple[bool, ...] | None = None
    disable_middle_self_attn: bool = False
    num_attention_blocks: tuple[int, ...] | None = None
    attention: str = "sdpa"
    num_classes: str | None = None  # "sequential": label_emb over an adm_in_channels-wide vector (SDXL)
    adm_in_channels: int | None = None

    def depth_at(self, level: int | None) -> int:
        """Transformer blocks per SpatialTransformer at ``level`` (None: the middle block, the last level's)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[-1 if level is None else level]

    def heads_at(self, ch: int) -> tuple[int, int]:
        """(heads, dim_head) for a transformer over ``ch`` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels

    @classmethod
    def from_params(cls, params: dict) -> "UNetConfig":
        """Map the original ``UNetModel`` yaml params; unknown keys are errors."""
        p = take_params("UNetModel", params, _IGNORED, _FIXED, known=_KNOWN)
        missing = [k for k in _REQUIRED if k not in p]
        if missing:
            raise ValueError(f"UNetModel: missing config key(s) {', '.join(missing)}")
        if isinstance(p["context_dim"], (list, tuple)):  # sgm: one per level; SDXL's refiner repeats one value
            if len(set(p["context_dim"])) != 1:
                raise ValueError("UNetModel: a context_dim that differs per level is not supported")
            p["context_dim"] = p["context_dim"][0]
        if p.get("num_classes") not in NUM_CLASSES:
            raise ValueError(f"UNetModel: num_classes={p['num_classes']!r} is not supported (only 'sequential')")
        if (p.get("num_classes") is None) != (p.get("adm_in_channels") is None):
            raise ValueError("UNetModel: num_classes: sequential and adm_in_channels go together")
        if p.get("num_heads", -1) == -1 and p.get("num_head_channels", -1) == -1:
            raise ValueError("UNetModel: either num_heads or num_head_channels has to be set")
        mult = tuple(p.get("channel_mult", cls.channel_mult))
        nrb = p["num_res_blocks"]
        p["num_res_blocks"] = (nrb,) * len(mult) if isinstance(nrb, int) else tuple(nrb)
        if isinstance(p.get("transformer_depth"), (list, tuple)):
            if len(p["transformer_depth"]) != len(mult):
                raise ValueError(f"UNetModel: transformer_depth has {len(p['transformer_depth'])} entries for "
                                 f"{len(mult)} levels")
            p["transformer_depth"] = tuple(p["transformer_depth"])
        for key in ("attention_resolutions", "channel_mult", "disable_self_attentions", "num_attention_blocks"):
            if p.get(key) is not None:
                p[key] = tuple(p[key])
        if "attention" in p:
            check_backend(p["attention"])
        return cls(**p)  # keys the yaml leaves out take the dataclass defaults: one set of defaults


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
        if cfg.num_classes == "sequential":  # key label_emb.0.{0,2}: sgm nests the MLP in a second Sequential
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        def transformer(ch: int, level: int | None, index: int) -> list[nn.Module]:
            if level is not None and cfg.num_attention_blocks is not None and index >= cfg.num_attention_blocks[level]:
                return []
            heads, dim_head = cfg.heads_at(ch)
            if level is None:
                no_self = cfg.disable_middle_self_attn
            else:
                no_self = bool(cfg.disable_self_attentions[level]) if cfg.disable_self_attentions else False
            return [SpatialTransformer(ch, heads, dim_head, cfg.depth_at(level), cfg.context_dim,
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
        blocks = [m for m in self.modules() if isinstance(m, BasicTransformerBlock)]  # in call order
        for i, m in enumerate(blocks):
            m.cross_index = i
        self.num_cross_blocks = len(blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, branch: int | None = None,
                deep: torch.Tensor | None = None, cross: tuple[torch.Tensor, ...] | None = None,
                record: bool = False, y: torch.Tensor | None = None):
        """The UNet output (B, C_out, H, W); with any of the caching arguments (branch, cross, record), the tuple
        (out, deep feature or None, cross-attention outputs or None).

        ``y`` (B, adm_in_channels): the vector conditioning of a ``num_classes: sequential`` UNet (SDXL's pooled
        text embedding and Fourier-embedded sizes), required by such a UNet and refused by others.

        ``branch`` (DeepCache, Ma et al. 2023): the skip branch whose features stay fresh, 0 being the
        shallowest. Without ``deep`` the whole UNet runs and also returns the input of output block
        ``-(branch + 1)``, the deep feature; with ``deep`` (a feature from an earlier call) only input blocks
        ``0 ... branch`` and the last ``branch + 1`` output blocks run. ``cross`` (T-GATE, Zhang et al. 2024):
        every transformer block takes its cross-attention output from this tuple instead of computing it;
        ``record``: return each block's cross-attention output (index ``cross_index``).
        The extras are Python structure, not data: each combination is its own compiled graph.
        """
        # The network runs in its weights' dtype; the output comes back in the input's dtype.
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))  # (B, 4*mc)
        if (y is None) != (self.cfg.num_classes is None):
            raise ValueError("a num_classes: sequential UNet needs y, the vector conditioning; other UNets take none")
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))  # (B, 4*mc)
        context = context.to(dtype)
        if deep is not None and (branch is None or record):
            raise ValueError("deep (a DeepCache feature) needs its branch, and a call that keeps the cross-attention "
                             "outputs (record) must be a full one")
        kept = [None] * self.num_cross_blocks if record else None
        shallow = len(self.input_blocks) if branch is None else branch + 1  # the output blocks fed by fresh skips
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks[:shallow if deep is not None else len(self.input_blocks)]:
            h = block(h, emb, context, cross, kept)
            skips.append(h)
        if deep is None:
            h = self.middle_block(h, emb, context, cross, kept)
            for block in self.output_blocks[:len(self.output_blocks) - shallow]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context, cross, kept)
            fresh = h
        else:
            h, fresh = deep.to(dtype), None
        for block in self.output_blocks[len(self.output_blocks) - shallow:]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, cross, kept)
        out = self.out(h).to(x.dtype)
        if branch is None and cross is None and not record:
            return out
        return out, (fresh if branch is not None else None), (tuple(kept) if record else None)

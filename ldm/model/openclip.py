"""OpenCLIP text tower (ViT-H-14 for SD 2.x) and the FrozenOpenCLIPEmbedder conditioning.

The tower is written here in the open_clip state-dict layout (``model.transformer.resblocks.N.attn.
in_proj_weight`` ...), so a checkpoint's ``cond_stage_model.*`` keys load as they are; only
open_clip's tokenizer is used. Nothing is downloaded: the checkpoint holds the weights.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.model.config import take_params


def open_clip_file(*parts: str) -> str:
    """A file of the installed open_clip package, found without importing it: its ``__init__`` imports
    torchvision, timm and torch._dynamo, seconds of start-up for an arch table and a tokenizer."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is missing: pip install open_clip_torch")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


@functools.lru_cache(maxsize=1)
def open_clip_tokenizer():
    """open_clip's ``tokenizer`` module (``tokenize``, ``SimpleTokenizer``) loaded on its own: the file
    imports no other part of open_clip. Falls back to the package import if a later version does."""
    name = "ldm_open_clip_tokenizer"
    spec = importlib.util.spec_from_file_location(name, open_clip_file("tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: its objects pickle, its functions find their module
    try:
        spec.loader.exec_module(module)
    except ImportError:
        del sys.modules[name]
        import open_clip.tokenizer as module
    return module


def normal_(t: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """``nn.init.normal_``, skipped on the meta device: there torch runs it through its reference ops,
    which import torch._dynamo (about a second of start-up) for values that loading replaces anyway."""
    return t if t.is_meta else nn.init.normal_(t, std=std)


def embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)`` with torch's N(0, 1) init, none on the meta device (see ``normal_``)."""
    return nn.Embedding(num, dim, _weight=normal_(torch.empty(num, dim)))


@dataclass(frozen=True)
class TextConfig:
    """The OpenCLIP text tower's shape (default: ViT-H-14, the original's default arch) and the layer read."""
    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 1024  # text_projection output; unused for conditioning but present in checkpoints
    layer: str = "last"  # the original's default; SD 2.x yamls say penultimate

    @classmethod
    def from_params(cls, params: dict) -> "TextConfig":
        """Map ``FrozenOpenCLIPEmbedder`` yaml params; the tower's shape comes from open_clip's arch table."""
        p = take_params("FrozenOpenCLIPEmbedder", params, {"freeze", "version", "device"}, {},
                        known={"arch", "layer", "max_length", "width", "heads", "layers", "embed_dim"})
        layer = p.get("layer", cls.layer)
        if layer not in ("last", "penultimate"):
            raise ValueError(f"FrozenOpenCLIPEmbedder: layer={layer!r} is not supported (last or penultimate)")
        arch = p.get("arch", "ViT-H-14")
        shape = {} if arch == "custom" else arch_shape(arch)
        shape.update({k: p[k] for k in ("width", "heads", "layers", "embed_dim") if k in p})
        if "max_length" in p:
            shape["context_length"] = p["max_length"]
        return cls(layer=layer, **shape)


def arch_shape(arch: str) -> dict:
    """The text tower's shape of an open_clip arch: from the JSON files open_clip ships (read without importing
    the package: start-up), else from open_clip's registry, where ``open_clip.add_model_config`` puts a user's."""
    if os.path.basename(arch) != arch or arch.startswith(".") or ":" in arch:  # no paths, no hf-hub:/local-dir:
        raise ValueError(f"FrozenOpenCLIPEmbedder: unknown open_clip arch {arch!r}")
    path = open_clip_file("model_configs", f"{arch}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            mc = json.load(f)
    else:
        import open_clip  # slow (torchvision, timm); only for an arch registered at run time
        mc = open_clip.get_model_config(arch)
        if mc is None:
            raise ValueError(f"FrozenOpenCLIPEmbedder: unknown open_clip arch {arch!r} (neither shipped with "
                             f"open_clip nor registered with open_clip.add_model_config)")
    t = mc["text_cfg"]
    return dict(width=t["width"], heads=t["heads"], layers=t["layers"], vocab_size=t.get("vocab_size", 49408),
                embed_dim=mc["embed_dim"])


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block in open_clip's layout: ln_1, attn (packed in_proj), ln_2, mlp.c_fc/c_proj (GELU)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.attn.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = qkv.reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, d)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.out_proj(h.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(nn.Module):
    """The text half of an open_clip CLIP model, with its parameter names."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg.width, cfg.heads)
                                                   for _ in range(cfg.layers))
        self.token_embedding = embedding(cfg.vocab_size, cfg.width)
        self.ln_final = nn.LayerNorm(cfg.width)
        normal_(self.positional_embedding.data, std=0.01)
        normal_(self.text_projection.data, std=cfg.width ** -0.5)


class FrozenOpenCLIPEmbedder(nn.Module):
    """Prompts -> (B, 77, width) token features from the last or penultimate layer, then ln_final."""

    def __init__(self, cfg: TextConfig | None = None, **params):
        super().__init__()
        cfg = cfg if cfg is not None else TextConfig.from_params(params)
        self.cfg = cfg
        self.model = OpenCLIPText(cfg)
        self.layer_idx = 1 if cfg.layer == "penultimate" else 0
        self.max_length = cfg.context_length
        # Kept for scripts that set it (``model.cond_stage_model.device = "cpu"``); the tokens
        # always go to the device of the weights, so a stale value cannot break anything.
        self.device = None

    def tokenize(self, text: list[str] | str) -> torch.Tensor:
        """open_clip's BPE tokenizer: (B, context_length) int64, SOT ... EOT, zero padded, truncated."""
        return open_clip_tokenizer().tokenize(text, context_length=self.max_length)

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.token_embedding(tokens.to(m.token_embedding.weight.device)) + m.positional_embedding  # (B, T, W)
        for block in m.transformer.resblocks[: len(m.transformer.resblocks) - self.layer_idx]:
            x = block(x)
        return m.ln_final(x)

    def forward(self, text: list[str] | str) -> torch.Tensor:
        return self.encode_with_transformer(self.tokenize(text))

    def encode(self, text: list[str] | str) -> torch.Tensor:
        return self(text)

"""SDXL's conditioning (generative-models' ``GeneralConditioner``): a list of embedders, each reading one key of a
batch, whose outputs are concatenated by rank: (B, T, D) ones into the cross-attention context, (B, D) ones into
the UNet's vector conditioning ``y``.

SDXL base: CLIP ViT-L/14 (``hidden`` layer 11, no final norm; ``ldm.model.clip``) and OpenCLIP ViT-bigG-14
(penultimate layer, no final norm, plus the pooled, projected EOT feature of the final layer;
``FrozenOpenCLIPEmbedder2`` below) give a 768 + 1280 = 2048-wide context; the pooled feature (1280) and the
Fourier embeddings (256 per number) of the original size, the crop's top-left corner and the target size give
the 2816-wide vector. The refiner reads only bigG (1280-wide context) and replaces the target size by the
aesthetic score: 1280 + 512 + 512 + 256 = 2560.

Module attribute names follow the checkpoint keys: ``conditioner.embedders.N.transformer.text_model.*`` (CLIP),
``conditioner.embedders.N.model.*`` (OpenCLIP); the Fourier embedders have no weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ldm.model.clip import CLIPTextConfig, FrozenCLIPEmbedder
from ldm.model.config import take_params, to_plain
from ldm.model.openclip import FrozenOpenCLIPEmbedder, TextConfig
from ldm.model.unet_blocks import timestep_embedding

# The batch keys of SDXL's embedders that carry numbers, and how many each: (height, width), (top, left), score.
NUMBER_KEYS = {"original_size_as_tuple": 2, "crop_coords_top_left": 2, "target_size_as_tuple": 2,
               "aesthetic_score": 1}
TEXT_KEY = "txt"
# yaml keys of an emb_models entry that only matter for training (ucg: random dropping of the condition).
_EMBEDDER_IGNORED = {"is_trainable", "ucg_rate", "legacy_ucg_value"}


@dataclass(frozen=True)
class OpenCLIP2Config(TextConfig):
    """``FrozenOpenCLIPEmbedder2``: the OpenCLIP tower (``TextConfig``) and what it returns. ``legacy=False``
    returns the layer's features without ``ln_final`` (and, with ``always_return_pooled``, the pooled
    ``ln_final``-ed EOT feature of the last layer through ``text_projection``); ``legacy=True`` is SD 2's."""
    always_return_pooled: bool = False
    legacy: bool = True

    def __post_init__(self):
        if self.always_return_pooled and self.legacy:
            raise ValueError("FrozenOpenCLIPEmbedder2: always_return_pooled needs legacy: False (as sgm asserts)")

    @classmethod
    def from_params(cls, params: dict) -> "OpenCLIP2Config":
        """Map ``FrozenOpenCLIPEmbedder2`` yaml params (``FrozenOpenCLIPEmbedder``'s and these two)."""
        p = dict(to_plain(params or {}))
        own = {k: p.pop(k) for k in ("always_return_pooled", "legacy") if k in p}
        return cls(**asdict(TextConfig.from_params(p)), **own)


@dataclass(frozen=True)
class FourierConfig:
    """``ConcatTimestepEmbedderND``: each number of the key gets a sinusoidal embedding ``outdim`` wide."""
    outdim: int

    @classmethod
    def from_params(cls, params: dict) -> "FourierConfig":
        p = take_params("ConcatTimestepEmbedderND", params, set(), {}, known={"outdim"})
        if "outdim" not in p:
            raise ValueError("ConcatTimestepEmbedderND: missing config key outdim")
        return cls(**p)


EmbedderKind = CLIPTextConfig | OpenCLIP2Config | FourierConfig
# emb_models target -> the typed config of that embedder (sgm's names and this package's own).
EMBEDDER_TARGETS: dict[str, type] = {
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": CLIPTextConfig,
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": OpenCLIP2Config,
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": FourierConfig,
    "ldm.model.clip.FrozenCLIPEmbedder": CLIPTextConfig,
    "ldm.model.conditioner.FrozenOpenCLIPEmbedder2": OpenCLIP2Config,
    "ldm.model.conditioner.ConcatTimestepEmbedderND": FourierConfig,
}


@dataclass(frozen=True)
class EmbedderConfig:
    """One ``emb_models`` entry: the batch key it reads and its embedder."""
    input_key: str
    embedder: EmbedderKind

    def __post_init__(self):
        text = not isinstance(self.embedder, FourierConfig)
        if text != (self.input_key == TEXT_KEY) or (not text and self.input_key not in NUMBER_KEYS):
            raise ValueError(f"GeneralConditioner: input_key {self.input_key!r} does not fit a "
                             f"{type(self.embedder).__name__} (text reads {TEXT_KEY!r}; numbers one of "
                             f"{', '.join(NUMBER_KEYS)})")

    @property
    def context_width(self) -> int:
        """Width this embedder adds to the cross-attention context (0 for number embedders)."""
        return 0 if isinstance(self.embedder, FourierConfig) else self.embedder.width

    @property
    def vector_width(self) -> int:
        """Width this embedder adds to the vector conditioning."""
        e = self.embedder
        if isinstance(e, FourierConfig):
            return e.outdim * NUMBER_KEYS[self.input_key]
        return e.embed_dim if isinstance(e, OpenCLIP2Config) and e.always_return_pooled else 0


@dataclass(frozen=True)
class ConditionerConfig:
    """``GeneralConditioner``'s embedders in order (the order of the concatenations and of the checkpoint keys)."""
    embedders: tuple[EmbedderConfig, ...]

    @property
    def context_dim(self) -> int:
        return sum(e.context_width for e in self.embedders)

    @property
    def vector_dim(self) -> int:
        return sum(e.vector_width for e in self.embedders)

    @property
    def input_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.input_key for e in self.embedders))

    @classmethod
    def from_params(cls, params: dict) -> "ConditionerConfig":
        """Map ``GeneralConditioner``'s ``emb_models`` list; unknown targets and keys are errors."""
        p = take_params("GeneralConditioner", params, set(), {}, known={"emb_models"})
        embedders = []
        for i, node in enumerate(p.get("emb_models") or []):
            where = f"GeneralConditioner.emb_models[{i}]"
            node = take_params(where, node, _EMBEDDER_IGNORED, {}, known={"target", "params", "input_key"})
            if node.get("target") not in EMBEDDER_TARGETS:
                raise ValueError(f"{where}: target {node.get('target')!r} is not supported (expected one of "
                                 f"{sorted(EMBEDDER_TARGETS)})")
            if "input_key" not in node:
                raise ValueError(f"{where}: missing input_key")
            kind = EMBEDDER_TARGETS[node["target"]]
            embedders.append(EmbedderConfig(node["input_key"], kind.from_params(node.get("params") or {})))
        if not embedders:
            raise ValueError("GeneralConditioner: emb_models is empty")
        return cls(tuple(embedders))


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """Prompts -> (B, 77, width) features of the chosen layer and, with ``always_return_pooled``, (B, embed_dim)."""

    def __init__(self, cfg: OpenCLIP2Config | None = None, **params):
        super().__init__(cfg if cfg is not None else OpenCLIP2Config.from_params(params))

    def encode_with_transformer(self, tokens: torch.Tensor):
        cfg, m = self.cfg, self.model
        if cfg.legacy:
            return super().encode_with_transformer(tokens)
        tokens = tokens.to(m.token_embedding.weight.device)
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, T, W)
        blocks = m.transformer.resblocks
        kept = len(blocks) - self.layer_idx  # the blocks up to the chosen layer
        for block in blocks[:kept]:
            x = block(x)
        z = x  # the chosen layer's output, without ln_final (sgm's legacy=False)
        if not cfg.always_return_pooled:
            return z
        for block in blocks[kept:]:
            x = block(x)
        eot = m.ln_final(x)[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, W): EOT, largest id
        return z, eot @ m.text_projection  # (B, T, W), (B, embed_dim)


class ConcatTimestepEmbedderND(nn.Module):
    """(B, d) numbers -> (B, d * outdim): each number's sinusoidal embedding [cos | sin], concatenated."""

    def __init__(self, cfg: FourierConfig | None = None, **params):
        super().__init__()
        self.cfg = cfg if cfg is not None else FourierConfig.from_params(params)
        self.outdim = self.cfg.outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None] if x.dim() == 1 else x  # (B, d)
        B, d = x.shape
        return timestep_embedding(x.reshape(B * d), self.outdim).reshape(B, d * self.outdim)


def build_embedder(cfg: EmbedderConfig) -> nn.Module:
    """The module of one embedder, with ``input_key`` set."""
    e = cfg.embedder
    module = (FrozenCLIPEmbedder(e) if isinstance(e, CLIPTextConfig) else
              FrozenOpenCLIPEmbedder2(e) if isinstance(e, OpenCLIP2Config) else ConcatTimestepEmbedderND(e))
    module.input_key = cfg.input_key
    return module


class GeneralConditioner(nn.Module):
    """A batch (``txt``: prompts; the number keys: (B, d) tensors or lists) -> {"crossattn": (B, T, context_dim),
    "vector": (B, vector_dim)}, each embedder's outputs concatenated in order (sgm's ``GeneralConditioner``)."""

    def __init__(self, cfg: ConditionerConfig | None = None, **params):
        super().__init__()
        self.cfg = cfg if cfg is not None else ConditionerConfig.from_params(params)
        self.embedders = nn.ModuleList(build_embedder(e) for e in self.cfg.embedders)

    def forward(self, batch: dict[str, Any], force_zero_embeddings: tuple[str, ...] | list[str] = ()) -> dict:
        """The conditioning of ``batch``; the outputs of embedders whose key is in ``force_zero_embeddings`` are
        zeros (sgm: the unconditional half of SDXL's guidance zeroes ``txt``)."""
        w = next(self.parameters())  # the text towers' device and dtype
        out: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            value = batch[embedder.input_key]
            if not isinstance(embedder, ConcatTimestepEmbedderND):
                embs = embedder(value)
            else:
                embs = embedder(torch.as_tensor(value, dtype=torch.float32).to(w.device))
            for emb in embs if isinstance(embs, tuple) else (embs,):
                emb = emb.to(w.dtype)
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                key = "crossattn" if emb.dim() == 3 else "vector"
                out[key] = emb if key not in out else torch.cat([out[key], emb], dim=emb.dim() - 1)
        return out

    def get_unconditional_conditioning(self, batch_c: dict[str, Any], batch_uc: dict[str, Any] | None = None,
                                       force_uc_zero_embeddings: tuple[str, ...] | list[str] = ()):
        """(c, uc) as sgm's: ``uc`` from ``batch_uc`` (keys it lacks taken from ``batch_c``), zeroed where asked."""
        uc_batch = {**batch_c, **(batch_uc or {})}
        return self(batch_c), self(uc_batch, force_uc_zero_embeddings)


def conditioning_batch(prompts: list[str], original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
                       target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0) -> dict[str, Any]:
    """The batch every SDXL embedder reads (each takes its key): sizes as (height, width), crop as (top, left),
    target size defaulting to the original size; sgm's demo defaults: crop (0, 0), aesthetic score 6.0 (2.5 for
    the negative side of the refiner)."""
    n = len(prompts)
    target = original_size if target_size is None else target_size
    rows = lambda v: torch.tensor([list(v)] * n, dtype=torch.float32)  # (B, d)
    return {TEXT_KEY: list(prompts), "original_size_as_tuple": rows(original_size),
            "crop_coords_top_left": rows(crop_top_left), "target_size_as_tuple": rows(target),
            "aesthetic_score": rows([aesthetic_score])}

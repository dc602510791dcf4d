"""CLIP ViT-L/14 text tower (SD 1.x) and the FrozenCLIPEmbedder conditioning.

The tower is written here in transformers' ``CLIPTextModel`` state-dict layout
(``transformer.text_model.encoder.layers.N.self_attn.q_proj.weight`` ...), so a checkpoint's
``cond_stage_model.*`` keys load as they are. The tokenizer is CLIP's BPE (open_clip's tables),
with transformers' ``CLIPTokenizer`` conventions as SD 1.x calls it: ``<|startoftext|>`` ...
``<|endoftext|>``, truncated to ``max_length`` with the end token kept, padded with the end token
(49407), not with 0 as open_clip pads. ``version`` only picks the tower's shape: nothing is
downloaded, the checkpoint holds the weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.model.config import take_params
from ldm.model.openclip import embedding, open_clip_tokenizer

# Text-tower shapes of the CLIP releases a FrozenCLIPEmbedder ``version`` can name (transformers' configs).
PRESETS = {
    "openai/clip-vit-large-patch14": dict(width=768, heads=12, layers=12),
    "openai/clip-vit-large-patch14-336": dict(width=768, heads=12, layers=12),
    "openai/clip-vit-base-patch32": dict(width=512, heads=8, layers=12),
    "openai/clip-vit-base-patch16": dict(width=512, heads=8, layers=12),
}
LAYERS = ("last", "pooled", "hidden")
SOT, EOT = 49406, 49407  # <|startoftext|>, <|endoftext|> (also the padding token)
# transformers' CLIP pre-tokenizer split: its two special tokens, contractions, letters, digits, punctuation runs.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    width: int = 768
    heads: int = 12
    layers: int = 12
    context_length: int = 77  # rows of the position embedding
    max_length: int = 77      # tokens per prompt (<= context_length)
    layer: str = "last"       # last (final_layer_norm applied), pooled (EOT token), hidden (hidden_states[layer_idx])
    layer_idx: int | None = None
    version: str = "openai/clip-vit-large-patch14"

    def __post_init__(self):
        if self.layer not in LAYERS:
            hint = " (the penultimate layer is layer: hidden, layer_idx: -2)" if self.layer == "penultimate" else ""
            raise ValueError(f"FrozenCLIPEmbedder: layer={self.layer!r} is not supported, use one of {LAYERS}{hint}")
        if self.layer == "hidden" and (self.layer_idx is None or abs(self.layer_idx) > self.layers):
            raise ValueError(f"FrozenCLIPEmbedder: layer: hidden needs layer_idx in [-{self.layers}, {self.layers}], "
                             f"got {self.layer_idx}")
        if not 2 <= self.max_length <= self.context_length:
            raise ValueError(f"FrozenCLIPEmbedder: max_length={self.max_length} must be in [2, {self.context_length}]")
        if self.width % self.heads:
            raise ValueError(f"FrozenCLIPEmbedder: width {self.width} is not divisible by heads {self.heads}")

    @property
    def blocks_run(self) -> int:
        """Encoder layers the conditioning runs (all but for ``hidden``)."""
        return blocks_run(self.layer, self.layer_idx, self.layers)

    @classmethod
    def from_params(cls, params: dict) -> "CLIPTextConfig":
        """Map ``FrozenCLIPEmbedder`` yaml params; ``version: custom`` plus width/heads/layers gives a test tower."""
        p = take_params("FrozenCLIPEmbedder", params, {"freeze", "device"}, {},
                        known={"version", "max_length", "layer", "layer_idx", "width", "heads", "layers"})
        version = p.get("version", "openai/clip-vit-large-patch14")
        if version == "custom":
            missing = [k for k in ("width", "heads", "layers") if k not in p]
            if missing:
                raise ValueError(f"FrozenCLIPEmbedder: version: custom needs {', '.join(missing)}")
            shape = {k: p[k] for k in ("width", "heads", "layers")}
        elif version in PRESETS:
            extra = [k for k in ("width", "heads", "layers") if k in p]
            if extra:
                raise ValueError(f"FrozenCLIPEmbedder: {', '.join(extra)} can only be set with version: custom")
            shape = PRESETS[version]
        else:
            raise ValueError(f"FrozenCLIPEmbedder: unknown version {version!r} (known: {', '.join(PRESETS)}, "
                             f"or custom); it only selects the tower's shape, the weights come from the checkpoint")
        return cls(max_length=p.get("max_length", 77), layer=p.get("layer", "last"),
                   layer_idx=p.get("layer_idx"), version=version, **shape)


def blocks_run(layer: str, layer_idx: int | None, layers: int) -> int:
    """How many encoder layers the conditioning needs (hidden_states[i] is the output of layer i; 0 = embeddings)."""
    if layer != "hidden":
        return layers
    return layer_idx if layer_idx >= 0 else layers + 1 + layer_idx


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        split = lambda t: t.reshape(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, T, d)
        h = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           is_causal=True)
        return self.out_proj(h.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: layer_norm1, self_attn, layer_norm2, mlp, each residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(width)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nn.Module):
    """``text_model``: embeddings (token + learned position), encoder.layers, final_layer_norm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = embedding(cfg.vocab_size, cfg.width)
        self.embeddings.position_embedding = embedding(cfg.context_length, cfg.width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """Holds ``text_model``, as transformers' CLIPTextModel does (the checkpoint prefix ``transformer.text_model.``)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


@functools.lru_cache(maxsize=1)
def _bpe():
    """(open_clip's SimpleTokenizer for its BPE tables, transformers' compiled split pattern), built once."""
    import regex
    return open_clip_tokenizer().SimpleTokenizer(), regex.compile(_SPLIT, regex.IGNORECASE)


def encode_text(text: str) -> list[int]:
    """One prompt -> BPE ids without SOT/EOT, cleaned as transformers' CLIPTokenizer does (ftfy, whitespace, lower).

    open_clip's own ``encode`` also html-unescapes ("&amp;" -> "&"), which CLIPTokenizer does not.
    """
    import ftfy
    tok, split = _bpe()
    text = " ".join(ftfy.fix_text(text).split()).lower()
    ids: list[int] = []
    for piece in split.findall(text):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(SOT if piece == "<|startoftext|>" else EOT)
            continue
        piece = "".join(tok.byte_encoder[b] for b in piece.encode("utf-8"))
        ids.extend(tok.encoder[p] for p in tok.bpe(piece).split(" "))
    return ids


def tokenize(texts: list[str] | str, max_length: int = 77) -> torch.Tensor:
    """(B, max_length) int64: SOT, up to max_length-2 tokens, EOT, EOT padding (CLIPTokenizer's "max_length")."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = torch.full((len(texts), max_length), EOT, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [SOT] + encode_text(text)[: max_length - 2]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> (B, 77, width) CLIP token features: last layer + final_layer_norm, pooled, or a hidden state."""

    def __init__(self, cfg: CLIPTextConfig | None = None, **params):
        super().__init__()
        cfg = cfg if cfg is not None else CLIPTextConfig.from_params(params)
        self.cfg = cfg
        self.transformer = CLIPTextModel(cfg)
        # The original's attributes, read at each call as there (a script may switch layer after loading).
        self.max_length = cfg.max_length
        self.layer = cfg.layer
        self.layer_idx = cfg.layer_idx
        # Kept for scripts that set it; the tokens always go to the device of the weights.
        self.device = None

    def tokenize(self, text: list[str] | str) -> torch.Tensor:
        return tokenize(text, self.max_length)

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, width), or (B, 1, width) for ``pooled``."""
        m = self.transformer.text_model
        emb = m.embeddings
        tokens = tokens.to(emb.token_embedding.weight.device)
        x = emb.token_embedding(tokens) + emb.position_embedding.weight[: tokens.shape[1]]  # (B, T, W)
        for block in m.encoder.layers[: blocks_run(self.layer, self.layer_idx, len(m.encoder.layers))]:
            x = block(x)
        if self.layer == "hidden":
            return x  # transformers' hidden_states[i]: no final_layer_norm
        x = m.final_layer_norm(x)
        if self.layer == "pooled":
            # The first EOT (the largest id) as transformers' CLIPTextModel picks it for SD 1.x's config.
            return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)][:, None, :]
        return x

    def forward(self, text: list[str] | str) -> torch.Tensor:
        return self.encode_with_transformer(self.tokenize(text))

    def encode(self, text: list[str] | str) -> torch.Tensor:
        return self(text)

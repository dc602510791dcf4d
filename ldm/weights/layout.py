"""The two attention layouts of a checkpoint and every rename between them, and the text tower's key prefixes
(one table: this file).

  original    ``...attn1.to_q.weight``, ``to_k``, ``to_v`` (no bias), ``to_out.0.weight/bias``
  native_mha  ``...attn1.in_proj_weight`` (self-attention: Q,K,V packed), ``...attn2.q_proj_weight``/
              ``k_proj_weight``/``v_proj_weight`` (cross-attention), ``in_proj_bias``, ``out_proj.weight/bias``

The CLIP text tower is ``...transformer.text_model.{embeddings,encoder,final_layer_norm}...`` (transformers < 5,
the form the model and the converter use); transformers 5 and some early SD 1.x files save it without the
``text_model.`` level. Both read alike (``canonical_text_keys``).
"""

from __future__ import annotations

import re

import torch

from ldm.weights.reading import CheckpointError


# prefix as some writers save it -> the canonical prefix, for keys that continue with one of CLIP_PARTS
TEXT_RENAMES = {
    "cond_stage_model.transformer.": "cond_stage_model.transformer.text_model.",  # SD 1.x CLIP ViT-L/14
    "conditioner.embedders.0.transformer.": "conditioner.embedders.0.transformer.text_model.",  # SDXL base's CLIP
}
CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_ORIG_ATTN = re.compile(r"^(.*\.attn[12])\.to_q\.weight$")
_NATIVE_ATTN = re.compile(r"^(.*\.attn[12])\.(in_proj_weight|q_proj_weight)$")


def detect_layout(sd: dict[str, torch.Tensor]) -> str | None:
    """'original', 'native_mha', or None when the dict has no UNet attention keys."""
    orig = any(_ORIG_ATTN.match(k) for k in sd)
    native = any(_NATIVE_ATTN.match(k) for k in sd)
    if orig and native:
        raise CheckpointError("checkpoint mixes the original (to_q/to_k/to_v) and native (in_proj) attention layouts")
    return "original" if orig else "native_mha" if native else None


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original -> native layout. Self-attention (query and key widths equal in attn1) is packed."""
    out = dict(sd)
    for key in [k for k in sd if _ORIG_ATTN.match(k)]:
        p = _ORIG_ATTN.match(key).group(1)
        try:
            q, k, v = (out.pop(f"{p}.to_{n}.weight") for n in "qkv")
            out[f"{p}.out_proj.weight"] = out.pop(f"{p}.to_out.0.weight")
            out[f"{p}.out_proj.bias"] = out.pop(f"{p}.to_out.0.bias")
        except KeyError as e:
            raise CheckpointError(f"incomplete attention weights at {p}: missing {e.args[0]}") from None
        if p.endswith("attn1") and k.shape[1] == q.shape[1]:
            out[f"{p}.in_proj_weight"] = torch.cat([q, k, v])
        else:
            out[f"{p}.q_proj_weight"], out[f"{p}.k_proj_weight"], out[f"{p}.v_proj_weight"] = q, k, v
        out[f"{p}.in_proj_bias"] = torch.zeros(3 * q.shape[0], dtype=q.dtype)
    return out


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native -> original layout; refuses non-zero in_proj_bias, which the original cannot hold."""
    out = dict(sd)
    for key in [k for k in sd if _NATIVE_ATTN.match(k)]:
        p = _NATIVE_ATTN.match(key).group(1)
        bias = out.pop(f"{p}.in_proj_bias", None)
        if bias is not None and not bias.is_meta and bool(bias.any()):
            raise CheckpointError(f"{p}.in_proj_bias is non-zero: the original layout has no Q/K/V bias")
        if key.endswith("in_proj_weight"):
            q, k, v = out.pop(key).chunk(3)
        else:
            q, k, v = (out.pop(f"{p}.{n}_proj_weight") for n in "qkv")
        out[f"{p}.to_q.weight"], out[f"{p}.to_k.weight"], out[f"{p}.to_v.weight"] = \
            q.contiguous(), k.contiguous(), v.contiguous()
        out[f"{p}.to_out.0.weight"] = out.pop(f"{p}.out_proj.weight")
        out[f"{p}.to_out.0.bias"] = out.pop(f"{p}.out_proj.bias")
    return out


def text_key(key: str) -> str:
    """The canonical name of a CLIP text-tower key (``...transformer.text_model.*``); other keys unchanged."""
    for old, new in TEXT_RENAMES.items():
        if key.startswith(old) and key[len(old):].startswith(CLIP_PARTS):
            return new + key[len(old):]
    return key


def canonical_text_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with its CLIP text-tower keys in the canonical form; refuses a weight stored in both forms."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = text_key(key)
        if name in out:
            raise CheckpointError(f"checkpoint holds the text encoder weight {name} twice, with and without "
                                  f"the text_model. level")
        out[name] = value
    return out

"""The two attention layouts of a checkpoint and every rename between them (one table: this file).

  original    ``...attn1.to_q.weight``, ``to_k``, ``to_v`` (no bias), ``to_out.0.weight/bias``
  native_mha  ``...attn1.in_proj_weight`` (self-attention: Q,K,V packed), ``...attn2.q_proj_weight``/
              ``k_proj_weight``/``v_proj_weight`` (cross-attention), ``in_proj_bias``, ``out_proj.weight/bias``
"""

from __future__ import annotations

import re

import torch

from ldm.weights.reading import CheckpointError


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



"""Attention in the native ``nn.MultiheadAttention`` parameter layout.

State-dict keys follow ``nn.MultiheadAttention`` so that converted checkpoints load with no
renames: self-attention packs Q,K,V in ``in_proj_weight`` (3*inner, dim); cross-attention has
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` because the context width differs; both
have ``in_proj_bias`` (zeros for weights converted from the bias-free original) and
``out_proj``. Which SDPA kernel runs is chosen by the caller with
``torch.nn.attention.sdpa_kernel``; nothing here reads flags or the environment.

Fused projections: cross-attention stores K and V as one parameter ``kv_proj_weight``
(2*inner, context_dim), so that ``fused`` (the default) projects the context with one matmul and
no copy; ``k_proj_weight``/``v_proj_weight`` are row views of it, and ``state_dict()``/
``load_state_dict()`` split and join it, so the checkpoint keys stay the three of the layout above.
``fused=False`` runs three matmuls over row slices of the packed weights (the original's way)
for both attentions. One storage means nothing can go stale when weights are loaded or edited.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "mha", "math", "xformers")


def check_backend(name: str) -> str:
    """Validate an attention backend name; xformers must be importable to be chosen."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            raise ValueError("attention backend 'xformers' needs the xformers package (pip install xformers)") from e
    return name


def set_attention_backend(module: nn.Module, name: str) -> int:
    """Switch every CrossAttention under ``module`` to backend ``name``; returns how many."""
    check_backend(name)
    count = 0
    for m in module.modules():
        if isinstance(m, CrossAttention):
            m.backend = name
            count += 1
    return count


def set_fused_projections(module: nn.Module, fused: bool) -> int:
    """Fuse (one QKV matmul in self-, one KV matmul in cross-attention) or split the projections of every
    CrossAttention under ``module``; returns how many. A compiled module recompiles on its next call."""
    count = 0
    for m in module.modules():
        if isinstance(m, CrossAttention):
            m.fused = bool(fused)
            count += 1
    return count


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with the logits and softmax in fp32, as the original ldm code does."""
    # q: (B, heads, T, d), k/v: (B, heads, S, d)
    sim = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, heads, T, S)
    attn = sim.softmax(dim=-1).to(v.dtype)
    return torch.matmul(attn, v)  # (B, heads, T, d)


class CrossAttention(nn.Module):
    """Multi-head attention over ``x`` (self) or a context (cross), in nn.MultiheadAttention layout."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 backend: str = "sdpa", fused: bool = True):
        super().__init__()
        inner = heads * dim_head
        if inner != query_dim:
            # nn.MultiheadAttention's layout projects the query to embed_dim == query_dim.
            raise ValueError(f"heads*dim_head ({inner}) must equal query_dim ({query_dim})")
        self.heads = heads
        self.dim_head = dim_head
        self.is_self = context_dim is None
        self.backend = check_backend(backend)
        self.fused = fused
        if self.is_self:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, query_dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(inner, query_dim))
            self.kv_proj_weight = nn.Parameter(torch.empty(2 * inner, context_dim))  # [K; V], see the module doc
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner))
        self.out_proj = nn.Linear(inner, query_dim)
        self.reset_parameters()

    @property
    def k_proj_weight(self) -> torch.Tensor:
        """(inner, context_dim) view of ``kv_proj_weight``."""
        return self.kv_proj_weight[:self.kv_proj_weight.shape[0] // 2]

    @property
    def v_proj_weight(self) -> torch.Tensor:
        """(inner, context_dim) view of ``kv_proj_weight``."""
        return self.kv_proj_weight[self.kv_proj_weight.shape[0] // 2:]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.is_self:
                nn.init.xavier_uniform_(self.in_proj_weight)
            else:
                for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                    nn.init.xavier_uniform_(w)
            nn.init.zeros_(self.in_proj_bias)

    def project(self, x: torch.Tensor, context: torch.Tensor | None):
        """Return q, k, v of shape (B, T or S, inner)."""
        # Row slices, not chunk(): they are views here, and torchao's int8 weights support them.
        n, b = self.out_proj.in_features, self.in_proj_bias
        if self.is_self:
            w = self.in_proj_weight
            if self.fused:
                return F.linear(x, w, b).chunk(3, dim=-1)  # (B, T, 3*inner) -> 3 x (B, T, inner)
            return F.linear(x, w[:n], b[:n]), F.linear(x, w[n:2 * n], b[n:2 * n]), F.linear(x, w[2 * n:], b[2 * n:])
        q = F.linear(x, self.q_proj_weight, b[:n])
        w = self.kv_proj_weight
        if self.fused:
            k, v = F.linear(context, w, b[n:]).chunk(2, dim=-1)  # (B, S, 2*inner) -> 2 x (B, S, inner)
            return q, k, v
        return q, F.linear(context, w[:n], b[n:2 * n]), F.linear(context, w[n:], b[2 * n:])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Write the checkpoint keys: ``kv_proj_weight`` becomes ``k_proj_weight`` and ``v_proj_weight`` (views)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.is_self:
            kv = destination.pop(prefix + "kv_proj_weight")
            bias = destination.pop(prefix + "in_proj_bias")  # re-added after K, V: the checkpoint's key order
            n = kv.shape[0] // 2
            destination[prefix + "k_proj_weight"], destination[prefix + "v_proj_weight"] = kv[:n], kv[n:]
            destination[prefix + "in_proj_bias"] = bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Read the checkpoint keys: ``k_proj_weight`` and ``v_proj_weight`` are joined into ``kv_proj_weight``."""
        if self.is_self:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        kv, names = prefix + "kv_proj_weight", (prefix + "k_proj_weight", prefix + "v_proj_weight")
        present = [k for k in names if k in state_dict]
        found = [state_dict.pop(k) for k in present]
        half = (self.kv_proj_weight.shape[0] // 2, self.kv_proj_weight.shape[1])
        if len(found) == 2 and all(t.shape == half for t in found):
            state_dict[kv] = torch.cat(found)  # (2*inner, context_dim)
        elif len(found) == 2:
            shapes = [tuple(t.shape) for t in found]
            error_msgs.append(f"size mismatch for {prefix}k_proj_weight/v_proj_weight: copying params with shapes "
                              f"{shapes} from checkpoint, the shape in current model is {half}.")
        start = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if kv in missing_keys[start:]:  # name the checkpoint keys, not the packed one
            missing_keys.remove(kv)
            missing_keys.extend(k for k in names if k not in present)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, dim); context: (B, S, context_dim) or None for self-attention
        ctx = x if self.is_self else context
        if self.backend == "mha":
            return self._mha(x, ctx)
        B, T, _ = x.shape
        q, k, v = self.project(x, ctx)
        if self.backend == "xformers":
            import xformers.ops
            split = lambda t: t.reshape(B, t.shape[1], self.heads, self.dim_head)  # (B, T, heads, d)
            out = xformers.ops.memory_efficient_attention(split(q), split(k), split(v))
            return self.out_proj(out.reshape(B, T, -1))
        split = lambda t: t.reshape(B, t.shape[1], self.heads, self.dim_head).transpose(1, 2)  # (B, heads, T, d)
        q, k, v = split(q), split(k), split(v)
        if self.backend == "math":
            out = math_attention(q, k, v, self.dim_head ** -0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, inner)
        return self.out_proj(out)

    def _mha(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The nn.MultiheadAttention forward (functional form), batch-first, need_weights=False."""
        # Self-attention passes one tensor as query, key and value, as nn.MultiheadAttention's callers do: the
        # packed weight then projects in one matmul instead of being split in two.
        q = x.transpose(0, 1)  # (T, B, dim)
        k = q if self.is_self else ctx.transpose(0, 1)  # (S, B, ctx_dim)
        out, _ = F.multi_head_attention_forward(
            q, k, k, self.out_proj.in_features, self.heads,
            self.in_proj_weight if self.is_self else None, self.in_proj_bias,
            None, None, False, 0.0, self.out_proj.weight, self.out_proj.bias,
            training=False, need_weights=False,
            use_separate_proj_weight=not self.is_self,
            q_proj_weight=None if self.is_self else self.q_proj_weight,
            k_proj_weight=None if self.is_self else self.k_proj_weight,
            v_proj_weight=None if self.is_self else self.v_proj_weight,
        )
        return out.transpose(0, 1)  # (B, T, dim)

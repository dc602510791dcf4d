"""Attention in the native ``nn.MultiheadAttention`` parameter layout.

Parameter names follow ``nn.MultiheadAttention`` so that converted checkpoints load with no
renames: self-attention packs Q,K,V in ``in_proj_weight`` (3*inner, dim); cross-attention keeps
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` because the context width differs; both
have ``in_proj_bias`` (zeros for weights converted from the bias-free original) and
``out_proj``. Which SDPA kernel runs is chosen by the caller with
``torch.nn.attention.sdpa_kernel``; nothing here reads flags or the environment.
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


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with the logits and softmax in fp32, as the original ldm code does."""
    # q: (B, heads, T, d), k/v: (B, heads, S, d)
    sim = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, heads, T, S)
    attn = sim.softmax(dim=-1).to(v.dtype)
    return torch.matmul(attn, v)  # (B, heads, T, d)


class CrossAttention(nn.Module):
    """Multi-head attention over ``x`` (self) or a context (cross), in nn.MultiheadAttention layout."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 backend: str = "sdpa"):
        super().__init__()
        inner = heads * dim_head
        if inner != query_dim:
            # nn.MultiheadAttention's layout projects the query to embed_dim == query_dim.
            raise ValueError(f"heads*dim_head ({inner}) must equal query_dim ({query_dim})")
        self.heads = heads
        self.dim_head = dim_head
        self.is_self = context_dim is None
        self.backend = check_backend(backend)
        if self.is_self:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, query_dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(inner, query_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, context_dim))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, context_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner))
        self.out_proj = nn.Linear(inner, query_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            p = getattr(self, name, None)
            if p is not None:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.in_proj_bias)

    def project(self, x: torch.Tensor, context: torch.Tensor | None):
        """Return q, k, v of shape (B, T or S, inner)."""
        if self.is_self:
            return F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(x, self.q_proj_weight, bq)
        k = F.linear(context, self.k_proj_weight, bk)
        v = F.linear(context, self.v_proj_weight, bv)
        return q, k, v

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
        q, k = x.transpose(0, 1), ctx.transpose(0, 1)  # (T, B, dim), (S, B, ctx_dim)
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

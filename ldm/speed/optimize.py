"""Speed transformations of a loaded model: fused projections, channels_last, int8 dynamic quantization.

Each works in place on any module (the whole LatentDiffusion, its UNet or its VAE), keeps the
``state_dict()`` keys, and is applied after loading and moving the model and before
``torch.compile``:

- ``set_fused_projections(model, fused)``: one QKV matmul in self-attention and one KV matmul in
  cross-attention (the default), or three matmuls as the original code ran them.
- ``to_channels_last(model)``: conv weights stored channels_last, so every activation between
  convs is channels_last too (the first conv converts the NCHW input; see ``SpatialTransformer``).
- ``quantize_int8(model)``: torchao's dynamic int8-activation x int8-weight matmuls for the
  linear layers large enough to gain (optional dependency ``torchao``). Each call quantizes the
  activations on the fly; compiled, inductor fuses that into the neighbouring ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.model.attention import CrossAttention, set_fused_projections

__all__ = ["set_fused_projections", "to_channels_last", "quantize_int8", "int8_targets", "swap_conv1x1_to_linear",
           "Conv1x1Linear", "INT8_HELP"]

INT8_HELP = "--int8 needs torchao: pip install torchao"

# Layers whose input has one row per sample (timestep embeddings, SDXL's vector embedding ``label_emb``) or per
# context token (the text encoder, the cross-attention K/V: 77 per sample): quantizing so few rows on the fly costs
# more than the int8 matmul saves.
FEW_ROWS = ("time_embed", "emb_layers", "label_emb", "cond_stage_model", "conditioner",
            "time_embedding", "time_emb_proj", "add_embedding")  # the last three: diffusers' names (benchmark peer)
PEER_CROSS_KV = ("attn2.to_k", "attn2.to_v", "attn2.to_kv")  # diffusers' cross-attention K/V: 77 rows, as ours
# Attention projections kept as raw parameters (nn.MultiheadAttention layout) that see every spatial token.
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight")


def to_channels_last(model: nn.Module) -> int:
    """Store the 4-D (conv) weights of ``model`` channels_last; returns how many.

    Convolutions give a channels_last output when their weight is, so activations follow without
    converting inputs. Only 4-D parameters are touched (in place, the Parameter objects stay), so it
    also works on a model already quantized by ``quantize_int8``, whose int8 weights ``Module.to``
    cannot convert once compiled. Undo with ``model.to(memory_format=torch.contiguous_format)``.
    """
    count = 0
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.dim() == 4:  # empty_like restrides 1x1 kernels too, which contiguous() leaves as they are
                    p.data = torch.empty_like(p, memory_format=torch.channels_last).copy_(p)
                    count += 1
    return count


class Conv1x1Linear(nn.Linear):
    """A 1x1 convolution computed as a linear layer over channels: (B, C_in, H, W) -> (B, C_out, H, W).

    The weight is (C_out, C_in), so torchao can quantize it. The output is a channels_last view,
    free when the model is channels_last; in an NCHW model the next layer pays a reorder.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "Conv1x1Linear":
        """The same map as ``conv`` (1x1, stride 1, no padding, one group), sharing no storage with it."""
        lin = cls(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.reshape(conv.out_channels, conv.in_channels))
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, H, W, C_in) -> (B, H, W, C_out) -> (B, C_out, H, W)
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


def _is_pointwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), 0)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def swap_conv1x1_to_linear(model: nn.Module, min_features: int = 0) -> list[str]:
    """Replace every pointwise ``nn.Conv2d`` with at least ``min_features`` in and out channels by a Conv1x1Linear.

    Returns their names. State-dict keys stay; those weights become 2-D (C_out, C_in).
    """
    names = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if _is_pointwise(child) and min(child.in_channels, child.out_channels) >= min_features:
                setattr(parent, child_name, Conv1x1Linear.from_conv(child))
                names.append(f"{name}.{child_name}" if name else child_name)
    return names


def _few_rows(name: str) -> bool:
    return any(part in FEW_ROWS for part in name.split(".")) or name.endswith(PEER_CROSS_KV)


def int8_targets(model: nn.Module, min_features: int = 320, attention: bool = True) -> list[str]:
    """Names of the linear layers (modules) and attention weights (parameters) ``quantize_int8`` converts.

    Taken: ``nn.Linear`` layers (feed-forward, attention output, transformer proj_in/out, swapped 1x1
    convs) and, with ``attention``, the self-attention QKV and cross-attention Q weights, when both
    dimensions are at least ``min_features``. Left in float: the timestep- and vector-embedding layers
    (one row per sample) and the cross-attention K/V weight (77 context rows per sample).
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not _few_rows(name):
            if min(m.in_features, m.out_features) >= min_features:
                names.append(name)
        elif attention and isinstance(m, CrossAttention):
            for p_name in ATTENTION_WEIGHTS:
                w = getattr(m, p_name, None)
                if isinstance(w, nn.Parameter) and min(m.out_proj.in_features, w.shape[1]) >= min_features:
                    names.append(f"{name}.{p_name}" if name else p_name)
    return names


def quantize_int8(model: nn.Module, min_features: int = 320, attention: bool = True, conv1x1: bool = False,
                  inductor_config: bool = True) -> list[str]:
    """Dynamic int8 quantization (torchao ``Int8DynamicActivationInt8WeightConfig``: per-row int8 weights,
    per-token int8 activations) of the layers ``int8_targets`` names; returns those names.

    ``conv1x1`` first turns pointwise convs into linear layers (``swap_conv1x1_to_linear``) so they
    are quantized too. ``inductor_config`` lets torchao set its recommended inductor options (process
    wide). Apply after moving the model to its device and dtype (then only ``to_channels_last`` and
    ``set_fused_projections`` still apply), and compile: eager, the on-the-fly activation quantization
    is separate kernels, which only large layers repay.
    """
    try:
        from torchao.quantization import FqnToConfig, Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        raise ValueError(INT8_HELP) from e
    if attention and any(m.backend == "mha" for m in model.modules() if isinstance(m, CrossAttention)):
        raise ValueError("int8 attention weights do not run with --attention mha; use sdpa or math, or "
                         "quantize_int8(..., attention=False)")
    if conv1x1:
        swap_conv1x1_to_linear(model, min_features)
    names = int8_targets(model, min_features, attention)
    if names:
        config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=inductor_config)
        quantize_(model, FqnToConfig({name: config for name in names}), filter_fn=None)
    return names

"""Run-time choices made by scripts: device, dtype, SDPA kernels, compilation, precision scope.

Nothing here runs at import; scripts call these functions inside ``main``.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str | None) -> torch.device:
    """The requested device, or cuda when available, else cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sdpa_backends(disable_math: bool = False, disable_mem_efficient: bool = False,
                  disable_flash: bool = False) -> list[SDPBackend]:
    """The SDPA kernels left after the --disable_* flags (cuDNN counts with the fused kernels)."""
    backends = []
    if not disable_flash:
        backends.append(SDPBackend.FLASH_ATTENTION)
    if not disable_mem_efficient:
        backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if not disable_math:
        backends.append(SDPBackend.MATH)
    if not backends:
        raise ValueError("--disable_math --disable_mem_efficient --disable_flash leave no SDPA kernel; keep one")
    return backends


def check_sdpa(backends: list[SDPBackend], device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> None:
    """Fail early, with one line, when none of ``backends`` can run attention of this device/dtype/head size."""
    q = torch.zeros(2, 2, 16, head_dim, device=device, dtype=dtype)
    k = torch.zeros(2, 2, 8, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel(backends):
            torch.nn.functional.scaled_dot_product_attention(q, k, k)
    except RuntimeError as e:
        names = ", ".join(b.name.lower() for b in backends)
        raise ValueError(f"no enabled SDPA kernel ({names}) supports {dtype} attention on {device.type}; "
                         f"enable another (drop a --disable_* flag) or use --attention math") from e


def attention_scope(backends: list[SDPBackend]):
    """The context that restricts SDPA to ``backends`` for everything run inside it (eager and compiled)."""
    return sdpa_kernel(backends)


def compile_unet(model, mode: str = "default", device: torch.device | None = None, dynamic: bool = False):
    """torch.compile the UNet only (fullgraph). On CPU, inductor's freezing (oneDNN weight prepacking) is on:
    it is what makes the compiled UNet faster than eager there."""
    import torch._inductor.config as inductor_config
    device = device or model.device
    if device.type == "cpu":
        inductor_config.freezing = True
    inductor_config.fx_graph_cache = True
    unet = model.model.diffusion_model
    compiled = torch.compile(unet, fullgraph=True, dynamic=dynamic, mode=None if mode == "default" else mode)
    model.model.diffusion_model = compiled
    return compiled


def precision_scope(precision: str, device: torch.device, dtype: torch.dtype):
    """``autocast`` as the original script used it (fp16 on CUDA, bf16 on CPU) or a no-op for ``full``."""
    if precision == "autocast" and dtype == torch.float32:
        return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

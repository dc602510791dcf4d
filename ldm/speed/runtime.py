"""Run-time choices made by scripts: device, dtype, SDPA kernels, compilation, precision scope.

Nothing here runs at import; scripts call these functions inside ``main``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel




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


PRECISIONS = ("full", "autocast")  # --precision: as the original script
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# pytorch-labs/diffusion-fast's inductor flags for max-autotune: 1x1 convs as matmuls (the
# transformer projections), coordinate-descent tuning of the generated kernels' block sizes
# (checking all directions), and no pointwise-epilogue fusion into the autotuned GEMM templates.
DIFFUSION_FAST_FLAGS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                        "coordinate_descent_check_all_directions": True}


def effective_mode(mode: str, device: torch.device) -> str:
    """``mode`` as it runs on ``device``: CUDA graphs exist on CUDA only, so reduce-overhead is default elsewhere."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return "default" if mode == "reduce-overhead" and device.type != "cuda" else mode


def uses_cudagraphs(mode: str, device: torch.device) -> bool:
    """Whether the compiled module replays CUDA graphs (reduce-overhead and max-autotune on CUDA)."""
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def inductor_settings(mode: str, device: torch.device) -> dict[str, Any]:
    """The inductor options ``compile_module`` passes to ``torch.compile`` for ``mode`` on ``device``.

    The mode's own options (``torch._inductor.list_mode_options``), the local FX graph cache (on,
    remote off), freezing on CPU (constant-folded, oneDNN-prepacked weights: what makes compile beat
    eager there) and, for the max-autotune modes, diffusion-fast's flags. Passed as per-compile
    options, so nothing global changes.
    """
    import torch._inductor
    mode = effective_mode(mode, device)
    settings = dict(torch._inductor.list_mode_options(mode))
    if not uses_cudagraphs(mode, device):
        settings.pop("triton.cudagraphs", None)
    settings.update(fx_graph_cache=True, fx_graph_remote_cache=False)
    if device.type == "cpu":
        settings["freezing"] = True
    if mode.startswith("max-autotune"):
        settings.update(DIFFUSION_FAST_FLAGS)
    return settings


def _clone_tensors(out: Any) -> Any:
    """``out`` with every tensor cloned: a tensor, or a (nested) tuple/list of them and None (diffusers'
    ``return_dict=False``; the UNet's caching outputs)."""
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_tensors(o) for o in out)
    raise TypeError(f"CloneOutput cannot clone a {type(out).__name__} output; return a tensor or a tuple")


class CloneOutput(nn.Module):
    """Calls a CUDA-graph compiled module and returns a clone of its output.

    A CUDA-graph replay writes its output into the same static buffer every time, so a tensor kept
    across calls (PLMS's previous eps, the CFG halves, earlier decoded images) would be overwritten
    by the next call. Attribute reads (``dtype``, ``time_embed``, ``cfg``...) fall through to the
    wrapped module; state-dict keys gain the prefix ``module.``.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()  # the previous call's buffers may be reused now
        return _clone_tensors(self.module(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


def compile_module(module: nn.Module, mode: str = "default", device: torch.device | None = None,
                   dynamic: bool = False) -> nn.Module:
    """torch.compile ``module`` (fullgraph) with ``inductor_settings(mode, device)``.

    Wrapped in ``CloneOutput`` when it replays CUDA graphs; reduce-overhead off CUDA warns once and
    compiles as default. Compilation itself happens at the first call.
    """
    if device is None:
        device = next(module.parameters()).device
    run_mode = effective_mode(mode, device)
    if run_mode != mode:
        warnings.warn(f"compile mode {mode!r} needs CUDA graphs, which {device.type} does not have; "
                      f"compiling with mode 'default'", stacklevel=2)
    settings = inductor_settings(run_mode, device)
    compiled = torch.compile(module, fullgraph=True, dynamic=dynamic, options=settings)
    compiled.ldm_inductor_options = settings  # a fullgraph compile's get_compiler_config() is None (offload reads it)
    return CloneOutput(compiled) if uses_cudagraphs(run_mode, device) else compiled


def compile_unet(model, mode: str = "default", device: torch.device | None = None,
                 dynamic: bool = False) -> nn.Module:
    """Compile ``model.model.diffusion_model`` (the UNet only; the sampler loop stays eager) and install it."""
    compiled = compile_module(model.model.diffusion_model, mode, device or model.device, dynamic)
    model.model.diffusion_model = compiled
    return compiled


def compile_vae(model, mode: str = "default", device: torch.device | None = None,
                dynamic: bool = False) -> nn.Module:
    """Compile the VAE decoder ``model.first_stage_model.decoder`` (fullgraph) and install it."""
    vae = model.first_stage_model
    compiled = compile_module(vae.decoder, mode, device or vae.quant_conv.weight.device, dynamic)
    vae.decoder = compiled
    return compiled


def enable_tf32(device: torch.device) -> bool:
    """Let fp32 matmuls and convolutions use TF32 tensor cores on CUDA Ampere or newer; returns whether it did.

    For ``--dtype fp32`` runs: about 10 mantissa bits in the products, fp32 accumulation and storage.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def precision_scope(precision: str, device: torch.device, dtype: torch.dtype):
    """``autocast`` as the original script used it (fp16 on CUDA, bf16 on CPU) or a no-op for ``full``."""
    if precision == "autocast" and dtype == torch.float32:
        return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (timings); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""UNet-only microbenchmark of one configuration, run by the harness in a fresh process.

    python -m ldm.benchmark.unet --config CFG --ckpt CKPT --H 512 --W 512 --batch 2 --iters 10 \
        --stats OUT.json [--budget_gb 24] [txt2img speed flags: --attention math --disable_flash --compile ...]
    python -m ldm.benchmark.unet --peer --weights EXPORT_DIR ...      # diffusers' UNet2DConditionModel

Reports seconds per UNet call (one sampling step with classifier-free guidance at ``--batch 2``), the
first call's time on its own (for ``--compile`` that is the compilation), peak memory
(``torch.cuda.max_memory_allocated`` on CUDA, the RSS high-water mark elsewhere) of the first calls and,
reset, of the timed steps alone (its rise over the memory before them is one step's activations, to set
beside the fake-tensor estimate), and the largest square resolution whose
UNet forward fits ``--budget_gb``: measured with real forwards on CUDA, estimated from tensor sizes on fake
tensors elsewhere (``--fit estimate``), since the math path at 2048x2048 needs far more memory, and time,
than a CPU has. The search runs the eager UNet: compilation is not applied to it. The inputs follow the
UNet's config: its input channels (4, or 9 for inpainting: the latent, the mask and the masked image's
latent) and its context width (1024 for SD 2's OpenCLIP, 768 for SD 1's CLIP).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any, Callable

import torch

from ldm.benchmark.measure import (environment, estimate_peak_bytes, memory_now, peak_memory, reset_peak,
                                   time_calls, write_json)
from ldm.model.attention import BACKENDS
from ldm.model.config import DTYPES
from ldm.speed.runtime import COMPILE_MODES, PRECISIONS


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Known flags, and the rest (txt2img flags that do not concern the UNet, e.g. --steps, are ignored)."""
    p = argparse.ArgumentParser(prog="python -m ldm.benchmark.unet", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="our model yaml")
    p.add_argument("--ckpt", help="our checkpoint (either layout)")
    p.add_argument("--peer", action="store_true", help="time diffusers' UNet from --weights instead of ours")
    p.add_argument("--weights", help="a folder written by `python -m ldm.benchmark.peer export`")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="UNet batch: 2 x images (classifier-free guidance)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first one")
    p.add_argument("--device", default=None)
    p.add_argument("--stats", required=True, help="write the results here (json)")
    p.add_argument("--budget_gb", type=float, default=None, help="default: the device's memory")
    p.add_argument("--fit", choices=["auto", "estimate", "measure", "none"], default="auto",
                   help="auto: measure on CUDA, estimate elsewhere")
    p.add_argument("--fit_min", type=int, default=256)
    p.add_argument("--fit_max", type=int, default=2048)
    p.add_argument("--fit_step", type=int, default=128)
    # the txt2img flags that change the UNet call
    p.add_argument("--attention", choices=list(BACKENDS), default="sdpa")
    p.add_argument("--disable_math", action="store_true")
    p.add_argument("--disable_mem_efficient", action="store_true")
    p.add_argument("--disable_flash", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile_mode", default="default",
                   choices=list(COMPILE_MODES))
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None)
    p.add_argument("--unfused_projections", action="store_true", help="ours: separate Q/K/V matmuls")
    p.add_argument("--fuse_projections", action="store_true", help="the peer: fuse_qkv_projections()")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--int8", action="store_true", help="torchao dynamic int8 of the large linear layers")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="profile one more call (torch.profiler) and record its K costliest ops by self time")
    return p.parse_known_args(argv)


def unet_factory(opt: argparse.Namespace) -> tuple[Callable[[], torch.nn.Module], Callable[..., torch.Tensor],
                                                   tuple[int, int]]:
    """(build() -> UNet with this configuration's attention, call(unet, x, t, context) -> eps,
    (input channels, context width))."""
    if opt.peer:
        import json
        from diffusers import UNet2DConditionModel
        with open(os.path.join(opt.weights, "configs.json"), encoding="utf-8") as f:
            export = json.load(f)
        cfg = export["unet"]

        from ldm.benchmark.peer import set_peer_attention

        def build_peer():
            unet = UNet2DConditionModel(**cfg).eval()
            set_peer_attention(unet, opt.attention)  # here too for the memory estimate, which builds afresh
            return unet
        call = lambda m, x, t, c: m(x, t, c, return_dict=False)[0]
        if cfg.get("addition_embed_type") == "text_time":  # SDXL: the pooled text and the six size numbers
            n_ids = export["time_ids"]  # 6 for the base (three sizes), 5 for the refiner (two and the score)
            pooled = cfg["projection_class_embeddings_input_dim"] - n_ids * cfg["addition_time_embed_dim"]
            call = lambda m, x, t, c: m(x, t, c, added_cond_kwargs={
                "text_embeds": x.new_zeros(x.shape[0], pooled), "time_ids": x.new_zeros(x.shape[0], n_ids)},
                return_dict=False)[0]
        return build_peer, call, (cfg["in_channels"], cfg["cross_attention_dim"])
    from ldm.model.attention import set_attention_backend
    from ldm.model.presets import load_config
    from ldm.model.unet import UNetModel
    cfg = load_config(opt.config).unet

    def build():
        unet = UNetModel(cfg).eval()
        set_attention_backend(unet, opt.attention)
        return unet
    if cfg.adm_in_channels:  # SDXL's vector conditioning (zeros: the timing does not depend on its values)
        return build, lambda m, x, t, c: m(x, t, c, y=x.new_zeros(x.shape[0], cfg.adm_in_channels)), \
            (cfg.in_channels, cfg.context_dim)
    return build, lambda m, x, t, c: m(x, t, c), (cfg.in_channels, cfg.context_dim)


def load_unet(opt: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The UNet alone, built on the meta device and loaded strictly (the rest of the checkpoint is not touched)."""
    if opt.peer:
        from ldm.benchmark.peer import load_part, quiet_peer_logs
        quiet_peer_logs()
        unet = load_part(unet_factory(opt)[0], os.path.join(opt.weights, "unet.pt"))
        return unet.to(device=device, dtype=dtype)
    from ldm.weights.layout import detect_layout, to_native
    from ldm.weights.reading import read_checkpoint
    raw, _ = read_checkpoint(opt.ckpt)
    prefix = "model.diffusion_model."
    sd = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    del raw
    if detect_layout(sd) == "original":
        sd = to_native(sd)
    build, _, _ = unet_factory(opt)
    with torch.device("meta"):
        unet = build()
    unet.load_state_dict(sd, strict=True, assign=True)
    return unet.to(device=device, dtype=dtype)


def apply_flags(unet: torch.nn.Module, opt: argparse.Namespace) -> torch.nn.Module:
    """The layout and quantization flags on a loaded UNet, ours or the peer's (as txt2img and the peer apply them)."""
    if opt.peer:
        from ldm.benchmark.peer import optimize_peer_unet
        optimize_peer_unet(unet, opt)
        return unet
    from ldm.speed.optimize import quantize_int8, set_fused_projections, to_channels_last
    set_fused_projections(unet, not opt.unfused_projections)
    if opt.channels_last:
        to_channels_last(unet)
    if opt.int8:
        quantize_int8(unet)
    return unet


def profile_call(step: Callable[[], Any], device: torch.device, top: int) -> list[dict]:
    """The ``top`` ops of one ``step()`` by self time (device time on CUDA, CPU time elsewhere)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) or 1
    events.sort(key=self_us, reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms": self_us(e) / 1000, "share": self_us(e) / total}
            for e in events[:top]]


def inputs(batch: int, h: int, w: int, dims: tuple[int, int], device, dtype) -> tuple[torch.Tensor, ...]:
    """x (B, C, h, w), t (B,), context (B, 77, D) for dims = (C, D): one guided sampling step's UNet input."""
    in_channels, context_dim = dims
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, h, w, generator=g).to(device, dtype)
    context = torch.randn(batch, 77, context_dim, generator=g).to(device, dtype)
    return x, torch.full((batch,), 981, dtype=torch.long, device=device), context


def built_in(build, dtype: torch.dtype) -> torch.nn.Module:
    """``build()`` with parameters created in ``dtype`` (``.to`` cannot convert fake parameters in place)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(default)


def largest_fit(fits, resolutions: list[int]) -> int | None:
    """The largest resolution r with fits(r), assuming memory grows with r (binary search); None if none fits."""
    lo, hi, best = 0, len(resolutions) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(resolutions[mid]):
            best, lo = resolutions[mid], mid + 1
        else:
            hi = mid - 1
    return best


def fit_resolution(opt, method: str, unet, device, dtype, budget: int, scopes) -> tuple[int | None, dict[int, int]]:
    """(largest fitting resolution, {resolution: peak bytes (or -1 for out of memory)} of the probes)."""
    build, call, dims = unet_factory(opt)
    probes: dict[int, int] = {}

    def peak_at(res: int) -> int:
        if method == "estimate":
            with scopes():
                est = estimate_peak_bytes(lambda: built_in(build, dtype),
                                          lambda: inputs(2, res // 8, res // 8, dims, "cpu", dtype), call)
            return est["total"]
        x, t, c = inputs(2, res // 8, res // 8, dims, device, dtype)
        torch.cuda.empty_cache()
        reset_peak(device)
        try:
            with scopes():
                call(unet, x, t, c)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            return -1
        finally:
            del x, t, c
            torch.cuda.empty_cache()

    def fits(res: int) -> bool:
        probes[res] = peak_at(res)
        return 0 <= probes[res] <= budget

    resolutions = list(range(opt.fit_min, opt.fit_max + 1, opt.fit_step))
    return largest_fit(fits, resolutions), probes


def run(opt: argparse.Namespace) -> dict:
    """Load, time, profile and size the UNet of one configuration; the results as a json-ready dict."""
    from ldm.speed import runtime
    device = runtime.pick_device(opt.device)
    dtype = DTYPES[opt.dtype or ("bf16" if opt.bf16 else "fp32")]
    backends = runtime.sdpa_backends(opt.disable_math, opt.disable_mem_efficient, opt.disable_flash)
    precision = opt.precision or ("autocast" if device.type == "cuda" else "full")
    scopes = lambda: _scopes(runtime, backends, precision, device, dtype)

    unet = apply_flags(load_unet(opt, device, dtype), opt)
    loaded = memory_now(device)
    eager = unet
    if opt.compile:
        unet = runtime.compile_module(unet, opt.compile_mode, device)  # the settings txt2img's --compile uses
    _, call, dims = unet_factory(opt)
    x, t, c = inputs(opt.batch, opt.H // 8, opt.W // 8, dims, device, dtype)
    step = lambda: call(unet, x, t, c)
    with torch.no_grad(), scopes():
        reset_peak(device)
        first = time_calls(step, 1, device)[0]  # compilation happens here
        time_calls(step, opt.warmup, device)
        first_peak, _ = peak_memory(device)  # the first calls' peak: compilation, lazy library set-up
        reset_peak(device)
        before = memory_now(device)
        times = time_calls(step, opt.iters, device)
        peak, kind = peak_memory(device)  # steady state: weights and one step's activations
        profiled = profile_call(step, device, opt.profile) if opt.profile > 0 else None
    build, call, dims = unet_factory(opt)
    with scopes():
        est = estimate_peak_bytes(lambda: built_in(build, dtype),
                                  lambda: inputs(opt.batch, opt.H // 8, opt.W // 8, dims, "cpu", dtype), call)
    result = {"s_mean": statistics.fmean(times), "s_median": statistics.median(times), "s_min": min(times),
              "s_max": max(times), "iters": len(times), "first_call_s": first, "peak_bytes": peak, "peak_kind": kind,
              "loaded_bytes": loaded, "before_bytes": before, "first_peak_bytes": first_peak,
              "est_bytes": est["total"], "est_activation_bytes": est["activations"], **environment(device)}
    if profiled is not None:
        result["profile"] = profiled
    method = opt.fit if opt.fit != "auto" else ("measure" if device.type == "cuda" else "estimate")
    if method == "measure" and device.type != "cuda":
        raise ValueError("--fit measure needs CUDA (a CPU's peak RSS cannot be reset between probes); use estimate")
    if method != "none":
        total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        budget = int(opt.budget_gb * 1024 ** 3) if opt.budget_gb else total
        del x, t, c
        with torch.no_grad():
            best, probes = fit_resolution(opt, method, eager, device, dtype, budget, scopes)
        result.update(fit_res=best, fit_method=method, budget_bytes=budget,
                      fit_probes={str(k): v for k, v in sorted(probes.items())})
    return result


def _scopes(runtime, backends, precision, device, dtype):
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(runtime.attention_scope(backends))
    stack.enter_context(runtime.precision_scope(precision, device, dtype))
    return stack


def main(argv: list[str] | None = None) -> int:
    opt, _ignored = parse_args(argv)
    if opt.peer != bool(opt.weights) or (not opt.peer and not (opt.config and opt.ckpt)):
        print("error: give --config and --ckpt, or --peer --weights", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    result = run(opt)
    write_json(opt.stats, result)
    print(f"UNet x{opt.batch} at {opt.H}x{opt.W}: {1000 * result['s_mean']:.1f} ms/step "
          f"(first call {result['first_call_s']:.2f}s), peak {result['peak_bytes'] / 2 ** 20:.0f} MiB"
          + (f", fits {result.get('fit_res')} px" if "fit_res" in result else ""))
    for row in result.get("profile", []):
        print(f"  {row['self_ms']:10.2f} ms {100 * row['share']:5.1f}% x{row['calls']:<5} {row['op']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

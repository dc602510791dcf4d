"""The SD 2 parts of the GPU window (``ldm.benchmark.window``; SDXL's is ``window_sdxl``); each writes its rows to the
report as it goes.

The UNet variants are made once per window and side (``unet_variant``): the eager rows run a copy with separate
Q/K/V projections and contiguous weights; every later row shares the fused, channels_last module, and each compile
mode wraps it once, so parts 2-5 reuse what the first of them compiled.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import platform
import statistics
import subprocess
import time

import torch

from ldm.benchmark import window_models as wm
from ldm.benchmark.measure import device_name, time_calls
from ldm.speed import runtime

# (key, label): the UNet configurations of part 3, cumulative as the Hugging Face write-ups tabulate them.
UNET_CONFIGS = (("eager", "eager SDPA"), ("fused_cl", "+ fused projections + channels_last"),
                ("default", "+ torch.compile (default)"), ("reduce-overhead", "+ CUDA graphs (reduce-overhead)"),
                ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"), ("int8", "int8 + compile default"))
OPTIONAL = ("max-autotune-no-cudagraphs", "int8")
PROMPT = "a professional photograph of an astronaut riding a horse"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(w) -> None:
    """Part 1: what ran where."""
    from ldm.benchmark.runs import code_version
    row = w.report.table(["what", "value"])
    row(["device", device_name(w.device)])
    if w.device.type == "cuda":
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            smi = "nvidia-smi not available"
        row(["driver, memory", smi])
        row(["CUDA, cuDNN", f"{torch.version.cuda}, {torch.backends.cudnn.version()}"])
    row(["torch, python", f"{torch.__version__}, {platform.python_version()}"])
    row(["diffusers, transformers", f"{_version('diffusers')}, {_version('transformers')}"])
    row(["code", code_version()])
    row(["date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())])


# ----------------------------------------------------------------------------- shared pieces

def conditioning(w, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, uc) from our text encoder (open_clip's tokenizer must be importable; say so where it is not)."""
    try:
        return w.model.get_learned_conditioning(prompts), w.model.get_learned_conditioning([""] * len(prompts))
    except ImportError as e:
        raise RuntimeError(f"our text encoder needs open_clip's tokenizer ({e}); carry open_clip_torch and ftfy") from e


def noise(w, n: int) -> torch.Tensor:
    g = torch.Generator(w.device).manual_seed(w.opt.seed)
    return torch.randn(n, 4, w.side, w.side, generator=g, device=w.device, dtype=torch.float32)


def sample(w, sampler_cls, steps: int, n: int = 1, prompts: list[str] | None = None) -> torch.Tensor:
    """Guided latents from fixed noise with our original-API sampler (what txt2img runs)."""
    c, uc = conditioning(w, prompts or [PROMPT] * n)
    x, _ = sampler_cls(w.model).sample(S=steps, conditioning=c, batch_size=n, shape=[4, w.side, w.side], verbose=False,
                                       unconditional_guidance_scale=9.0, unconditional_conditioning=uc, x_T=noise(w, n))
    return x


def unet_variant(w, side: str, key: str):
    """The callable ``f(x, t, context)`` of one UNet configuration of one side, made (and compiled) once; its first
    call on the window's UNet input is timed then (``w.first``: compile time for compiled ones)."""
    if (side, key) in w.compiled:
        return w.compiled[(side, key)]
    if side == "ours":
        base = w.model.model.diffusion_model
        if ("ours", "eager") not in w.compiled:  # first use: keep a plain copy, then fuse the original
            from ldm.speed.optimize import set_fused_projections, to_channels_last
            w.compiled[("ours", "eager")] = wm.plain_copy(base)
            set_fused_projections(base, True)
            to_channels_last(base)
            w.compiled[("ours", "fused_cl")] = base
    else:
        base = w.peer.unet
        if ("diffusers", "eager") not in w.compiled:
            w.compiled[("diffusers", "eager")] = copy.deepcopy(base)
            base.fuse_qkv_projections()
            base.to(memory_format=torch.channels_last)
            w.compiled[("diffusers", "fused_cl")] = base
    for eager in ("eager", "fused_cl"):
        if (side, eager) not in w.first:
            w.first[(side, eager)] = wm.first_call(bind(w, side, w.compiled[(side, eager)]), w.device)
    if (side, key) in w.compiled:
        return w.compiled[(side, key)]
    if key == "int8":
        from ldm.speed.optimize import quantize_int8
        base = copy.deepcopy(base)
        quantize_int8(base)
        module = wm.compiled(base, "default", w.device, w.opt.compile_backend)
    else:
        module = wm.compiled(base, key, w.device, w.opt.compile_backend)
    w.compiled[(side, key)] = module
    w.first[(side, key)] = wm.first_call(bind(w, side, module), w.device)
    return module


def bind(w, side: str, f, batch: int = 2):
    """A no-argument call of ``f`` (ours or diffusers' UNet) on fixed inputs of the window's shape and dtype, typed as
    each side's sampling loop passes them (one compiled graph for both): ours the samplers' float32 latents and (B,)
    timesteps, diffusers its pipeline's latents in the model dtype and 0-dim timestep."""
    x, t, c = wm.unet_inputs(w.model.cfg, batch, w.side, w.device, w.dtype)
    if side == "ours":
        return lambda: f(x, t, c)
    x, t, kwargs = x.to(w.dtype), wm.pipeline_timestep(w.peer.scheduler, w.device), wm.pipeline_unet_kwargs(c)
    return lambda: f(x, t, **kwargs)[0]


def unet_call(w, side: str, key: str, batch: int = 2):
    """A no-argument call of one variant (made on first use)."""
    return bind(w, side, unet_variant(w, side, key), batch)


def interleaved_ms(w, calls: dict) -> dict[str, float]:
    """side -> median milliseconds of ``w.opt.iters`` calls each, the sides taking turns in up to 4 rounds (drift and
    clocks hit both alike)."""
    times = {side: [] for side in calls}
    rounds = 4 if w.opt.iters >= 4 else 1
    for _ in range(rounds):
        for side, fn in calls.items():
            times[side] += time_calls(fn, max(1, w.opt.iters // rounds), w.device)
    return {side: statistics.median(t) * 1000 for side, t in times.items()}


def later(w, *names: str) -> float:
    """Seconds the parts after an optional row still need (estimates): an optional row runs only if they stay whole.
    SDXL's compiled row counts among them: its figures beside the seed's table come before SD 2's extras."""
    return sum(w.estimate.get(n, 0.0) for n in names)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


# ----------------------------------------------------------------------------- part 2

def checks(w) -> None:
    """Part 2: the correctness claims the speed rests on, each a row with its verdict."""
    from ldm.samplers.api import DDIMSampler, DPMSolverSampler, PLMSSampler
    row = w.report.table(["check", "result", "verdict"])
    # images in fp32 (the reference), bf16 and fp16 (copies; the window's own dtype is the model itself)
    steps, ref = min(10, w.opt.steps), None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        working = w.model
        if dtype != w.dtype:
            w.model = wm.cast_(copy.deepcopy(working), dtype)
        try:
            img = w.model.decode_first_stage(sample(w, DDIMSampler, steps)).float()
        finally:
            w.model = working
        finite = bool(torch.isfinite(img).all())
        ref = img if ref is None else ref
        ok = finite and img.std() > 1e-3  # a NaN below fp32 is a bug only where fp32 is finite
        row([f"{str(dtype).split('.')[-1]} image, {steps} DDIM steps",
             f"finite {finite}, std {img.std():.3f}, max diff vs fp32 {rel(img, ref):.3g} (of its max)",
             "ok" if ok else "FAIL" + (" (fp32 is finite)" if dtype != torch.float32 and torch.isfinite(ref).all()
                                       else "")])

    # compiled UNet: no graph break (fullgraph), no recompile over a whole PLMS and DPM-Solver++ run
    from torch._dynamo.utils import counters
    unet = w.model.model.diffusion_model
    before = counters["stats"]["unique_graphs"]  # counted from the compile on (made here, the first part to use it)
    compiled = unet_variant(w, "ours", "default")
    w.model.model.diffusion_model = compiled
    try:
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                for cls in (PLMSSampler, DPMSolverSampler):
                    x = sample(w, cls, w.opt.steps)
            recompiled = "no recompile"
        except torch._dynamo.exc.RecompileError as e:
            recompiled = f"recompiled: {' '.join(str(e).split())[:150]}"
        graphs, breaks = counters["stats"]["unique_graphs"] - before, sum(counters["graph_break"].values())
        row([f"compiled UNet over PLMS {w.opt.steps} + DPM++ {w.opt.steps} steps",
             f"{graphs} graph(s), {breaks} graph break(s), {recompiled}",
             "ok" if graphs <= 1 and not breaks and recompiled == "no recompile" else "FAIL"])
        with w.sync_free():
            x = sample(w, PLMSSampler, w.opt.steps)
        row(["sampling loop under set_sync_debug_mode('error')" if w.device.type == "cuda" else
             "sampling loop host syncs", "no sync" if w.device.type == "cuda" else "not checkable on a CPU",
             "ok" if torch.isfinite(x).all() else "FAIL"])
    finally:
        w.model.model.diffusion_model = unet

    # CUDA graphs: an output survives the next replay, and PLMS (which keeps earlier eps) matches eager
    ro = unet_variant(w, "ours", "reduce-overhead")
    a, b = (wm.unet_inputs(w.model.cfg, 2, w.side, w.device, w.dtype) for _ in range(2))
    b = (b[0] * 0.5, (b[1][:1] - 400).expand_as(b[1]), b[2])  # t still a (1,) expanded: the same graph
    first = ro(*a)
    kept = first.clone()
    second = ro(*b)
    survives = torch.equal(first, kept) and not torch.equal(first, second)
    eager = sample(w, PLMSSampler, 10)
    w.model.model.diffusion_model = ro
    try:
        graphed = sample(w, PLMSSampler, 10)
    finally:
        w.model.model.diffusion_model = unet
    err = rel(graphed, eager)
    row(["reduce-overhead: output kept across the next replay; PLMS 10 steps vs eager",
         f"kept {survives}, rel. diff {err:.2e}" + ("" if w.device.type == "cuda" else " (no CUDA graphs here)"),
         "ok" if survives and err < 2e-2 else "FAIL"])
    sdpa_kernels(w, row)


def sdpa_kernels(w, row) -> None:
    """The SDPA op each --disable_* choice leaves: a fused one by default, never a disabled one."""
    from torch.profiler import ProfilerActivity, profile
    heads = 5 if not w.opt.tiny else 2
    q = torch.randn(2, heads, w.side * w.side, 64, device=w.device, dtype=w.dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.device.type == "cuda" else [])
    for flags, allowed in (((False, False, False), ("flash", "efficient", "cudnn")),
                           ((False, False, True), ("efficient", "cudnn", "math")), ((False, True, True), ("math",))):
        backends = runtime.sdpa_backends(*flags)
        with profile(activities=activities) as prof, runtime.attention_scope(backends):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        ops = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")})
        chosen = ops[0].removeprefix("aten::_scaled_dot_product_") if ops else "none"
        ok = bool(ops) and any(a in chosen for a in allowed) and not ("flash" in chosen and flags[2])
        names = ", ".join(b.name.lower() for b in backends)
        row([f"SDPA with {names}", chosen, "ok" if ok else "FAIL"])


# ----------------------------------------------------------------------------- part 3

def unet_part(w) -> None:
    """Part 3: one guided UNet call per configuration, ours and diffusers interleaved, median of the timed calls."""
    sides = ["ours"] + (["diffusers"] if w.peer is not None else [])
    row = w.report.table(["configuration", "ours ms", "diffusers ms", "diffusers / ours", "ours first call s",
                          "diffusers first call s"])
    for key, label in UNET_CONFIGS:
        if key == "int8" and importlib.util.find_spec("torchao") is None:
            w.report(f"| {label} | skipped: torchao is not installed | | | | |")
            continue
        if key in OPTIONAL and not w.opt.tiny and not w.budget.allows(wm.COMPILE_S.get(key, 60.0) * len(sides) + later(
                w, "end_to_end", "profile", "fewer_flops", "sdxl", "sdxl_compile")):
            w.report(f"| {label} | skipped: {w.budget.left():.0f} s left, parts 4-7 come first | | | | |")
            continue
        calls, first = {}, {}
        for side in sides:
            try:
                calls[side] = unet_call(w, side, key)
                first[side] = w.first.get((side, key))
                calls[side]()
            except Exception as e:  # one side's failure is a cell, not the end of the row
                calls.pop(side, None)
                first[side] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
        med = interleaved_ms(w, calls)
        for side, ms in med.items():
            if side not in w.best or ms < w.best[side][1]:
                w.best[side] = (key, ms)
        speedup = f"{med['diffusers'] / med['ours']:.2f}x" if len(med) == 2 else "–"
        fmt = (lambda v: f"{v:.2f}" if isinstance(v, float) else v)
        row([label, fmt(med.get("ours", "–")), fmt(med.get("diffusers", "–")), speedup, fmt(first.get("ours", "–")),
             fmt(first.get("diffusers", "–"))])
    best = ", ".join(f"{side} {key} ({ms:.2f} ms)" for side, (key, ms) in w.best.items())
    w.report(f"\nBest per side: {best}. 'first call': the variant's first call, compile included (made once, "
             f"in the part that first needed it).")


# ----------------------------------------------------------------------------- parts 4 and 5

def timed_s(w, fn, runs: int) -> float:
    """Median seconds of ``runs`` calls after one untimed warm-up."""
    wm.first_call(fn, w.device)
    return statistics.median(time_calls(fn, runs, w.device))


def end_to_end(w) -> None:
    """Part 4: text to decoded image, 50 PLMS steps, each side's best UNet from part 3 (eager fused if none)."""
    from ldm.apps.images import to_uint8
    from ldm.samplers.api import PLMSSampler
    row = w.report.table(["batch", "side", "UNet", "s / image", "images / s", "denoising it/s"])
    runs = 3 if w.device.type == "cuda" else 1
    for batch in (1, 4):
        if batch > 1 and not w.opt.tiny and not w.budget.allows(w.estimate["end_to_end_batch4"] + later(
                w, "profile", "fewer_flops", "sdxl", "sdxl_compile")):
            w.report(f"| {batch} | skipped: {w.budget.left():.0f} s left, parts 5-7 come first | | | | |")
            continue
        prompts = [PROMPT] * batch
        key = w.best.get("ours", ("fused_cl", 0))[0]
        unet = w.model.model.diffusion_model
        w.model.model.diffusion_model = unet_variant(w, "ours", key)
        try:
            latent = timed_s(w, lambda: sample(w, PLMSSampler, w.opt.steps, batch, prompts), runs)
            total = timed_s(w, lambda: to_uint8(w.model.decode_first_stage(sample(w, PLMSSampler, w.opt.steps, batch,
                                                                                   prompts))), runs)
        finally:
            w.model.model.diffusion_model = unet
        row([batch, "ours", key, f"{total / batch:.3f}", f"{batch / total:.3f}", f"{w.opt.steps / latent:.1f}"])
        if w.peer is None:
            continue
        from ldm.benchmark.peer import generate
        key = w.best.get("diffusers", ("fused_cl", 0))[0]
        pipe_unet = w.peer.unet
        w.peer.unet = unet_variant(w, "diffusers", key)
        x_T = noise(w, batch).to(w.dtype)
        try:
            latent = timed_s(w, lambda: generate(w.peer, prompts, "", w.opt.steps, 9.0, x_T, "latent"), runs)
            total = timed_s(w, lambda: generate(w.peer, prompts, "", w.opt.steps, 9.0, x_T, "pt"), runs)
        finally:
            w.peer.unet = pipe_unet
        row([batch, "diffusers", key, f"{total / batch:.3f}", f"{batch / total:.3f}", f"{w.opt.steps / latent:.1f}"])
    w.report("\n'denoising it/s': steps / (text encoding + sampling) seconds; 's / image' includes the VAE decode.")


def profile(w) -> None:
    """Part 5: where one compiled UNet call of ours spends its time (the default compile: no graph replay to hide it)."""
    from ldm.benchmark.unet import profile_call
    call = unet_call(w, "ours", "default")
    call()
    row = w.report.table(["op / kernel", "calls", "self ms", "share"])
    for r in profile_call(call, w.device, 10):
        row([r["op"][:90].replace("|", "/"), r["calls"], f"{r['self_ms']:.3f}", f"{r['share']:.1%}"])


def blog_table(w) -> None:
    """Part 8, only with time left: the blog's table (A-E and the peer) in its fresh-process protocol, batch 1,
    as ``ldm-benchmark`` runs it (a random checkpoint on disk, one process per run), cut off at the budget."""
    import os
    import sys
    if w.opt.tiny and not w.opt.blog_table:
        w.report("Full size only (--blog_table walks it on the tiny preset).")
        return
    out = os.path.join(os.path.dirname(os.path.abspath(w.report.path or "outputs/x")), "window-blog")
    size = ["--device", "cpu", "--H", "64", "--W", "64", "--steps", "2", "--unet_iters", "1"] if w.opt.tiny else []
    cmd = [sys.executable, "-m", "ldm.benchmark.harness", "--random", "tiny" if w.opt.tiny else "sd2", "--batch", "1",
           "--repeats", "1", "--configs", "A,C,D,E,P", "--fit", "none", "--outdir", out, "--name", "blog", *size]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(w.budget.left() - 5, 1))
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = "cut off at the budget"
    md = os.path.join(out, "blog.md")
    w.report(open(md, encoding="utf-8").read() if os.path.isfile(md) else f"no table (exit {code})")


def fewer_flops(w) -> None:
    """Part 6: DeepCache, T-GATE, cfg_end and DeepCache + T-GATE, ours and the peer through the reference packages
    (ldm.benchmark.fewer_flops), eager, at the window's size; the peer's modules are restored after each method."""
    from ldm.benchmark.fewer_flops import window_part
    window_part(w)

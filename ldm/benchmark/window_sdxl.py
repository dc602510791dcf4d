"""Part 7 of the GPU window (``ldm.benchmark.window``): SDXL base at 1024x1024, ours and diffusers, beside the seed's
table (the Hugging Face SDXL post: diffusers on an A100, 1024x1024, 30 steps, batch 1).

The SD 2 models and every compiled module are freed first (no later part needs them). The full SDXL base is then
built on the device with seeded random weights and diffusers' StableDiffusionXLPipeline holds the same weights in
memory (``window_models.build_ours`` / ``build_sdxl_peer``), in bf16 on CUDA (the seed's dtype; ``--dtype`` overrides).
Rows, ours and diffusers interleaved, medians of ``--iters`` timed calls (CUDA events):

  * one guided UNet call (batch 2, 128x128 latent): eager SDPA; + fused projections + channels_last (in place, as part
    3 does); + torch.compile (default) when the budget still holds both compiles and the end-to-end rows;
  * text to decoded 1024x1024 image, 30 Euler steps (ours ``EulerSampler``, diffusers ``EulerDiscreteScheduler`` given
    our timesteps), batch 1, each side's best UNet; then how far apart the two images are (same noise, same weights).

The seed's figures are quoted beside ours, labelled as its A100 numbers. ``--tiny``: ``sdxl-tiny``, 64x64, 2 steps.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm.benchmark import window_models as wm
from ldm.benchmark.window_parts import interleaved_ms, rel, timed_s

# The seed's table: diffusers' StableDiffusionXLPipeline, an 80 GB A100 at 400 W, 1024x1024, 30 steps, batch 1.
SEED_TABLE = (("fp32 (TF32 matmuls)", 7.36), ("+ bf16", 4.63), ("+ SDPA", 3.31),
              ("+ torch.compile max-autotune (UNet and VAE, channels_last)", 2.54), ("+ fused QKV projections", 2.52),
              ("+ dynamic int8", 2.43))
# (key, label, the seed's nearest row): cumulative as the seed tabulates, but the seed fused after compiling
CONFIGS = (("eager", "eager SDPA", "3.31 (bf16 + SDPA)"), ("fused_cl", "+ fused projections + channels_last", "–"),
           ("default", "+ torch.compile (default)", "2.52 (+ compile max-autotune + fused QKV)"))
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"  # the seed's
SCALE = 5.0  # the SDXL pipeline's default guidance, as the seed ran it


@dataclass
class SDXLRun:
    """The part's models, latent side, steps and dtype; local to the part, so its memory goes when the part ends."""
    model: Any
    peer: Any
    side: int
    steps: int
    dtype: torch.dtype
    best: dict = field(default_factory=dict)  # side -> (config key, module, median ms)
    fused: dict = field(default_factory=dict)  # side -> whether its UNet is fused and channels_last now


def free_sd2(w) -> None:
    """Drop the SD 2 models and every compiled module (CUDA-graph pools with them) before building SDXL."""
    w.model = w.peer = None
    w.compiled.clear()
    w.first.clear()
    w.best.clear()
    release(w.device)


def release(device: torch.device) -> None:
    """Forget every compiled graph (and its CUDA-graph pool), collect, and hand cached device memory back."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build(w) -> SDXLRun:
    """SD 2 freed, then SDXL: ours with seeded random fp32 weights on the device, the peer from them, both cast."""
    want_peer = w.peer is not None
    free_sd2(w)
    dtype = w.dtype if w.opt.dtype or w.device.type != "cuda" else torch.bfloat16
    preset = "sdxl-tiny" if w.opt.tiny else wm.SDXL_PRESET
    t0 = time.perf_counter()
    model = wm.build_ours(preset, w.device, w.opt.seed)
    peer = wm.build_sdxl_peer(model, w.device, dtype) if want_peer else None  # from the fp32 weights
    wm.cast_(model, dtype)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    w.report(f"{preset} built in {time.perf_counter() - t0:.1f} s after freeing SD 2: {billions:.2f} B parameters, "
             f"seeded random weights on {w.device.type}, {str(dtype).split('.')[-1]}"
             f"{'; diffusers from the same weights in memory' if peer is not None else '; no diffusers peer'}.")
    return SDXLRun(model, peer, 8 if w.opt.tiny else wm.SDXL_SIDE, 2 if w.opt.tiny else wm.SDXL_STEPS, dtype)


def set_layout(xl: SDXLRun, side: str, unet: torch.nn.Module, fused: bool) -> None:
    """Fused Q/K/V projections and channels_last weights on or off, in place (no copy of a 2.6 B-parameter UNet);
    only on a change: diffusers' fuse_qkv_projections twice would rebuild the fused weights a compiled UNet holds."""
    if xl.fused.get(side, False) == fused:
        return
    xl.fused[side] = fused
    if side == "ours":
        from ldm.speed.optimize import set_fused_projections, to_channels_last
        set_fused_projections(unet, fused)
        to_channels_last(unet) if fused else unet.to(memory_format=torch.contiguous_format)
    else:
        unet.fuse_qkv_projections() if fused else unet.unfuse_qkv_projections()
        unet.to(memory_format=torch.channels_last if fused else torch.contiguous_format)


def bind(w, xl: SDXLRun, side: str, f):
    """A no-argument guided UNet call of ``f``, its inputs typed as each side's sampling loop passes them (ours: the
    samplers' float32 latents and (B,) timesteps; diffusers: latents in the model dtype, a 0-dim timestep, the pooled
    text and the six size numbers apart), so the compiled graph timed here is the one the images run."""
    cfg = xl.model.cfg
    x, t, c = wm.unet_inputs(cfg, 2, xl.side, w.device, xl.dtype)
    y = wm.vector_input(cfg, 2, w.device, xl.dtype)
    if side == "ours":
        return lambda: f(x, t, c, y=y)
    from ldm.benchmark.export import fourier_dim, tower_configs
    pooled = tower_configs(cfg)["text_encoder_2"][1]["projection_dim"]
    ids = (cfg.unet.adm_in_channels - pooled) // fourier_dim(cfg)
    added = {"text_embeds": y[:, :pooled].contiguous(), "time_ids": y[:, pooled:pooled + ids].contiguous()}
    x, t, kwargs = x.to(xl.dtype), wm.pipeline_timestep(xl.peer.scheduler, w.device), wm.pipeline_unet_kwargs(c, added)
    return lambda: f(x, t, **kwargs)[0]


def unet_rows(w, xl: SDXLRun) -> None:
    """One guided UNet call per configuration, the sides interleaved; each side's fastest goes to ``xl.best``."""
    base = {"ours": xl.model.model.diffusion_model, **({"diffusers": xl.peer.unet} if xl.peer is not None else {})}
    row = w.report.table(["configuration", "ours ms", "diffusers ms", "diffusers / ours", "ours first call s",
                          "diffusers first call s", "the seed's A100 s / image (diffusers, not ours)"])
    fmt = (lambda v: f"{v:.2f}" if isinstance(v, float) else v)
    for key, label, seed in CONFIGS:
        need = w.estimate.get("sdxl_compile", 0.0) + w.estimate.get("sdxl_end_to_end", 0.0)
        if key == "default" and not w.opt.tiny and not w.budget.allows(need):
            w.report(f"| {label} | skipped: {w.budget.left():.0f} s left, needs about {need:.0f} s with the end-to-end "
                     f"rows | | | | | {seed} |")
            continue
        calls, first, modules = {}, {}, {}
        for side, unet in base.items():
            try:
                if key == "default":  # wraps the fused, channels_last module of the row before
                    modules[side] = wm.compiled(unet, "default", w.device, w.opt.compile_backend)
                else:
                    set_layout(xl, side, unet, key == "fused_cl")
                    modules[side] = unet
                calls[side] = bind(w, xl, side, modules[side])
                first[side] = wm.first_call(calls[side], w.device)  # compile time for the compiled row
            except Exception as e:  # one side's failure is a cell, not the end of the row
                calls.pop(side, None)
                first[side] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
        med = interleaved_ms(w, calls)
        for side, ms in med.items():
            if side not in xl.best or ms < xl.best[side][2]:
                xl.best[side] = (key, modules[side], ms)
        ratio = f"{med['diffusers'] / med['ours']:.2f}x" if len(med) == 2 else "–"
        row([label, fmt(med.get("ours", "–")), fmt(med.get("diffusers", "–")), ratio, fmt(first.get("ours", "–")),
             fmt(first.get("diffusers", "–")), seed])


def end_to_end_rows(w, xl: SDXLRun) -> None:
    """Text to decoded image, batch 1, each side's best UNet; then the two images from the same noise compared."""
    from ldm.model.conditioner import conditioning_batch
    from ldm.samplers.sigma_api import EulerSampler
    size, model = 8 * xl.side, xl.model
    x_T = torch.randn(1, 4, xl.side, xl.side, generator=torch.Generator(w.device).manual_seed(w.opt.seed),
                      device=w.device)  # unit (VP) noise: Euler and diffusers' "leading" init_noise_sigma scale it
    sampler = EulerSampler(model)
    sampler.make_schedule(xl.steps, verbose=False)
    timesteps = list(sampler.sigma_schedule.timesteps)
    images = {}

    def ours():
        batch = conditioning_batch([PROMPT], original_size=(size, size))
        c, uc = model.get_learned_conditioning(batch), model.get_unconditional_conditioning(batch, [""])
        x, _ = sampler.sample(S=xl.steps, conditioning=c, batch_size=1, shape=[4, xl.side, xl.side], verbose=False,
                              unconditional_guidance_scale=SCALE, unconditional_conditioning=uc, x_T=x_T)
        images["ours"] = ((model.decode_first_stage(x).float() + 1) / 2).clamp(0, 1)

    def theirs():  # the empty negative prompt zeroed on both sides (force_zeros_for_empty_prompt, sgm's)
        images["diffusers"] = xl.peer(prompt=[PROMPT], height=size, width=size, timesteps=timesteps,
                                      guidance_scale=SCALE, latents=x_T.to(xl.dtype), output_type="pt").images.float()

    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    row = w.report.table(["side", "UNet", "s / image", "images / s", "the seed's A100 s / image (diffusers, not ours)"])
    runs, seconds = (2 if w.device.type == "cuda" else 1), {}
    owners = {"ours": (model.model, "diffusion_model", ours), "diffusers": (xl.peer, "unet", theirs)}
    for side, (key, module, _) in xl.best.items():
        owner, attr, fn = owners[side]
        plain = getattr(owner, attr)
        set_layout(xl, side, plain, key != "eager")  # the best row's layout (the eager row is unfused)
        setattr(owner, attr, module)
        try:
            seconds[side] = timed_s(w, fn, runs)
        finally:
            setattr(owner, attr, plain)
        seed = next(s for k, _, s in CONFIGS if k == key)
        row([side, key, f"{seconds[side]:.3f}", f"{1 / seconds[side]:.3f}", seed])
    w.report(f"\n{xl.steps} Euler steps, guidance {SCALE}, {size}x{size}, batch 1, {str(xl.dtype).split('.')[-1]}; "
             f"'s / image': text encoding, sampling and the VAE decode, median of {runs} after a warm-up."
             + (f" diffusers / ours: {seconds['diffusers'] / seconds['ours']:.2f}x." if len(seconds) == 2 else "")
             + (" diffusers decodes in fp32 (its SDXL VAE's force_upcast in fp16), ours in fp16 (fp32 only on "
                "overflow)." if xl.dtype == torch.float16 and xl.peer is not None else ""))
    made = counters["stats"]["unique_graphs"] - graphs  # a recompile here would cost a second compile's time
    compiled = any(key == "default" for key, _, _ in xl.best.values())
    checks = [["graphs compiled while making the images (the timed rows' compiled UNets reused)",
               f"{made}" + ("" if compiled else " (no compiled UNet in use)"), "ok" if made == 0 else "FAIL"]]
    if len(images) == 2:
        err = rel(images["ours"], images["diffusers"])
        tol = 1e-3 if xl.dtype == torch.float32 else 0.1
        checks.append([f"ours vs diffusers, the same noise and weights, {xl.steps} Euler steps: the [0, 1] images",
                       f"max diff {err:.3g} (of the max)", "ok" if err <= tol else "FAIL"])
    check = w.report.table(["check", "result", "verdict"])
    for cells in checks:
        check(cells)


def seed_table(w) -> None:
    w.report("\nThe seed's table, quoted for reference: the Hugging Face SDXL post's numbers (diffusers, A100 80GB "
             "400 W, 1024x1024, 30 steps, batch 1, real weights), not measured here.")
    row = w.report.table(["the seed's step (cumulative)", "the seed's A100 s / image"])
    for step, seconds in SEED_TABLE:
        row([step, f"{seconds:.2f}"])


def sdxl_part(w) -> None:
    """Part 7: free SD 2, build SDXL and its peer, the UNet rows, the end-to-end rows, the seed's table."""
    xl = build(w)
    try:
        unet_rows(w, xl)
        end_to_end_rows(w, xl)
        seed_table(w)
    finally:
        del xl
        release(w.device)

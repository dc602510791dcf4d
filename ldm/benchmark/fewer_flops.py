"""The fewer-FLOPs table: DeepCache, T-GATE, guidance that stops early and their combination, ours and diffusers
with the reference packages, from the same weights and start noise, in one process and one run.

    ldm-benchmark --fewer_flops --random sd2 --H 256 --W 256 --steps 50 --out docs/fewer-flops-cpu

For each method: wall seconds of the sampling loop (text encoding and decoding excluded: the methods change
neither), the UNet calls it makes (full / shallow / unguided), the share of UNet FLOPs it saves (per-call FLOPs
of each kind of call counted by torch's FlopCounterMode over math attention at this size, times the calls),
the speed-up over the plain run and over plain diffusers, and the deviation from the plain run's image
(max |difference| / max |plain| of the decoded images: with random weights only a sanity figure, quality needs
real weights). Both models are in memory, and each method runs on ours, then on diffusers, so that the machine's
load at that moment touches both alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ldm.samplers.caching import Caching, default_gate

PUBLISHED = [  # (method, quality cost as published, source)
    ("DeepCache N=5", "SD 1.5, PLMS 50 steps: 2.15x faster, CLIP score 29.46 vs 29.51",
     "Ma et al. 2023, arXiv:2312.00858, Table 3"),
    ("DeepCache N=3 / N=5", "SD 2.1 512x512: 2.61 s -> 1.12 s / 0.81 s",
     "diffusers docs, 'DeepCache' (Optimization)"),
    ("T-GATE gate 10 of 25", "SD 2.1: 16.1 s -> 9.9 s (their GPU), FID 22.6 -> 19.9",
     "Zhang et al. 2024, arXiv:2404.02747, Table 1"),
    ("Guidance stops early", "about 25 % less compute at the picture kept",
     "Castillo et al. 2023, arXiv:2312.12487"),
]


ROWS = ("plain", "deepcache", "tgate", "cfg_end", "deepcache+tgate")


def methods(steps: int, rows: tuple[str, ...] = ROWS) -> list[tuple[str, Caching | None]]:
    """The rows (``rows``, by key, of ``ROWS``): plain, each method at its published default, DeepCache + T-GATE."""
    gate = default_gate(steps)
    every = dict(zip(ROWS, [("plain", None), ("DeepCache 3,0", Caching(deepcache=3)),
                            (f"T-GATE {gate}", Caching(tgate=gate)), ("cfg_end 0.5", Caching(cfg_end=0.5)),
                            (f"DeepCache 3,0 + T-GATE {gate}", Caching(deepcache=3, tgate=gate))]))
    return [every[k] for k in ROWS if k in rows]


def unet_flops(model, x: torch.Tensor, context: torch.Tensor, branch: int) -> dict[tuple[bool, bool], int]:
    """FLOPs of one batch-1 UNet call of each kind: (DeepCache full?, reuses cross-attention?) -> FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    from ldm.model.attention import set_attention_backend
    unet = model.model.diffusion_model
    t = torch.full((1,), 500.0, device=x.device)
    backends = {m: m.backend for m in unet.modules() if hasattr(m, "backend")}
    set_attention_backend(unet, "math")  # matmuls FlopCounterMode counts; CPU SDPA has no FLOP formula
    out = {}
    try:
        with torch.no_grad():
            _, deep, cross = unet(x, t, context, branch=branch, record=True)
            for full in (True, False):
                for reuse in (False, True):
                    extras = dict(branch=branch, deep=None if full else deep, cross=cross if reuse else None)
                    with FlopCounterMode(display=False) as counter:
                        unet(x, t, context, **extras)
                    out[(full, reuse)] = counter.get_total_flops()
    finally:
        for m, backend in backends.items():
            m.backend = backend
    return out


def ours_runs(model, x_T: torch.Tensor, opt, device: torch.device):
    """For each method in turn: (name, its row) with our ``model`` (already on ``device``): seconds, calls, FLOPs,
    decoded image. A generator, so that the peer's run of the same method can come right after."""
    from ldm.models.diffusion.plms import PLMSSampler
    from ldm.speed.runtime import synchronize
    with torch.no_grad():
        c, uc = model.get_learned_conditioning([opt.prompt]), model.get_learned_conditioning([""])
        flops = unet_flops(model, x_T, c, branch=0)
        shape = list(x_T.shape[1:])

        def run(sampler, steps):
            return sampler.sample(S=steps, conditioning=c, batch_size=1, shape=shape, verbose=False,
                                  unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                                  x_T=x_T.clone())[0]

        run(PLMSSampler(model), 2)  # warm-up
        for name, caching in methods(opt.steps, opt.rows):
            sampler = PLMSSampler(model, caching=caching)
            seconds = float("inf")
            for _ in range(opt.repeats):  # the best of the repeats: the least disturbed by other work
                synchronize(device)
                t0 = time.perf_counter()
                z = run(sampler, opt.steps)
                synchronize(device)
                seconds = min(seconds, time.perf_counter() - t0)
            plan = (caching or Caching()).plan(sampler.call_steps(), guided=True)  # without DeepCache: all full
            cost = sum((2 if k.guided else 1) * flops[(k.full, k.reuse)] for k in plan)
            print(f"ours {name}: {seconds:.2f} s", file=sys.stderr)
            yield name, {"seconds": seconds, "image": model.decode_first_stage(z).float().cpu(), "flops": cost,
                         "full": sum(k.full for k in plan), "calls": len(plan),
                         "unguided": sum(not k.guided for k in plan)}


def peer_runs(pipe, x_T: torch.Tensor, opt, device: torch.device):
    """For each method in turn: (name, its row) with diffusers' ``pipe`` through the reference packages (undone
    after each method): seconds, decoded image."""
    from ldm.benchmark.peer_caching import reference_call
    from ldm.speed.runtime import synchronize
    kwargs = dict(prompt=[opt.prompt], negative_prompt=[""], guidance_scale=opt.scale, height=opt.H, width=opt.W,
                  output_type="latent")
    with torch.no_grad():
        pipe(**kwargs, latents=x_T.clone(), num_inference_steps=2)  # warm-up
        for name, caching in methods(opt.steps, opt.rows):
            call, undo = reference_call(pipe, caching, opt.steps)
            seconds = float("inf")
            try:
                for _ in range(opt.repeats):
                    synchronize(device)
                    t0 = time.perf_counter()
                    z = call(**kwargs, latents=x_T.clone(), num_inference_steps=opt.steps).images
                    synchronize(device)
                    seconds = min(seconds, time.perf_counter() - t0)
            finally:
                undo()
            print(f"diffusers {name}: {seconds:.2f} s", file=sys.stderr)
            yield name, {"seconds": seconds, "image": pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
                         .float().cpu()}


def interleaved(model, pipe, x_T: torch.Tensor, opt, device: torch.device) -> tuple[dict, dict]:
    """(ours, peer) rows, each method run by ours then by the peer, so that a change in the machine's load
    between methods touches both sides alike; ``pipe`` None: ours only."""
    ours, peer = {}, {}
    theirs = peer_runs(pipe, x_T, opt, device) if pipe is not None else None
    for name, row in ours_runs(model, x_T, opt, device):
        ours[name] = row
        if theirs is not None:
            peer_name, peer_row = next(theirs)
            peer[peer_name] = peer_row
    return ours, peer


def window_part(w) -> None:
    """The GPU window's part: the table on the window's models (ours, and the peer through the packages), at the
    window's size and dtype; the peer's modules are patched and restored per method."""
    from types import SimpleNamespace
    opt = SimpleNamespace(steps=w.opt.steps, scale=9.0, prompt="A photo", repeats=2 if w.device.type == "cuda" else 1,
                          rows=ROWS, H=8 * w.side, W=8 * w.side)
    x_T = torch.randn(1, 4, w.side, w.side, generator=torch.Generator().manual_seed(1)).to(w.device, w.dtype)
    ours, peer = interleaved(w.model, w.peer, x_T, opt, w.device)
    w.report(table(ours, peer, opt, f"{w.device.type}, {w.dtype}").rstrip("\n"))


def table(ours: dict, peer: dict, opt, where: str | None = None) -> str:
    """The markdown report; ``where``: the device and dtype (default: the CPU in fp32)."""
    dev = lambda rows, k: ((rows[k]["image"] - rows["plain"]["image"]).abs().max()
                           / rows["plain"]["image"].abs().max()).item()
    base, peer_base = ours["plain"], peer.get("plain")
    where = where or f"CPU ({torch.get_num_threads()} threads), fp32"
    lines = [f"{opt.steps} PLMS steps, {opt.W}x{opt.H}, guidance {opt.scale}, batch 1, {where}; sampling loop only, "
             f"best of {opt.repeats}.", "",
             "| method | UNet calls (full / all, unguided) | UNet FLOPs saved | ours s | ours speed-up | "
             "diffusers + package s | package speed-up | ours vs plain diffusers | ours vs diffusers + package "
             "| deviation ours | deviation diffusers |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _ in methods(opt.steps, opt.rows):
        o, p = ours[name], peer.get(name)
        saved = 1 - o["flops"] / base["flops"]
        cells = [name, f"{o['full']} / {o['calls']}, {o['unguided']}", f"{saved:.0%}", f"{o['seconds']:.1f}",
                 f"{base['seconds'] / o['seconds']:.2f}x"]
        if p is not None:
            cells += [f"{p['seconds']:.1f}", f"{peer_base['seconds'] / p['seconds']:.2f}x",
                      f"{peer_base['seconds'] / o['seconds']:.2f}x", f"{p['seconds'] / o['seconds']:.2f}x"]
        else:
            cells += ["–"] * 4
        cells += [f"{dev(ours, name):.3f}", f"{dev(peer, name):.3f}" if p is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if hasattr(os, "getloadavg"):
        lines += ["", f"Load average (1 min) when the table was written: {os.getloadavg()[0]:.1f} "
                      f"(on {os.cpu_count()} cores; other work on the machine slows both sides alike only if it is steady)."]
    lines += ["", "Published quality cost (real weights):", "", "| method | published | source |", "|---|---|---|"]
    lines += [f"| {m} | {q} | {s} |" for m, q, s in PUBLISHED]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldm-benchmark --fewer_flops", description=__doc__.split("\n")[0])
    p.add_argument("--random", default="sd2", help="a random checkpoint of this preset (default sd2, full size)")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--W", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=9.0)
    p.add_argument("--prompt", default="A photo")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs per method; the best is reported")
    p.add_argument("--rows", default=",".join(ROWS), help=f"the rows to run, of {','.join(ROWS)} (plain always)")
    p.add_argument("--no_peer", action="store_true")
    p.add_argument("--out", default="outputs/fewer-flops", help="writes OUT.md")
    opt = p.parse_args(argv)
    if opt.repeats < 1 or opt.steps < 1 or opt.H % 8 or opt.W % 8 or opt.H < 8 or opt.W < 8:
        p.error("--repeats and --steps must be at least 1 and --H/--W positive multiples of 8")
    rows = tuple(r.strip() for r in opt.rows.split(",") if r.strip())
    if not set(rows) <= set(ROWS):
        p.error(f"--rows takes {','.join(ROWS)}: got {opt.rows!r}")
    opt.rows = ("plain",) + tuple(r for r in rows if r != "plain")  # the speed-ups are over the plain run
    if opt.ckpt:
        opt.random = None
    return opt


def main(argv: list[str] | None = None) -> int:
    from ldm.benchmark.export import cached_export
    from ldm.benchmark.runs import prepare_model
    from ldm.benchmark.peer import build_pipeline, quiet_peer_logs
    from ldm.weights.loading import load_model
    from ldm.fileio import write_text
    opt = parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    config, ckpt, _ = prepare_model(opt)
    x_T = torch.randn(1, 4, opt.H // 8, opt.W // 8, generator=torch.Generator().manual_seed(opt.seed))
    cpu = torch.device("cpu")
    pipe = None
    if not opt.no_peer:  # both models in memory (fp32 SD 2: 2 x 5.2 GB), so that each method runs on both in turn
        quiet_peer_logs()
        pipe = build_pipeline(cached_export(config, ckpt, os.path.dirname(ckpt)), cpu, torch.float32)
    model, _ = load_model(config, ckpt, device=cpu, dtype=torch.float32)
    ours, peer = interleaved(model, pipe, x_T, opt, cpu)
    text = table(ours, peer, opt)
    write_text(opt.out + ".md", text)
    print(text)
    return 0

"""The GPU proof in one short window: ``ldm-benchmark --window`` (``scripts/gpu_window.sh`` on a GPU machine).

One process, no checkpoint file: the full SD 2 model with seeded random weights is built on the device and the
diffusers peer gets the same weights in memory (``ldm.benchmark.window_models``). Eight parts, in this order, each
appending its rows to the report as soon as it has them (a cut-off keeps everything before it), each run only
when the time budget (``--budget_s``) still holds its estimate, else skipped with a line that says so:

  1. environment: device, driver, torch, diffusers;
  2. checks: fp32/bf16/fp16 images finite and not black; the compiled UNet has no graph break and never recompiles
     over 50 PLMS and 50 DPM-Solver++ steps; the sampling loop makes no host sync; CUDA-graph outputs survive the
     next replay; the SDPA kernels chosen are the fused ones and the --disable_* flags restrict them;
  3. one UNet call (guided batch 2, 64x64 latent, fp16), median of >= 20 (CUDA events), ours and diffusers
     interleaved: eager SDPA; + fused projections + channels_last; compile default; reduce-overhead;
     max-autotune-no-cudagraphs and int8 when the budget allows; compile time beside each;
  4. end to end, 512x512, 50 PLMS steps, batch 1 (4 if the budget allows): each side's best UNet of part 3;
  5. the top 10 kernels of one compiled UNet call of ours;
  6. fewer FLOPs: DeepCache, T-GATE, cfg_end and DeepCache + T-GATE, ours and the peer with the reference packages;
  7. SDXL (``ldm.benchmark.window_sdxl``): SD 2 freed, the full SDXL base and its diffusers peer built on the device
     (bf16, shared random weights); one UNet call at 1024x1024 (guided batch 2, 128x128 latent), ours and diffusers
     interleaved: eager SDPA; + fused projections + channels_last; compile default when the budget allows; then
     1024x1024, 30 Euler steps, batch 1, each side's best UNet, the two images compared; the Hugging Face SDXL
     post's A100 table (the seed's numbers) quoted beside;
  8. only with time left: the blog's table (A-E and the peer) in its fresh-process protocol, batch 1.

The optional rows of parts 3 and 4 (max-autotune, int8, batch 4) run only if the parts after them, SDXL's compiled
row included, still fit: SDXL's figures beside the seed's table come before SD 2's extras. Compiled modules are made
once and reused by every part. ``--tiny`` runs the same code on the tiny presets (the CPU walk a CI test makes; part 7
on ``sdxl-tiny``, 64x64, 2 steps); ``--dry_run`` is that walk plus each part's estimated seconds on an H100 at full
size.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ldm.benchmark import window_models as wm
from ldm.benchmark.window_parts import blog_table, checks, end_to_end, environment, fewer_flops, profile, unet_part
from ldm.benchmark.window_sdxl import sdxl_part

DEFAULT_BUDGET_S = 480.0
PARTS = (("environment", environment), ("checks", checks), ("unet", unet_part), ("end_to_end", end_to_end),
         ("profile", profile), ("fewer_flops", fewer_flops), ("sdxl", sdxl_part), ("blog_table", blog_table))


@dataclass
class Budget:
    """The window's seconds: what is left, and whether an estimate still fits (an injectable clock for tests)."""
    total_s: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)

    def __post_init__(self):
        self.start = self.clock()

    def left(self) -> float:
        return self.total_s - (self.clock() - self.start)

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s


class Report:
    """Markdown appended line by line and flushed to disk at once: a window cut off keeps every row before the cut.
    (Not ``atomic_write``: a partial report is the point here.)"""

    def __init__(self, path: str | None, echo: bool = True):
        self.path, self.echo, self.lines = path, echo, []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w", encoding="utf-8").close()

    def __call__(self, text: str = "") -> None:
        self.lines.append(text)
        if self.echo:
            print(text, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())

    def table(self, header: list[str]) -> Callable[[list], None]:
        """Write a table header; returns the function that writes one row."""
        self("")
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        return lambda cells: self("| " + " | ".join(str(c) for c in cells) + " |")


@dataclass
class Window:
    """What the parts share: the options, the budget, the report, the device, both models and the compiled modules."""
    opt: argparse.Namespace
    budget: Budget
    report: Report
    device: torch.device
    dtype: torch.dtype
    model: object = None
    peer: object = None
    compiled: dict = field(default_factory=dict)  # (side, config) -> compiled module, made once
    first: dict = field(default_factory=dict)  # (side, config) -> seconds of its first call (compile included)
    best: dict = field(default_factory=dict)  # side -> (config, median seconds) from part 3
    estimate: dict = field(default_factory=dict)

    @property
    def side(self) -> int:
        """The latent side: 64 (512x512 images) at full size, 8 (64x64) for the tiny preset."""
        return 8 if self.opt.tiny else 64

    def sync_free(self):
        """``torch.cuda.set_sync_debug_mode("error")`` on CUDA (any host sync raises); nothing to check elsewhere."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def scope():
            torch.cuda.synchronize(self.device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return scope()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ldm.model.config import DTYPES
    p = argparse.ArgumentParser(prog="ldm-benchmark --window", description=__doc__.split("\n")[0])
    p.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for the whole window; a part whose estimate no longer fits is skipped, saying so")
    p.add_argument("--out", default="outputs/gpu-window.md", help="the report (markdown, appended as rows come)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny preset: the same code paths in seconds")
    p.add_argument("--dry_run", action="store_true",
                   help="walk every part on the tiny preset here and print each part's estimated H100 seconds")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the checks and the end-to-end part")
    p.add_argument("--iters", type=int, default=None, help="timed UNet calls per configuration and side "
                   "(default: 20 on CUDA, 4 elsewhere)")
    p.add_argument("--compile_backend", default="inductor",
                   help="dynamo backend; 'eager' makes a CPU walk quick (no code generation)")
    p.add_argument("--no_peer", action="store_true", help="leave diffusers out")
    p.add_argument("--blog_table", action="store_true", help="with --tiny: walk part 8 too (fresh processes)")
    p.add_argument("--seed", type=int, default=0)
    opt = p.parse_args(argv)
    if opt.dry_run:
        opt.tiny, opt.device = True, "cpu"
    if opt.budget_s <= 0 or opt.steps < 2 or (opt.iters is not None and opt.iters < 1):
        p.error("--budget_s must be positive, --steps at least 2, --iters at least 1")
    return opt


def setup(opt: argparse.Namespace, clock: Callable[[], float] = time.monotonic) -> Window:
    """The window: device, dtype, budget and report, and both models built (their time counts against the budget)."""
    from ldm.model.config import DTYPES
    from ldm.speed.runtime import pick_device
    device = pick_device(opt.device)
    dtype = DTYPES[opt.dtype] if opt.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if opt.iters is None:
        opt.iters = 20 if device.type == "cuda" else 4
    w = Window(opt, Budget(opt.budget_s, clock), Report(opt.out), device, dtype)
    w.estimate = wm.estimates("sd2", opt.steps, opt.iters)
    preset = "tiny" if opt.tiny else "sd2"
    w.report(f"# GPU window: {preset}, {device.type}, {str(dtype).split('.')[-1]}, budget {opt.budget_s:.0f} s")
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    w.model = wm.build_ours(preset, device, opt.seed)
    if not opt.no_peer and wm.peer_available():
        w.peer = wm.build_peer(w.model, device, dtype)  # from the fp32 weights, then cast as ours is
    wm.cast_(w.model, dtype)
    w.report(f"\nModels built in {time.perf_counter() - t0:.1f} s (seeded random weights on {device.type}"
             f"{'; diffusers from the same weights in memory' if w.peer is not None else '; no diffusers peer'}).")
    return w


def run_parts(w: Window, parts: tuple = PARTS) -> None:
    """Each part in order when the budget still holds its estimate (the tiny walk runs all); a failing part is a
    line of the report and the next part runs. The report is on disk row by row, so a cut-off loses nothing."""
    for name, fn in parts:
        need = 0.0 if w.opt.tiny else w.estimate.get(name, 0.0)
        if not w.budget.allows(need):
            w.report(f"\n## {name}: skipped ({max(w.budget.left(), 0):.0f} s left of the budget, the part needs about "
                     f"{need:.0f} s)")
            continue
        w.report(f"\n## {name}")
        start = time.perf_counter()
        try:
            fn(w)
        except Exception as e:  # a broken part is a row of the report, not the end of the window
            w.report(f"\n**{name} failed**: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        w.report(f"\n({name}: {time.perf_counter() - start:.1f} s; {max(w.budget.left(), 0):.0f} s of the budget left)")


def dry_run_estimates(w: Window) -> None:
    """Each part's estimated seconds on an H100 at full size (window_models.estimates: FLOPs, published rates and the
    assumptions it names), and what of them the budget holds."""
    e = w.estimate
    row = w.report.table(["part", "estimated H100 s (full size: SD 2, SDXL base)"])
    for name in ("build", "environment", "checks", "unet", "unet_optional", "end_to_end", "end_to_end_batch4",
                 "profile", "fewer_flops", "sdxl", "sdxl_compile", "blog_table"):
        row([name, f"{e[name]:.0f}"])
    must = sum(e[k] for k in ("build", "environment", "checks", "unet", "end_to_end", "profile", "fewer_flops", "sdxl"))
    xl_tflop = wm.unet_flops(wm.SDXL_PRESET, 2, wm.SDXL_SIDE) / 1e12  # the meta device: a few seconds
    w.report(f"\nSD 2 UNet call (guided batch 2, 64x64 latent): {e['unet_tflop']:.2f} TFLOP; at the published "
             f"{wm.H100_BEST_IT_S} it/s that is {e['unet_tflop'] * wm.H100_BEST_IT_S:.0f} TFLOP/s. SDXL UNet call "
             f"(guided batch 2, 128x128 latent): {xl_tflop:.1f} TFLOP; the assumed "
             f"{wm.SDXL_EAGER_CALL_S * 1000:.0f} ms eager is {xl_tflop / wm.SDXL_EAGER_CALL_S:.0f} TFLOP/s. Parts 1-7 "
             f"without the optional rows: about {must:.0f} s of the {w.opt.budget_s:.0f} s budget; with SDXL's "
             f"compiled row {must + e['sdxl_compile']:.0f} s (SD 2's optional rows yield to it; part 8 runs only "
             f"after).")


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(sys.argv[1:] if argv is None else argv)
    w = setup(opt)
    run_parts(w)
    if opt.dry_run:
        dry_run_estimates(w)
    failed = [line for line in w.report.lines if line.startswith("**") and "failed" in line]
    print(f"report: {opt.out}" + (f" ({len(failed)} part(s) failed)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

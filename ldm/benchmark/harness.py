"""Speed and memory of text-to-image generation, in the protocol of the PyTorch 2 Stable Diffusion blog.

    ldm-benchmark --ckpt checkpoints/v2-1_512-ema-pruned.ckpt \
        --config configs/stable-diffusion/v2-inference.yaml --batch 1,2,4           # GPU: 512x512, 50 steps, N=10
    ldm-benchmark --random sd2 --device cpu --H 256 --W 256 --steps 2 --repeats 2   # no weights needed
    ldm-benchmark --ckpt checkpoints/v1-5-pruned-emaonly.safetensors                 # config guessed from the weights

Models: SD 1.x (CLIP ViT-L/14 text encoder), SD 2.x eps and 768-v (v-prediction), with ``--config`` or guessed
from the checkpoint (ldm.weights.detect.guess_config; the guess is printed), or ``--random`` (a seeded random
checkpoint of a repo config: ``sd1``, ``sd2``, ``sd2-v``, ``sd2-inpainting`` full size, ``sd1-tiny``, ``tiny``,
``tiny-v``, ``tiny-inpainting`` for tests). Inpainting checkpoints (a 9-channel UNet input) get the UNet
microbenchmark only, ours and the peer's: txt2img and diffusers' text-to-image pipeline cannot run them.

Configurations run one after another, A B C D E P ..., and the sequence is repeated ``--repeats`` times
(the blog's 10). Each run is a fresh process running txt2img (``ldm.apps.txt2img``) ``--prompt "A photo" --seed 1 --plms
--n_iter 2 --skip_first --time_file T`` with the configuration's flags; its timed seconds are the two
iterations' sampling and decoding, after one untimed warm-up iteration (where compilation happens):
  A  original attention: fp32 softmax(QK^T)V (``--attention math``), no compile ("original without xFormers")
  B  xFormers' memory-efficient attention (``--attention xformers``); skipped when xformers is missing
  C  SDPA restricted to its math kernel (``--disable_mem_efficient --disable_flash``)
  D  SDPA with the memory-efficient/flash kernels (the default)
  E  D + ``torch.compile`` of the UNet (``--compile``)
  P  the peer: diffusers' StableDiffusionPipeline (SDPA) built from the same weights (ldm.benchmark.peer)
  PC P with diffusers' UNet compiled
  and ``--extra NAME:FLAGS`` configurations of your own (txt2img flags).
``--deepcache``/``--tgate``/``--cfg_end`` (ldm.samplers.caching) apply to every run: ours through txt2img's flags,
the peer's through the reference packages (ldm.benchmark.peer_caching). ``--fewer_flops`` writes instead the
methods' table, ours and diffusers with the packages in one process (ldm.benchmark.fewer_flops).
``--ladder`` runs instead the technique ladder (ldm.benchmark.ladder): S0 S1 ... ours and H0 H1 ... the
peer, each step adding one speed feature (bf16, SDPA, fused projections, channels_last, compile,
max-autotune, int8), in the Hugging Face post's table style.
Then, per configuration, the UNet alone in a fresh process (ldm.benchmark.unet): seconds per step, the
compile time, peak memory and the largest resolution within ``--memory_budget_gb``. Writes NAME-runs.csv,
NAME-summary.csv, NAME-unet.csv, NAME.md and NAME-summary.png / NAME-runs.png into ``--outdir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import tempfile
import time

from ldm.apps.fewer_flops import add_caching_args, caching_flags
from ldm.benchmark.runs import (Config, cache_dir, code_version, compile_notes, peer_check, prepare_model, run_once,
                                txt2img_child, unet_once)
from ldm.fileio import write_text
from ldm.model.presets import PRESETS


CONFIGS = {c.key: c for c in [
    Config("A", "original attention (math), no compile", ("--attention", "math")),
    Config("B", "xFormers attention, no compile", ("--attention", "xformers")),
    Config("C", "SDPA math kernel, no compile", ("--disable_mem_efficient", "--disable_flash")),
    Config("D", "SDPA mem-efficient/flash, no compile"),
    Config("E", "SDPA + torch.compile", ("--compile",)),
    Config("P", "diffusers (SDPA), no compile", peer=True),
    Config("PC", "diffusers + torch.compile", ("--compile",), peer=True),
]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ldm.model.config import DTYPES
    p = argparse.ArgumentParser(prog="ldm-benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--ckpt", help="checkpoint (.ckpt/.safetensors, either layout)")
    m.add_argument("--config", help="its model yaml (default: guessed from the checkpoint's keys and shapes)")
    m.add_argument("--random", choices=list(PRESETS), help="make (and cache) a seeded random checkpoint of this "
                   "preset (ldm.model.presets; sd2 is the 512px eps base model)")
    m.add_argument("--cache_dir", default=None, help="random checkpoints and diffusers exports "
                   "(default: $XDG_CACHE_HOME/ldm-fast/benchmark or ~/.cache/ldm-fast/benchmark)")
    r = p.add_argument_group("protocol")
    r.add_argument("--configs", default="A,B,C,D,E,P", help=f"comma list of {', '.join(CONFIGS)} (default %(default)s)")
    r.add_argument("--extra", action="append", default=[], metavar="NAME:FLAGS",
                   help='another configuration of txt2img flags, e.g. "bf16:--dtype bf16" (repeatable)')
    r.add_argument("--ladder", action="store_true",
                   help="the technique ladder S0..S7 (ours) and H0..H7 (diffusers) instead of --configs")
    r.add_argument("--ladder_steps", type=int, default=None, help="only the first K steps of the ladder")
    r.add_argument("--ladder_only", default=None, metavar="K,K,...",
                   help="run only these ladder steps (each still with every earlier step's flags): "
                        "split a long ladder over several sessions, each with its own --name")
    r.add_argument("--ladder_dtype", choices=["bf16", "fp16"], default="bf16",
                   help="the reduced precision of the ladder's step 1")
    r.add_argument("--no_peer", action="store_true", help="the ladder without diffusers' H configurations")
    r.add_argument("--throughput", default=None, metavar="N|R,R,...",
                   help="data-parallel throughput instead (ldm.benchmark.throughput): txt2img under torchrun at "
                        "1..N ranks (or these rank counts), configuration D and any --extra")
    r.add_argument("--repeats", "-N", type=int, default=10, help="times the sequence A B C ... is repeated (0: the UNet microbenchmark only)")
    r.add_argument("--batch", default="1", help="batch sizes (n_samples), comma list of 1, 2, 4, ...")
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--n_iter", type=int, default=2)
    r.add_argument("--H", type=int, default=512)
    r.add_argument("--W", type=int, default=512)
    r.add_argument("--prompt", default="A photo")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    r.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights and activations of every configuration (default: fp16 on CUDA, fp32 on CPU)")
    r.add_argument("--fresh_inductor_cache", action="store_true",
                   help="a new TORCHINDUCTOR_CACHE_DIR for each timed run, so every compile there is cold")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads of every run (OMP_NUM_THREADS; default: torch's choice)")
    r.add_argument("--run_timeout", type=float, default=None, help="seconds before a run is stopped")
    add_caching_args(r)  # every run, ours and the peer's (through the reference packages); not the UNet microbenchmark
    u = p.add_argument_group("UNet microbenchmark and memory")
    u.add_argument("--unet_iters", type=int, default=10, help="timed UNet calls per configuration (0: skip)")
    u.add_argument("--memory_budget_gb", type=float, default=None, help="default: the device's memory")
    u.add_argument("--fit", choices=["auto", "estimate", "measure", "none"], default="auto",
                   help="largest resolution within budget: measured on CUDA, estimated from tensor sizes elsewhere")
    u.add_argument("--fit_step", type=int, default=128, help="resolutions 256..2048 in this step")
    u.add_argument("--unet_profile", type=int, default=0, metavar="K",
                   help="profile one more UNet call per configuration and report its K costliest ops")
    c = p.add_argument_group("checks and output")
    c.add_argument("--check", action="store_true", help="first compare the peer's latents/images with ours")
    c.add_argument("--check_steps", type=int, default=4)
    c.add_argument("--check_size", type=int, default=64)
    c.add_argument("--outdir", default="outputs/benchmark")
    c.add_argument("--name", default="benchmark", help="prefix of the output files")
    c.add_argument("--keep_logs", action="store_true", help="keep every run's output under OUTDIR/NAME-logs")
    opt = p.parse_args(argv)
    check_flags(p, opt)
    if opt.repeats < 0 or (opt.repeats == 0 and opt.unet_iters <= 0):
        p.error("--repeats 0 runs the UNet microbenchmark only: give --unet_iters 1 or more (and --repeats >= 0)")
    if opt.unet_profile and opt.unet_iters <= 0:
        p.error("--unet_profile profiles the UNet microbenchmark: give --unet_iters 1 or more")
    if opt.ladder_only is not None:
        from ldm.benchmark.ladder import steps
        n = len(steps(opt.ladder_dtype)[: opt.ladder_steps])
        try:
            opt.ladder_only = sorted({int(k) for k in opt.ladder_only.split(",")})
        except ValueError:
            p.error(f"--ladder_only takes step numbers such as 5,6: got {opt.ladder_only!r}")
        if not opt.ladder or not opt.ladder_only or not all(0 <= k < n for k in opt.ladder_only):
            p.error(f"--ladder_only needs --ladder and step numbers from 0 to {n - 1}")
    if opt.throughput is not None:
        from ldm.benchmark.throughput import parse_ranks
        try:
            opt.throughput = parse_ranks(opt.throughput)
        except ValueError:
            p.error(f"--throughput takes a rank count N (1..N) or counts such as 1,2,4: got {opt.throughput!r}")
    if opt.ladder and opt.fit != "auto":
        p.error("--ladder runs no memory search (--fit); drop --fit, or run it with --configs")
    if opt.random and (opt.ckpt or opt.config):
        p.error("--random makes its own checkpoint: drop --ckpt/--config")
    if not opt.random and not opt.ckpt:
        p.error(f"give --ckpt (and --config, or it is guessed), or --random {'|'.join(PRESETS)}")
    return opt


def check_flags(p: argparse.ArgumentParser, opt: argparse.Namespace) -> None:
    """Numbers and paths the runs would fail on, as argparse's one-line usage error before any work."""
    from ldm.apps.cli import UserError, number_problem
    from ldm.apps.fewer_flops import check_caching
    from ldm.apps.images import unwritable_folder
    try:
        batches = [int(b) for b in opt.batch.split(",")]
    except ValueError:
        p.error(f"--batch takes batch sizes such as 1,2,4: got {opt.batch!r}")
    if min(batches) < 1:
        p.error(f"--batch sizes must be 1 or more: got {opt.batch!r}")
    if problem := number_problem(opt):
        p.error(problem)
    try:
        check_caching(opt)
    except UserError as e:
        p.error(str(e))
    for name, low in (("steps", 1), ("n_iter", 1), ("unet_iters", 0), ("fit_step", 8), ("threads", 1),
                      ("check_steps", 1), ("ladder_steps", 1), ("unet_profile", 0)):
        value = getattr(opt, name)
        if value is not None and value < low:
            p.error(f"--{name} {value} must be at least {low}")
    for name in ("H", "W", "check_size"):
        if getattr(opt, name) < 8 or getattr(opt, name) % 8:
            p.error(f"--{name} {getattr(opt, name)} must be a positive multiple of 8")
    for name in ("memory_budget_gb", "run_timeout"):
        if getattr(opt, name) is not None and getattr(opt, name) <= 0:
            p.error(f"--{name} {getattr(opt, name)} must be more than 0")
    for name in ("outdir", "cache_dir"):
        folder = getattr(opt, name)
        if folder is not None and (why := unwritable_folder(folder)):
            p.error(f"--{name} {folder} cannot be used: {why}")


def ladder_configs(opt: argparse.Namespace) -> list[Config]:
    """S0 H0 S1 H1 ...: the ladder's cumulative flags, ours and the peer's, interleaved."""
    from ldm.benchmark.ladder import cumulative, steps
    ladder = steps(opt.ladder_dtype)[: opt.ladder_steps]
    peer = not opt.no_peer and all(importlib.util.find_spec(m) for m in ("diffusers", "transformers"))
    chosen = []
    for k, (step, (ours, theirs)) in enumerate(zip(ladder, cumulative(ladder))):
        if opt.ladder_only is not None and k not in opt.ladder_only:
            continue
        chosen.append(Config(f"S{k}", step.name, ours))
        if peer:
            chosen.append(Config(f"H{k}", "diffusers " + step.name, theirs, peer=True))
    return chosen


def config_dtype(cfg: Config, default: str) -> str:
    """The dtype a configuration runs in: the last --dtype among its flags (the ladder's), else the run's."""
    flags = list(cfg.flags)
    where = [i for i, f in enumerate(flags) if f == "--dtype" and i + 1 < len(flags)]
    return flags[where[-1] + 1] if where else default


def select_configs(opt: argparse.Namespace) -> tuple[list[Config], list[str]]:
    """The configurations to run, in order, and notes on the ones skipped."""
    if opt.ladder:
        note = ("ladder: the UNet microbenchmark runs each step's flags, without the memory search" if opt.unet_iters
                else "ladder: the UNet microbenchmark is skipped (--unet_iters 0)")
        return ladder_configs(opt), [note]
    chosen, notes = [], []
    for key in [k.strip() for k in opt.configs.split(",") if k.strip()]:
        if key not in CONFIGS:
            raise SystemExit(f"error: unknown configuration {key!r}; choose from {', '.join(CONFIGS)}")
        cfg = CONFIGS[key]
        if key == "B" and importlib.util.find_spec("xformers") is None:
            notes.append("B (xFormers) skipped: xformers is not installed (pip install xformers)")
        elif cfg.peer and not all(importlib.util.find_spec(m) for m in ("diffusers", "transformers")):
            notes.append(f"{key} skipped: the peer needs diffusers and transformers "
                         "(pip install diffusers transformers)")
        else:
            chosen.append(cfg)
    for extra in opt.extra:
        name, sep, flags = extra.partition(":")
        if not sep or not name.strip() or name.strip() in CONFIGS:
            raise SystemExit(f"error: --extra {extra!r}: expected NAME:FLAGS with a new NAME")
        chosen.append(Config(name.strip(), flags.strip() or "(no flags)", tuple(shlex.split(flags))))
    return chosen, notes


def is_inpainting(config: str) -> bool:
    """True when the config's model is an inpainting one (hybrid conditioning: a 9-channel UNet input)."""
    from ldm.model.presets import load_config
    return getattr(load_config(config), "conditioning_key", "crossattn") == "hybrid"  # SDXL: none


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_txt2img"]:
        return txt2img_child(argv[1:])
    if "--fewer_flops" in argv:  # the DeepCache / T-GATE / cfg_end table (ldm.benchmark.fewer_flops)
        from ldm.benchmark.fewer_flops import main as fewer_flops_main
        return fewer_flops_main([a for a in argv if a != "--fewer_flops"])
    if "--window" in argv:  # the GPU proof in one short window (ldm.benchmark.window)
        from ldm.benchmark.window import main as window_main
        return window_main([a for a in argv if a != "--window"])
    from ldm.benchmark import report
    from ldm.speed.runtime import pick_device
    opt = parse_args(argv)
    device = pick_device(opt.device)
    dtype = opt.dtype or ("fp16" if device.type == "cuda" else "fp32")
    batches = [int(b) for b in opt.batch.split(",")]
    configs, notes = select_configs(opt)
    if methods := caching_flags(opt):
        notes.append(f"every run with {' '.join(methods)} (ours; the peer through the deepcache/tgate packages and "
                     f"diffusers' SDCFGCutoffCallback)")
    if opt.ladder:
        opt.fit = "none"
    config, ckpt, model_name = prepare_model(opt)
    if opt.throughput:
        if is_inpainting(config):
            raise SystemExit("error: --throughput times text-to-image runs, which an inpainting model cannot do")
        from ldm.benchmark import throughput
        os.makedirs(opt.outdir, exist_ok=True)
        extra = [c for c in configs if c.key not in CONFIGS]
        return throughput.main(opt, argv, [CONFIGS["D"], *extra], config, ckpt, model_name, dtype)
    run_configs = configs
    if is_inpainting(config):
        if opt.ladder:
            raise SystemExit("error: --ladder times text-to-image runs, which an inpainting model cannot do; "
                             "drop --ladder for its UNet microbenchmark")
        run_configs = []
        notes.append("inpainting model: the end-to-end runs and the peer check are skipped (txt2img and diffusers' "
                     "text-to-image pipeline cannot run a 9-channel UNet); the UNet microbenchmark runs with its "
                     "input channels")
        opt.check = False
    os.makedirs(opt.outdir, exist_ok=True)
    base = os.path.join(opt.outdir, opt.name)
    weights = None
    if any(c.peer for c in configs) or opt.check:
        from ldm.benchmark.export import cached_export
        t0 = time.perf_counter()
        weights = cached_export(config, ckpt, cache_dir(opt))
        print(f"diffusers weights: {weights} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    started, code = time.strftime("%Y-%m-%d %H:%M"), code_version()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as scratch_root:
        logs = base + "-logs" if opt.keep_logs else os.path.join(scratch_root, "logs")
        os.makedirs(logs, exist_ok=True)
        if opt.check:
            notes.append(peer_check(opt, config, ckpt, weights, scratch_root))
        rows, order = [], 0
        for batch in batches:
            for rep in range(opt.repeats):
                for cfg in run_configs:
                    row = run_once(cfg, opt, config, ckpt, weights, batch, rep, order, dtype, scratch_root, logs)
                    row.update(model=model_name, H=opt.H, W=opt.W, steps=opt.steps, n_iter=opt.n_iter,
                               dtype=config_dtype(cfg, dtype),
                               code=code)
                    rows.append(row)
                    order += 1
                    print(f"[batch {batch} repeat {rep + 1}/{opt.repeats}] {cfg.key:>3}: " + (
                        f"{row['seconds']:.3f}s timed, {row['process_s']:.1f}s process" if row["status"] == "ok"
                        else row["status"]), file=sys.stderr, flush=True)
        unet_rows = []
        if opt.unet_iters > 0:
            for i, batch in enumerate(batches):
                for cfg in configs:
                    fit = opt.fit if i == 0 else "none"  # the search is at UNet batch 2 whatever the batch size
                    unet_rows.append(unet_once(cfg, opt, config, ckpt, weights, batch, dtype, fit, scratch_root, logs))
                    u = unet_rows[-1]
                    print(f"[UNet x{u['unet_batch']}] {cfg.key:>3}: " + (
                        f"{u['ms_mean']:.1f} ms/step, first call {u['first_call_s']:.2f}s"
                        if u["status"] == "ok" else u["status"]), file=sys.stderr, flush=True)
    summary = report.summarize(rows)
    env = next((r for r in rows + unet_rows if r["status"] == "ok"), {})
    runs = (f"{opt.steps} PLMS steps, n_iter {opt.n_iter} (+1 warm-up), N={opt.repeats}" if opt.repeats > 0
            else f"the UNet alone, {opt.unet_iters} timed calls per configuration")
    header = [f"## {model_name}, {opt.H}x{opt.W}, {runs}, {'dtype per ladder step' if opt.ladder else dtype}", "",
              f"Device: {env.get('device_name', device.type)}; torch {env.get('torch', '?')}; code {code}; "
              f"started {started}, took {(time.perf_counter() - t_start) / 60:.1f} min.", "",
              "Command: `ldm-benchmark " + " ".join(shlex.quote(a) for a in argv) + "`"]
    failed = [r for r in rows if r["status"] != "ok"]
    notes += [f"{len(failed)} run(s) failed, e.g. {failed[0]['config']}: {failed[0]['status']}"] if failed else []
    notes += ["'process s' is each run's whole process (start, load, warm-up iteration with any compilation, "
              "timed iterations, PNG writing); 'mean s' is the timed part only."] if rows else []
    notes += compile_notes(rows, configs)
    if any(u.get("fit_method") for u in unet_rows):
        notes.append(f"largest HxW in budget: the eager UNet (compile is not applied in the search) at UNet batch 2 "
                     f"(one image with guidance), {dtype}, square sizes 256..2048 in steps of {opt.fit_step}; "
                     "'estimate' adds up tensor sizes on fake tensors (no compute), 'measure' runs real forwards.")
    note = report.charts(rows, summary, f"{model_name} {opt.H}x{opt.W}, {opt.steps} steps, {dtype}, "
                                        f"{env.get('device_name', device.type)}", base + "-runs.png",
                         base + "-summary.png") if rows else None
    notes += [note] if note else []
    report.write_csv(base + "-runs.csv", rows, report.RUN_FIELDS)
    report.write_csv(base + "-summary.csv", summary, report.SUMMARY_FIELDS)
    report.write_csv(base + "-unet.csv", unet_rows, report.UNET_FIELDS)
    text = report.markdown(summary, unet_rows, header, notes)
    if opt.ladder:
        from ldm.benchmark.ladder import steps, table, unet_table
        ladder = steps(opt.ladder_dtype)[: opt.ladder_steps]
        tables = [table(summary, ladder, b) for b in batches] + [unet_table(unet_rows, ladder, 2 * b) for b in batches]
        text += "\n\n" + "\n\n".join("\n".join(t) for t in tables if t)
    write_text(base + ".md", text + "\n")
    print(text)
    if not rows:  # an inpainting model or --repeats 0: only the UNet microbenchmark ran
        return 1 if unet_rows and all(u["status"] != "ok" for u in unet_rows) else 0
    return 1 if failed and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

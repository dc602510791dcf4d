"""The benchmark's runs: each configuration in a fresh process, its output read back into a CSV row.

A txt2img run is ``python -m ldm.benchmark.harness _txt2img STATS -- ARGS`` (``ldm.apps.txt2img.main``, then its
peak memory); a peer run is ``python -m ldm.benchmark.peer run``; the UNet microbenchmark is ``ldm.benchmark.unet``.
Each run's output goes to a log; a failed run becomes a row with its exit code and last line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ldm.apps.fewer_flops import caching_flags
from ldm.model.presets import PRESETS, config_file

# The folder holding the ldm package this process imported (a checkout, or site-packages when installed):
# every run imports the same code.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MB = 1024 ** 2


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: its key (A..E, P, PC, S0.., H0.. or an --extra name), what it is, the flags
    its runs get, and whether it runs the peer (diffusers) instead of our txt2img."""
    key: str
    label: str
    flags: tuple[str, ...] = ()
    peer: bool = False


def child_env(opt: argparse.Namespace) -> dict[str, str]:
    """The environment of every run: this ldm importable, unbuffered output, the --threads choice."""
    env = dict(os.environ)
    if PACKAGE_PARENT not in sys.path:  # a checkout run as a folder; an installed ldm is on the path already
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if opt.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(opt.threads)
    return env


def run_child(cmd: list[str], log: str, opt: argparse.Namespace, env: dict | None = None) -> tuple[int, float]:
    """(exit code, wall seconds) of ``cmd`` in a fresh process, its output into ``log``."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or child_env(opt),
                                  timeout=opt.run_timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - t0


def tail(log: str) -> str:
    """The last non-empty line of a run's output (progress bars' carriage returns count as line ends)."""
    with open(log, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def code_version() -> str:
    """The commit of the checkout ldm runs from, with "+changes" when tracked files differ from it; installed
    (no checkout), the package version."""
    from ldm import __version__
    if not os.path.exists(os.path.join(PACKAGE_PARENT, ".git")):  # a file in a git worktree
        return f"ldm-fast {__version__} (installed)"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACKAGE_PARENT, capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=PACKAGE_PARENT, capture_output=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.returncode != 0 else "")


def txt2img_child(argv: list[str]) -> int:
    """``python -m ldm.benchmark.harness _txt2img STATS -- ARGS``: run txt2img's main, then record its peak memory."""
    import torch
    from ldm.apps.txt2img import main
    from ldm.benchmark.measure import environment, peak_memory, write_json
    stats, args = argv[0], argv[2:]
    code = main(args)
    device = torch.device("cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu")
    peak, kind = peak_memory(device)
    write_json(stats, {"exit": code, "peak_bytes": peak, "peak_kind": kind, **environment(device)})
    return code


def run_commands(cfg: Config, opt: argparse.Namespace, config: str, ckpt: str, weights: str | None, batch: int,
                 scratch: str, dtype: str) -> tuple[list[str], str, str]:
    """(command, time file, stats file) of one run."""
    time_file, stats = os.path.join(scratch, "time.txt"), os.path.join(scratch, "stats.json")
    common = ["--prompt", opt.prompt, "--seed", str(opt.seed), "--n_iter", str(opt.n_iter), "--n_samples",
              str(batch), "--steps", str(opt.steps), "--H", str(opt.H), "--W", str(opt.W), "--skip_first",
              "--time_file", time_file, "--dtype", dtype] + (["--device", opt.device] if opt.device else [])
    common += caching_flags(opt)  # --deepcache/--tgate/--cfg_end: ours, and the peer through the reference packages
    if cfg.peer:
        cmd = [sys.executable, "-m", "ldm.benchmark.peer", "run", "--weights", weights, "--stats", stats,
               *common, *cfg.flags]
    else:
        cmd = [sys.executable, "-m", "ldm.benchmark.harness", "_txt2img", stats, "--", "--plms", "--config",
               config, "--ckpt", ckpt, "--outdir", os.path.join(scratch, "out"), "--precision", "full",
               *common, *cfg.flags]
    return cmd, time_file, stats


def run_once(cfg: Config, opt: argparse.Namespace, config: str, ckpt: str, weights: str | None, batch: int,
             rep: int, order: int, dtype: str, scratch_root: str, logs: str) -> dict:
    """One fresh-process txt2img (or peer) run -> a CSV row."""
    import json
    scratch = tempfile.mkdtemp(dir=scratch_root)
    cmd, time_file, stats = run_commands(cfg, opt, config, ckpt, weights, batch, scratch, dtype)
    env = child_env(opt)
    if opt.fresh_inductor_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")
    log = os.path.join(logs, f"b{batch}-r{rep}-{cfg.key}.log")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # how busy the machine was: noise
    code, wall = run_child(cmd, log, opt, env)
    row = {"batch": batch, "repeat": rep, "order": order, "config": cfg.key, "label": cfg.label,
           "flags": " ".join(cfg.flags), "process_s": round(wall, 3), "images": opt.n_iter * batch,
           "loadavg_1min": load}
    if code != 0 or not os.path.isfile(time_file):
        row["status"] = f"failed (exit {code}): {tail(log)}"
        return row
    with open(time_file, encoding="utf-8") as f:
        seconds = float(f.read())
    with open(stats, encoding="utf-8") as f:
        st = json.load(f)
    row.update(status="ok", seconds=seconds, images_per_s=row["images"] / seconds,
               peak_mem_mb=round(st["peak_bytes"] / MB, 1), peak_kind=st["peak_kind"],
               **{k: st[k] for k in ("device", "device_name", "torch", "python")})
    return row


def unet_once(cfg: Config, opt: argparse.Namespace, config: str, ckpt: str, weights: str | None, batch: int,
              dtype: str, fit: str, scratch_root: str, logs: str) -> dict:
    """The UNet microbenchmark of one configuration in a fresh process -> a CSV row."""
    import json
    stats = os.path.join(tempfile.mkdtemp(dir=scratch_root), "unet.json")
    src = ["--peer", "--weights", weights] if cfg.peer else ["--config", config, "--ckpt", ckpt]
    cmd = [sys.executable, "-m", "ldm.benchmark.unet", *src, "--H", str(opt.H), "--W", str(opt.W),
           "--batch", str(2 * batch), "--iters", str(opt.unet_iters), "--stats", stats, "--dtype", dtype,
           "--fit", fit, "--fit_step", str(opt.fit_step), *(["--device", opt.device] if opt.device else []),
           *(["--budget_gb", str(opt.memory_budget_gb)] if opt.memory_budget_gb else []),
           *(["--profile", str(opt.unet_profile)] if opt.unet_profile else []), "--precision", "full", *cfg.flags]
    log = os.path.join(logs, f"unet-b{batch}-{cfg.key}.log")
    code, _ = run_child(cmd, log, opt)
    row = {"config": cfg.key, "label": cfg.label, "flags": " ".join(cfg.flags), "unet_batch": 2 * batch,
           "H": opt.H, "W": opt.W}
    if code != 0:
        return {**row, "status": f"failed (exit {code}): {tail(log)}"}
    with open(stats, encoding="utf-8") as f:
        st = json.load(f)
    row.update(status="ok", ms_mean=1000 * st["s_mean"], ms_median=1000 * st["s_median"], ms_min=1000 * st["s_min"],
               ms_max=1000 * st["s_max"], iters=st["iters"], first_call_s=st["first_call_s"],
               peak_mem_mb=st["peak_bytes"] / MB, loaded_mb=st["loaded_bytes"] / MB,
               activations_mb=(st["peak_bytes"] - st["before_bytes"]) / MB, first_peak_mb=st["first_peak_bytes"] / MB,
               est_activations_mb=st["est_activation_bytes"] / MB, est_mb=st["est_bytes"] / MB,
               peak_kind=st["peak_kind"], fit_res=st.get("fit_res"), fit_method=st.get("fit_method", ""),
               budget_gb=st["budget_bytes"] / 1024 ** 3 if "budget_bytes" in st else None, profile=st.get("profile"),
               **{k: st[k] for k in ("device", "device_name", "torch")})
    return row


def eager_counterpart(cfg: Config, configs: list[Config]) -> str | None:
    """The key of the uncompiled configuration ``cfg`` is compared with: D for E, P for PC, and in the ladder
    the last uncompiled step of the same side (S4 for S5..S7, H4 for H5..H7)."""
    if cfg.key in ("E", "PC"):
        return {"E": "D", "PC": "P"}[cfg.key]
    side = [c for c in configs if c.key[:1] == cfg.key[:1] and c.key[1:].isdigit()]
    if cfg not in side:
        return None
    before = [c.key for c in side[: side.index(cfg)] if "--compile" not in c.flags]
    return before[-1] if before else None


def compile_notes(rows: list[dict], configs: list[Config]) -> list[str]:
    """For each compiled configuration: what its untimed part (load + warm-up with compilation) costs per run,
    beside its eager counterpart, run by run (later runs can reuse inductor's on-disk caches)."""
    notes = []
    for cfg in configs:
        if "--compile" not in cfg.flags:
            continue
        eager = eager_counterpart(cfg, configs)
        for batch in sorted({r["batch"] for r in rows}):
            own = [r for r in rows if r["config"] == cfg.key and r["batch"] == batch and r["status"] == "ok"]
            base = [r for r in rows if r["config"] == eager and r["batch"] == batch and r["status"] == "ok"]
            if not own:
                continue
            untimed = [r["process_s"] - r["seconds"] for r in own]
            text = (f"{cfg.key} (batch {batch}): untimed part of each process (load, warm-up iteration with "
                    f"compilation) {', '.join(f'{u:.1f}' for u in untimed)} s run by run")
            if base:
                extra = sum(untimed) / len(untimed) - sum(r["process_s"] - r["seconds"] for r in base) / len(base)
                text += (f", {extra:.1f} s more than {eager}'s on average: the compile cost of a fresh process"
                         + (" (with the int8 quantization)" if "--int8" in cfg.flags else ""))
            notes.append(text + "; its timed part is " + ", ".join(f"{r['seconds']:.2f}" for r in own) + " s.")
    return notes


def peer_check(opt: argparse.Namespace, config: str, ckpt: str, weights: str, scratch_root: str) -> str:
    """Run the peer check in a fresh process; a one-line note with its errors."""
    import json
    out, log = os.path.join(scratch_root, "check.json"), os.path.join(scratch_root, "check.log")
    cmd = [sys.executable, "-m", "ldm.benchmark.peer", "check", "--config", config, "--ckpt", ckpt, "--weights",
           weights, "--steps", str(opt.check_steps), "--size", str(opt.check_size), "--json", out]
    code, _ = run_child(cmd, log, opt)
    if code != 0:
        return f"peer check failed (exit {code}): {tail(log)}"
    with open(out, encoding="utf-8") as f:
        err = json.load(f)
    print(f"peer check: {err}", file=sys.stderr)
    return (f"peer check (fp32 CPU, {opt.check_size}x{opt.check_size}, {opt.check_steps} PLMS steps, same x_T): "
            "max|ours - diffusers| / max|diffusers| = " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))


def cache_dir(opt: argparse.Namespace) -> str:
    """Where random checkpoints and diffusers exports are kept between invocations."""
    base = opt.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                         "ldm-fast", "benchmark")
    os.makedirs(base, exist_ok=True)
    return base


def resolve_config(ckpt: str, config: str | None) -> str:
    """``config``, or the repo yaml that fits the checkpoint's keys and shapes (the guess is printed on stderr)."""
    from ldm.weights.detect import config_for
    from ldm.weights.reading import CheckpointError
    if ckpt and not os.path.isfile(ckpt):
        raise SystemExit(f"error: checkpoint not found: {ckpt}")
    try:
        path, message = config_for(ckpt, config)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    except CheckpointError as e:
        raise SystemExit(f"error: {ckpt}: {e}") from None
    if message:
        print(message, file=sys.stderr)
    return path


def prepare_model(opt: argparse.Namespace) -> tuple[str, str, str]:
    """(config, ckpt, model name); a random checkpoint is made once and cached; a missing config is guessed."""
    if not opt.random:
        return resolve_config(opt.ckpt, opt.config), opt.ckpt, os.path.splitext(os.path.basename(opt.ckpt))[0]
    preset = PRESETS[opt.random]
    config = config_file(preset.native_yaml() or preset.yaml)  # the checkpoint is written in the native layout
    ckpt = os.path.join(cache_dir(opt), f"random-{opt.random}-seed0-native_mha.ckpt")
    if not os.path.isfile(ckpt):
        print(f"making a random {opt.random} checkpoint: {ckpt}", file=sys.stderr)
        cmd = [sys.executable, "-m", "ldm.apps.random_checkpoint", ckpt, "--config", config, "--layout", "native_mha",
               "--quiet"]
        subprocess.run(cmd, check=True, env=child_env(opt))
    return config, ckpt, f"random-{opt.random}"

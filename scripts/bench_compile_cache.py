"""Cold vs warm torch.compile of the UNet: what inductor's on-disk caches save on a second process start.

    python scripts/bench_compile_cache.py --config configs/tiny/v2-tiny.yaml
    python scripts/bench_compile_cache.py --config configs/stable-diffusion/v2-inference.yaml --latent 32 --batch 2

Each run is a fresh process that builds the UNet (random weights), compiles it with
``ldm.speed.runtime.compile_module`` (what ``compile_unet`` installs) and times the first call, which is
where compilation happens. The first run gets an empty cache directory (``TORCHINDUCTOR_CACHE_DIR``
and ``TRITON_CACHE_DIR``, set for the child processes only); the next ``--warm`` runs reuse it.
CPU seconds (this process and its waited-for children, e.g. the C++ compiler) are reported next to
wall seconds because they depend less on other load. Each child also reports inductor's FX-graph and
AOTAutograd cache hit/miss/bypass counters and, after the compiled calls, one eager call for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny", "v2-tiny.yaml")


def child(opt: argparse.Namespace) -> dict:
    """Build, compile and call the UNet once in this process; return the timings and cache counters."""
    import torch
    from torch._dynamo.utils import counters
    from ldm.model.config import DTYPES
    from ldm.model.presets import load_config
    from ldm.model.unet import UNetModel
    from ldm.speed import runtime

    device = runtime.pick_device(opt.device)
    dtype = DTYPES[opt.dtype]
    cfg = load_config(opt.config).unet
    torch.manual_seed(0)
    unet = UNetModel(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(opt.batch, cfg.in_channels, opt.latent, opt.latent, generator=g).to(device, dtype)
    t = torch.linspace(10, 990, opt.batch).long().to(device)
    c = torch.randn(opt.batch, 77, cfg.context_dim, generator=g).to(device, dtype)

    def timed(fn) -> float:
        runtime.synchronize(device)
        t0 = time.perf_counter()
        fn()
        runtime.synchronize(device)
        return time.perf_counter() - t0

    cpu_time = lambda: sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                           for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    with torch.no_grad():
        t0, cpu0 = time.perf_counter(), cpu_time()
        compiled = runtime.compile_module(unet, opt.mode, device)
        compiled(x, t, c)
        runtime.synchronize(device)
        first, first_cpu = time.perf_counter() - t0, cpu_time() - cpu0
        second = timed(lambda: compiled(x, t, c))
        eager = timed(lambda: unet(x, t, c))
    cache = {f"{group}.{k}": v for group in ("inductor", "aot_autograd") for k, v in sorted(counters[group].items())
             if "cache" in k}
    return {"first_call_s": first, "first_call_cpu_s": first_cpu, "second_call_s": second, "eager_call_s": eager,
            "counters": cache}


def run_child(opt: argparse.Namespace, cache_dir: str) -> dict:
    """One fresh process with the cache directory set for it only."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"))
    args = [sys.executable, os.path.abspath(__file__), "--child", "--config", opt.config, "--mode", opt.mode,
            "--device", opt.device or "", "--dtype", opt.dtype, "--batch", str(opt.batch), "--latent", str(opt.latent)]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"child process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, ROOT)  # this checkout's ldm
    from ldm.model.config import DTYPES
    from ldm.speed.runtime import COMPILE_MODES
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=TINY, help="yaml whose unet_config is built (random weights)")
    p.add_argument("--mode", default="default", choices=list(COMPILE_MODES))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=8, help="latent height = width (image size / 8)")
    p.add_argument("--warm", type=int, default=1, help="warm-cache runs after the cold one")
    p.add_argument("--keep_cache", default=None, help="use (and keep) this cache directory instead of a temp one")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opt = p.parse_args(argv)
    if not os.path.isfile(opt.config):
        p.error(f"config not found: {opt.config}")
    if opt.warm < 1:
        p.error("--warm must be at least 1")
    if opt.child:
        opt.device = opt.device or None
        print(json.dumps(child(opt)))
        return

    if opt.keep_cache:
        if os.path.exists(opt.keep_cache) and os.listdir(opt.keep_cache):
            p.error(f"--keep_cache {opt.keep_cache} is not empty; the cold run needs an empty cache")
        cache_dir = opt.keep_cache
        os.makedirs(cache_dir, exist_ok=True)
    else:
        cache_dir = tempfile.mkdtemp(prefix="ldm-inductor-cache-")
    try:
        runs = [("cold", run_child(opt, cache_dir))]
        runs += [(f"warm{i + 1}" if opt.warm > 1 else "warm", run_child(opt, cache_dir)) for i in range(opt.warm)]
    finally:
        if not opt.keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"config={os.path.relpath(opt.config, ROOT)} mode={opt.mode} device={opt.device or 'auto'} "
          f"dtype={opt.dtype} batch={opt.batch} latent={opt.latent}x{opt.latent}")
    print("| run | compile + first call s | (CPU s) | second call s | eager call s | cache counters |")
    print("|---|---|---|---|---|---|")
    for name, r in runs:
        hits = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in r["counters"].items()) or "-"
        print(f"| {name} | {r['first_call_s']:.2f} | {r['first_call_cpu_s']:.1f} | {r['second_call_s']:.3f} "
              f"| {r['eager_call_s']:.3f} | {hits} |")
    for key, unit in (("first_call_s", "s"), ("first_call_cpu_s", "CPU s")):
        cold, warm = runs[0][1][key], min(r[key] for _, r in runs[1:])
        print(f"cold {cold:.2f} {unit}, warm {warm:.2f} {unit}, cold/warm {cold / warm:.2f}x")


if __name__ == "__main__":
    main()

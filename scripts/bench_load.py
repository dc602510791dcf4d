"""Time and peak RSS of loading a checkpoint into a ready model: the fast path vs the plain one.

    python scripts/bench_load.py --ckpt /tmp/sd2.ckpt --ckpt /tmp/sd2.safetensors [--config ...]

Each measurement runs in a fresh process. "fast" is ``ldm.weights.loading.load_model`` (meta-device build,
mmap'd weights_only read, strict load with assign=True); "plain" is what the original txt2img does
(build with random init, torch.load, load_state_dict). "ready" adds one small forward pass of the
text encoder, UNet and VAE decoder, which touches every weight (mmap'd pages are read lazily).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD2 = os.path.join(ROOT, "configs", "stable-diffusion", "v2-inference.yaml")


def child(mode: str, config: str, ckpt: str) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    if mode == "fast":
        from ldm.weights.loading import load_model
        model, _ = load_model(config, ckpt)
    else:
        from omegaconf import OmegaConf
        from ldm.util import instantiate_from_config
        model = instantiate_from_config(OmegaConf.load(config).model)
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(sd.get("state_dict", sd), strict=False)
        model.eval()
    loaded = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    c = model.get_learned_conditioning(["a photo"])
    model.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([1]), c)
    model.decode_first_stage(torch.zeros(1, 4, 8, 8))
    ready = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": mode, "ckpt": os.path.basename(ckpt), "load_s": round(loaded, 2), "ready_s": round(ready, 2),
            "peak_rss_gb_loaded": round(rss_loaded, 2), "peak_rss_gb_ready": round(rss, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", action="append", required=True)
    p.add_argument("--config", default=SD2)
    p.add_argument("--modes", default="fast,plain")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opt = p.parse_args()
    if opt.child:
        print(json.dumps(child(opt.child[0], opt.config, opt.child[1])))
        return
    print("| checkpoint | path | load s | ready s | peak RSS GB (loaded) | peak RSS GB (ready) |")
    print("|---|---|---|---|---|---|")
    for ckpt in opt.ckpt:
        for mode in opt.modes.split(","):
            if mode == "plain" and ckpt.endswith(".safetensors"):
                continue  # the original path reads pickles only
            out = subprocess.run([sys.executable, __file__, "--config", opt.config, "--ckpt", ckpt,
                                  "--child", mode, ckpt], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r['ckpt']} | {mode} | {r['load_s']} | {r['ready_s']} | {r['peak_rss_gb_loaded']} "
                  f"| {r['peak_rss_gb_ready']} |", flush=True)


if __name__ == "__main__":
    main()

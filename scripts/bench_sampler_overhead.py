"""Sampler overhead per step: everything but the UNet, measured with a trivial denoiser (apply_model = 0.1 * x).

Times ``Sampler(model).sample(...)`` with classifier-free guidance for DDIM, PLMS and DPM-Solver++ next to an
"original-style" DDIM loop written for this measurement: per step it builds timestep tensors with torch.full,
indexes device alpha tables with ``[index]`` and makes a tensor per coefficient, as the original ldm code does
(on a GPU each of those indexings is a host sync). Reports the best of --repeats runs, in microseconds per step.

    python scripts/bench_sampler_overhead.py --steps 50 --sizes 8 64 --repeats 7
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.model.schedule import make_betas, schedule_buffers


class TrivialModel:
    """LatentDiffusion's sampler-facing surface with a free UNet: apply_model returns 0.1 * x."""

    parameterization = "eps"
    num_timesteps = 1000

    def __init__(self, device: torch.device):
        betas = make_betas("linear", 1000, 0.00085, 0.012)
        self.cfg = SimpleNamespace(betas=lambda: betas)
        self.device = device
        for name, value in schedule_buffers(betas).items():
            setattr(self, name, value.to(device))

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x * 0.1


def original_style_ddim(model: TrivialModel, S: int, x: torch.Tensor, c: torch.Tensor, uc: torch.Tensor,
                        scale: float, eta: float = 0.0) -> torch.Tensor:
    """DDIM in the original's per-step style (device tables indexed per step, tensors made per step)."""
    device, b = x.device, x.shape[0]
    steps = np.asarray(list(range(0, 1000, 1000 // S))) + 1
    alphas = model.alphas_cumprod[torch.from_numpy(steps).to(device)]
    alphas_prev = torch.cat([model.alphas_cumprod[:1], alphas[:-1]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    sqrt_one_minus = torch.sqrt(1.0 - alphas)
    for i, step in enumerate(np.flip(steps)):
        index = S - i - 1
        ts = torch.full((b,), int(step), device=device, dtype=torch.long)
        out_u, out_c = model.apply_model(torch.cat([x] * 2), torch.cat([ts] * 2), torch.cat([uc, c])).chunk(2)
        e_t = out_u + scale * (out_c - out_u)
        a_t = torch.full((b, 1, 1, 1), alphas[index], device=device)
        a_prev = torch.full((b, 1, 1, 1), alphas_prev[index], device=device)
        sigma_t = torch.full((b, 1, 1, 1), sigmas[index], device=device)
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), sqrt_one_minus[index], device=device)
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * torch.randn(x.shape, device=device)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
    return x


def best_us_per_step(fn, steps: int, repeats: int, device: torch.device) -> float:
    """Best wall time of fn() over repeats (after one warm-up), in microseconds per sampler step."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:]) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 64], help="latent height = width")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = TrivialModel(device)
    print(f"device={device} threads={torch.get_num_threads()} steps={args.steps} batch={args.batch} "
          f"CFG on (2B UNet batch); best of {args.repeats}; microseconds per step")
    columns = ["trivial UNet", "orig DDIM", "DDIM", "DDIM eta=1", "PLMS", "DPM++2M"]
    print(f"{'latent':>10} " + " ".join(f"{k:>{max(len(k), 8)}}" for k in columns))
    for size in args.sizes:
        g = torch.Generator(device=device).manual_seed(0)
        x_T = torch.randn(args.batch, 4, size, size, generator=g, device=device)
        c = torch.randn(args.batch, 77, 1024, generator=g, device=device)
        uc = torch.zeros_like(c)
        x2 = torch.cat([x_T, x_T])

        def ours(cls, eta=0.0):
            return lambda: cls(model).sample(S=args.steps, batch_size=args.batch, shape=[4, size, size],
                                             conditioning=c, unconditional_conditioning=uc, eta=eta,
                                             unconditional_guidance_scale=7.5, x_T=x_T, verbose=False, generator=g)

        row = {
            "trivial UNet": best_us_per_step(lambda: [model.apply_model(x2, None, None) for _ in range(args.steps)],
                                             args.steps, args.repeats, device),
            "orig DDIM": best_us_per_step(lambda: original_style_ddim(model, args.steps, x_T, c, uc, 7.5),
                                          args.steps, args.repeats, device),
            "DDIM": best_us_per_step(ours(DDIMSampler), args.steps, args.repeats, device),
            "DDIM eta=1": best_us_per_step(ours(DDIMSampler, 1.0), args.steps, args.repeats, device),
            "PLMS": best_us_per_step(ours(PLMSSampler), args.steps, args.repeats, device),
            "DPM++2M": best_us_per_step(ours(DPMSolverSampler), args.steps, args.repeats, device),
        }
        print(f"{f'{size}x{size}':>10} " + " ".join(f"{v:{max(len(k), 8)}.1f}" for k, v in row.items()))


if __name__ == "__main__":
    main()

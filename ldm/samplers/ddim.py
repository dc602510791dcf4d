"""DDIM sampling as a pure function over an eps denoiser."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.timesteps import DDIMSchedule, time_tensors


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, sched: DDIMSchedule, generator: torch.Generator | None = None,
                callback: StepCallback | None = None, progress: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2020, eq. 12) from x at sched.timesteps[0]; deterministic unless the schedule has eta > 0.

    generator=None draws the eta noise from the global RNG, as the original did.
    """
    ts = time_tensors(sched.timesteps, x.device)
    for i in tqdm(range(len(ts)), desc="DDIM", disable=not progress):
        eps = denoise(x, ts[i], sched.alpha[i], sched.sigma[i])
        x0 = (x - sched.sigma[i] * eps) / sched.alpha[i]
        x_prev = sched.alpha_prev[i] * x0 + sched.dir_coef[i] * eps
        if sched.noise_std[i] > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_prev = x_prev + sched.noise_std[i] * noise
        x = x_prev
        if callback is not None:
            callback(i, x, x0)
    return x

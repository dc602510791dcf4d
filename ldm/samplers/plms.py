"""PLMS sampling as a pure function over an eps denoiser."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.timesteps import DDIMSchedule, time_tensors


@torch.no_grad()
def sample_plms(denoise: Denoiser, x: torch.Tensor, sched: DDIMSchedule, callback: StepCallback | None = None,
                progress: bool = True) -> torch.Tensor:
    """PLMS (Liu et al. 2022): a pseudo improved-Euler first step, then pseudo Adams-Bashforth of order 2, 3, 4.

    The first step calls the denoiser twice (S + 1 calls in all), as the original does.
    """
    if any(s > 0 for s in sched.noise_std):
        raise ValueError("PLMS is deterministic: build its schedule with eta = 0")
    ts = time_tensors(sched.timesteps, x.device)
    n = len(ts)

    def ddim_step(x: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = (x - sched.sigma[i] * eps) / sched.alpha[i]
        return sched.alpha_prev[i] * x0 + sched.dir_coef[i] * eps, x0

    old_eps: list[torch.Tensor] = []
    for i in tqdm(range(n), desc="PLMS", disable=not progress):
        eps = denoise(x, ts[i], sched.alpha[i], sched.sigma[i])
        if not old_eps:
            j = min(i + 1, n - 1)  # the original re-uses the last timestep when S = 1
            x_next, _ = ddim_step(x, eps, i)
            eps_prime = (eps + denoise(x_next, ts[j], sched.alpha[j], sched.sigma[j])) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        old_eps = (old_eps + [eps])[-3:]
        x, x0 = ddim_step(x, eps_prime, i)
        if callback is not None:
            callback(i, x, x0)
    return x

"""DPM-Solver++(2M) as a pure function over an eps denoiser."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.timesteps import DPMSchedule, time_tensors


def dpmpp_2m_coefficients(sched: DPMSchedule, lower_order_final: bool = True) -> list[tuple[float, float, float]]:
    """Per step k -> k+1: (c_x, c_0, c_1) with x_{k+1} = c_x * x_k + c_0 * x0_k + c_1 * x0_{k-1}.

    Data-prediction multistep update (Lu et al. 2022, DPM-Solver++ Alg. 2, "dpm_solver" variant): the first step
    is first order (no history yet); with lower_order_final the last one is too when S < 15, as in the original.
    """
    alpha, sigma, lam = sched.alpha, sched.sigma, sched.lam
    n = len(lam) - 1
    coefs = []
    for k in range(n):
        h = lam[k + 1] - lam[k]
        c_x = sigma[k + 1] / sigma[k]
        b = -alpha[k + 1] * math.expm1(-h)  # the first-order (DDIM) weight of x0_k
        if k == 0 or (lower_order_final and n < 15 and k == n - 1):
            coefs.append((c_x, b, 0.0))
        else:
            r = (lam[k] - lam[k - 1]) / h
            # x0_k + D1 / 2 with D1 = (x0_k - x0_{k-1}) / r
            coefs.append((c_x, b * (1 + 0.5 / r), -b * 0.5 / r))
    return coefs


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sched: DPMSchedule, lower_order_final: bool = True,
                    callback: StepCallback | None = None, progress: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) from x at sched.model_time[0] to model_time[-1]; S denoiser calls."""
    coefs = dpmpp_2m_coefficients(sched, lower_order_final)
    ts = time_tensors(sched.model_time[:-1], x.device)  # the final time is never evaluated
    x0_prev = x
    for k in tqdm(range(len(coefs)), desc="DPM-Solver++", disable=not progress):
        alpha, sigma = sched.alpha[k], sched.sigma[k]
        x0 = (x - sigma * denoise(x, ts[k], alpha, sigma)) / alpha
        c_x, c_0, c_1 = coefs[k]
        x = c_x * x + c_0 * x0
        if c_1 != 0.0:  # a second-order step (a Python float, decided on the CPU)
            x = x + c_1 * x0_prev
        x0_prev = x0
        if callback is not None:
            callback(k, x, x0)
    return x

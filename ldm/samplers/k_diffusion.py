"""Euler, Euler ancestral and DPM++ 2M over discrete sigmas (``ldm.samplers.sigmas``), as pure functions over
the eps denoiser ``denoise(x, t, alpha, sigma)`` every sampler here uses (``ldm.samplers.guidance``).

They step the VE latent x = x0 + sigma * eps, as k-diffusion and sgm do; x comes in and goes out VP-scaled
(x * alpha: unit noise at the top level, as ``stochastic_encode`` noises), so they take the same start latents
as DDIM and hand back the clean latent when the last sigma is 0. The UNet sees x * alpha (sgm's c_in) and the
timestep of each sigma. All coefficients are CPU Python floats; the noise comes from ``generator``.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.sigmas import SigmaSchedule
from ldm.samplers.timesteps import time_tensors


def _eps(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, sigma: float) -> torch.Tensor:
    """eps at the VE latent x of noise level sigma: the denoiser sees the VP latent x * alpha."""
    alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return denoise(x * alpha, t, alpha, sigma * alpha)


@torch.no_grad()
def sample_euler(denoise: Denoiser, x: torch.Tensor, sched: SigmaSchedule, callback: StepCallback | None = None,
                 progress: bool = True) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = eps (Karras et al. 2022, Alg. 1 without churn;
    sgm's ``EulerEDMSampler``, SDXL's default); S denoiser calls."""
    sigmas, ts = sched.sigmas, time_tensors(sched.timesteps, x.device)
    x = x * math.sqrt(1.0 + sigmas[0] ** 2)  # VP -> VE (sgm's prepare_sampling_loop)
    for i in tqdm(range(len(ts)), desc="Euler", disable=not progress):
        eps = _eps(denoise, x, ts[i], sigmas[i])
        x0 = x - sigmas[i] * eps
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
        if callback is not None:
            callback(i, x, x0)
    return x / math.sqrt(1.0 + sigmas[-1] ** 2)


@torch.no_grad()
def sample_euler_ancestral(denoise: Denoiser, x: torch.Tensor, sched: SigmaSchedule, eta: float = 1.0,
                           generator: torch.Generator | None = None, callback: StepCallback | None = None,
                           progress: bool = True) -> torch.Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, sgm's ``EulerAncestralSampler``): an Euler step
    down to sigma_down, then fresh noise of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2."""
    sigmas, ts = sched.sigmas, time_tensors(sched.timesteps, x.device)
    x = x * math.sqrt(1.0 + sigmas[0] ** 2)
    for i in tqdm(range(len(ts)), desc="Euler a", disable=not progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        down = math.sqrt(s_next ** 2 - up ** 2)
        eps = _eps(denoise, x, ts[i], s)
        x0 = x - s * eps
        x = x + (down - s) * eps
        if up > 0:  # a Python float: decided on the CPU
            x = x + up * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(i, x, x0)
    return x / math.sqrt(1.0 + sigmas[-1] ** 2)


def dpmpp_2m_sigma_coefficients(sigmas: tuple[float, ...]) -> list[tuple[float, float, float]]:
    """Per step i: (c_x, c_0, c_1) with x_{i+1} = c_x x_i + c_0 x0_i + c_1 x0_{i-1} (VE), lambda = -log sigma.

    First order on the first step and where sigma_next = 0 (sgm's ``DPMPP2MSampler``; diffusers' with
    final_sigmas_type="zero"), else the midpoint second-order correction with r = h_last / h.
    """
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    coefs = []
    for i in range(len(sigmas) - 1):
        h = lam[i + 1] - lam[i]
        c_x = sigmas[i + 1] / sigmas[i]
        b = -math.expm1(-h)  # the weight of x0 (1 when sigma_next = 0)
        if i == 0 or sigmas[i + 1] == 0:
            coefs.append((c_x, b, 0.0))
        else:
            r = (lam[i] - lam[i - 1]) / h
            coefs.append((c_x, b * (1 + 0.5 / r), -b * 0.5 / r))
    return coefs


@torch.no_grad()
def sample_dpmpp_2m_sigmas(denoise: Denoiser, x: torch.Tensor, sched: SigmaSchedule,
                           callback: StepCallback | None = None, progress: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) over discrete sigmas, as k-diffusion's ``sample_dpmpp_2m``; S calls."""
    sigmas, ts = sched.sigmas, time_tensors(sched.timesteps, x.device)
    coefs = dpmpp_2m_sigma_coefficients(sigmas)
    x = x * math.sqrt(1.0 + sigmas[0] ** 2)
    x0_prev = x
    for i in tqdm(range(len(ts)), desc="DPM++ 2M", disable=not progress):
        x0 = x - sigmas[i] * _eps(denoise, x, ts[i], sigmas[i])
        c_x, c_0, c_1 = coefs[i]
        x = c_x * x + c_0 * x0
        if c_1 != 0.0:
            x = x + c_1 * x0_prev
        x0_prev = x0
        if callback is not None:
            callback(i, x, x0)
    return x / math.sqrt(1.0 + sigmas[-1] ** 2)


__all__ = ["sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m_sigmas", "dpmpp_2m_sigma_coefficients"]

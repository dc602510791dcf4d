"""The DDPM noise schedule, as float64 CPU tables and as the original model's 12 buffers."""

from __future__ import annotations

import math

import torch

BUFFER_NAMES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")


def make_betas(schedule: str = "linear", n: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
               cosine_s: float = 8e-3) -> torch.Tensor:
    """beta_t in float64 on the CPU, for the original's "linear" (sqrt-linear squared) and "cosine" schedules."""
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2
    if schedule == "cosine":
        t = torch.arange(n + 1, dtype=torch.float64) / n + cosine_s
        alpha_bar = torch.cos(t / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64) ** 0.5
    raise ValueError(f"unknown beta_schedule {schedule!r}")


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 12 float32 buffers the original LatentDiffusion registers (v_posterior = 0)."""
    alphas = 1.0 - betas
    alpha_bar = torch.cumprod(alphas, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=betas.dtype), alpha_bar[:-1]])
    post_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    table = {
        "betas": betas,
        "alphas_cumprod": alpha_bar,
        "alphas_cumprod_prev": alpha_bar_prev,
        "sqrt_alphas_cumprod": alpha_bar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alpha_bar).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alpha_bar).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alpha_bar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alpha_bar - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
        "posterior_mean_coef2": (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
    }
    return {k: v.to(torch.float32) for k, v in table.items()}

"""Sampler schedules as CPU tables of Python floats: DDIM/PLMS timesteps and DPM-Solver time-uniform steps.

Notation (VP diffusion): x_t = alpha * x0 + sigma * eps with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch


def alpha_bar_from_betas(betas: torch.Tensor) -> list[float]:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), computed in float64 on the CPU."""
    return torch.cumprod(1.0 - betas.detach().to("cpu", torch.float64), 0).tolist()


def ddim_timesteps(num_steps: int, num_train: int = 1000, discretize: str = "uniform") -> list[int]:
    """Descending DDIM/PLMS timesteps: the original's spacing and +1 offset, always exactly ``num_steps`` of them.

    "uniform": t_i = i * (T // S) + 1 for i < S. Where S divides T this is the original ``make_ddim_timesteps``
    list. Otherwise the original kept every multiple of T // S below T, i.e. more steps than asked (S=7 gives 8)
    and, when T // S divides T - 1 (S=3, 9, 27, ...), a timestep T that indexes past the alpha_bar table; we keep
    its first S entries instead (diffusers' "leading" spacing with steps_offset=1), so t <= T - T // S + 1.
    S = T would need t = T, so 1 <= S < T. "quad" is the original's quadratic spacing, unchanged.
    """
    if not 1 <= num_steps < num_train:
        raise ValueError(f"num_steps={num_steps}: need 1 <= S < {num_train} (the +1 offset makes S = T reach t = T)")
    if discretize == "uniform":
        c = num_train // num_steps
        steps = [i * c + 1 for i in range(num_steps)]
    elif discretize == "quad":
        top = math.sqrt(num_train * 0.8)
        step = top / max(num_steps - 1, 1)
        # i * step as np.linspace computes it, with its exact endpoint
        steps = [int((top if 0 < i == num_steps - 1 else i * step) ** 2) + 1 for i in range(num_steps)]
    else:
        raise ValueError(f"unknown ddim_discretize {discretize!r} (uniform or quad)")
    return steps[::-1]


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step DDIM/PLMS coefficients (Song et al. 2020, eq. 12) in sampling order; all Python floats."""

    timesteps: tuple[int, ...]         # model timesteps, descending
    alpha_bar: tuple[float, ...]       # at each timestep
    alpha_bar_prev: tuple[float, ...]  # the level each step lands on: the next timestep's, alpha_bar[0] after the last
    noise_std: tuple[float, ...]       # DDIM's sigma_t(eta): std of the fresh noise added by each step
    alpha: tuple[float, ...]           # sqrt(alpha_bar)
    sigma: tuple[float, ...]           # sqrt(1 - alpha_bar)
    alpha_prev: tuple[float, ...]      # sqrt(alpha_bar_prev)
    dir_coef: tuple[float, ...]        # sqrt(1 - alpha_bar_prev - noise_std^2): weight of eps in x_prev


def ddim_schedule(alpha_bar: Sequence[float], num_steps: int, eta: float = 0.0,
                  discretize: str = "uniform") -> DDIMSchedule:
    """The DDIM schedule for ``num_steps`` steps over a training alpha_bar table (the original's conventions)."""
    ts = ddim_timesteps(num_steps, len(alpha_bar), discretize)
    # The original's alphas_prev: the previous (lower) timestep's alpha_bar, and alpha_bar[0] (not 1) at the end.
    return ddim_schedule_at(alpha_bar, ts, eta, final_alpha_bar=alpha_bar[0])


def ddim_schedule_at(alpha_bar: Sequence[float], timesteps: Sequence[int], eta: float,
                     final_alpha_bar: float) -> DDIMSchedule:
    """DDIM coefficients at given descending ``timesteps``; the last step lands on ``final_alpha_bar``."""
    ts = list(timesteps)
    ab = [alpha_bar[t] for t in ts]
    ab_prev = ab[1:] + [final_alpha_bar]
    noise = [eta * math.sqrt((1 - p) / (1 - a) * (1 - a / p)) for a, p in zip(ab, ab_prev)]
    return DDIMSchedule(
        timesteps=tuple(ts), alpha_bar=tuple(ab), alpha_bar_prev=tuple(ab_prev), noise_std=tuple(noise),
        alpha=tuple(math.sqrt(a) for a in ab), sigma=tuple(math.sqrt(1 - a) for a in ab),
        alpha_prev=tuple(math.sqrt(p) for p in ab_prev),
        dir_coef=tuple(math.sqrt(max(1 - p - s * s, 0.0)) for p, s in zip(ab_prev, noise)))


@dataclass(frozen=True)
class DPMSchedule:
    """DPM-Solver's S + 1 time points, from the noisiest to the cleanest; all Python floats."""

    model_time: tuple[float, ...]  # the (fractional) timestep label the UNet sees, T-1 down to 0
    alpha: tuple[float, ...]       # sqrt(alpha_bar), log-linearly interpolated between integer timesteps
    sigma: tuple[float, ...]       # sqrt(1 - alpha^2)
    lam: tuple[float, ...]         # half log-SNR lambda = log(alpha / sigma), increasing


def dpm_time_uniform_schedule(alpha_bar: Sequence[float], num_steps: int) -> DPMSchedule:
    """The original DPMSolverSampler's "time_uniform" steps (Lu et al. 2022) over a discrete alpha_bar table.

    The original maps timestep n to continuous time (n + 1) / T, spaces S + 1 times uniformly from 1 down to
    1 / T, interpolates log(alpha) linearly in between and feeds the UNet (t - 1/T) * 1000; in timestep units
    that is n_k = (T - 1) * (1 - k / S), fractional unless S divides T - 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one step")
    n_train = len(alpha_bar)
    log_alpha = [0.5 * math.log(a) for a in alpha_bar]
    model_time, alpha, sigma, lam = [], [], [], []
    for k in range(num_steps + 1):
        n = (n_train - 1) * (1 - k / num_steps)
        lo = min(int(n), n_train - 2)
        w = n - lo
        la = (1 - w) * log_alpha[lo] + w * log_alpha[lo + 1]
        s = math.sqrt(-math.expm1(2 * la))
        model_time.append(n * 1000 / n_train)
        alpha.append(math.exp(la))
        sigma.append(s)
        lam.append(la - math.log(s))
    return DPMSchedule(tuple(model_time), tuple(alpha), tuple(sigma), tuple(lam))


def original_steps_schedule(alpha_bar: Sequence[float], eta: float = 0.0) -> DDIMSchedule:
    """DDIM over every training timestep T-1 ... 0, landing on alpha_bar = 1 (the original's use_original_steps)."""
    return ddim_schedule_at(alpha_bar, range(len(alpha_bar) - 1, -1, -1), eta, final_alpha_bar=1.0)


def schedule_tail(sched: Any, steps: int) -> Any:
    """The last ``steps`` steps of a schedule (img2img: start partway down, at step index S - steps); a
    ``DDIMSchedule``, ``DPMSchedule`` or ``ldm.samplers.sigmas.SigmaSchedule`` (its S timesteps, S + 1 sigmas)."""
    total = len(sched.model_time) - 1 if isinstance(sched, DPMSchedule) else len(sched.timesteps)
    if not 0 <= steps <= total:
        raise ValueError(f"cannot run the last {steps} steps of a {total}-step schedule")
    start = total - steps  # an S + 1 point table keeps the start point and ``steps`` more
    return replace(sched, **{f.name: getattr(sched, f.name)[start:] for f in fields(sched)})


def time_tensors(times: Sequence[float], device: torch.device | str) -> list[torch.Tensor]:
    """One (1,) float32 timestep tensor per step, made on the device before the loop (no host copies in it).

    float32 even for integer timesteps: the UNet's embedding casts to float anyway, and one dtype for all
    samplers keeps a compiled UNet on one graph.
    """
    return [torch.full((1,), float(t), dtype=torch.float32, device=device) for t in times]

"""Discrete noise levels for the k-diffusion samplers (Euler, Euler ancestral, DPM++ 2M), as generative-models
(sgm) samples SDXL: ``LegacyDDPMDiscretization`` picks S of the model's training timesteps, each sampled at its
sigma, then a final 0; the UNet sees the timestep a sigma maps to (``DiscreteDenoiser``'s nearest-sigma index).

Notation (VE, Karras et al. 2022): x = x0 + sigma * eps with sigma = sqrt((1 - alpha_bar) / alpha_bar); the VP
latent the UNet sees is x * alpha, alpha = 1 / sqrt(1 + sigma^2) (sgm's ``EpsScaling`` c_in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SigmaSchedule:
    """S steps over S + 1 descending noise levels; all Python floats (ints for the timesteps)."""

    sigmas: tuple[float, ...]   # S + 1, descending; the last one is 0 for a full run
    timesteps: tuple[int, ...]  # S: the training timestep each of sigmas[:-1] is sampled at

    @property
    def alpha(self) -> tuple[float, ...]:
        """VP alpha = 1 / sqrt(1 + sigma^2) at each of the S + 1 levels."""
        return tuple(1.0 / math.sqrt(1.0 + s * s) for s in self.sigmas)

    @property
    def sigma_vp(self) -> tuple[float, ...]:
        """VP sigma = sigma * alpha at each of the S + 1 levels (what ``stochastic_encode`` noises to)."""
        return tuple(s * a for s, a in zip(self.sigmas, self.alpha))


def sgm_timesteps(num_steps: int, num_train: int = 1000) -> list[int]:
    """Descending timesteps of sgm's ``generate_roughly_equally_spaced_steps``: int(linspace(T-1, 0, S,
    endpoint=False)) (numpy's i * step + start in float64), e.g. S = 4 gives 999, 749, 499, 249."""
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps={num_steps}: need 1 <= S <= {num_train}")
    step = -(num_train - 1) / num_steps
    return [int(i * step + (num_train - 1)) for i in range(num_steps)]


def discrete_sigma_schedule(alpha_bar: Sequence[float], num_steps: int) -> SigmaSchedule:
    """sgm's ``LegacyDDPMDiscretization`` over the model's training alpha_bar table: S sigmas and a final 0."""
    ts = sgm_timesteps(num_steps, len(alpha_bar))
    sigmas = [math.sqrt((1.0 - alpha_bar[t]) / alpha_bar[t]) for t in ts]
    return SigmaSchedule(sigmas=tuple(sigmas) + (0.0,), timesteps=tuple(ts))


def schedule_head(sched: SigmaSchedule, steps: int) -> SigmaSchedule:
    """The first ``steps`` steps: the run stops at sigmas[steps] (the base's part of an ensemble of experts)."""
    if not 0 <= steps <= len(sched.timesteps):
        raise ValueError(f"cannot run the first {steps} steps of a {len(sched.timesteps)}-step schedule")
    return SigmaSchedule(sched.sigmas[:steps + 1], sched.timesteps[:steps])


def expert_split(sched: SigmaSchedule, denoising_end: float, num_train: int = 1000) -> int:
    """How many steps the first expert runs for diffusers' ``denoising_end`` (the fraction of the noise removed):
    the steps whose timestep is >= round(T - denoising_end * T), as ``StableDiffusionXLPipeline`` counts them."""
    if not 0.0 < denoising_end < 1.0:
        raise ValueError(f"denoising_end {denoising_end} must be between 0 and 1 (exclusive)")
    cutoff = int(round(num_train - denoising_end * num_train))
    return sum(1 for t in sched.timesteps if t >= cutoff)


__all__ = ["SigmaSchedule", "sgm_timesteps", "discrete_sigma_schedule", "schedule_head", "expert_split"]

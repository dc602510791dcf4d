"""Euler, Euler ancestral and DPM++ 2M with the original sampler interface (``Sampler(model).sample(S=...)``,
``stochastic_encode`` / ``decode`` for img2img), over sgm's discrete sigmas: SDXL's samplers, and they run on
SD 1/2 models too (any model with the 1,000-step alpha_bar table)."""

from __future__ import annotations

from typing import Any

import torch

from ldm.samplers.api import LDMSampler
from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.k_diffusion import sample_dpmpp_2m_sigmas, sample_euler, sample_euler_ancestral
from ldm.samplers.sigmas import SigmaSchedule, discrete_sigma_schedule, schedule_head
from ldm.samplers.timesteps import schedule_tail


class SigmaSampler(LDMSampler):
    """The shared part: the schedule of ``make_schedule``, its last ``steps`` (img2img) and its first
    ``stop_after`` steps (the first expert of an ensemble, which hands on a still-noisy latent)."""

    def __init__(self, model: Any, device: torch.device | str | None = None, caching: Any = None,
                 stop_after: int | None = None, **kwargs: Any):
        super().__init__(model, device=device, caching=caching, **kwargs)
        self.stop_after = stop_after  # a whole run (not img2img's decode) stops after this many steps

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """S of sgm's roughly equally spaced timesteps and a final sigma of 0; eta is DDIM's and must be 0."""
        if ddim_eta != 0:
            raise ValueError(f"eta is a DDIM option; {type(self).__name__} takes ddim_eta = 0")
        self.sigma_schedule = discrete_sigma_schedule(self.alpha_bar, ddim_num_steps)

    @property
    def num_steps(self) -> int:
        return len(self.sigma_schedule.timesteps)

    def schedule_for(self, steps: int | None = None) -> SigmaSchedule:
        """The steps a run follows: the last ``steps`` (decode), else the first ``stop_after`` (or all)."""
        if steps is not None:
            return schedule_tail(self.sigma_schedule, steps)
        return self.sigma_schedule if self.stop_after is None else schedule_head(self.sigma_schedule, self.stop_after)

    def steps_of_run(self, steps: int | None, use_original_steps: bool) -> int:
        return len(self.schedule_for(steps).timesteps)

    def encode_levels(self) -> list[tuple[float, float]]:
        """Index t is the level decode(t_start=t) starts from: point S - t of the S + 1 (0: sigma 0)."""
        sched = self.sigma_schedule
        return list(zip(sched.alpha[::-1], sched.sigma_vp[::-1]))

    def run(self, denoise: Denoiser, x: torch.Tensor, generator: torch.Generator | None,
            step_callback: StepCallback, progress: bool, steps: int | None = None,
            use_original_steps: bool = False) -> torch.Tensor:
        if use_original_steps:
            raise NotImplementedError(f"use_original_steps is a DDIM option; {type(self).__name__} has none")
        return self.solve(denoise, x, self.schedule_for(steps), generator, step_callback, progress)

    def solve(self, denoise: Denoiser, x: torch.Tensor, sched: SigmaSchedule, generator: torch.Generator | None,
              step_callback: StepCallback, progress: bool) -> torch.Tensor:
        raise NotImplementedError

    def intermediates(self, recorded: dict) -> Any:
        return None


class EulerSampler(SigmaSampler):
    """Euler (sgm's ``EulerEDMSampler`` without churn): SDXL's default sampler."""

    def solve(self, denoise, x, sched, generator, step_callback, progress):
        return sample_euler(denoise, x, sched, step_callback, progress)


class EulerAncestralSampler(SigmaSampler):
    """Euler ancestral, eta 1 (sgm's ``EulerAncestralSampler``); its noise comes from the run's generator."""

    def solve(self, denoise, x, sched, generator, step_callback, progress):
        return sample_euler_ancestral(denoise, x, sched, 1.0, generator, step_callback, progress)


class DPMPP2MSampler(SigmaSampler):
    """DPM++ 2M over the discrete sigmas (sgm's ``DPMPP2MSampler``)."""

    def solve(self, denoise, x, sched, generator, step_callback, progress):
        return sample_dpmpp_2m_sigmas(denoise, x, sched, step_callback, progress)


__all__ = ["SigmaSampler", "EulerSampler", "EulerAncestralSampler", "DPMPP2MSampler"]

"""Import path of the original ``DDIMSampler``: a thin adapter over ``ldm.samplers.sample_ddim``."""

from __future__ import annotations

import numpy as np
import torch

from ldm.samplers.adapter import LDMSampler
from ldm.samplers.ddim import sample_ddim
from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.timesteps import DDIMSchedule, ddim_schedule, original_steps_schedule, schedule_tail


class DDIMSampler(LDMSampler):
    """DDIM (eta >= 0) with the original interface; the device defaults to the model's."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """The step tables for S steps; see ``ldm.samplers.timesteps.ddim_timesteps`` for S not dividing T."""
        self.ddim_schedule = ddim_schedule(self.alpha_bar, ddim_num_steps, ddim_eta, ddim_discretize)
        self.ddim_eta = ddim_eta
        self.ddim_timesteps = np.asarray(self.ddim_schedule.timesteps[::-1])  # ascending, as the original's

    @property
    def num_steps(self) -> int:
        return len(self.ddim_schedule.timesteps)

    def schedule_for(self, steps: int | None = None, use_original_steps: bool = False) -> DDIMSchedule:
        """The schedule ``run`` follows: make_schedule's (or every training step), its last ``steps`` steps."""
        sched = original_steps_schedule(self.alpha_bar, self.ddim_eta) if use_original_steps else self.ddim_schedule
        return sched if steps is None else schedule_tail(sched, steps)

    def encode_levels(self) -> list[tuple[float, float]]:
        """The original's ascending DDIM tables: index t is ddim_timesteps[t]; decode(t_start) then begins one
        step lower, at index t_start - 1, as the original does. Index S (strength 1.0, past the original's table,
        where it failed) is the top level S - 1."""
        sched = self.ddim_schedule
        levels = list(zip(sched.alpha[::-1], sched.sigma[::-1]))
        return levels + levels[-1:]

    def run(self, denoise: Denoiser, x: torch.Tensor, generator: torch.Generator | None,
            step_callback: StepCallback, progress: bool, steps: int | None = None,
            use_original_steps: bool = False) -> torch.Tensor:
        sched = self.schedule_for(steps, use_original_steps)
        return sample_ddim(denoise, x, sched, generator, step_callback, progress)


__all__ = ["DDIMSampler"]

"""Import path of the original ``DDIMSampler``: a thin adapter over ``ldm.samplers.sample_ddim``."""

from __future__ import annotations

import numpy as np
import torch

from ldm.samplers.adapter import LDMSampler
from ldm.samplers.ddim import sample_ddim
from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.timesteps import ddim_schedule


class DDIMSampler(LDMSampler):
    """DDIM (eta >= 0) with the original interface; the device defaults to the model's."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """The step tables for S steps; see ``ldm.samplers.timesteps.ddim_timesteps`` for S not dividing T."""
        self.ddim_schedule = ddim_schedule(self.alpha_bar, ddim_num_steps, ddim_eta, ddim_discretize)
        self.ddim_timesteps = np.asarray(self.ddim_schedule.timesteps[::-1])  # ascending, as the original's

    @property
    def num_steps(self) -> int:
        return len(self.ddim_schedule.timesteps)

    def run(self, denoise: Denoiser, x: torch.Tensor, generator: torch.Generator | None,
            step_callback: StepCallback, progress: bool) -> torch.Tensor:
        return sample_ddim(denoise, x, self.ddim_schedule, generator, step_callback, progress)


__all__ = ["DDIMSampler"]

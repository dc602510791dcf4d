"""Import path of the original ``PLMSSampler``: a thin adapter over ``ldm.samplers.sample_plms``."""

from __future__ import annotations

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.plms import sample_plms


class PLMSSampler(DDIMSampler):
    """PLMS with the original interface (eta must be 0); eps and v models (the original ignored v here)."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """The DDIM step tables for S steps; PLMS has no eta."""
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, 0.0, verbose)

    def run(self, denoise: Denoiser, x: torch.Tensor, generator: torch.Generator | None,
            step_callback: StepCallback, progress: bool, steps: int | None = None,
            use_original_steps: bool = False) -> torch.Tensor:
        return sample_plms(denoise, x, self.schedule_for(steps, use_original_steps), step_callback, progress)


__all__ = ["PLMSSampler"]

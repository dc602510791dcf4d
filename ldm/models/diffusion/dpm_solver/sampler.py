"""The original ``DPMSolverSampler``: DPM-Solver++(2M), time-uniform steps, lower-order final step.

A thin adapter over ``ldm.samplers.sample_dpmpp_2m`` with the configuration the original hard-coded
(algorithm_type "dpmsolver++", method "multistep", order 2, skip_type "time_uniform", lower_order_final).
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.samplers.adapter import LDMSampler
from ldm.samplers.dpm_solver import sample_dpmpp_2m
from ldm.samplers.guidance import Denoiser, StepCallback
from ldm.samplers.timesteps import dpm_time_uniform_schedule, schedule_tail


class DPMSolverSampler(LDMSampler):
    """DPM-Solver++(2M) with the original interface; ``sample()`` returns (x, None) like the original."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """S + 1 time-uniform points (the original asserted S >= 2; S = 1 here is one first-order step)."""
        self.dpm_schedule = dpm_time_uniform_schedule(self.alpha_bar, ddim_num_steps)

    @property
    def num_steps(self) -> int:
        return len(self.dpm_schedule.model_time) - 1

    def encode_levels(self) -> list[tuple[float, float]]:
        """Index t is the point decode(t_start=t) starts from: point S - t of the S + 1 (0: timestep 0, S: T-1)."""
        sched = self.dpm_schedule
        return list(zip(sched.alpha[::-1], sched.sigma[::-1]))

    def run(self, denoise: Denoiser, x: torch.Tensor, generator: torch.Generator | None,
            step_callback: StepCallback, progress: bool, steps: int | None = None,
            use_original_steps: bool = False) -> torch.Tensor:
        if use_original_steps:
            raise NotImplementedError("use_original_steps is a DDIM option; DPMSolverSampler has no such schedule")
        sched = self.dpm_schedule if steps is None else schedule_tail(self.dpm_schedule, steps)
        return sample_dpmpp_2m(denoise, x, sched, lower_order_final=True, callback=step_callback, progress=progress)

    def intermediates(self, recorded: dict) -> Any:
        return None


__all__ = ["DPMSolverSampler"]

"""Samplers as pure functions over an eps denoiser ``denoise(x, t, alpha, sigma)``, with CPU-float schedules.

The original sampler classes are in ``ldm.samplers.api`` (re-exported at ``ldm.models.diffusion.*``).
"""

from ldm.samplers.ddim import sample_ddim
from ldm.samplers.dpm_solver import dpmpp_2m_coefficients, sample_dpmpp_2m
from ldm.samplers.guidance import CFGDenoiser, Denoiser, StepCallback
from ldm.samplers.plms import sample_plms
from ldm.samplers.timesteps import (DDIMSchedule, DPMSchedule, alpha_bar_from_betas, ddim_schedule, ddim_schedule_at,
                                    ddim_timesteps, dpm_time_uniform_schedule, original_steps_schedule, schedule_tail,
                                    time_tensors)

__all__ = ["sample_ddim", "sample_plms", "sample_dpmpp_2m", "dpmpp_2m_coefficients", "CFGDenoiser", "Denoiser", "StepCallback",
           "DDIMSchedule", "DPMSchedule", "alpha_bar_from_betas", "ddim_schedule", "ddim_timesteps",
           "dpm_time_uniform_schedule", "time_tensors", "ddim_schedule_at", "original_steps_schedule", "schedule_tail"]

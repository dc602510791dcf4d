"""Samplers as pure functions over an eps denoiser ``denoise(x, t, alpha, sigma)``, with CPU-float schedules: DDIM,
PLMS, DPM-Solver++ over alpha_bar tables; Euler, Euler ancestral, DPM++ 2M over discrete sigmas (SDXL's).

The original sampler classes are in ``ldm.samplers.api`` (re-exported at ``ldm.models.diffusion.*``).
"""

from ldm.samplers.ddim import sample_ddim
from ldm.samplers.dpm_solver import dpmpp_2m_coefficients, sample_dpmpp_2m
from ldm.samplers.guidance import CFGDenoiser, Denoiser, StepCallback
from ldm.samplers.k_diffusion import sample_dpmpp_2m_sigmas, sample_euler, sample_euler_ancestral
from ldm.samplers.plms import sample_plms
from ldm.samplers.sigmas import SigmaSchedule, discrete_sigma_schedule, expert_split, schedule_head, sgm_timesteps
from ldm.samplers.timesteps import (DDIMSchedule, DPMSchedule, alpha_bar_from_betas, ddim_schedule, ddim_schedule_at,
                                    ddim_timesteps, dpm_time_uniform_schedule, original_steps_schedule, schedule_tail,
                                    time_tensors)

__all__ = ["sample_ddim", "sample_plms", "sample_dpmpp_2m", "sample_euler", "sample_euler_ancestral",
           "sample_dpmpp_2m_sigmas", "SigmaSchedule", "discrete_sigma_schedule", "expert_split", "schedule_head",
           "sgm_timesteps", "dpmpp_2m_coefficients", "CFGDenoiser", "Denoiser", "StepCallback",
           "DDIMSchedule", "DPMSchedule", "alpha_bar_from_betas", "ddim_schedule", "ddim_timesteps",
           "dpm_time_uniform_schedule", "time_tensors", "ddim_schedule_at", "original_steps_schedule", "schedule_tail"]

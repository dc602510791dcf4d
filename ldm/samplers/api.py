"""The original sampler classes (``DDIMSampler``, ``PLMSSampler``, ``DPMSolverSampler``): ``Sampler(model).sample(
S=..., ...)`` with the original arguments, over the pure samplers. ``ldm.models.diffusion.*`` re-export them.

DPMSolverSampler is the configuration the original hard-coded: DPM-Solver++, multistep, order 2,
time-uniform steps, lower-order final step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ldm.samplers.caching import Caching, CachingCFGDenoiser
from ldm.samplers.ddim import sample_ddim
from ldm.samplers.dpm_solver import sample_dpmpp_2m
from ldm.samplers.guidance import CFGDenoiser, Denoiser, StepCallback
from ldm.samplers.plms import sample_plms
from ldm.samplers.timesteps import (DDIMSchedule, alpha_bar_from_betas, ddim_schedule, dpm_time_uniform_schedule,
                                    original_steps_schedule, schedule_tail)


def model_alpha_bar(model: Any) -> list[float]:
    """The model's training alpha_bar as float64 Python floats, from its config's betas when it has one."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "betas"):
        return alpha_bar_from_betas(cfg.betas())
    return model.alphas_cumprod.detach().to("cpu", torch.float64).tolist()  # once, at construction


def _check_unsupported(quantize_x0: bool, mask: Any, temperature: float, noise_dropout: float, score_corrector: Any,
                       dynamic_threshold: Any, ucg_schedule: Any) -> None:
    """The original's editing/correction options are accepted at their defaults only: never silently dropped."""
    used = {"quantize_x0": bool(quantize_x0), "mask": mask is not None, "temperature": temperature != 1.0,
            "noise_dropout": noise_dropout > 0, "score_corrector": score_corrector is not None,
            "dynamic_threshold": dynamic_threshold is not None, "ucg_schedule": ucg_schedule is not None}
    names = [k for k, v in used.items() if v]
    if names:
        raise NotImplementedError(f"sampler options not supported by this inference-only port: {names}")


def _batch_of(cond: Any) -> int | None:
    """The batch size of a conditioning: a tensor, or the original's list/dict of them (its first leaf)."""
    while isinstance(cond, (dict, list, tuple)) and cond:
        cond = next(iter(cond.values())) if isinstance(cond, dict) else cond[0]
    return cond.shape[0] if isinstance(cond, torch.Tensor) and cond.dim() > 0 else None


def _check_batch(what: str, cond: Any, batch_size: int) -> None:
    """The original warned "Got N conditionings but batch-size is M" and then failed deep inside attention."""
    n = _batch_of(cond)
    if n is not None and n != batch_size:
        raise ValueError(f"got {n} {what} row(s) but batch_size is {batch_size}: give one per sample")


class LDMSampler:
    """Holds the model and device; ``sample()`` takes the original keyword arguments and returns (x, intermediates).

    ``caching``: DeepCache / T-GATE / early guidance end (``ldm.samplers.caching``), not the original's;
    None: the plain ``CFGDenoiser``. The last run's denoiser is ``last_denoiser``.
    """

    def __init__(self, model: Any, schedule: str = "linear", device: torch.device | str | None = None,
                 caching: Caching | None = None, **kwargs: Any):
        self.model = model
        self.caching = caching
        self.last_denoiser: Any = None
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.device = torch.device(device) if device is not None else model.device
        self.alpha_bar = model_alpha_bar(model)

    def run(self, denoise: Denoiser, x: torch.Tensor, generator: torch.Generator | None,
            step_callback: StepCallback, progress: bool, steps: int | None = None,
            use_original_steps: bool = False) -> torch.Tensor:
        """Sample from x with the subclass's pure sampler over the schedule ``make_schedule`` built.

        ``steps``: run only its last ``steps`` steps (img2img's decode); ``use_original_steps``: every
        training timestep instead (DDIM only).
        """
        raise NotImplementedError

    def call_steps(self, steps: int | None = None, use_original_steps: bool = False) -> list[int]:
        """The step index of each denoiser call a ``run`` makes (one call per step here)."""
        return list(range(self.steps_of_run(steps, use_original_steps)))

    def steps_of_run(self, steps: int | None, use_original_steps: bool) -> int:
        """How many steps ``run(steps=..., use_original_steps=...)`` takes."""
        raise NotImplementedError

    def denoiser(self, cond: Any, uncond: Any, scale: float, steps: int | None = None,
                 use_original_steps: bool = False) -> Denoiser:
        """The denoiser of one run: ``CFGDenoiser``, or ``CachingCFGDenoiser`` when ``caching`` is given."""
        if self.caching is not None:
            denoise = CachingCFGDenoiser(self.model, cond, uncond, scale, self.caching,
                                         self.call_steps(steps, use_original_steps))
        else:
            denoise = CFGDenoiser(self.model, cond, uncond, scale)
        self.last_denoiser = denoise
        return denoise

    def encode_levels(self) -> list[tuple[float, float]]:
        """(alpha, sigma) that ``stochastic_encode(x0, t)`` noises to, for each step index t = 0 ... S.

        ``decode(z, cond, t_start)`` then runs the schedule's last t_start steps.
        """
        raise NotImplementedError

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Precompute the step tables on the CPU (Python floats)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int] | list[int], conditioning: Any = None,
               callback: Callable | None = None, normals_sequence: Any = None, img_callback: Callable | None = None,
               quantize_x0: bool = False, eta: float = 0.0, mask: Any = None, x0: Any = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Any = None, verbose: bool = True, x_T: torch.Tensor | None = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, dynamic_threshold: Any = None, ucg_schedule: Any = None,
               generator: torch.Generator | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Sample latents (batch_size, *shape) with the original's semantics; x_T from ``generator`` when not given.

        ``callback(i)`` and ``img_callback(pred_x0, i)`` are called after each step, as in the original; the
        intermediates dict records x and pred_x0 every ``log_every_t`` steps and after the first one.
        """
        _check_unsupported(quantize_x0, mask, temperature, noise_dropout, score_corrector, dynamic_threshold,
                           ucg_schedule)
        for what, cond in (("conditioning", conditioning), ("unconditional_conditioning", unconditional_conditioning)):
            _check_batch(what, cond, batch_size)
        if x_T is not None and x_T.shape[0] != batch_size:
            raise ValueError(f"x_T holds {x_T.shape[0]} samples but batch_size is {batch_size}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        # generator=None draws from the global RNG, like the original's torch.randn(shape, device=device)
        x = x_T if x_T is not None else torch.randn(size, generator=generator, device=self.device)
        denoise = self.denoiser(conditioning, unconditional_conditioning, unconditional_guidance_scale)
        intermediates = {"x_inter": [x], "pred_x0": [x]}

        def step_callback(i: int, x_i: torch.Tensor, x0_i: torch.Tensor) -> None:
            index = self.num_steps - i - 1
            if index % log_every_t == 0 or index == self.num_steps - 1:
                intermediates["x_inter"].append(x_i)
                intermediates["pred_x0"].append(x0_i)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(x0_i, i)

        x = self.run(denoise, x, generator, step_callback, verbose)
        return x, self.intermediates(intermediates)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: Any, use_original_steps: bool = False,
                          noise: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise (the forward process in closed form), at step index t per sample.

        ``t``: an int or (B,) indices into the schedule of the last ``make_schedule`` (see ``encode_levels``),
        or training timesteps with ``use_original_steps``. ``noise``: given, else drawn from ``generator``
        (None: the global RNG, as the original's randn_like).
        """
        if use_original_steps:
            levels = [(math.sqrt(a), math.sqrt(1.0 - a)) for a in self.alpha_bar]
        else:
            try:
                levels = self.encode_levels()
            except AttributeError as e:  # no schedule yet
                raise RuntimeError("call make_schedule(ddim_num_steps=...) before stochastic_encode") from e
        idx = torch.as_tensor(t).reshape(-1).tolist()  # once per image, before sampling: not a per-step sync
        if len(idx) not in (1, x0.shape[0]):
            raise ValueError(f"t has {len(idx)} entries for a batch of {x0.shape[0]}")
        if not all(0 <= i < len(levels) for i in idx):
            raise ValueError(f"stochastic_encode: t={idx} outside 0 ... {len(levels) - 1}")
        shape = (len(idx),) + (1,) * (x0.dim() - 1)
        alpha = torch.tensor([levels[i][0] for i in idx], dtype=torch.float64).view(shape)
        sigma = torch.tensor([levels[i][1] for i in idx], dtype=torch.float64).view(shape)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return alpha.to(x0.device, x0.dtype) * x0 + sigma.to(x0.device, x0.dtype) * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Callable | None = None, generator: torch.Generator | None = None,
               verbose: bool = True) -> torch.Tensor:
        """Denoise x_latent with the last ``t_start`` steps of the schedule (img2img after stochastic_encode).

        As the original DDIM ``decode``: step indices t_start - 1 ... 0, ``callback(i)`` after each; the eta noise
        (DDIM with eta > 0) comes from ``generator``.
        """
        denoise = self.denoiser(cond, unconditional_conditioning, unconditional_guidance_scale, int(t_start),
                                use_original_steps)

        def step_callback(i: int, x_i: torch.Tensor, x0_i: torch.Tensor) -> None:
            if callback is not None:
                callback(i)

        return self.run(denoise, x_latent, generator, step_callback, verbose, steps=int(t_start),
                        use_original_steps=use_original_steps)

    def intermediates(self, recorded: dict) -> Any:
        """What ``sample()`` returns beside the latents (the original DDIM/PLMS dict)."""
        return recorded

    @property
    def num_steps(self) -> int:
        """Steps of the current schedule."""
        raise NotImplementedError


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

    def steps_of_run(self, steps: int | None, use_original_steps: bool) -> int:
        return len(self.schedule_for(steps, use_original_steps).timesteps)

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


class PLMSSampler(DDIMSampler):
    """PLMS with the original interface (eta must be 0); eps and v models (the original ignored v here)."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """The DDIM step tables for S steps; PLMS has no eta."""
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, 0.0, verbose)

    def call_steps(self, steps: int | None = None, use_original_steps: bool = False) -> list[int]:
        """PLMS's first step calls the denoiser twice."""
        return [0] + super().call_steps(steps, use_original_steps)

    def run(self, denoise: Denoiser, x: torch.Tensor, generator: torch.Generator | None,
            step_callback: StepCallback, progress: bool, steps: int | None = None,
            use_original_steps: bool = False) -> torch.Tensor:
        return sample_plms(denoise, x, self.schedule_for(steps, use_original_steps), step_callback, progress)


class DPMSolverSampler(LDMSampler):
    """DPM-Solver++(2M) with the original interface; ``sample()`` returns (x, None) like the original."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """S + 1 time-uniform points (the original asserted S >= 2; S = 1 here is one first-order step)."""
        self.dpm_schedule = dpm_time_uniform_schedule(self.alpha_bar, ddim_num_steps)

    @property
    def num_steps(self) -> int:
        return len(self.dpm_schedule.model_time) - 1

    def steps_of_run(self, steps: int | None, use_original_steps: bool) -> int:
        return self.num_steps if steps is None else int(steps)

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


__all__ = ["LDMSampler", "DDIMSampler", "PLMSSampler", "DPMSolverSampler"]

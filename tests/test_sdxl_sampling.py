"""SDXL sampling: sgm's discrete sigmas, Euler / Euler ancestral / DPM++ 2M as pure functions (analytic denoisers),
and short runs against diffusers' StableDiffusionXLPipeline on the same re-randomised tiny weights (its schedulers
given our timesteps); DDIM, PLMS and DPM-Solver++ on the SDXL model."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import rel_err
from ldm.model.conditioner import conditioning_batch
from ldm.model.sdxl import LegacyDDPMDiscretization
from ldm.samplers import (CFGDenoiser, discrete_sigma_schedule, expert_split, sample_dpmpp_2m_sigmas, sample_euler,
                          sample_euler_ancestral, schedule_head, schedule_tail, sgm_timesteps)
from ldm.samplers.api import model_alpha_bar
from ldm.samplers.sigma_api import DPMPP2MSampler, EulerAncestralSampler, EulerSampler
from test_sdxl import PROMPTS, SIZES, diffusers_parts, tiny

SAMPLERS = {"euler": lambda d, x, s: sample_euler(d, x, s, progress=False),
            "euler_a": lambda d, x, s: sample_euler_ancestral(d, x, s, generator=torch.Generator().manual_seed(3),
                                                              progress=False),
            "dpmpp_2m": lambda d, x, s: sample_dpmpp_2m_sigmas(d, x, s, progress=False)}


@pytest.fixture(scope="module")
def base():
    return tiny("sdxl-tiny")


@pytest.fixture(scope="module")
def alpha_bar(base):
    return model_alpha_bar(base)


@pytest.mark.parametrize("n", [1, 4, 7, 30, 40, 999, 1000])
def test_sigmas_are_sgms_legacy_ddpm_discretization(alpha_bar, n):
    """sgm's spacing (int(linspace(999, 0, S, endpoint=False)), reversed) and its float32 sigma table, a final 0."""
    sched = discrete_sigma_schedule(alpha_bar, n)
    theirs = LegacyDDPMDiscretization()(n)  # descending, with the appended zero
    assert len(sched.sigmas) == n + 1 and len(sched.timesteps) == n and sched.sigmas[-1] == 0.0
    assert rel_err(torch.tensor(sched.sigmas), theirs.double()) <= 1e-6
    assert sgm_timesteps(4) == [999, 749, 499, 249]
    assert all(a > b for a, b in zip(sched.timesteps, sched.timesteps[1:]))


def delta_denoiser(mu: torch.Tensor, calls: list):
    """eps of data that is always mu: x_vp = alpha mu + sigma eps exactly, so every solver lands on mu."""
    def denoise(x, t, alpha, sigma):
        calls.append((t.item(), alpha, sigma, x))
        return (x - alpha * mu) / sigma
    return denoise


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_solvers_are_exact_for_a_point_mass_and_call_sgm_timesteps(alpha_bar, name):
    mu = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))  # unit noise: the VP start
    sched = discrete_sigma_schedule(alpha_bar, 6)
    calls = []
    out = SAMPLERS[name](delta_denoiser(mu, calls), x, sched)
    assert rel_err(out, mu) <= 1e-6
    assert [c[0] for c in calls] == list(sched.timesteps)  # one call per step, at the timestep of its sigma
    assert torch.allclose(calls[0][3], x, atol=1e-6)  # the denoiser sees the VP latent: the start noise itself
    for _, alpha, sigma, _ in calls:
        assert math.isclose(alpha * alpha + sigma * sigma, 1.0)


def gaussian_denoiser(c: float):
    """eps of N(0, c^2) data: E[x0 | x_vp] = x_vp alpha c^2 / (alpha^2 c^2 + sigma^2)."""
    def denoise(x, t, alpha, sigma):
        x0 = x * alpha * c * c / (alpha * alpha * c * c + sigma * sigma)
        return (x - alpha * x0) / sigma
    return denoise


def test_euler_and_dpmpp_2m_converge_to_the_ode_solution(alpha_bar):
    """For N(0, c^2) data the probability-flow ODE ends at x_T c / sqrt(c^2 + sigma_T^2) (VE x_T): both converge
    with S, DPM++ 2M (second order but for its last step) faster than Euler."""
    c, x = 0.5, torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name in ("euler", "dpmpp_2m"):
        for n in (10, 40):
            sched = discrete_sigma_schedule(alpha_bar, n)
            exact = x * math.sqrt(1 + sched.sigmas[0] ** 2) * c / math.sqrt(c * c + sched.sigmas[0] ** 2)
            errors[name, n] = rel_err(SAMPLERS[name](gaussian_denoiser(c), x, sched), exact)
    # measured: Euler 0.231 -> 0.075, DPM++ 2M 0.180 -> 0.039 (the first-order jump to sigma 0 weighs on both)
    assert errors["dpmpp_2m", 10] < errors["euler", 10] and errors["dpmpp_2m", 40] < errors["euler", 40] / 1.8, errors
    assert errors["euler", 40] < errors["euler", 10] / 2.5 and errors["dpmpp_2m", 40] < errors["dpmpp_2m", 10] / 4


def test_euler_ancestral_noise_comes_from_the_generator(alpha_bar):
    sched = discrete_sigma_schedule(alpha_bar, 5)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    run = lambda seed: sample_euler_ancestral(gaussian_denoiser(0.5), x, sched,
                                              generator=torch.Generator().manual_seed(seed), progress=False)
    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2))
    # eta 0 is Euler
    same = sample_euler_ancestral(gaussian_denoiser(0.5), x, sched, eta=0.0, progress=False)
    assert torch.allclose(same, sample_euler(gaussian_denoiser(0.5), x, sched, progress=False), atol=1e-6)


def test_head_and_tail_split_a_run_in_two(alpha_bar):
    """An ensemble of experts: the first k steps, then the last S - k from where they stopped, equal the whole run."""
    sched = discrete_sigma_schedule(alpha_bar, 10)
    k = expert_split(sched, 0.8)
    assert k == sum(1 for t in sched.timesteps if t >= 200) == 8
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for name in ("euler", "dpmpp_2m"):
        whole = SAMPLERS[name](gaussian_denoiser(0.5), x, sched)
        mid = SAMPLERS[name](gaussian_denoiser(0.5), x, schedule_head(sched, k))
        tail = SAMPLERS[name](gaussian_denoiser(0.5), mid, schedule_tail(sched, 10 - k))
        assert rel_err(tail, whole) <= (1e-6 if name == "euler" else 0.05)  # DPM++ restarts its history


# ----------------------------------------------------------------------------- the SDXL model, against diffusers

@pytest.fixture(scope="module")
def pipe(base, tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline, EulerDiscreteScheduler
    parts = diffusers_parts(base, tmp_path_factory.mktemp("sdxl-sampling"))
    # "leading": init_noise_sigma = sqrt(1 + sigma_max^2), sgm's start scaling (linspace/trailing use sigma_max)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(**parts, scheduler=scheduler, force_zeros_for_empty_prompt=True)


def ours_and_diffusers(base, pipe, sampler_cls, scheduler, steps: int, scale: float = 5.0):
    x = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(7))
    batch = conditioning_batch(PROMPTS, **SIZES)
    c, uc = base.get_learned_conditioning(batch), base.get_unconditional_conditioning(batch, ["", ""])
    sampler = sampler_cls(base)
    ours, _ = sampler.sample(S=steps, batch_size=2, shape=(4, 16, 12), conditioning=c, unconditional_conditioning=uc,
                             unconditional_guidance_scale=scale, x_T=x, verbose=False)
    pipe.scheduler = scheduler
    theirs = pipe(prompt=PROMPTS, height=128, width=96, timesteps=list(sampler.sigma_schedule.timesteps),
                  guidance_scale=scale, latents=x.clone(), original_size=SIZES["original_size"],
                  crops_coords_top_left=SIZES["crop_top_left"], target_size=SIZES["target_size"],
                  output_type="latent").images
    return ours, theirs


@torch.no_grad()
def test_euler_run_matches_diffusers(base, pipe):
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    ours, theirs = ours_and_diffusers(base, pipe, EulerSampler, scheduler, 4)
    err = rel_err(ours, theirs)
    assert err <= 1e-4, err
    assert theirs.abs().max() > 0.1


@torch.no_grad()
def test_dpmpp_2m_run_matches_diffusers(base, pipe):
    from diffusers import DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            final_sigmas_type="zero")
    ours, theirs = ours_and_diffusers(base, pipe, DPMPP2MSampler, scheduler, 5)
    err = rel_err(ours, theirs)
    assert err <= 1e-4, err


@torch.no_grad()
@pytest.mark.parametrize("kind", ["ddim", "plms", "dpm", "euler_a"])
def test_other_samplers_run_on_sdxl_with_batched_guidance(base, kind):
    """DDIM/PLMS/DPM-Solver++ over the engine's DDPM tables, Euler ancestral: finite latents, one 2B UNet call per
    denoiser call (the dict conditioning concatenated leaf by leaf)."""
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler
    from ldm.models.diffusion.plms import PLMSSampler
    cls = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler, "euler_a": EulerAncestralSampler}[kind]
    batch = conditioning_batch(PROMPTS, **SIZES)
    c, uc = base.get_learned_conditioning(batch), base.get_unconditional_conditioning(batch, ["", ""])
    batches = []
    inner = base.apply_model
    base.apply_model = lambda x, t, cond, **kw: batches.append((x.shape[0], cond["vector"].shape[0])) or inner(
        x, t, cond, **kw)
    try:
        out, _ = cls(base).sample(S=3, batch_size=2, shape=(4, 8, 8), conditioning=c, unconditional_conditioning=uc,
                                  unconditional_guidance_scale=5.0, verbose=False,
                                  generator=torch.Generator().manual_seed(0))
    finally:
        del base.apply_model
    assert torch.isfinite(out).all() and out.shape == (2, 4, 8, 8)
    assert set(batches) == {(4, 4)} and len(batches) == (4 if kind == "plms" else 3)


def test_cfg_denoiser_guides_the_dict_conditioning(base):
    """One batched [uncond, cond] call: crossattn and vector both concatenated."""
    batch = conditioning_batch(PROMPTS, **SIZES)
    c, uc = base.get_learned_conditioning(batch), base.get_unconditional_conditioning(batch, ["", ""])
    d = CFGDenoiser(base, c, uc, 3.0)
    assert d.context["crossattn"].shape[0] == d.context["vector"].shape[0] == 4
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((1,), 500.0)
    with torch.no_grad():
        e_u, e_c = base.apply_model(x, t.expand(2), uc), base.apply_model(x, t.expand(2), c)
        assert rel_err(d(x, t, 0.5, 0.5), e_u + 3.0 * (e_c - e_u)) <= 1e-5


def sgm_img2img_sigmas(steps: int, strength: float) -> list[float]:
    """generative-models' Img2ImgDiscretizationWrapper over its discretization: the sigmas (descending, a final 0),
    flipped, the first max(int(strength * len), 1) kept, flipped back."""
    sigmas = LegacyDDPMDiscretization()(steps).flip(0)
    return sigmas[: max(int(strength * len(sigmas)), 1)].flip(0).tolist()


@pytest.mark.parametrize("steps, strength", [(40, 0.15), (30, 0.3), (50, 0.75), (7, 0.5), (10, 0.05), (25, 1.0),
                                             (25, 0.0)])
def test_sdxl_img2img_runs_the_sigmas_sgm_keeps(base, steps, strength):
    """The refiner (and img2img on SDXL) runs sgm's pruned schedule: its count (one fewer than int(strength * S) at
    most) and its noise levels, from the first sigma it keeps down to 0."""
    from ldm.apps.pipelines import strength_to_steps
    t_enc = strength_to_steps(strength, steps, sgm=True)
    sampler = EulerSampler(base)
    sampler.make_schedule(ddim_num_steps=steps, verbose=False)
    ours = sampler.schedule_for(t_enc).sigmas
    want = sgm_img2img_sigmas(steps, strength)
    assert len(ours) == len(want) == t_enc + 1
    assert max(abs(a - b) for a, b in zip(ours, want)) <= 1e-6 * max(want[0], 1.0)
    assert strength_to_steps(strength, steps) - t_enc in (0, 1)  # the original's int(strength * steps)

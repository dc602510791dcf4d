"""Samplers vs diffusers' schedulers and vs closed-form answers, over analytic denoisers (no UNet).

Conventions shared with diffusers (so the comparisons are exact up to float rounding):
- DDIM / PNDM: timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False (the last step lands on
  alpha_bar[0]), which is also our choice of exactly S steps with spacing T // S when S does not divide T.
- DPM-Solver++: the original runs at fractional timesteps (T-1)(1 - k/S), diffusers at integers, so they
  coincide only when S divides T - 1 = 999 (S = 3, 9, 27, ...), with timestep_spacing="linspace" and
  final_sigmas_type="sigma_min" (the original ends at timestep 0, not at sigma = 0). Other S are checked
  against the closed form here and against an original-style reference in test_samplers_reference.py.
- PLMS with v-prediction differs: diffusers' PNDM combines raw v outputs and converts the combination with
  the current x, we convert each output to eps at its own (x, t) first (the original PLMS ignored v
  altogether), so v-PLMS is checked against the closed form only.
- diffusers builds alpha_bar in float32; ours is float64, hence differences of ~1e-6, not 0.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.model.schedule import schedule_buffers

T = 1000
BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2  # SD2's "linear" schedule
ALPHA_BAR = np.cumprod(1.0 - BETAS)
SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler}
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy-2 copy= notice


def toy_net(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear, timestep- and context-dependent stand-in for the UNet."""
    w = (0.5 + t.to(x.dtype) / T).view(-1, 1, 1, 1)
    return 0.8 * torch.tanh(w * x) + 0.1 * torch.sin(3 * w) + 0.2 * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)


class ToyModel:
    """LatentDiffusion's sampler-facing surface (apply_model, parameterization, cfg.betas, ...) over ``net``."""

    num_timesteps = T

    def __init__(self, parameterization: str = "eps", net=toy_net):
        self.parameterization = parameterization
        self.cfg = SimpleNamespace(betas=lambda: torch.from_numpy(BETAS.copy()))
        self.device = torch.device("cpu")
        self.net = net
        self.calls: list[tuple[int, torch.Tensor]] = []
        for name, value in schedule_buffers(torch.from_numpy(BETAS.copy())).items():
            setattr(self, name, value)  # the original-style references read these float32 buffers

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], t.detach().clone()))
        return self.net(x, t, c)


class GaussianData:
    """Exact eps / v of data x0 ~ N(mu(context), s^2): E[eps | x_t] = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2)."""

    def __init__(self, s: float, parameterization: str = "eps"):
        self.s, self.parameterization = s, parameterization

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        # log-linear between integer timesteps: exact at integers, and what DPM-Solver assumes in between
        log_alpha = float(np.interp(t, np.arange(T), 0.5 * np.log(ALPHA_BAR)))
        return math.exp(log_alpha), math.sqrt(-math.expm1(2 * log_alpha))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(float(t[0]))
        mu = c.mean(dim=(1, 2)).view(-1, 1, 1, 1).to(x.dtype)
        eps = sigma * (x - alpha * mu) / (alpha ** 2 * self.s ** 2 + sigma ** 2)
        if self.parameterization == "eps":
            return eps
        return alpha * eps - sigma * (x - sigma * eps) / alpha  # v = alpha eps - sigma x0


def flow_map(x_T: torch.Tensor, mu: torch.Tensor, s: float, ab_start: float, ab_end: float) -> torch.Tensor:
    """Exact probability-flow ODE map of N(mu, s^2) data from level alpha_bar = ab_start to ab_end."""
    std = lambda ab: math.sqrt(ab * s * s + 1 - ab)  # noqa: E731 - marginal std of x_t
    return math.sqrt(ab_end) * mu + std(ab_end) / std(ab_start) * (x_T - math.sqrt(ab_start) * mu)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def inputs(dtype=torch.float32, b: int = 2, seed: int = 0):
    """x_T (b, 4, 3, 5), cond and uncond contexts (b, 77, 8): cond means differ per sample, uncond is zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 3, 5, generator=g, dtype=dtype)
    c = (torch.randn(b, 77, 8, generator=g, dtype=dtype) + torch.linspace(-1, 1, b, dtype=dtype).view(-1, 1, 1))
    return x, c, torch.zeros_like(c)


def run_ours(kind: str, model, S: int, x, c, uc, scale: float, **kw):
    out, _ = SAMPLERS[kind](model).sample(S=S, batch_size=x.shape[0], shape=list(x.shape[1:]), conditioning=c,
                                          verbose=False, unconditional_guidance_scale=scale,
                                          unconditional_conditioning=uc, x_T=x, **kw)
    return out


# ----- diffusers -----
def diffusers_scheduler(kind: str, param: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
    common = dict(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="epsilon" if param == "eps" else "v_prediction")
    if kind == "ddim":
        return DDIMScheduler(**common, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                             clip_sample=False)
    if kind == "plms":
        return PNDMScheduler(**common, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                             skip_prk_steps=True)
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                       solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace",
                                       final_sigmas_type="sigma_min", use_karras_sigmas=False)


def run_diffusers(kind: str, param: str, S: int, x, c, uc, scale: float) -> torch.Tensor:
    sched = diffusers_scheduler(kind, param)
    sched.set_timesteps(S)
    context = torch.cat([uc, c])
    for t in sched.timesteps:
        tt = torch.full((2 * x.shape[0],), float(t))
        out_u, out_c = toy_net(torch.cat([x, x]), tt, context).chunk(2)
        kw = {"eta": 0.0} if kind == "ddim" else {}
        x = sched.step(out_u + scale * (out_c - out_u), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("kind,param,S", [
    ("ddim", "eps", 4), ("ddim", "v", 4), ("ddim", "eps", 7), ("ddim", "v", 50),
    ("plms", "eps", 6), ("plms", "eps", 7), ("plms", "eps", 1),
    ("dpm", "eps", 3), ("dpm", "v", 3), ("dpm", "eps", 9), ("dpm", "v", 27), ("dpm", "eps", 27),
])
def test_matches_diffusers(kind, param, S):
    x, c, uc = inputs()
    model = ToyModel(param)
    ours = run_ours(kind, model, S, x, c, uc, 5.0)
    ref = run_diffusers(kind, param, S, x, c, uc, 5.0)
    assert rel(ours, ref) <= 1e-4
    # one batched [uncond, cond] call per step (PLMS: one more on its first step)
    assert [n for n, _ in model.calls] == [2 * x.shape[0]] * (S + (kind == "plms"))


# ----- closed form -----
@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("kind,S", [("ddim", 3), ("ddim", 10), ("ddim", 7), ("dpm", 2), ("dpm", 10), ("dpm", 20)])
def test_point_mass_is_solved_exactly(kind, S, param):
    """For data = one point, DDIM (eta = 0) and DPM-Solver++ steps are exact, whatever the step sizes."""
    x, c, uc = inputs(torch.float64)
    scale = 3.0
    out = run_ours(kind, ToyModel(param, GaussianData(0.0, param)), S, x, c, uc, scale)
    # CFG mixes the linear denoisers of mu_uncond = 0 and mu_cond: the denoiser of mu = scale * mu_cond
    mu = scale * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    t_start = (S - 1) * (T // S) + 1 if kind == "ddim" else T - 1
    # 1e-7, not 1e-12: the model reads its (fractional) timestep from a float32 tensor
    assert rel(out, flow_map(x, mu, 0.0, ALPHA_BAR[t_start], ALPHA_BAR[0])) <= 1e-7


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("kind,S,tol", [("ddim", 500, 3e-3), ("plms", 100, 2e-4), ("dpm", 400, 1e-3)])
def test_gaussian_data_converges_to_the_flow_map(kind, S, tol, param):
    """For N(mu, s^2) data the sample approaches the exact probability-flow map as S grows.

    The tolerances are what each method reaches at this S (DDIM is first order; DPM-Solver++ is second order
    but the original's time-uniform steps make its last step span ~1 in lambda even at S = 400).
    """
    x, c, uc = inputs(torch.float64)
    out = run_ours(kind, ToyModel(param, GaussianData(0.5, param)), S, x, c, uc, 2.0)
    mu = 2.0 * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    t_start = (S - 1) * (T // S) + 1 if kind != "dpm" else T - 1
    assert rel(out, flow_map(x, mu, 0.5, ALPHA_BAR[t_start], ALPHA_BAR[0])) <= tol


def test_convergence_orders():
    """DDIM's error halves when S doubles; DPM-Solver++(2M)'s quarters (on log-SNR-uniform steps)."""
    from ldm.samplers import DPMSchedule, ddim_schedule, sample_ddim, sample_dpmpp_2m
    s, mu = 0.5, 1.5
    eps_fn = lambda x, t, alpha, sigma: sigma * (x - alpha * mu) / (alpha ** 2 * s ** 2 + sigma ** 2)  # noqa: E731
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)

    def ddim_err(S: int) -> float:
        out = sample_ddim(eps_fn, x, ddim_schedule(ALPHA_BAR.tolist(), S), progress=False)
        return rel(out, flow_map(x, mu, s, ALPHA_BAR[(S - 1) * (T // S) + 1], ALPHA_BAR[0]))

    lam_tab = 0.5 * np.log(ALPHA_BAR / (1 - ALPHA_BAR))

    def dpm_err(S: int) -> float:
        lam = np.linspace(lam_tab[-1], lam_tab[0], S + 1)
        alpha = 1 / np.sqrt(1 + np.exp(-2 * lam))
        sched = DPMSchedule((0.0,) * (S + 1), tuple(alpha), tuple(np.sqrt(1 - alpha ** 2)), tuple(lam))
        return rel(sample_dpmpp_2m(eps_fn, x, sched, progress=False), flow_map(x, mu, s, ALPHA_BAR[-1], ALPHA_BAR[0]))

    assert 1.8 <= ddim_err(100) / ddim_err(200) <= 2.2
    assert 3.6 <= dpm_err(50) / dpm_err(100) <= 4.4
    assert dpm_err(100) <= 2e-4


def test_ddim_eta_step_formula_in_float64():
    """One DDIM step with eta > 0 from the paper's eq. 12, computed independently in float64."""
    from ldm.samplers import ddim_schedule, sample_ddim
    eta, S = 0.8, 5
    x, _, _ = inputs(torch.float64)
    eps_fn = lambda x, t, alpha, sigma: torch.sin(x) + float(t[0]) / T  # noqa: E731
    sched = ddim_schedule(ALPHA_BAR.tolist(), S, eta)
    out = sample_ddim(eps_fn, x, sched, torch.Generator().manual_seed(3), progress=False)
    g = torch.Generator().manual_seed(3)
    ts = list(range(1, T, T // S))[::-1]
    for i, t in enumerate(ts):
        a, a_prev = ALPHA_BAR[t], ALPHA_BAR[ts[i + 1]] if i + 1 < S else ALPHA_BAR[0]
        std = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        eps = torch.sin(x) + t / T
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std ** 2) * eps + std * torch.randn(
            x.shape, generator=g, dtype=x.dtype)
    assert rel(out, x) <= 1e-12

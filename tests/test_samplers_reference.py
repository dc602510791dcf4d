"""Our samplers vs original-style reference loops (written here, in the original ldm code's structure), and the
timestep conventions: float32 tables read from the model's buffers, integer (long) timesteps, global RNG.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.samplers import ddim_timesteps, dpm_time_uniform_schedule
from test_samplers import ALPHA_BAR, T, ToyModel, inputs, rel, run_ours


def cfg_output(model, x, t, c, uc, scale):
    """The original's guided UNet output: one [uncond, cond] batch, no v -> eps conversion."""
    out_u, out_c = model.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uc, c])).chunk(2)
    return out_u + scale * (out_c - out_u)


def original_ddim_tables(model, S, eta):
    """make_ddim_timesteps + make_ddim_sampling_parameters, for S dividing T, from float32 buffers."""
    steps = np.arange(0, T, T // S) + 1
    ab = model.alphas_cumprod
    a = ab[steps]
    a_prev = torch.cat([ab[:1], ab[steps[:-1]]])
    sig = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return steps, a, a_prev, sig


def original_ddim(model, S, x, c, uc, scale, eta, plms=False):
    """DDIM / PLMS as the original loops do them (eps models for PLMS, as the original)."""
    steps, a_tab, ap_tab, sig_tab = original_ddim_tables(model, S, eta)
    b = x.shape[0]
    time_range = np.flip(steps)
    old_eps = []

    def eps_of(x, ts):
        out = cfg_output(model, x, ts, c, uc, scale)
        if model.parameterization == "v":
            ab = model.alphas_cumprod[ts].view(-1, 1, 1, 1)
            return ab.sqrt() * out + (1 - ab).sqrt() * x
        return out

    def step(x, e_t, index):
        a_t = torch.full((b, 1, 1, 1), a_tab[index].item())
        a_prev = torch.full((b, 1, 1, 1), ap_tab[index].item())
        sigma_t = torch.full((b, 1, 1, 1), sig_tab[index].item())
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        noise = sigma_t * torch.randn(x.shape)
        return a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma_t ** 2).sqrt() * e_t + noise

    for i, t in enumerate(time_range):
        index = len(time_range) - i - 1
        ts = torch.full((b,), int(t), dtype=torch.long)
        e_t = eps_of(x, ts)
        if not plms:
            x = step(x, e_t, index)
            continue
        if not old_eps:
            t_next = torch.full((b,), int(time_range[min(i + 1, len(time_range) - 1)]), dtype=torch.long)
            e_prime = (e_t + eps_of(step(x, e_t, index), t_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        old_eps = (old_eps + [e_t])[-3:]
        x = step(x, e_prime, index)
    return x


def original_dpm(model, S, x, c, uc, scale):
    """DPM-Solver++ multistep order 2, time-uniform, lower_order_final, on the original's continuous time."""
    log_alpha_tab = 0.5 * torch.log(model.alphas_cumprod).numpy()
    t_grid = np.linspace(0.0, 1.0, T + 1)[1:]
    log_alpha = lambda t: float(np.interp(t, t_grid, log_alpha_tab))  # noqa: E731
    alpha = lambda t: np.exp(log_alpha(t))  # noqa: E731
    sigma = lambda t: np.sqrt(1 - np.exp(2 * log_alpha(t)))  # noqa: E731
    lam = lambda t: log_alpha(t) - np.log(sigma(t))  # noqa: E731

    def data_pred(x, t):
        t_in = torch.full((x.shape[0],), (t - 1 / T) * 1000)
        out = cfg_output(model, x, t_in, c, uc, scale)
        eps = alpha(t) * out + sigma(t) * x if model.parameterization == "v" else out
        return (x - sigma(t) * eps) / alpha(t)

    times = np.linspace(1.0, 1 / T, S + 1)
    m_prev, t_prev = [data_pred(x, times[0])], [times[0]]
    for step in range(1, S + 1):
        t = times[step]
        h = lam(t) - lam(t_prev[-1])
        order = 1 if step == 1 or (S < 15 and step == S) else 2
        x = sigma(t) / sigma(t_prev[-1]) * x - alpha(t) * np.expm1(-h) * m_prev[-1]
        if order == 2:
            r0 = (lam(t_prev[-1]) - lam(t_prev[-2])) / h
            x = x - 0.5 * alpha(t) * np.expm1(-h) * (m_prev[-1] - m_prev[-2]) / r0
        t_prev, m_prev = (t_prev + [t])[-2:], m_prev[-2:]
        if step < S:
            m_prev = (m_prev + [data_pred(x, t)])[-2:]
    return x


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("S,eta", [(5, 0.0), (10, 0.7), (20, 1.0)])
def test_ddim_matches_original_loop(S, eta, param):
    x, c, uc = inputs()
    model = ToyModel(param)
    torch.manual_seed(123)  # generator=None: the eta noise comes from the global RNG, as in the original
    ours = run_ours("ddim", model, S, x, c, uc, 4.0, eta=eta)
    torch.manual_seed(123)
    assert rel(ours, original_ddim(model, S, x, c, uc, 4.0, eta)) <= 1e-5


@pytest.mark.parametrize("S", [1, 2, 5, 10])
def test_plms_matches_original_loop(S):
    x, c, uc = inputs()
    model = ToyModel("eps")
    ref = original_ddim(model, S, x, c, uc, 4.0, 0.0, plms=True)
    assert rel(run_ours("plms", model, S, x, c, uc, 4.0), ref) <= 1e-5


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("S", [2, 5, 20])
def test_dpm_solver_matches_original_algorithm(S, param):
    """Fractional timesteps (S = 20 gives 999, 949.05, ...) where diffusers cannot follow."""
    x, c, uc = inputs(torch.float64)
    model = ToyModel(param)
    assert rel(run_ours("dpm", model, S, x, c, uc, 4.0), original_dpm(model, S, x, c, uc, 4.0)) <= 1e-5
    assert abs(float(model.calls[1][1][0]) - (999 - 999 / S)) < 1e-3  # the UNet saw the fractional time


def test_ddim_timesteps_conventions():
    original = lambda S: list(np.arange(0, T, T // S) + 1)  # noqa: E731 - make_ddim_timesteps "uniform"
    for S in (1, 2, 4, 10, 20, 25, 50, 100, 250, 500):  # S divides T: identical to the original
        assert ddim_timesteps(S)[::-1] == original(S)
    for S in (3, 7, 9, 15, 30, 300, 999):  # otherwise: the original's first S entries, all < T
        ts = ddim_timesteps(S)[::-1]
        assert len(ts) == S and ts == original(S)[:S] and max(ts) < T
    assert original(3)[-1] == T  # why the original's extra steps are not kept: alpha_bar[1000] does not exist
    quad = ((np.linspace(0, np.sqrt(T * 0.8), 50)) ** 2).astype(int) + 1
    assert ddim_timesteps(50, discretize="quad")[::-1] == list(quad)
    for bad in (0, T, T + 1):
        with pytest.raises(ValueError):
            ddim_timesteps(bad)


def test_dpm_time_uniform_schedule():
    sched = dpm_time_uniform_schedule(ALPHA_BAR.tolist(), 20)
    assert np.allclose(sched.model_time, (np.linspace(1.0, 1 / T, 21) - 1 / T) * 1000, atol=1e-9)
    assert sched.alpha[0] ** 2 == pytest.approx(ALPHA_BAR[-1], rel=1e-12)
    assert sched.alpha[-1] ** 2 == pytest.approx(ALPHA_BAR[0], rel=1e-12)
    assert all(b > a for a, b in zip(sched.lam, sched.lam[1:]))


def test_plms_rejects_eta():
    x, c, uc = inputs()
    with pytest.raises(ValueError, match="eta"):
        run_ours("plms", ToyModel(), 5, x, c, uc, 4.0, eta=0.5)

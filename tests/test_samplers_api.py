"""The original sampler interface on the tiny model: arguments, callbacks, RNG, compile stability, host syncs."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, build
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler

RUNS = [(DDIMSampler, 0.0), (DDIMSampler, 0.5), (PLMSSampler, 0.0), (DPMSolverSampler, 0.0)]


def _sample(model, cls, eta=0.0, prompt="a photo of a cat", scale=7.5, seed=0, S=4, **kw):
    c = model.get_learned_conditioning([prompt] * 2)
    uc = model.get_learned_conditioning([""] * 2)
    g = torch.Generator(device=model.device).manual_seed(seed)
    kw.setdefault("verbose", False)
    return cls(model).sample(S=S, conditioning=c, batch_size=2, shape=[4, 8, 8], unconditional_guidance_scale=scale,
                             unconditional_conditioning=uc, eta=eta, generator=g, **kw)


@pytest.mark.parametrize("cls,eta", RUNS)
def test_original_interface(tiny_model_v, cls, eta):
    steps, previews = [], []
    x, inter = _sample(tiny_model_v, cls, eta, S=3, callback=steps.append,
                       img_callback=lambda x0, i: previews.append((i, x0.shape)),
                       # txt2img's other keywords are accepted at their defaults
                       normals_sequence=None, quantize_x0=False, mask=None, x0=None, temperature=1.0,
                       noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, log_every_t=100,
                       dynamic_threshold=None, ucg_schedule=None, unknown_future_kwarg=1)
    assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert steps == [0, 1, 2]  # S = 3 does not divide 1000: still exactly 3 steps
    assert previews == [(i, (2, 4, 8, 8)) for i in range(3)]
    if cls is DPMSolverSampler:
        assert inter is None
    else:  # x_T, then after the first step (index S-1) and the last (index 0), as the original logs them
        assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 3
        assert inter["x_inter"][-1] is x
    assert cls(tiny_model_v).device == tiny_model_v.device  # not "cuda"


@pytest.mark.parametrize("cls,eta", [(DDIMSampler, 0.5), (DPMSolverSampler, 0.0)])
def test_same_seed_same_latents(tiny_model, cls, eta):
    a, _ = _sample(tiny_model, cls, eta, seed=1, S=2)
    b, _ = _sample(tiny_model, cls, eta, seed=1, S=2)
    c, _ = _sample(tiny_model, cls, eta, seed=2, S=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_given_x_T_and_eta_noise_generator(tiny_model):
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a, _ = _sample(tiny_model, DDIMSampler, 1.0, x_T=x_T, seed=3, S=2)
    b, _ = _sample(tiny_model, DDIMSampler, 1.0, x_T=x_T, seed=3, S=2)
    c, _ = _sample(tiny_model, DDIMSampler, 1.0, x_T=x_T, seed=4, S=2)  # same start, other eta noise
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_unsupported_options_are_errors(tiny_model):
    with pytest.raises(NotImplementedError, match="mask"):
        _sample(tiny_model, DDIMSampler, mask=torch.ones(2, 4, 8, 8), x0=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="eta"):
        _sample(tiny_model, PLMSSampler, 0.1)


@pytest.mark.parametrize("cls", [DDIMSampler, PLMSSampler, DPMSolverSampler])
def test_batch_size_must_match_the_conditioning(tiny_model, cls):
    """The original warned and then failed inside attention; here a mismatch is one clear error, before sampling."""
    c = tiny_model.get_learned_conditioning(["a cat"] * 2)
    uc = tiny_model.get_learned_conditioning([""] * 2)
    with pytest.raises(ValueError, match=r"got 2 conditioning row\(s\) but batch_size is 3"):
        cls(tiny_model).sample(S=2, conditioning=c, batch_size=3, shape=[4, 8, 8], verbose=False)
    with pytest.raises(ValueError, match=r"got 2 unconditional_conditioning row\(s\) but batch_size is 1"):
        cls(tiny_model).sample(S=2, conditioning=c[:1], batch_size=1, shape=[4, 8, 8], verbose=False,
                               unconditional_guidance_scale=7.5, unconditional_conditioning=uc)
    with pytest.raises(ValueError, match="x_T holds 1 samples but batch_size is 2"):
        cls(tiny_model).sample(S=2, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                               x_T=torch.zeros(1, 4, 8, 8))
    dict_cond = {"c_crossattn": [c]}  # the original's dict form counts its first leaf
    with pytest.raises(ValueError, match="got 2 conditioning"):
        cls(tiny_model).sample(S=2, conditioning=dict_cond, batch_size=4, shape=[4, 8, 8], verbose=False)


def test_progress_bar_follows_verbose(tiny_model, capsys):
    _sample(tiny_model, DDIMSampler, verbose=True, S=2)
    assert "DDIM" in capsys.readouterr().err
    _sample(tiny_model, DDIMSampler, verbose=False, S=2)
    assert capsys.readouterr().err == ""


def _runs_without_recompiling(model, backend) -> int:
    """Every sampler, twice (new prompt, seed and scale), over one compiled UNet; returns the graphs compiled.

    The second scale is 1.0: with an unconditional context the UNet batch stays 2B even there.
    """
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return backend(gm, example_inputs) if callable(backend) else gm.forward

    unet = model.model.diffusion_model
    torch._dynamo.reset()
    model.model.diffusion_model = torch.compile(unet, fullgraph=True, backend=counting)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed, (prompt, scale) in enumerate([("a photo of a cat", 7.5), ("an oil painting", 1.0)]):
                for cls, eta in RUNS:
                    x, _ = _sample(model, cls, eta, prompt=prompt, scale=scale, seed=seed, S=3)
                    assert torch.isfinite(x).all()
    finally:
        model.model.diffusion_model = unet
        torch._dynamo.reset()
    return len(graphs)


def test_compiled_unet_is_never_recompiled(tiny_model):
    """Dynamo's guards decide recompiles, whatever the backend: the eager backend keeps this test fast."""
    assert _runs_without_recompiling(tiny_model, None) == 1


@pytest.mark.slow
def test_compiled_unet_is_never_recompiled_inductor(tiny_model):
    from torch._inductor.compile_fx import compile_fx
    assert _runs_without_recompiling(tiny_model, compile_fx) == 1


@pytest.mark.gpu
def test_sampling_loops_never_sync_with_the_host():
    model = build(TINY).cuda()
    for cls, eta in RUNS:
        c = model.get_learned_conditioning(["a photo of a cat"] * 2)
        uc = model.get_learned_conditioning([""] * 2)
        g = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            x, _ = cls(model).sample(S=4, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                                     unconditional_guidance_scale=7.5, unconditional_conditioning=uc, eta=eta,
                                     generator=g, callback=lambda i: None, img_callback=lambda x0, i: None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert x.device.type == "cuda" and torch.isfinite(x).all()

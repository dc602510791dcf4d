"""ldm.speed.runtime: compile modes and their inductor settings, the CUDA-graph output clone, VAE compile, TF32."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import TINY, build
from helpers import rel_err
from ldm.speed import runtime

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
DIFFUSION_FAST = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                  "coordinate_descent_check_all_directions": True}
CACHES = {"fx_graph_cache": True, "fx_graph_remote_cache": False}
COMPILE_TOL = 1e-4  # max|compiled - eager| / max|eager|, fp32 (inductor reorders reductions and fuses)


@pytest.fixture()
def tiny():
    """A fresh tiny model: compiling swaps submodules, so the session fixture must not be used."""
    model = build(TINY)
    yield model
    torch._dynamo.reset()


def unet_inputs(hw: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, hw, hw, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 64, generator=g)


# ----------------------------------------------------------------------------- settings per mode and device

@pytest.mark.parametrize("mode,device,expected", [
    ("default", CPU, {**CACHES, "freezing": True}),
    ("reduce-overhead", CPU, {**CACHES, "freezing": True}),  # no CUDA graphs off CUDA: runs as default
    ("max-autotune", CPU, {**CACHES, "freezing": True, "max_autotune": True, **DIFFUSION_FAST}),
    ("max-autotune-no-cudagraphs", CPU, {**CACHES, "freezing": True, "max_autotune": True, **DIFFUSION_FAST}),
    ("default", CUDA, CACHES),
    ("reduce-overhead", CUDA, {**CACHES, "triton.cudagraphs": True}),
    ("max-autotune", CUDA, {**CACHES, "max_autotune": True, "triton.cudagraphs": True, **DIFFUSION_FAST}),
    ("max-autotune-no-cudagraphs", CUDA, {**CACHES, "max_autotune": True, **DIFFUSION_FAST}),
])
def test_inductor_settings(mode, device, expected):
    assert runtime.inductor_settings(mode, device) == expected
    assert runtime.uses_cudagraphs(runtime.effective_mode(mode, device), device) == \
        expected.get("triton.cudagraphs", False)


def test_inductor_settings_are_valid_options_and_change_nothing_global():
    import torch._inductor.config as inductor_config
    before = inductor_config.get_config_copy()
    for mode in runtime.COMPILE_MODES:
        for device in (CPU, CUDA):
            settings = runtime.inductor_settings(mode, device)
            unknown = [k for k in settings if k not in before]
            assert not unknown, unknown
    assert inductor_config.get_config_copy() == before


def test_unknown_mode_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        runtime.inductor_settings("fast", CPU)
    with pytest.raises(ValueError, match="unknown compile mode"):
        runtime.compile_module(nn.Linear(2, 2), "max_autotune", CPU)


# ----------------------------------------------------------------------------- the CUDA-graph output clone

class SameBuffer(nn.Module):
    """Writes each result into one preallocated buffer and returns it, as a CUDA-graph replay does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("out", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.copy_(2 * x)


def test_clone_output_survives_the_next_call():
    raw = SameBuffer()
    a, b = raw(torch.ones(3)), raw(torch.full((3,), 5.0))
    assert a.data_ptr() == b.data_ptr() and a.tolist() == [10.0] * 3  # the hazard: the first result is gone
    wrapped = runtime.CloneOutput(SameBuffer())
    a, b = wrapped(torch.ones(3)), wrapped(torch.full((3,), 5.0))
    assert a.tolist() == [2.0] * 3 and b.tolist() == [10.0] * 3
    assert a.data_ptr() != b.data_ptr() != wrapped.module.out.data_ptr()


def test_clone_output_keeps_the_unet_attributes(tiny):
    unet = tiny.model.diffusion_model
    tiny.model.diffusion_model = runtime.CloneOutput(unet)
    assert tiny.dtype == torch.float32 and tiny.device == CPU  # read through to the UNet
    assert tiny.model.diffusion_model.cfg is unet.cfg and tiny.model.diffusion_model.time_embed is unet.time_embed
    with torch.no_grad():
        x, t, c = unet_inputs()
        assert torch.equal(tiny.apply_model(x, t, c), unet(x, t, c))
    with pytest.raises(AttributeError):
        tiny.model.diffusion_model.no_such_attribute


class ReplayLike(nn.Module):
    """The UNet with a CUDA-graph replay's output semantics: every call returns the same (overwritten) buffer."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.out = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, t, context)
        self.out = torch.empty_like(out) if self.out is None else self.out
        return self.out.copy_(out)


def test_plms_over_a_replayed_unet_needs_the_clone(tiny):
    """PLMS keeps the previous steps' eps: over shared output buffers it goes wrong unless each output is cloned.

    Unguided, the eps PLMS keeps is the UNet's output itself (with CFG it would be a fresh tensor).
    """
    from ldm.models.diffusion.plms import PLMSSampler
    c = tiny.get_learned_conditioning(["a cat"] * 2)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = tiny.model.diffusion_model

    def sample(diffusion_model: nn.Module) -> torch.Tensor:
        tiny.model.diffusion_model = diffusion_model
        s, _ = PLMSSampler(tiny, device=CPU).sample(S=6, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                                                    x_T=x_T.clone())
        return s

    with torch.no_grad():
        eager = sample(unet)
        shared = sample(ReplayLike(unet))
        cloned = sample(runtime.CloneOutput(ReplayLike(unet)))
    assert rel_err(shared, eager) > 1e-2  # the hazard is real for this sampler
    assert torch.equal(cloned, eager)


def test_reduce_overhead_on_cpu_warns_and_compiles_as_default():
    lin = nn.Linear(4, 4)
    with pytest.warns(UserWarning, match="needs CUDA graphs"):
        compiled = runtime.compile_module(lin, "reduce-overhead", CPU)
    assert not isinstance(compiled, runtime.CloneOutput)
    assert compiled._orig_mod is lin
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.compile_module(lin, "max-autotune", CPU)  # max-autotune means something on CPU: no warning
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- compiled vs eager

def test_vae_decoder_has_no_graph_breaks(tiny_model):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(tiny_model.first_stage_model.decoder)(z)
    torch._dynamo.reset()
    assert (explanation.graph_break_count, explanation.graph_count) == (0, 1)


def test_compile_vae_matches_eager(tiny):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = tiny.decode_first_stage(z)
        compiled = runtime.compile_vae(tiny, "default")
        assert tiny.first_stage_model.decoder is compiled and compiled._orig_mod is not None
        out = tiny.decode_first_stage(z)
    assert out.shape == eager.shape == (2, 3, 64, 64)
    assert rel_err(out, eager) <= COMPILE_TOL


# max-autotune is slow-marked: inductor's CPU GEMM autotuning, about a minute on a busy 2-core machine, cold cache
@pytest.mark.parametrize("mode", ["default", pytest.param("max-autotune", marks=pytest.mark.slow)])
def test_compile_unet_matches_eager(tiny, mode):
    x, t, c = unet_inputs()
    with torch.no_grad():
        eager = tiny.apply_model(x, t, c)
        runtime.compile_unet(tiny, mode)
        out = tiny.apply_model(x, t, c)
    assert tiny.dtype == torch.float32 and tiny.device == CPU
    assert rel_err(out, eager) <= COMPILE_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_keep_old_outputs_and_match_eager(mode):
    """Unguided PLMS keeps earlier UNet outputs across steps: with CUDA graphs each must be a clone."""
    from ldm.models.diffusion.plms import PLMSSampler
    model = build(TINY).cuda()
    c = model.get_learned_conditioning(["a cat"] * 2)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()

    def sample():
        s, _ = PLMSSampler(model).sample(S=6, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                                          x_T=x_T.clone())
        return s

    with torch.no_grad():
        eager = sample()
        compiled = runtime.compile_unet(model, mode)
        assert isinstance(compiled, runtime.CloneOutput)
        first, second = sample(), sample()  # the second run replays the recorded graphs
    torch._dynamo.reset()
    assert rel_err(first, eager) <= 1e-3 and rel_err(second, eager) <= 1e-3  # TF32 may be on in kernels


# ----------------------------------------------------------------------------- TF32

def test_enable_tf32_is_a_no_op_off_cuda():
    before = torch.get_float32_matmul_precision()
    assert runtime.enable_tf32(CPU) is False
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.gpu
def test_enable_tf32_on_ampere_or_newer():
    before = torch.get_float32_matmul_precision()
    try:
        on = runtime.enable_tf32(CUDA)
        assert on == (torch.cuda.get_device_capability()[0] >= 8)
        assert torch.get_float32_matmul_precision() == ("high" if on else before)
    finally:
        torch.set_float32_matmul_precision(before)

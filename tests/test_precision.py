"""Reduced precision: bf16/fp16 weights (``load_model(..., dtype=)``) and CPU autocast vs the fp32 eager path.

The fp32 upcasts that numerics need are checked directly (timestep embedding, the UNet's GroupNorm32)
and through whole components: UNet (every attention backend), text encoder, VAE decoder and a few DDIM
steps end to end from the same x_T. Errors are max|low - fp32| / max|fp32| on re-randomised weights.
Tolerances are about twice the errors measured on this CPU (torch 2.14):

    tiny, bf16: UNet 1.6e-2 (math attention 1.8e-2), text 1.2e-2, VAE 9.4e-3, DDIM 5 steps 2.5e-2 (image 2.3e-2)
    tiny, fp16: UNet 2.1e-3 (math attention 2.4e-3), text 1.8e-3, VAE 1.2e-3, DDIM 5 steps 3.6e-3 (image 3.5e-3)
    tiny, fp32 weights under CPU autocast (bf16): UNet 1.5e-2
    medium (17M UNet, 32x32 latent; VAE ch 64, 128x128), bf16: UNet 2.1e-2, VAE 2.2e-2

bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per op), fp16 11 bits (2.4e-4); a network of
a few dozen layers accumulates roughly ten times that.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, build
from helpers import randomize_, rel_err
from ldm.speed import runtime
from ldm.model.attention import set_attention_backend

BF16, FP16 = torch.bfloat16, torch.float16
TOL = {BF16: 4e-2, FP16: 5e-3}        # one component (UNet, text encoder, VAE decoder)
TOL_SAMPLE = {BF16: 6e-2, FP16: 1e-2}  # 5 DDIM steps with CFG, then the VAE
PROMPTS = ["a photo of a cat", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def models():
    """The tiny model in fp32 and cast whole to bf16 and fp16 (what ``load_model(dtype=)`` does)."""
    fp32 = build(TINY)
    return {torch.float32: fp32, BF16: copy.deepcopy(fp32).to(BF16), FP16: copy.deepcopy(fp32).to(FP16)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the local upcasts

@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_timestep_embedding_is_computed_in_fp32_then_cast(models, dtype):
    """At t=999 the sinusoid's arguments reach ~1000 rad: computed in bf16/fp16 they would be off by whole radians."""
    unet = models[dtype].model.diffusion_model
    seen = []
    hook = unet.time_embed[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    t = torch.tensor([0, 1, 500, 999])
    with torch.no_grad():
        unet(torch.zeros(4, 4, 8, 8), t, torch.zeros(4, 77, 64))
    hook.remove()
    half = unet.model_channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    reference = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # float64, closed form
    assert seen[0].dtype == dtype
    assert (seen[0].double() - reference).abs().max().item() <= torch.finfo(dtype).eps  # one rounding at most


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_unet_groupnorm_statistics_are_fp32(models, dtype):
    """GroupNorm32 on a low-precision input with a large mean: within one rounding of the float64 result."""
    norm = models[dtype].model.diffusion_model.out[0]
    x = (20.0 + torch.randn(2, norm.num_channels, 8, 8, generator=gen())).to(dtype)
    with torch.no_grad():
        out = norm(x)
        reference = F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    assert out.dtype == dtype
    assert rel_err(out, reference) <= torch.finfo(dtype).eps


# ----------------------------------------------------------------------------- whole components, tiny

@pytest.mark.parametrize("backend", ["sdpa", "math", "mha"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_unet(models, dtype, backend):
    g = gen()
    x, t, c = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 64, generator=g)
    ref_unet, low_unet = models[torch.float32].model.diffusion_model, models[dtype].model.diffusion_model
    set_attention_backend(low_unet, backend)
    try:
        with torch.no_grad():
            reference, out = ref_unet(x, t, c), low_unet(x, t, c)
    finally:
        set_attention_backend(low_unet, "sdpa")
    assert out.dtype == torch.float32  # the UNet answers in its input's dtype: sampler math stays fp32
    assert rel_err(out, reference) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_text_encoder(models, dtype):
    with torch.no_grad():
        reference = models[torch.float32].get_learned_conditioning(PROMPTS)
        out = models[dtype].get_learned_conditioning(PROMPTS)
    assert out.dtype == dtype
    assert rel_err(out, reference) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_vae_decoder(models, dtype):
    z = torch.randn(1, 4, 8, 8, generator=gen())
    with torch.no_grad():
        reference, out = models[torch.float32].decode_first_stage(z), models[dtype].decode_first_stage(z)
    assert out.dtype == dtype
    assert rel_err(out, reference) <= TOL[dtype]


def test_cpu_autocast_unet(models):
    """--precision autocast with fp32 weights: bf16 matmuls/convs on CPU, norms kept in fp32 by autocast."""
    g = gen()
    x, t, c = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 64, generator=g)
    unet = models[torch.float32].model.diffusion_model
    with torch.no_grad():
        reference = unet(x, t, c)
        with runtime.precision_scope("autocast", torch.device("cpu"), torch.float32):
            out = unet(x, t, c)
    assert rel_err(out, reference) <= TOL[BF16]
    assert rel_err(out, reference) > 1e-5  # autocast really was on


@pytest.mark.parametrize("dtype", [BF16, pytest.param(FP16, marks=pytest.mark.slow)])  # fp16 CPU convs are slow
def test_ddim_end_to_end(models, dtype):
    """5 DDIM steps with CFG from one x_T, then decode: the latents stay fp32 whatever the weights' dtype."""
    from ldm.models.diffusion.ddim import DDIMSampler
    x_T = torch.randn(2, 4, 8, 8, generator=gen(1))

    def sample(model):
        c, uc = model.get_learned_conditioning(PROMPTS), model.get_learned_conditioning(["", ""])
        latents, _ = DDIMSampler(model).sample(S=5, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                                               x_T=x_T.clone(), unconditional_guidance_scale=5.0,
                                               unconditional_conditioning=uc, eta=0.0)
        return latents, model.decode_first_stage(latents)

    with torch.no_grad():
        ref_latents, ref_images = sample(models[torch.float32])
        latents, images = sample(models[dtype])
    assert latents.dtype == torch.float32
    assert rel_err(latents, ref_latents) <= TOL_SAMPLE[dtype]
    assert rel_err(images.float(), ref_images) <= TOL_SAMPLE[dtype]


# ------------------------------------------------------------------- medium size, bf16 only (fp16 CPU convs are slow)

@pytest.mark.slow
def test_medium_unet_bf16():
    from ldm.model.unet import UNetConfig, UNetModel
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=(1, 1, 1),
                     attention_resolutions=(4, 2, 1), num_head_channels=32, context_dim=256,
                     use_linear_in_transformer=True)
    unet = randomize_(UNetModel(cfg).eval())
    g = gen()
    x, t, c = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 256, generator=g)
    with torch.no_grad():
        reference = unet(x, t, c)
        out = unet.to(BF16)(x, t, c)
    assert rel_err(out, reference) <= TOL[BF16]


@pytest.mark.slow
def test_medium_vae_bf16():
    from ldm.model.vae import AutoencoderKL, VAEConfig
    vae = randomize_(AutoencoderKL(VAEConfig(embed_dim=4, z_channels=4, in_channels=3, out_ch=3, ch=64,
                                                    ch_mult=(1, 2, 4, 4), num_res_blocks=2)).eval())
    z = torch.randn(1, 4, 16, 16, generator=gen())
    with torch.no_grad():
        reference = vae.decode(z)
        out = vae.to(BF16).decode(z)
    assert out.shape == (1, 3, 128, 128)
    assert rel_err(out.float(), reference) <= TOL[BF16]

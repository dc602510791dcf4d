"""The full SDXL base architecture against diffusers' StableDiffusionXLPipeline on the same re-randomised weights, fp32
on the CPU, at a small latent size (slow): text embeddings and the pooled embedding, the UNet with the vector
conditioning, the VAE decode, and short Euler and DPM++ 2M runs, each rel max <= 1e-4; then the full refiner's text
tower and UNet (aesthetic score), once the base is gone.

Memory: one fp32 copy of the model (about 14 GB). Ours is built on the meta device and given fresh CPU storage;
diffusers' parts are built on the meta device and loaded with assign=True from our state dict in the released
layout, whose tensors are views of ours (diffusers' converters only rename them; bigG's Q/K/V, split from one
in_proj tensor, are the one copy made: 0.6 GB). The peak RSS of the comparison is asserted."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from helpers import randomize_, rel_err
from ldm.benchmark.measure import peak_memory, reset_peak, rss_bytes
from ldm.model.conditioner import conditioning_batch
from ldm.model.presets import from_name
from ldm.model.sdxl import DiffusionEngine
from ldm.samplers.sigma_api import DPMPP2MSampler, EulerSampler
from test_sdxl import PROMPTS, SIZES, diffusers_parts
from test_sdxl_sampling import ours_and_diffusers

pytestmark = pytest.mark.slow
GB = 1e9
CPU = torch.device("cpu")


def random_full(name: str, seed: int) -> DiffusionEngine:
    """The full-size model with seeded random weights, allocated once (meta device, then empty CPU tensors that
    ``randomize_`` fills: no default initialisation pass over 3.5 B parameters)."""
    with torch.device("meta"):
        model = DiffusionEngine(from_name(name))
    for mod in model.modules():
        for key, p in mod._parameters.items():
            if p is not None and p.is_meta:
                mod._parameters[key] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
    assert not any(t.is_meta for t in model.state_dict().values())  # the derived buffers are real tables
    return randomize_(model, seed).eval()


def release(*modules) -> None:
    """Free the weights' storage now, even if a failed test's traceback still references the modules (pytest keeps
    it in sys.last_traceback): the next class builds another full-size model."""
    for m in modules:
        if isinstance(m, nn.Module):
            m.to("meta")
    gc.collect()


def fp32_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class TestBase:
    """The base (one fp32 copy in memory; released when the class is done)."""

    @pytest.fixture(scope="class")
    @classmethod
    def pair(cls, tmp_path_factory):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
        torch.manual_seed(0)
        cls.baseline = rss_bytes()  # what earlier tests of this process left resident
        model = random_full("sdxl-base", seed=11)
        reset_peak(CPU)
        parts = diffusers_parts(model, tmp_path_factory.mktemp("sdxl-full-tokenizers"))
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(**parts, scheduler=scheduler, force_zeros_for_empty_prompt=True)
        yield model, pipe
        release(model, *pipe.components.values())

    def test_diffusers_parts_share_our_storage(self, pair):
        """Diffusers' UNet and VAE hold our tensors (views), so the comparison never holds two copies of them."""
        model, pipe = pair
        ours = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
        for part in (pipe.unet, pipe.vae):
            own = [t for t in [*part.parameters(), *part.buffers()]]
            assert all(t.untyped_storage().data_ptr() in ours for t in own)
        assert fp32_bytes(model) > 13 * GB  # the whole base: 3.5 B parameters


    @torch.no_grad()
    def test_full_text_embeddings_and_pooled_match_diffusers(self, pair, record_property):
        model, pipe = pair
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=True,
                                                             negative_prompt=None)
        batch = conditioning_batch(PROMPTS, **SIZES)
        c = model.get_learned_conditioning(batch)
        assert c["crossattn"].shape == embeds.shape == (2, 77, 2048) and pooled.shape == (2, 1280)
        assert c["vector"].shape == (2, 2816)
        errors = rel_err(c["crossattn"], embeds), rel_err(c["vector"][:, :1280], pooled)
        record_property("rel_err", errors)
        assert max(errors) <= 1e-4, errors
        uc = model.get_unconditional_conditioning(batch, ["", ""])
        assert not neg.any() and not neg_pooled.any()
        assert torch.equal(uc["crossattn"], neg) and torch.equal(uc["vector"][:, :1280], neg_pooled)


    @torch.no_grad()
    def test_full_unet_with_vector_conditioning_matches_diffusers(self, pair, record_property):
        model, pipe = pair
        g = torch.Generator().manual_seed(1)
        c = model.get_learned_conditioning(conditioning_batch(PROMPTS, **SIZES))
        x, t = torch.randn(2, 4, 16, 12, generator=g), torch.tensor([999, 37])
        ours = model.apply_model(x, t, c)
        time_ids = pipe._get_add_time_ids(SIZES["original_size"], SIZES["crop_top_left"], SIZES["target_size"],
                                          torch.float32, text_encoder_projection_dim=1280).repeat(2, 1)
        theirs = pipe.unet(x, t, encoder_hidden_states=c["crossattn"],
                           added_cond_kwargs={"text_embeds": c["vector"][:, :1280], "time_ids": time_ids}).sample
        err = rel_err(ours, theirs)
        record_property("rel_err", err)
        assert err <= 1e-4, err
        assert theirs.abs().max() > 0.1


    @torch.no_grad()
    def test_full_vae_decode_matches_diffusers(self, pair, record_property):
        model, pipe = pair
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        err = rel_err(model.decode_first_stage(z), pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample)
        record_property("rel_err", err)
        assert err <= 1e-4, err


    @torch.no_grad()
    @pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
    def test_full_short_runs_match_diffusers(self, pair, name, record_property):
        from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
        model, pipe = pair
        if name == "euler":
            sampler, scheduler = EulerSampler, EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading")
        else:
            sampler, scheduler = DPMPP2MSampler, DPMSolverMultistepScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", final_sigmas_type="zero")
        ours, theirs = ours_and_diffusers(model, pipe, sampler, scheduler, 3)
        err = rel_err(ours, theirs)
        record_property("rel_err", err)
        assert err <= 1e-4, err


    def test_full_comparison_held_one_copy(self, pair, record_property):
        """Run last in this file: the peak RSS since diffusers' parts were built stayed within one fp32 copy of the model
        plus the bigG Q/K/V copy and the activations (2.5 GB in all), far below two copies; counted above what the process
        held before the model was built."""
        model, _ = pair
        peak, what = peak_memory(CPU)
        peak -= type(self).baseline
        record_property("peak_gb", (peak / GB, fp32_bytes(model) / GB))
        if what != "peak_rss":
            pytest.skip("no RSS high-water mark on this system")
        assert peak <= fp32_bytes(model) + 2.5 * GB, (peak / GB, fp32_bytes(model) / GB)


class TestRefiner:
    """The refiner (one tower, attention at the middle levels, depth 4, the aesthetic score), after the base."""

    @pytest.fixture(scope="class")
    @classmethod
    def pair(cls, tmp_path_factory):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
        model = random_full("sdxl-refiner", seed=12)
        parts = diffusers_parts(model, tmp_path_factory.mktemp("sdxl-refiner-tokenizers"))
        assert "text_encoder" not in parts
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading")
        pipe = StableDiffusionXLImg2ImgPipeline(**dict(parts, text_encoder=None, tokenizer=None), scheduler=scheduler,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        yield model, pipe
        release(model, *pipe.components.values())

    @torch.no_grad()
    def test_full_refiner_text_and_unet_match_diffusers(self, pair, record_property):
        model, pipe = pair
        batch = conditioning_batch(PROMPTS, SIZES["original_size"], SIZES["crop_top_left"], aesthetic_score=6.0)
        c = model.get_learned_conditioning(batch)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=False)
        assert c["crossattn"].shape == embeds.shape == (2, 77, 1280) and c["vector"].shape == (2, 2560)
        g = torch.Generator().manual_seed(4)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 3])  # 3 downsamplings
        time_ids = torch.tensor([[*SIZES["original_size"], *SIZES["crop_top_left"], 6.0]] * 2)  # diffusers' order
        theirs = pipe.unet(x, t, encoder_hidden_states=c["crossattn"],
                           added_cond_kwargs={"text_embeds": c["vector"][:, :1280], "time_ids": time_ids}).sample
        errors = (rel_err(c["crossattn"], embeds), rel_err(c["vector"][:, :1280], pooled),
                  rel_err(model.apply_model(x, t, c), theirs))
        record_property("rel_err", errors)
        assert max(errors) <= 1e-4, errors
        assert theirs.abs().max() > 0.1

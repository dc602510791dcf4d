"""SDXL's VAE through the engine: the 0.13025 latent scale, the fp32 redo of an overflowing fp16 decode (said on
stderr), and tiled decoding (against diffusers' tiling on the same weights; 2048x2048 in a slow test)."""

from __future__ import annotations

import copy
import resource

import pytest
import torch

from helpers import rel_err
from ldm.model.presets import from_name, load_config, config_file
from ldm.model.sdxl import DiffusionEngine
from test_memory_savers import TOL_DIFFUSERS, _diffusers_tiling, _overflowing
from test_parity_vae import build_pair, image, latent


@pytest.fixture(scope="module")
def engine_and_peer():
    """The tiny SDXL engine holding our VAE, and diffusers' AutoencoderKL on the same weights."""
    engine = DiffusionEngine(from_name("sdxl-tiny"))
    ours, theirs = build_pair(engine.cfg.vae, seed=4)
    engine.first_stage_model = ours
    return engine, theirs


@pytest.mark.parametrize("name", ["sd_xl_base.yaml", "sd_xl_refiner.yaml"])
def test_the_sgm_yamls_scale_latents_by_0_13025(name):
    assert load_config(config_file("sdxl/" + name)).scale_factor == 0.13025
    assert from_name("sdxl-base").scale_factor == from_name("sdxl-refiner").scale_factor == 0.13025


@torch.no_grad()
def test_decode_and_encode_use_the_scale_factor(engine_and_peer):
    engine, theirs = engine_and_peer
    z = latent(engine.cfg.vae, 1, 6, 5, seed=1)
    assert rel_err(engine.decode_first_stage(z * 0.13025), theirs.decode(z).sample) <= TOL_DIFFUSERS
    x = image(engine.cfg.vae, 1, 48, 40, seed=2)
    ours = engine.get_first_stage_encoding(engine.encode_first_stage(x).mode())
    assert rel_err(ours, theirs.encode(x).latent_dist.mode() * 0.13025) <= TOL_DIFFUSERS


@torch.no_grad()
def test_fp16_decode_that_overflows_is_redone_in_fp32(engine_and_peer):
    """The engine's fp16 decode goes non-finite; decode_first_stage warns on stderr and decodes again in fp32."""
    engine = copy.deepcopy(engine_and_peer[0])
    engine.first_stage_model = _overflowing(engine.first_stage_model).half()
    z = latent(engine.cfg.vae, 1, 4, 4, seed=3).half() * 0.13025
    assert not torch.isfinite(engine.first_stage_model.decode(z / 0.13025)).all()  # the precondition
    with pytest.warns(UserWarning, match="VAE decode in float16 produced non-finite values; decoding again"):
        out = engine.decode_first_stage(z)
    assert torch.isfinite(out).all() and out.dtype == torch.float16
    ref = copy.deepcopy(engine.first_stage_model).float().decode((z / 0.13025).float())  # z scaled in fp16, as there
    assert torch.equal(out, ref.half())


@torch.no_grad()
def test_tiled_decode_matches_diffusers_tiling(engine_and_peer):
    engine, theirs = engine_and_peer
    engine.first_stage_model.set_memory_savers(tiling=True, tile_latent=8, overlap=0.25)
    _diffusers_tiling(theirs, 8, 0.25, 2 ** (len(engine.cfg.vae.ch_mult) - 1))
    try:
        z = latent(engine.cfg.vae, 1, 20, 14, seed=5)
        err = rel_err(engine.decode_first_stage(z * 0.13025), theirs.decode(z).sample)
    finally:
        engine.first_stage_model.set_memory_savers()
        theirs.disable_tiling()
    assert err <= TOL_DIFFUSERS, err


@pytest.mark.slow
@torch.no_grad()
def test_2048_tiled_decode_in_bounded_memory():
    """A 2048x2048 image (256x256 latents) decodes in 64-latent tiles; the peak RSS stays far below what the untiled
    decoder's full-resolution activations would need (measured about 1 GB each for the tiny VAE's widest level)."""
    engine = DiffusionEngine(from_name("sdxl-tiny"))
    engine.first_stage_model.set_memory_savers(tiling=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # GB (Linux: kB)
    out = engine.decode_first_stage(torch.randn(1, 4, 256, 256, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 3, 2048, 2048) and torch.isfinite(out).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    assert peak - before < 3.0, (before, peak)

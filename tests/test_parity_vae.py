"""VAE parity with diffusers' AutoencoderKL on the same random weights: decode and the encoder's mean."""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import SD2, TINY
from helpers import load_on_meta, randomize_, rel_err, small_norm_inputs
from ldm.model.presets import load_config
from ldm.model.vae import AutoencoderKL, VAEConfig

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max|ours - diffusers| / max|diffusers|, fp32
MODES = ["plain", "small_input", "small_norm_inputs"]


def diffusers_config(cfg: VAEConfig) -> dict:
    """AutoencoderKL kwargs for the same architecture."""
    levels = len(cfg.ch_mult)
    assert cfg.embed_dim == cfg.z_channels, "diffusers' quant convs keep latent_channels"
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32, act_fn="silu",
        mid_block_add_attention=cfg.attn != "none", use_quant_conv=True, use_post_quant_conv=True)


def build_pair(cfg: VAEConfig, seed: int):
    """(ours, diffusers') with the same re-randomised weights, mapped by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ours = randomize_(AutoencoderKL(cfg), seed).eval()
    config = diffusers_config(cfg)
    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ours.state_dict().items()},
                                           config)
    theirs = load_on_meta(lambda: diffusers.AutoencoderKL(**config), converted)
    return ours, theirs


def run(ours, theirs, direction: str, x: torch.Tensor, mode: str) -> float:
    """rel error of decode(z) or encode(image).mean; ``x`` is the latent or the image.

    The norm hooks (identity unless small_norm_inputs) also check both sides have the same norms.
    """
    if mode == "small_input":  # the first GroupNorm sees a ~1e-3 signal, so its eps matters
        x = x * 1e-3
    with torch.no_grad(), small_norm_inputs(ours, theirs, factor=1e-3 if mode == "small_norm_inputs" else 1.0) as n:
        assert n[0] == n[1], f"norm count differs: ours {n[0]}, diffusers {n[1]}"
        if direction == "decode":
            return rel_err(ours.decode(x), theirs.decode(x).sample)
        return rel_err(ours.encode(x).mean, theirs.encode(x).latent_dist.mean)


def latent(cfg: VAEConfig, batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, cfg.embed_dim, h, w, generator=torch.Generator().manual_seed(seed))


def image(cfg: VAEConfig, batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Uniform in [-1, 1], as images are fed to the encoder; H != W so a transposed reshape cannot pass."""
    return torch.rand(batch, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny_pair():
    return build_pair(load_config(TINY).vae, seed=1)


@pytest.mark.parametrize("mode", MODES)
def test_tiny_vae_decode_matches_diffusers(tiny_pair, mode, record_property):
    ours, theirs = tiny_pair
    rel = run(ours, theirs, "decode", latent(ours.cfg, 2, 8, 12), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


@pytest.mark.parametrize("mode", MODES)
def test_tiny_vae_encode_mean_matches_diffusers(tiny_pair, mode, record_property):
    ours, theirs = tiny_pair
    rel = run(ours, theirs, "encode", image(ours.cfg, 2, 64, 96), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


@pytest.fixture(scope="module")
def full_pair():
    pair = list(build_pair(load_config(SD2).vae, seed=1))
    yield pair
    pair.clear()  # pytest keeps the fixture value until the session ends; free it now
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_full_sd2_vae_decode_matches_diffusers(full_pair, mode, record_property):
    ours, theirs = full_pair
    rel = run(ours, theirs, "decode", latent(ours.cfg, 1, 16, 16), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_full_sd2_vae_encode_mean_matches_diffusers(full_pair, mode, record_property):
    ours, theirs = full_pair
    rel = run(ours, theirs, "encode", image(ours.cfg, 1, 128, 96), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel

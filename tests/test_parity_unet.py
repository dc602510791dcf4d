"""UNet parity with diffusers' UNet2DConditionModel on the same random weights, and across attention backends."""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import SD2, TINY
from helpers import load_on_meta, randomize_, rel_err, small_norm_inputs
from ldm.attention import set_attention_backend
from ldm.checkpoint import load_config, to_original
from ldm.unet import UNetConfig, UNetModel

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max|ours - diffusers| / max|diffusers|, fp32
BACKEND_TOL = 1e-5
MODES = ["plain", "small_input", "small_norm_inputs"]


def diffusers_config(cfg: UNetConfig) -> dict:
    """UNet2DConditionModel kwargs for the same architecture."""
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2 ** level in cfg.attention_resolutions for level in range(len(channels))]
    assert len(set(cfg.num_res_blocks)) == 1, "diffusers' converter takes one layers_per_block"
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=cfg.num_res_blocks[0],
        # For UNet2DConditionModel ``attention_head_dim`` is the NUMBER of heads (diffusers' legacy
        # naming; SD2's [5, 10, 20, 20]), so head width = channels / it = num_head_channels.
        attention_head_dim=[cfg.heads_at(c)[0] for c in channels],
        cross_attention_dim=cfg.context_dim, use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=cfg.transformer_depth, flip_sin_to_cos=True, freq_shift=0,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", upcast_attention=False)


def build_pair(cfg: UNetConfig, seed: int):
    """(ours, diffusers') with the same re-randomised weights, mapped by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    ours = randomize_(UNetModel(cfg), seed).eval()
    config = diffusers_config(cfg)
    original = {f"model.diffusion_model.{k}": v for k, v in to_original(ours.state_dict()).items()}
    converted = convert_ldm_unet_checkpoint(original, config)
    theirs = load_on_meta(lambda: diffusers.UNet2DConditionModel(**config), converted)
    return ours, theirs


def inputs(cfg: UNetConfig, h: int, w: int, seed: int = 0):
    """Batch 2 at two different timesteps; H != W so a transposed reshape cannot pass."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    return x, torch.tensor([10, 900]), context


def compare(ours, theirs, x, t, context, mode: str) -> float:
    """rel error of eps; the norm hooks (identity unless small_norm_inputs) also check both have the same norms."""
    if mode == "small_input":  # the first GroupNorm sees a ~1e-3 signal, so its eps matters
        x = x * 1e-3
    with torch.no_grad(), small_norm_inputs(ours, theirs, factor=1e-3 if mode == "small_norm_inputs" else 1.0) as n:
        assert n[0] == n[1], f"norm count differs: ours {n[0]}, diffusers {n[1]}"
        want = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    return rel_err(got, want)


@pytest.fixture(scope="module")
def tiny_pair():
    return build_pair(load_config(TINY).unet, seed=1)


@pytest.mark.parametrize("mode", MODES)
def test_tiny_unet_matches_diffusers(tiny_pair, mode, record_property):
    ours, theirs = tiny_pair
    rel = compare(ours, theirs, *inputs(ours.cfg, 8, 12), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


def backend_errors(unet: UNetModel, x, t, context) -> dict[str, float]:
    """rel error of every backend against sdpa; restores sdpa."""
    outs = {}
    try:
        for backend in ("sdpa", "mha", "math"):
            set_attention_backend(unet, backend)
            with torch.no_grad():
                outs[backend] = unet(x, t, context)
    finally:
        set_attention_backend(unet, "sdpa")
    return {b: rel_err(outs[b], outs["sdpa"]) for b in ("mha", "math")}


def test_tiny_attention_backends_agree(record_property):
    cfg = load_config(TINY).unet
    # Non-zero Q/K/V biases here: the mha backend applies in_proj_bias itself, checking our chunking.
    unet = randomize_(UNetModel(cfg), seed=2, qkv_bias=True).eval()
    errs = backend_errors(unet, *inputs(cfg, 8, 12))
    record_property("rel_err", errs)
    assert max(errs.values()) <= BACKEND_TOL, errs


@pytest.fixture(scope="module")
def full_pair():
    pair = list(build_pair(load_config(SD2).unet, seed=1))
    yield pair
    pair.clear()  # pytest keeps the fixture value until the session ends; free the 3.5 GB now
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_full_sd2_unet_matches_diffusers(full_pair, mode, record_property):
    ours, theirs = full_pair
    rel = compare(ours, theirs, *inputs(ours.cfg, 16, 24), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


@pytest.mark.slow
def test_full_sd2_attention_backends_agree(full_pair, record_property):
    ours, _ = full_pair
    errs = backend_errors(ours, *inputs(ours.cfg, 8, 16))  # small: three full-size forwards
    record_property("rel_err", errs)
    assert max(errs.values()) <= BACKEND_TOL, errs

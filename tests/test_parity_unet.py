"""UNet parity with diffusers' UNet2DConditionModel on the same random weights, and across attention backends."""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import SD2, TINY
from helpers import load_on_meta, randomize_, rel_err, small_norm_inputs
from ldm.model.attention import set_attention_backend
from ldm.model.presets import load_config
from ldm.weights.layout import to_original
from ldm.model.unet import UNetConfig, UNetModel

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max|ours - diffusers| / max|diffusers|, fp32
BACKEND_TOL = 1e-5
MODES = ["plain", "small_input", "small_norm_inputs"]


def diffusers_config(cfg: UNetConfig) -> dict:
    """UNet2DConditionModel kwargs for the same architecture (the benchmark peer's mapping, one place)."""
    from ldm.benchmark.export import unet_config
    return unet_config(cfg)


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

"""Shared fixtures: tiny random models built from the repo's tiny configs."""

from __future__ import annotations

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny", "v2-tiny.yaml")
TINY_V = os.path.join(ROOT, "configs", "tiny", "v2-tiny-v.yaml")
SD2 = os.path.join(ROOT, "configs", "stable-diffusion", "v2-inference.yaml")


def build(config_path: str, seed: int = 0):
    """A LatentDiffusion from a yaml, every parameter random (seeded), on the CPU in fp32."""
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(config_path).model)
    randomize_(model, seed)
    return model


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-randomise every parameter (zero-initialised ones included) so zero init hides nothing.

    The UNet's Q/K/V biases stay zero: SD checkpoints have none, so they are structurally zero.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("attn1.in_proj_bias", "attn2.in_proj_bias")):
                p.zero_()  # the original layout (and diffusers) has no Q/K/V bias in the UNet
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight") and ("norm" in name or "ln_" in name or ".in_layers.0" in name
                                              or ".out_layers.0" in name or name.endswith("out.0.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="session")
def tiny_model():
    return build(TINY)


@pytest.fixture(scope="session")
def tiny_model_v():
    return build(TINY_V)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

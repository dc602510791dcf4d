"""Shared fixtures: tiny random models built from the repo's tiny configs."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import randomize_

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

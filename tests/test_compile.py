"""The UNet compiles with fullgraph=True, matches eager, and has no graph breaks."""

from __future__ import annotations

import pytest
import torch

from conftest import SD2
from ldm.model.attention import set_attention_backend


def _inputs(context_dim: int, hw: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, hw, hw, generator=g), torch.tensor([10, 900]),
            torch.randn(2, 77, context_dim, generator=g))


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("mha", marks=pytest.mark.slow),
                                     pytest.param("math", marks=pytest.mark.slow)])
def test_fullgraph_compile_matches_eager(tiny_model, backend):
    unet = tiny_model.model.diffusion_model
    set_attention_backend(unet, backend)
    try:
        x, t, c = _inputs(64)
        with torch.no_grad():
            eager = unet(x, t, c)
            torch._dynamo.reset()
            compiled = torch.compile(unet, fullgraph=True)(x, t, c)
        rel = ((compiled - eager).abs().max() / eager.abs().max()).item()
        assert rel <= 1e-4, rel
    finally:
        set_attention_backend(unet, "sdpa")
        torch._dynamo.reset()


def _graph_breaks(unet, x, t, c) -> int:
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(unet)(x, t, c)
    torch._dynamo.reset()
    return explanation.graph_break_count, explanation.graph_count


@pytest.mark.parametrize("backend", ["sdpa", "mha", "math"])
def test_tiny_unet_has_no_graph_breaks(tiny_model, backend):
    unet = tiny_model.model.diffusion_model
    set_attention_backend(unet, backend)
    try:
        assert _graph_breaks(unet, *_inputs(64)) == (0, 1)
    finally:
        set_attention_backend(unet, "sdpa")


@pytest.mark.slow
def test_full_sd2_unet_has_no_graph_breaks():
    from ldm.model.presets import load_config
    from ldm.model.unet import UNetModel
    unet = UNetModel(load_config(SD2).unet).eval()
    assert _graph_breaks(unet, *_inputs(1024, hw=8)) == (0, 1)

"""Helpers shared by the tests: seeded re-randomisation, relative error, small-signal norms, meta loading."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ldm.model.attention import CrossAttention

NORMS = (nn.GroupNorm, nn.LayerNorm)


def randomize_(module: nn.Module, seed: int = 0, qkv_bias: bool = False) -> nn.Module:
    """Re-randomise every parameter (zero-initialised ones included) so zero init hides nothing.

    Weights get std 1/sqrt(fan_in), norm weights 1 + 0.1 N(0,1), every other vector 0.1 N(0,1).
    The UNet's Q/K/V biases (``CrossAttention.in_proj_bias``) stay zero unless ``qkv_bias``: SD
    checkpoints, the original layout and diffusers have none.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, CrossAttention) and name == "in_proj_bias" and not qkv_bias:
                    p.zero_()
                elif isinstance(mod, NORMS) and name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max|ours - theirs| / max|theirs|."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


@contextlib.contextmanager
def small_norm_inputs(*modules: nn.Module, factor: float = 1e-3) -> Iterator[list[int]]:
    """Scale the input of every GroupNorm/LayerNorm in ``modules`` by ``factor`` while active.

    Without eps a norm ignores the scale of its input; at 1e-3 the variance (~1e-6) is below the
    usual eps (1e-5/1e-6), so an eps that differs from the reference's changes the output at the
    percent level in every norm of the network, not only the first one an input reaches.
    Yields the number of hooked norms per module, so callers can check both sides hook alike.
    """
    handles, counts = [], []
    hook = lambda mod, args: (args[0] * factor, *args[1:])
    for module in modules:
        norms = [m for m in module.modules() if isinstance(m, NORMS)]
        handles += [m.register_forward_pre_hook(hook) for m in norms]
        counts.append(len(norms))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def load_on_meta(factory: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build ``factory()`` on the meta device and load ``state_dict`` strictly with assign=True (shares storage)."""
    with torch.device("meta"):
        model = factory()
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not loaded: {left[:5]}"
    return model.eval()



def script_main(name: str) -> Callable:
    """``main`` of scripts/<name>.py, imported in this process (for fast bad-input tests)."""
    import importlib
    import os
    import sys
    scripts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
    sys.path.insert(0, scripts)
    try:
        return importlib.import_module(name).main
    finally:
        sys.path.remove(scripts)


def need_disk(folder, gb: float) -> None:
    """Skip (with the numbers) when ``folder``'s disk has less than ``gb`` GB free: a full-size test
    that cannot write its checkpoint says so instead of failing half-way with ENOSPC."""
    import shutil
    import pytest
    free = shutil.disk_usage(folder).free / 1e9
    if free < gb:
        pytest.skip(f"needs {gb:.1f} GB free disk in {folder}, {free:.1f} GB free")

"""Text conditioning parity with open_clip's own text tower on the same random weights.

The reference is computed as the original ``FrozenOpenCLIPEmbedder.encode_with_transformer`` does,
from open_clip's modules: token + positional embedding, open_clip's resblocks with its causal
``attn_mask`` (all but the last one for ``penultimate``), then ``ln_final``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SD2, TINY
from helpers import load_on_meta, randomize_, rel_err, small_norm_inputs
from ldm.model.presets import load_config
from ldm.model.openclip import FrozenOpenCLIPEmbedder, TextConfig

open_clip = pytest.importorskip("open_clip")

SD1_TINY = os.path.join(ROOT, "configs", "tiny", "v1-tiny.yaml")
TOL = 1e-4  # max|ours - open_clip| / max|open_clip|, fp32
MODES = ["plain", "small_input", "small_norm_inputs"]
PROMPTS = ["a professional photograph of an astronaut riding a horse", ""]


def open_clip_tower(embed_dim: int, text_cfg: dict, quick_gelu: bool = False) -> torch.nn.Module:
    """open_clip's text tower exactly as its CLIP class builds it, with no pretrained weights."""
    from open_clip.model import _build_text_tower
    return _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu).eval()


def reference(tower: torch.nn.Module, tokens: torch.Tensor, layer: str) -> torch.Tensor:
    """The original FrozenOpenCLIPEmbedder.encode_with_transformer over open_clip's modules."""
    x = tower.token_embedding(tokens) + tower.positional_embedding  # (B, T, W)
    batch_first = getattr(tower.transformer, "batch_first", True)
    x = x if batch_first else x.transpose(0, 1)
    blocks = tower.transformer.resblocks
    for block in blocks[: len(blocks) - (1 if layer == "penultimate" else 0)]:
        x = block(x, attn_mask=tower.attn_mask)
    x = x if batch_first else x.transpose(0, 1)
    return tower.ln_final(x)


def build_pair(cfg: TextConfig, tower: torch.nn.Module, seed: int):
    """(ours, open_clip tower): the tower re-randomised, ours built on meta and given the same tensors."""
    randomize_(tower, seed)
    sd = {f"model.{k}": v for k, v in tower.state_dict().items()}
    sd["model.logit_scale"] = torch.ones([])  # CLIP's, not the text tower's; unused for conditioning
    return load_on_meta(lambda: FrozenOpenCLIPEmbedder(cfg), sd), tower


@contextlib.contextmanager
def small_embeddings(ours: FrozenOpenCLIPEmbedder, tower: torch.nn.Module, factor: float):
    """Scale token + positional embedding by ``factor`` (at the first block's input) on both sides."""
    hook = lambda mod, args: (args[0] * factor, *args[1:])
    handles = [ours.model.transformer.resblocks[0].register_forward_pre_hook(hook),
               tower.transformer.resblocks[0].register_forward_pre_hook(hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def compare(ours: FrozenOpenCLIPEmbedder, tower: torch.nn.Module, mode: str) -> float:
    tokens = ours.tokenize(PROMPTS)
    scale = contextlib.nullcontext()
    if mode == "small_input":  # the first ln_1 sees a ~1e-3 signal, so its eps matters
        scale = small_embeddings(ours, tower, 1e-3)
    elif mode == "small_norm_inputs":
        scale = small_norm_inputs(ours, tower, factor=1e-3)
    with torch.no_grad(), scale as n:
        assert n is None or n[0] == n[1], f"norm count differs: ours {n[0]}, open_clip {n[1]}"
        want = reference(tower, tokens, ours.cfg.layer)
        got = ours.encode_with_transformer(tokens)
    return rel_err(got, want)


def tiny_pair(layer: str):
    cfg = dataclasses.replace(load_config(TINY).text, layer=layer)
    text_cfg = dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                    heads=cfg.heads, layers=cfg.layers)
    return build_pair(cfg, open_clip_tower(cfg.embed_dim, text_cfg), seed=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_tiny_text_matches_open_clip(layer, mode, record_property):
    rel = compare(*tiny_pair(layer), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


@pytest.fixture(scope="module")
def full_pair():
    cfg = load_config(SD2).text
    assert cfg.layer == "penultimate"
    mc = open_clip.get_model_config("ViT-H-14")  # the tower's shape from open_clip, not from our mapping
    tower = open_clip_tower(mc["embed_dim"], mc["text_cfg"], quick_gelu=mc.get("quick_gelu", False))
    pair = list(build_pair(cfg, tower, seed=1))
    del tower
    yield pair
    pair.clear()  # pytest keeps the fixture value until the session ends; free it now
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_full_vit_h14_text_matches_open_clip(full_pair, mode, record_property):
    rel = compare(*full_pair, mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


def test_arch_table_and_tokenizer_match_open_clip_without_importing_it():
    """The arch table and tokenizer are read from open_clip's files without its package import (seconds of
    torchvision/timm/dynamo imports): same shapes as get_model_config, same tokens as open_clip.tokenize."""
    from ldm.model.openclip import open_clip_tokenizer
    for arch in ("ViT-H-14", "ViT-L-14", "ViT-bigG-14"):
        mc = open_clip.get_model_config(arch)
        cfg = TextConfig.from_params({"arch": arch})
        t = mc["text_cfg"]
        assert (cfg.width, cfg.heads, cfg.layers, cfg.embed_dim) == (t["width"], t["heads"], t["layers"],
                                                                     mc["embed_dim"])
    with pytest.raises(ValueError, match="unknown open_clip arch"):
        TextConfig.from_params({"arch": "ViT-nonesuch"})
    prompts = PROMPTS + ["Naïve café &amp; <b>HTML</b>, emoji 🐈 and   spaces", "x " * 100, "A photo!!"]
    assert torch.equal(open_clip_tokenizer().tokenize(prompts, context_length=77), open_clip.tokenize(prompts))
    # nor torch._dynamo, which nn.init on the meta device imported (a second more)
    code = ("import sys, torch; from ldm.model.presets import load_config; from ldm.model.diffusion import model_class; "
            "from ldm.model.openclip import open_clip_tokenizer\n"
            f"for path in ({SD2!r}, {SD1_TINY!r}):\n"
            "    cfg = load_config(path)\n"
            "    with torch.device('meta'): model_class(cfg)(cfg)\n"
            "open_clip_tokenizer().tokenize(['a'], context_length=77)\n"
            "print(sorted(m for m in ('open_clip', 'torchvision', 'timm', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]

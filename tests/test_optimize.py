"""Speed transformations (ldm.speed.optimize) against the fp32 eager model and independent references.

Tolerances: fused/unfused projections and channels_last change only the order of float sums, so
they must agree to 1e-5 relative (max abs error over max abs value); int8 changes the numbers by
design, bounded at 5e-2 relative on the UNet output (measured ~4e-2 on the tiny model).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from conftest import TINY, build
from helpers import randomize_, rel_err
from ldm.model.attention import CrossAttention, set_attention_backend
from ldm.speed.optimize import (INT8_HELP, Conv1x1Linear, int8_targets, quantize_int8, set_fused_projections,
                          swap_conv1x1_to_linear, to_channels_last)

EXACT = 1e-5  # fp32, same math in another order
INT8 = 5e-2  # dynamic int8 activations and weights, whole UNet


@pytest.fixture(scope="module")
def model():
    return build(TINY, seed=3).eval()


@pytest.fixture
def unet(model):
    return copy.deepcopy(model.model.diffusion_model)


def _inputs(hw: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, hw, hw, generator=g), torch.tensor([10, 900]),
            torch.randn(2, 77, 64, generator=g))


def _keys(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


# ----------------------------------------------------------------------------- fused projections

def test_fused_and_unfused_unet_agree(unet):
    x, t, c = _inputs()
    keys = _keys(unet)
    with torch.no_grad():
        assert set_fused_projections(unet, True) == 14  # 7 transformers x (attn1, attn2)
        fused = unet(x, t, c)
        assert set_fused_projections(unet, False) == 14
        split = unet(x, t, c)
    assert rel_err(split, fused) <= EXACT
    assert _keys(unet) == keys


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("backend", ["sdpa", "math", "mha"])
def test_attention_matches_nn_multihead_attention(fused, backend):
    """Both layouts load into torch's nn.MultiheadAttention unchanged and give its outputs (Q/K/V biases nonzero)."""
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 48, generator=g)
    for context_dim, kv in ((None, x), (48, ctx)):
        ours = randomize_(CrossAttention(32, context_dim, heads=4, dim_head=8, backend=backend, fused=fused),
                          seed=2, qkv_bias=True).eval()
        ref = nn.MultiheadAttention(32, 4, kdim=context_dim, vdim=context_dim, batch_first=True).eval()
        ref.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            expected, _ = ref(x, kv, kv, need_weights=False)
            got = ours(x, None if context_dim is None else ctx)
        assert rel_err(got, expected) <= EXACT, (context_dim, backend, fused)


def test_fused_kv_follows_reloaded_and_edited_weights():
    """K and V live in one packed parameter: loading or editing k/v through the checkpoint keys reaches the matmul."""
    attn = randomize_(CrossAttention(32, 48, heads=4, dim_head=8), seed=4, qkv_bias=True).eval()
    assert [k for k in attn.state_dict()] == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                                              "out_proj.weight", "out_proj.bias"]
    assert "kv_proj_weight" not in attn.state_dict()
    g = torch.Generator().manual_seed(5)
    new = {k: torch.randn(v.shape, generator=g) / 8 for k, v in attn.state_dict().items()}
    attn.load_state_dict(new, strict=True)
    with torch.no_grad():
        attn.state_dict()["v_proj_weight"].mul_(-2.0)  # an in-place edit through the state_dict view
    new["v_proj_weight"] = new["v_proj_weight"] * -2.0
    ref = nn.MultiheadAttention(32, 4, kdim=48, vdim=48, batch_first=True).eval()
    ref.load_state_dict(new, strict=True)
    x, ctx = torch.randn(1, 5, 32, generator=g), torch.randn(1, 6, 48, generator=g)
    with torch.no_grad():
        assert rel_err(attn(x, ctx), ref(x, ctx, ctx, need_weights=False)[0]) <= EXACT


def test_fused_kv_loading_reports_checkpoint_keys():
    attn = CrossAttention(32, 48, heads=4, dim_head=8)
    sd = attn.state_dict()
    result = attn.load_state_dict({k: v for k, v in sd.items() if k != "v_proj_weight"}, strict=False)
    assert result.missing_keys == ["v_proj_weight"] and result.unexpected_keys == []
    result = attn.load_state_dict({k: v for k, v in sd.items() if k not in ("k_proj_weight", "v_proj_weight")},
                                  strict=False)
    assert sorted(result.missing_keys) == ["k_proj_weight", "v_proj_weight"]
    bad = dict(sd, k_proj_weight=torch.zeros(32, 40), v_proj_weight=torch.zeros(32, 40))
    with pytest.raises(RuntimeError, match="size mismatch for k_proj_weight/v_proj_weight"):
        attn.load_state_dict(bad)


def test_unfused_unet_has_no_graph_breaks(unet):
    set_fused_projections(unet, False)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(unet)(*_inputs())
    torch._dynamo.reset()
    assert (explanation.graph_break_count, explanation.graph_count) == (0, 1)


# ----------------------------------------------------------------------------- channels_last

def _conv_input_layouts(module: nn.Module, run) -> list[tuple[str, bool, bool]]:
    """(name, NCHW-contiguous, channels_last-contiguous) of every Conv2d's input during ``run()``."""
    seen, handles = [], []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            hook = lambda mod, args, name=name: seen.append(
                (name, args[0].is_contiguous(), args[0].is_contiguous(memory_format=torch.channels_last)))
            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_channels_last_unet_matches_and_keeps_its_layout(unet):
    x, t, c = _inputs()
    keys = _keys(unet)
    nchw = _conv_input_layouts(unet, lambda: unet(x, t, c))
    with torch.no_grad():
        expected = unet(x, t, c)
    assert all(contiguous for _, contiguous, _ in nchw), [n for n, ok, _ in nchw if not ok]
    assert to_channels_last(unet) == 25
    cl = _conv_input_layouts(unet, lambda: unet(x, t, c))
    # every conv but the first (fed the NCHW latent) sees channels_last activations, SpatialTransformer outputs too
    assert cl[0][0] == "input_blocks.0.0" and all(ok for _, _, ok in cl[1:]), [n for n, _, ok in cl if not ok]
    with torch.no_grad():
        got = unet(x, t, c)
    assert rel_err(got, expected) <= EXACT
    assert _keys(unet) == keys


def test_channels_last_vae_matches(model):
    vae = copy.deepcopy(model.first_stage_model)
    g = torch.Generator().manual_seed(6)
    z, img = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        expected = vae.decode(z), vae.encode(img).mean
        to_channels_last(vae)
        got = vae.decode(z), vae.encode(img).mean
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= EXACT
    for run, first in ((lambda: vae.decode(z), "post_quant_conv"), (lambda: vae.encode(img), "encoder.conv_in")):
        seen = _conv_input_layouts(vae, run)
        assert [n for n, _, cl in seen if not cl] == [first]  # only the conv fed the NCHW input


@pytest.mark.slow  # about a minute of inductor compilation on a small CPU
def test_channels_last_compiled_matches_eager(unet):
    x, t, c = _inputs()
    with torch.no_grad():
        expected = unet(x, t, c)
        to_channels_last(unet)
        torch._dynamo.reset()
        try:
            got = torch.compile(unet, fullgraph=True)(x, t, c)
        finally:
            torch._dynamo.reset()
    assert rel_err(got, expected) <= 1e-4  # compiled kernels reassociate more than eager (as in test_compile)


# ----------------------------------------------------------------------------- int8

def _int8_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric per-token int8 activations, per-output-row int8 weights, integer matmul, rescale.

    Symmetric int8 maps [-amax, amax] onto the 255 steps of [-128, 127]: scale = amax / 127.5, q =
    clamp(round(t * (1 / scale))), computed in fp32 so that ties round as in torchao; the matmul of
    the integers is exact in fp64.
    """
    def quant(t):  # (rows, k) -> int-valued (rows, k), (rows, 1)
        scale = t.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps) / 127.5
        return (t * (1.0 / scale)).round().clamp(-128, 127), scale
    (xq, sx), (wq, sw) = quant(x.float()), quant(w.float())
    return (xq.double() @ wq.double().T) * sx.double() * sw.double().T + b.double()


def test_int8_linear_is_per_token_per_row_int8():
    pytest.importorskip("torchao")
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(64, 96)
    randomize_(lin, seed=7)
    x = torch.randn(33, 64, generator=g)
    expected = _int8_reference(x, lin.weight.detach(), lin.bias.detach())
    exact = lin(x).detach().double()
    quantize_int8(nn.Sequential(lin), min_features=0, inductor_config=False)
    with torch.no_grad():
        got = lin(x).double()
    assert rel_err(got, expected) <= 1e-5  # the same integers, only float rounding of the scales differs
    assert 1e-3 < rel_err(got, exact) < 2e-2  # and it is really int8


def test_int8_unet_close_to_fp32_and_keys_kept(unet):
    pytest.importorskip("torchao")
    x, t, c = _inputs()
    keys = [k for k, _ in _keys(unet)]
    with torch.no_grad():
        expected = unet(x, t, c)
    assert int8_targets(unet) == []  # the tiny UNet (32/64 channels) has nothing worth it at the default 320
    names = quantize_int8(unet, min_features=16, inductor_config=False)
    # per transformer: proj_in, QKV, out_proj, GEGLU, FF out, Q, out_proj, proj_out; embeddings and K/V stay float
    assert len(names) == 7 * 8 and not any("emb" in n or "kv_proj" in n for n in names)
    assert type(unet.input_blocks[1][1].transformer_blocks[0].attn1.in_proj_weight).__name__ == "Int8Tensor"
    assert type(unet.time_embed[0].weight) is nn.Parameter
    with torch.no_grad():
        fused = unet(x, t, c)
        set_fused_projections(unet, False)  # row slices of the int8 packed weights
        split = unet(x, t, c)
    assert 1e-3 < rel_err(fused, expected) < INT8
    assert rel_err(split, fused) <= EXACT
    assert [k for k, _ in _keys(unet)] == keys


@pytest.mark.slow  # minutes of inductor compilation on a small CPU
def test_int8_compiled_close_to_fp32(unet):
    """Compiled int8 stays within the int8 bound. It is not compared tightly with eager int8: a 1e-6 relative
    change of the input already moves the tiny int8 UNet's output by ~2e-2 (roundings flip and spread)."""
    pytest.importorskip("torchao")
    x, t, c = _inputs()
    with torch.no_grad():
        expected = unet(x, t, c)
        quantize_int8(unet, min_features=16, inductor_config=False)
        to_channels_last(unet)
        eager = unet(x, t, c)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(unet, fullgraph=True)(x, t, c)
        finally:
            torch._dynamo.reset()
    assert 1e-3 < rel_err(compiled, expected) < INT8
    assert rel_err(compiled, eager) < INT8


def test_int8_refuses_mha_backend(unet):
    pytest.importorskip("torchao")
    set_attention_backend(unet, "mha")
    with pytest.raises(ValueError, match="mha"):
        quantize_int8(unet, min_features=16)


def test_int8_without_torchao_is_one_clear_error(unet, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ValueError, match="^--int8 needs torchao: pip install torchao$"):
        quantize_int8(unet)
    assert INT8_HELP == "--int8 needs torchao: pip install torchao"


def test_conv1x1_as_linear_matches_conv(model):
    conv = randomize_(nn.Conv2d(24, 40, 1), seed=8)
    x = torch.randn(2, 24, 5, 7, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(Conv1x1Linear.from_conv(conv)(x), conv(x)) <= EXACT
    vae = copy.deepcopy(model.first_stage_model)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    keys = [k for k, _ in _keys(vae)]
    with torch.no_grad():
        expected = vae.decode(z)
        names = swap_conv1x1_to_linear(vae)
        got = vae.decode(z)
    assert "post_quant_conv" in names and any("nin_shortcut" in n for n in names)
    assert rel_err(got, expected) <= EXACT
    assert [k for k, _ in _keys(vae)] == keys

"""Fewer FLOPs per image (ldm.samplers.caching): DeepCache, T-GATE and guidance that stops early.

- At their no-op settings (interval 1, a gate at the last step, a guidance end of 1.0) the caching code runs
  (its call counts say so) and gives exactly the uncached latents, for every sampler and img2img's decode.
- Against the reference packages on diffusers' pipeline built from the same random weights (PLMS = PNDM):
  ``deepcache``'s DeepCacheSDHelper, ``tgate``'s TgateSDLoader and TgateSDDeepCacheLoader (PyPI's tgate 1.0 is
  TGATE-V2, which also caches self-attention; ``sp_interval=1, fi_interval=1`` switches that off, leaving the
  paper's T-GATE, ours) and diffusers' own SDCFGCutoffCallback: the same latents to ~1e-6. Where the two are
  not the same algorithm it is said: DeepCache's helper numbers PNDM's calls by the index of their timestep,
  and PNDM repeats its second timestep, so with interval 2 its calls 1 and 2 are one "step"; ours counts calls.
- The FLOPs of a run (torch's FlopCounterMode, math attention so that attention matmuls count) equal the
  method's arithmetic: calls x per-call FLOPs of each kind, the shallow call being the sum of the blocks it runs
  and a T-GATE call the full one less each block's cross-attention in closed form.
- A compiled UNet: one graph per kind of call (``graph_kinds``), none recompiled on a second run, no graph
  breaks (fullgraph); features kept across calls survive a CUDA-graph-like buffer reuse through CloneOutput.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, TINY, TINY_V, build
from helpers import rel_err
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.samplers.caching import Caching, default_gate, graph_kinds

SAMPLERS = (DDIMSampler, PLMSSampler, DPMSolverSampler)
SCALE = 7.0


def sample(model, cls, caching, S=6, prompts=("a photo of a cat",), x_T=None, scale=SCALE, c_concat=None, **kw):
    """(latents, the sampler) of one run from fixed noise; guided unless ``scale`` is 1 (no unconditional pass);
    ``c_concat``: an inpainting model's mask and masked-image latent (the original's dict conditioning)."""
    c = model.get_learned_conditioning(list(prompts))
    uc = None if scale == 1.0 else model.get_learned_conditioning([""] * len(prompts))
    if c_concat is not None:
        c = {"c_concat": [c_concat], "c_crossattn": [c]}
        uc = None if uc is None else {"c_concat": [c_concat], "c_crossattn": [uc]}
    if x_T is None:
        x_T = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = cls(model, caching=caching)
    with torch.no_grad():
        z, _ = sampler.sample(S=S, conditioning=c, batch_size=len(prompts), shape=list(x_T.shape[1:]), verbose=False,
                              unconditional_guidance_scale=scale, unconditional_conditioning=uc, x_T=x_T.clone(), **kw)
    return z, sampler


# ----- the plan -----

def test_plan_of_the_defaults_for_plms_50_steps():
    """DeepCache 3,0 with T-GATE at the paper's gate (20 of 50): PLMS makes 51 calls, the first step two."""
    caching = Caching(deepcache=3, branch=0, tgate=default_gate(50))
    assert caching.tgate == 20
    calls = caching.plan([0] + list(range(50)), guided=True)
    assert len(calls) == 51
    guided = [k for k, c in enumerate(calls) if c.guided]
    assert guided == list(range(21))  # steps 0 ... 19: calls 0 ... 20
    assert [k for k, c in enumerate(calls) if c.record] == [20] and calls[20].full
    assert all(c.reuse == (k > 20) for k, c in enumerate(calls))
    # the interval counts calls from each phase start: 0 (guided) and 21 (after the gate)
    full = [k for k, c in enumerate(calls) if c.full]
    assert full == [0, 3, 6, 9, 12, 15, 18, 20] + list(range(21, 51, 3))
    assert len(graph_kinds(calls, deepcache=True)) == 5


def test_plan_call_counts_in_closed_form():
    plms50 = [0] + list(range(50))
    assert sum(c.full for c in Caching(deepcache=3).plan(plms50, guided=True)) == math.ceil(51 / 3)
    assert sum(c.full for c in Caching(deepcache=5, branch=2).plan(list(range(50)), guided=True)) == 10
    calls = Caching(tgate=20).plan(plms50, guided=True)
    assert sum(c.guided for c in calls) == 21 and sum(c.reuse for c in calls) == 30 and sum(c.record for c in calls) == 1
    calls = Caching(cfg_end=0.5).plan(list(range(50)), guided=True)
    assert sum(c.guided for c in calls) == 25 and all(c.full and not c.reuse and not c.record for c in calls)


def test_plan_guidance_stops_at_the_earlier_of_gate_and_cfg_end():
    assert Caching(cfg_end=0.5).guided_steps(50) == 25
    assert Caching(cfg_end=0.41).guided_steps(50) == 21  # ceil: at least the fraction asked for
    assert Caching(cfg_end=1.0).guided_steps(7) == 7
    assert Caching(cfg_end=0.5, tgate=10).guided_steps(50) == 10
    assert Caching(cfg_end=0.1, tgate=10).guided_steps(50) == 5
    calls = Caching(cfg_end=0.5).plan(list(range(10)), guided=True)
    assert [c.guided for c in calls] == [True] * 5 + [False] * 5
    assert not any(c.guided for c in Caching(cfg_end=0.5).plan(list(range(10)), guided=False))
    assert default_gate(25) == 10 and default_gate(1) == 1


@pytest.mark.parametrize("kwargs", [dict(deepcache=0), dict(branch=-1), dict(tgate=0), dict(cfg_end=0.0),
                                    dict(cfg_end=1.5)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Caching(**kwargs)


# ----- no-op settings: the caching path runs and changes nothing -----

@pytest.mark.parametrize("cls", SAMPLERS)
def test_noop_settings_run_the_caching_path_and_give_the_uncached_result(tiny_model, cls):
    S = 5
    ref, plain = sample(tiny_model, cls, None, S)
    assert not hasattr(plain.last_denoiser, "counts")  # without caching: the plain CFGDenoiser
    n_calls = S + (cls is PLMSSampler)
    for caching, expect in [(Caching(deepcache=1), {"full": n_calls}),
                            (Caching(deepcache=1, branch=3), {"full": n_calls}),
                            (Caching(tgate=S), {"full": n_calls, "record": 1}),
                            (Caching(cfg_end=1.0), {"full": n_calls}),
                            (Caching(deepcache=1, branch=1, tgate=S, cfg_end=1.0), {"full": n_calls, "record": 1})]:
        z, sampler = sample(tiny_model, cls, caching, S)
        counts = sampler.last_denoiser.counts
        assert counts["guided"] == n_calls and counts["shallow"] == 0 and counts["reuse"] == 0
        assert all(counts[k] == v for k, v in expect.items()), (caching, counts)
        assert torch.equal(z, ref), caching


@pytest.mark.parametrize("case", ["v-prediction", "inpainting", "ddim eta", "no guidance"])
def test_noop_settings_in_other_runs(tiny_model, case):
    """The same exactness for a v model, an inpainting model (dict conditioning), DDIM with eta > 0 (its noise from
    the generator) and a run without an unconditional pass (scale 1)."""
    kw, cls = {}, DDIMSampler
    model = tiny_model
    if case == "v-prediction":
        model, cls = build(TINY_V), PLMSSampler
    elif case == "inpainting":
        model = build(os.path.join(ROOT, "configs", "tiny", "v2-tiny-inpainting.yaml"))
        kw["c_concat"] = torch.randn(1, 5, 8, 8, generator=torch.Generator().manual_seed(4))
    elif case == "ddim eta":
        kw["eta"] = 0.5
    else:
        kw["scale"] = 1.0
    runs = {}
    for name, caching in (("plain", None), ("noop", Caching(deepcache=1, tgate=5, cfg_end=1.0)),
                          ("methods", Caching(deepcache=2, tgate=3))):
        if "eta" in kw:
            kw["generator"] = torch.Generator().manual_seed(9)
        runs[name], sampler = sample(model, cls, caching, S=5, **kw)
        if caching is not None:
            assert sampler.last_denoiser.counts["record"] == 1, case
    assert torch.equal(runs["noop"], runs["plain"]), case
    assert torch.isfinite(runs["methods"]).all() and rel_err(runs["methods"], runs["plain"]) > 1e-4, case


@pytest.mark.parametrize("caching", [Caching(deepcache=3), Caching(tgate=3), Caching(cfg_end=0.5),
                                     Caching(deepcache=2, branch=1, tgate=4)], ids=["deepcache", "tgate", "cfg_end",
                                                                                    "deepcache+tgate"])
def test_a_batch_is_its_images_run_one_by_one(tiny_model, caching):
    """Each image of a batch gets its own prediction in every kind of call (cached features are per image)."""
    prompts = ("a photo of a cat", "an oil painting of a harbour")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    batch, _ = sample(tiny_model, PLMSSampler, caching, S=6, prompts=prompts, x_T=x_T)
    for i, prompt in enumerate(prompts):
        alone, _ = sample(tiny_model, PLMSSampler, caching, S=6, prompts=(prompt,), x_T=x_T[i:i + 1])
        assert rel_err(batch[i:i + 1], alone) < 1e-5, (caching, i)
    assert rel_err(batch[0], batch[1]) > 1e-2


def test_unet_refuses_a_deep_feature_without_its_branch(tiny_model):
    unet = tiny_model.model.diffusion_model
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.full((1,), 10.0), torch.randn(1, 77, 64)
    with torch.no_grad():
        _, deep, _ = unet(x, t, ctx, branch=1)
        with pytest.raises(ValueError, match="needs its branch"):
            unet(x, t, ctx, deep=deep)
        with pytest.raises(ValueError, match="must be a full one"):
            unet(x, t, ctx, branch=1, deep=deep, record=True)


def test_noop_settings_in_img2img_decode(tiny_model):
    c = tiny_model.get_learned_conditioning(["a photo"])
    uc = tiny_model.get_learned_conditioning([""])
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = {}
    for name, caching in (("plain", None), ("cached", Caching(deepcache=1, tgate=4))):
        sampler = DDIMSampler(tiny_model, caching=caching)
        sampler.make_schedule(ddim_num_steps=10, verbose=False)
        with torch.no_grad():
            z = sampler.stochastic_encode(z0, 4, generator=torch.Generator().manual_seed(1))
            out[name] = sampler.decode(z, c, 4, unconditional_guidance_scale=SCALE, unconditional_conditioning=uc)
        if caching is not None:  # the gate counts the 4 steps decode runs: it keeps at the last one
            assert sampler.last_denoiser.counts["record"] == 1 and sampler.last_denoiser.counts["full"] == 4
    assert torch.equal(out["cached"], out["plain"])


def test_methods_change_the_result_and_a_bad_branch_is_named(tiny_model):
    ref, _ = sample(tiny_model, PLMSSampler, None)
    for caching in (Caching(deepcache=3), Caching(tgate=3), Caching(cfg_end=0.5)):
        z, _ = sample(tiny_model, PLMSSampler, caching)
        assert rel_err(z, ref) > 1e-3, caching
    with pytest.raises(ValueError, match="branch 4 does not exist.*0 ... 3"):
        sample(tiny_model, PLMSSampler, Caching(deepcache=3, branch=4))


# ----- against the reference packages, on diffusers' pipeline from the same weights -----

@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory):
    """The tiny model with two ResBlocks per level (DeepCache's branch numbering assumes diffusers' layers_per_block
    2), as a random checkpoint, its diffusers export and our model loaded from it."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from ldm.apps import random_checkpoint
    from ldm.benchmark.export import cached_export
    from ldm.weights.loading import load_model
    folder = tmp_path_factory.mktemp("two-blocks")
    config, ckpt = str(folder / "tiny2.yaml"), str(folder / "tiny2.ckpt")
    with open(TINY, encoding="utf-8") as f:
        text = f.read()
    assert "num_res_blocks: 1\n" in text
    with open(config, "w", encoding="utf-8") as f:
        f.write(text.replace("num_res_blocks: 1\n        channel_mult", "num_res_blocks: 2\n        channel_mult"))
    assert random_checkpoint.main([ckpt, "--config", config, "--quiet"]) == 0
    weights = cached_export(config, ckpt, str(folder))
    model, _ = load_model(config, ckpt, device="cpu", dtype=torch.float32)
    return model, weights


def peer_latents(weights, S, run, x_T):
    """diffusers' pipeline (fresh: the packages patch modules in place) through ``run(pipe, **pipeline kwargs)``."""
    from ldm.benchmark.peer import build_pipeline
    pipe = build_pipeline(weights, torch.device("cpu"), torch.float32)
    kwargs = dict(prompt=["a photo of a cat"], negative_prompt=[""], num_inference_steps=S, guidance_scale=SCALE,
                  latents=x_T.clone(), output_type="latent")
    with torch.no_grad():
        return run(pipe, **kwargs)


X_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_plain_runs_agree(two_blocks):
    model, weights = two_blocks
    ours, _ = sample(model, PLMSSampler, None, S=10, x_T=X_T)
    theirs = peer_latents(weights, 10, lambda pipe, **kw: pipe(**kw).images, X_T)
    assert rel_err(ours, theirs) < 1e-5


@pytest.mark.parametrize("interval,branch", [(3, 0), (3, 2), pytest.param(3, 1, marks=pytest.mark.slow),
                                             pytest.param(4, 3, marks=pytest.mark.slow),
                                             pytest.param(5, 4, marks=pytest.mark.slow)])
def test_deepcache_matches_the_deepcache_package(two_blocks, interval, branch):
    pytest.importorskip("DeepCache")
    from DeepCache import DeepCacheSDHelper
    model, weights = two_blocks

    def run(pipe, **kw):
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        return pipe(**kw).images

    ours, sampler = sample(model, PLMSSampler, Caching(deepcache=interval, branch=branch), S=10, x_T=X_T)
    assert sampler.last_denoiser.counts["shallow"] > 0
    uncached, _ = sample(model, PLMSSampler, None, S=10, x_T=X_T)
    theirs = peer_latents(weights, 10, run, X_T)
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours, uncached) > 1e-2


@pytest.mark.parametrize("gate", [6, pytest.param(3, marks=pytest.mark.slow)])
def test_tgate_matches_the_tgate_package(two_blocks, gate):
    pytest.importorskip("tgate")
    from tgate import TgateSDLoader
    model, weights = two_blocks
    ours, sampler = sample(model, PLMSSampler, Caching(tgate=gate), S=10, x_T=X_T)
    assert sampler.last_denoiser.counts["reuse"] == 10 - gate
    v1 = peer_latents(weights, 10, lambda pipe, **kw: TgateSDLoader(pipe).tgate(
        **kw, gate_step=gate, sp_interval=1, fi_interval=1, warm_up=0).images, X_T)
    assert rel_err(ours, v1) < 1e-5
    if gate > 4:  # the package's defaults are TGATE-V2: from its warm-up (2) to the gate, self-attention is reused too
        v2 = peer_latents(weights, 10, lambda pipe, **kw: TgateSDLoader(pipe).tgate(**kw, gate_step=gate).images, X_T)
        assert rel_err(ours, v2) > 1e-3


def test_tgate_with_deepcache_matches_the_package(two_blocks):
    pytest.importorskip("tgate")
    from tgate import TgateSDDeepCacheLoader
    model, weights = two_blocks
    ours, sampler = sample(model, PLMSSampler, Caching(deepcache=3, branch=2, tgate=5), S=10, x_T=X_T)
    assert sampler.last_denoiser.counts["shallow"] > 0 and sampler.last_denoiser.counts["reuse"] > 0
    theirs = peer_latents(weights, 10, lambda pipe, **kw: TgateSDDeepCacheLoader(
        pipe, cache_interval=3, cache_branch_id=2).tgate(**kw, gate_step=5, sp_interval=1, fi_interval=1,
                                                         warm_up=0).images, X_T)
    assert rel_err(ours, theirs) < 1e-5


@pytest.mark.parametrize("cfg_end", [0.5, pytest.param(0.3, marks=pytest.mark.slow)])
def test_cfg_end_matches_diffusers_cfg_cutoff_callback(two_blocks, cfg_end):
    from diffusers.callbacks import SDCFGCutoffCallback
    model, weights = two_blocks
    S = 10
    guided = Caching(cfg_end=cfg_end).guided_steps(S)
    ours, sampler = sample(model, PLMSSampler, Caching(cfg_end=cfg_end), S=S, x_T=X_T)
    assert sampler.last_denoiser.counts["unguided"] == S - guided
    # PNDM's call index i after which guidance stops: calls 0, 1 are step 0, call i is step i - 1
    callback = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=guided)
    theirs = peer_latents(weights, S, lambda pipe, **kw: pipe(**kw, callback_on_step_end=callback).images, X_T)
    assert rel_err(ours, theirs) < 1e-5


# ----- FLOPs -----

def cross_attention_flops(unet, batch: int, tokens_at: dict, context_tokens: int) -> dict[int, int]:
    """Closed-form FLOPs of each transformer block's cross-attention (q, k/v, QK^T, AV, out), by cross_index."""
    from ldm.model.unet_blocks import BasicTransformerBlock
    flops = {}
    for name, block in unet.named_modules():
        if isinstance(block, BasicTransformerBlock):
            a = block.attn2
            C, D = a.out_proj.in_features, a.kv_proj_weight.shape[1]
            T, S = tokens_at[C], context_tokens
            flops[block.cross_index] = 2 * batch * (T * C * C + S * D * 2 * C + 2 * T * S * C + T * C * C)
    return flops


def test_flops_of_a_run_match_the_methods_arithmetic():
    from torch.utils.flop_counter import FlopCounterMode
    from ldm.model.attention import set_attention_backend
    model = build(TINY, seed=5)
    unet = model.model.diffusion_model
    set_attention_backend(unet, "math")  # FlopCounterMode counts matmuls; CPU SDPA has no FLOP formula
    x, t = torch.randn(1, 4, 8, 8), torch.full((1,), 500.0)
    context = model.get_learned_conditioning(["a photo"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, context)
    full = counter.get_total_flops()
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter2:
        unet(torch.cat([x, x]), t.expand(2), torch.cat([context, context]))
    assert counter2.get_total_flops() == 2 * full  # FLOPs are linear in the batch

    branch = 1
    n_in = len(unet.input_blocks)
    shallow = (per_module["UNetModel.time_embed"] + per_module["UNetModel.out"]
               + sum(per_module[f"UNetModel.input_blocks.{i}"] for i in range(branch + 1))
               + sum(per_module[f"UNetModel.output_blocks.{n_in - 1 - i}"] for i in range(branch + 1)))
    tokens_at = {32: 64, 64: 16}  # the tiny UNet: 32 channels at 8x8, 64 at 4x4
    cross = cross_attention_flops(unet, 1, tokens_at, context.shape[1])
    blocks = {name: m.cross_index for name, m in unet.named_modules() if hasattr(m, "cross_index")}
    runs = lambda idx: [i for n, i in blocks.items() if any(n.startswith(p) for p in idx)]
    shallow_blocks = runs([f"input_blocks.{i}." for i in range(branch + 1)]
                          + [f"output_blocks.{n_in - 1 - i}." for i in range(branch + 1)])
    assert 0 < len(shallow_blocks) < len(cross)
    cost = {  # (DeepCache full?, reuses) -> FLOPs of one call at batch 1
        (True, False): full, (False, False): shallow,
        (True, True): full - sum(cross.values()), (False, True): shallow - sum(cross[i] for i in shallow_blocks)}

    S = 12
    uc_free = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for caching in (Caching(deepcache=3, branch=branch), Caching(tgate=5), Caching(cfg_end=0.5),
                    Caching(deepcache=4, branch=branch, tgate=5, cfg_end=0.25)):
        with FlopCounterMode(display=False) as run_counter:
            _, sampler = sample(model, PLMSSampler, caching, S=S, prompts=["a photo"], x_T=uc_free)
        calls = sampler.last_denoiser.calls
        expected = sum((2 if c.guided else 1) * cost[(c.full, c.reuse)] for c in calls)
        text = 2 * per_text_encoder(model)  # the prompt and the negative prompt, encoded inside ``sample``
        assert run_counter.get_total_flops() - text == expected, caching
        plain = 2 * full * len(calls)
        print(f"{caching}: {1 - expected / plain:.1%} of the UNet FLOPs saved")


def per_text_encoder(model) -> int:
    """The text encoder's FLOPs for one prompt."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.get_learned_conditioning(["a photo"])
    return counter.get_total_flops()


# ----- compile and CUDA graphs -----

GRAPH_RUNS = {  # name: (caching, the graphs one run compiles)
    "deepcache": (Caching(deepcache=3), 2), "tgate": (Caching(tgate=4), 3), "cfg_end": (Caching(cfg_end=0.5), 2),
    "deepcache+tgate": (Caching(deepcache=3, tgate=4), 5),
    "all three": (Caching(deepcache=2, tgate=6, cfg_end=0.25), 7),  # the most a plan makes (graph_kinds)
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "all three" else [pytest.mark.slow])
                                  for n in GRAPH_RUNS])
def test_compiled_unet_one_graph_per_kind_of_call_none_recompiled(tiny_model, name):
    """Dynamo's guards decide the graphs whatever the backend: the eager backend keeps this fast. fullgraph=True
    fails on any graph break; dynamic=False, as ldm.speed.runtime.compile_module compiles."""
    caching, expected = GRAPH_RUNS[name]
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    unet = tiny_model.model.diffusion_model
    torch._dynamo.reset()
    tiny_model.model.diffusion_model = torch.compile(unet, fullgraph=True, dynamic=False, backend=counting)
    try:
        for repeat in range(2):
            z, sampler = sample(tiny_model, PLMSSampler, caching, S=8, prompts=["a cat"])
            assert torch.isfinite(z).all()
            kinds = graph_kinds(sampler.last_denoiser.calls, caching.deepcache is not None)
            # one graph per kind, each compiled once: the second run compiles nothing
            assert len(graphs) == len(kinds) == expected, (repeat, len(graphs), kinds)
    finally:
        tiny_model.model.diffusion_model = unet
        torch._dynamo.reset()


class ReplayLike(nn.Module):
    """Imitates a CUDA-graph replay on the CPU: every call writes its outputs into the same static buffers."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.buffers = unet, {}

    def static(self, key, t):
        if t is None:
            return None
        if isinstance(t, tuple):
            return tuple(self.static((key, i), a) for i, a in enumerate(t))
        buf = self.buffers.setdefault((key, tuple(t.shape)), torch.empty_like(t))
        return buf.copy_(t)

    def forward(self, *args, **kwargs):
        out = self.unet(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.static("out", out)
        return tuple(self.static(i, o) for i, o in enumerate(out))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)


def test_cached_features_survive_buffer_reuse_through_clone_output(tiny_model):
    from ldm.speed.runtime import CloneOutput
    unet = tiny_model.model.diffusion_model
    caching = Caching(deepcache=3, branch=1, tgate=3)
    ref, _ = sample(tiny_model, PLMSSampler, caching, S=8)
    out = {}
    try:
        for name, wrapped in (("shared", ReplayLike(unet)), ("cloned", CloneOutput(ReplayLike(unet)))):
            tiny_model.model.diffusion_model = wrapped
            out[name], _ = sample(tiny_model, PLMSSampler, caching, S=8)
    finally:
        tiny_model.model.diffusion_model = unet
    assert rel_err(out["shared"], ref) > 1e-3  # the hazard is real: the kept deep feature is overwritten
    assert torch.equal(out["cloned"], ref)


@pytest.mark.gpu
def test_caching_loops_never_sync_with_the_host():
    model = build(TINY).cuda()
    c = model.get_learned_conditioning(["a photo of a cat"])
    uc = model.get_learned_conditioning([""])
    for cls in SAMPLERS:
        sampler = cls(model, caching=Caching(deepcache=3, tgate=3, cfg_end=0.5))
        g = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            x, _ = sampler.sample(S=6, conditioning=c, batch_size=1, shape=[4, 8, 8], verbose=False,
                                  unconditional_guidance_scale=7.5, unconditional_conditioning=uc, generator=g)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(x).all()


# ----- the scripts' flags -----

def script(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"ldm.apps.{name}", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_txt2img_flags_write_images_with_their_parameters(tmp_path):
    from PIL import Image
    out = tmp_path / "out"
    r = script("txt2img", "--demo", "--plms", "--steps", "6", "--n_iter", "1", "--n_samples", "1", "--outdir", str(out),
               "--deepcache", "--tgate", "--cfg_end", "0.5")
    assert r.returncode == 0, r.stderr
    (png,) = sorted((out / "samples").glob("*.png"))
    params = Image.open(png).info["parameters"]
    assert "DeepCache: 3,0" in params and f"T-GATE: {default_gate(6)}" in params and "CFG end: 0.5" in params


@pytest.mark.parametrize("flags,message", [
    (["--deepcache", "0"], "--deepcache takes an interval N of at least 1, got 0"),
    (["--deepcache", "3,x"], "--deepcache takes whole numbers"),
    (["--deepcache", "3,1,2"], "--deepcache takes N or N,BRANCH"),
    (["--deepcache", "3,9"], "--deepcache: DeepCache branch 9 does not exist"),
    (["--tgate", "0"], "--tgate takes a STEP of at least 1, got 0"),
    (["--cfg_end", "1.5"], "--cfg_end takes a FRACTION in (0, 1], got 1.5"),
])
def test_bad_flags_one_line_and_nothing_written(tmp_path, flags, message):
    out = tmp_path / "out"
    r = script("txt2img", "--demo", "--steps", "2", "--n_iter", "1", "--n_samples", "1", "--outdir", str(out), *flags)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and message in lines[-1], r.stderr
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not list(out.glob("**/*.png"))


def test_help_states_the_published_defaults():
    r = script("txt2img", "--help")
    text = " ".join(r.stdout.split())
    assert "3,0, the deepcache package's documented setting" in text and "40% of the steps (10 of 25)" in text


def test_img2img_takes_the_flags(tmp_path):
    from PIL import Image
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (120, 60, 30)).save(init)
    r = script("img2img", "--demo", "--init-img", str(init), "--steps", "10", "--strength", "0.5", "--n_samples", "1",
               "--outdir", str(tmp_path / "out"), "--deepcache", "2", "--tgate", "--cfg_end", "0.6")
    assert r.returncode == 0, r.stderr
    (png,) = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert f"T-GATE: {default_gate(5)}" in Image.open(png).info["parameters"]  # 40 % of the 5 steps run


@pytest.mark.slow
def test_benchmark_table_ours_and_the_packages(tmp_path):
    """ldm-benchmark --fewer_flops on the tiny model: every row, ours and diffusers with the reference packages,
    and the same deviation from the plain image on both sides (the same algorithm)."""
    pytest.importorskip("DeepCache")
    pytest.importorskip("tgate")
    from ldm.benchmark.harness import main
    out = tmp_path / "ff"
    assert main(["--fewer_flops", "--random", "tiny", "--cache_dir", str(tmp_path), "--H", "64", "--W", "64",
                 "--steps", "5", "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in (tmp_path / "ff.md").read_text().splitlines()
            if line.startswith("| ") and ("plain" in line or "DeepCache" in line or "T-GATE" in line
                                          or "cfg_end" in line) and "x |" in line]
    assert [r[0].strip() for r in rows] == ["plain", "DeepCache 3,0", "T-GATE 2", "cfg_end 0.5",
                                            "DeepCache 3,0 + T-GATE 2"]
    for r in rows:
        assert r[-2].strip() == r[-1].strip()  # deviation ours == deviation diffusers (3 decimals)
    assert rows[0][2].strip() == "0%" and all(0 < int(r[2].strip(" %")) < 100 for r in rows[1:])

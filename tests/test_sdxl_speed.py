"""Every speed and memory flag on SDXL: the tiny SDXL base (and refiner) with each flag against the same model without
it, through the scripts' own code path (``ldm.apps.cli``'s setup/optimize on txt2img's parsed flags, or txt2img's
main on tiny SDXL checkpoints): a guided 3-step Euler run from one x_T, then the VAE decode.

Errors are max|flag - plain| / max|plain| (``rel_err``); the tolerances are the SD tests' for the same flag, with the
values measured here (torch 2.14, one thread) in brackets:

- fused vs separate Q/K/V, SDPA math kernel vs the default kernel, ``--attention math``/``mha``, channels_last:
  ``EXACT`` 1e-5 (0, 2.2e-6, 2.0e-6/1.5e-6, 3.5e-6), as tests/test_optimize.py;
- VAE slicing, batch 2: ``TOL_SLICED`` 1e-5 (7.8e-7), tests/test_memory_savers.py; VAE tiling at the flag's tile
  size: a 64x64 image is one tile, bit-equal (tiled numerics on SDXL: tests/test_sdxl_vae.py, against diffusers);
- bf16 weights, CPU autocast: ``TOL_SAMPLE`` 6e-2 (latents 4.1e-2, both), tests/test_precision.py;
- int8: one UNet call ``INT8`` 5e-2 (2.9e-2) as tests/test_optimize.py, the whole run ``INT8_RUN`` 1e-1 (5.8e-2);
- offload on the CPU device, torch.compile with the eager backend: the PNGs bit-equal; inductor (slow): pixels within
  one level of 255.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import rel_err, script_main
from ldm.apps import txt2img
from ldm.apps.cli import Runtime, UserError, optimize, setup
from ldm.apps.random_checkpoint import make_random_checkpoint
from ldm.apps.sampler_choice import make_sampler
from ldm.apps.sdxl import sdxl_conditioning
from ldm.model.attention import CrossAttention, set_attention_backend
from ldm.model.conditioner import conditioning_batch
from ldm.model.presets import from_name
from ldm.speed import offload, runtime
from test_sdxl import PROMPTS, SIZES, tiny

EXACT = 1e-5        # fp32, the same math in another order (tests/test_optimize.py)
TOL_SLICED = 1e-5   # one image at a time vs the batch (tests/test_memory_savers.py)
TOL_SAMPLE = 6e-2   # bf16, a few guided steps then the VAE (tests/test_precision.py)
INT8 = 5e-2         # one UNet call with dynamic int8 activations and weights (tests/test_optimize.py)
INT8_RUN = 1e-1     # three guided steps of it
CPU = torch.device("cpu")
COMMON = ["--n_samples", "1", "--steps", "3", "--device", "cpu", "--H", "64", "--W", "64", "--seed", "3"]


@pytest.fixture(scope="module")
def base():
    return tiny("sdxl-tiny", seed=0)


@pytest.fixture(scope="module")
def refiner():
    return tiny("sdxl-refiner-tiny", seed=1)


def flagged(model: nn.Module, *flags: str) -> tuple[nn.Module, Runtime, list[str]]:
    """A copy of ``model`` as txt2img makes it with ``flags``: the dtype and attention backend of loading, then
    ``optimize``; with the runtime and what ``optimize`` says it did."""
    opt = txt2img.parse_args(["--device", "cpu", *flags])
    rt = setup(opt)
    model = copy.deepcopy(model).to(rt.dtype)  # what load_model(dtype=) gives
    set_attention_backend(model, opt.attention)
    return model, rt, optimize(opt, model, rt)


@torch.no_grad()
def generate(model: nn.Module, rt: Runtime, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, images) of txt2img's steps on a batch of 2: SDXL conditioning (empty negative), 3 Euler steps at
    scale 5 from a seeded x_T, the VAE decode; in the runtime's SDPA and precision scopes."""
    batch = conditioning_batch(PROMPTS, **SIZES)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(rt.device)
    with runtime.attention_scope(rt.backends), runtime.precision_scope(rt.precision, rt.device, rt.dtype):
        c, uc = sdxl_conditioning(model, batch, "", 5.0)
        sampler, _ = make_sampler("euler", model, rt.device)
        latents, _ = sampler.sample(S=3, conditioning=c, batch_size=2, shape=[4, 8, 8], x_T=x_T, verbose=False,
                                    unconditional_guidance_scale=5.0, unconditional_conditioning=uc)
        return latents, model.decode_first_stage(latents)


@pytest.fixture(scope="module")
def plain(base):
    model, rt, done = flagged(base)
    assert done == ["fused QKV/KV projections"]
    return generate(model, rt)


def _attention(model) -> list[CrossAttention]:
    return [m for m in model.modules() if isinstance(m, CrossAttention)]


def _convs_channels_last(model) -> bool:
    return all(p.is_contiguous(memory_format=torch.channels_last) for part in (model.model, model.first_stage_model)
               for p in part.parameters() if p.dim() == 4)


# flags, what optimize reports, tolerance, a check that the flag took effect
FLAGS = {
    "unfused": (["--unfused_projections"], "separate Q/K/V matmuls", EXACT,
                lambda m, rt: len(_attention(m)) > 10 and not any(a.fused for a in _attention(m))),
    "sdpa-math-kernel": (["--disable_flash", "--disable_mem_efficient"], None, EXACT,
                         lambda m, rt: rt.backends == [torch.nn.attention.SDPBackend.MATH]),
    "attention-math": (["--attention", "math"], None, EXACT,
                       lambda m, rt: {a.backend for a in _attention(m)} == {"math"}),
    "attention-mha": (["--attention", "mha"], None, EXACT,
                      lambda m, rt: {a.backend for a in _attention(m)} == {"mha"}),
    "channels_last": (["--channels_last"], "channels_last", EXACT, lambda m, rt: _convs_channels_last(m)),
    "vae_slicing": (["--vae_slicing"], "VAE slicing", TOL_SLICED, lambda m, rt: m.first_stage_model.use_slicing),
    "vae_tiling": (["--vae_tiling"], "VAE tiling", 0.0, lambda m, rt: m.first_stage_model.use_tiling),
}


@pytest.mark.parametrize("name", list(FLAGS))
def test_flag_matches_the_plain_run(base, plain, name):
    flags, said, tol, took = FLAGS[name]
    model, rt, done = flagged(base, *flags)
    assert said is None or said in done, done
    assert took(model, rt)
    latents, images = generate(model, rt)
    assert rel_err(latents, plain[0]) <= tol and rel_err(images, plain[1]) <= tol, name


@pytest.mark.parametrize("flags", [["--bf16"], ["--precision", "autocast"]])
def test_bf16_weights_and_cpu_autocast_stay_close(base, plain, flags):
    """bf16 weights (the latents stay fp32) and fp32 weights under CPU autocast: close, finite, and really reduced."""
    model, rt, _ = flagged(base, *flags)
    latents, images = generate(model, rt)
    assert latents.dtype == torch.float32 and images.dtype == torch.bfloat16
    assert model.dtype == (torch.bfloat16 if flags == ["--bf16"] else torch.float32)
    assert torch.isfinite(latents).all() and torch.isfinite(images).all()
    for ours, ref in ((latents, plain[0]), (images.float(), plain[1])):
        assert 1e-3 < rel_err(ours, ref) <= TOL_SAMPLE


def test_int8_quantizes_the_unet_and_stays_close(base, plain):
    pytest.importorskip("torchao", reason="--int8 needs the optional dependency torchao")
    from ldm.speed.optimize import quantize_int8
    model, rt, done = flagged(base, "--int8")
    assert "int8 dynamic quantization of 0 UNet layers" in done  # the tiny UNet (32/64 channels) has none >= 320
    unet = model.model.diffusion_model
    batch = conditioning_batch(PROMPTS, **SIZES)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([10, 900])
    with torch.no_grad():
        c = model.get_learned_conditioning(batch)
        expected = model.apply_model(x, t, c)
        names = quantize_int8(unet, min_features=16, inductor_config=False)
        out = model.apply_model(x, t, c)
    # 11 transformers' proj_in/out, 17 blocks' QKV, out_proj, GEGLU, FF out, Q, out_proj; the vector and timestep
    # embeddings (one row per sample) and the cross-attention K/V stay float
    assert len(names) == 2 * 11 + 6 * 17 and not any("emb" in n or "kv_proj" in n for n in names), names
    assert type(unet.input_blocks[4][1].transformer_blocks[0].attn1.in_proj_weight).__name__ == "Int8Tensor"
    assert type(unet.label_emb[0][0].weight) is nn.Parameter and type(unet.time_embed[0].weight) is nn.Parameter
    assert 1e-3 < rel_err(out, expected) <= INT8
    latents, images = generate(model, rt)
    assert torch.isfinite(latents).all() and 1e-3 < rel_err(latents, plain[0]) <= INT8_RUN
    assert rel_err(images, plain[1]) <= INT8_RUN


# ----------------------------------------------------------------------------- offload

def test_offload_places_sdxl_parts_and_shares_the_device_with_the_refiner(base, refiner):
    """The meta device as a stand-in accelerator: SDXL's conditioner is the text part; base and refiner on one device
    take turns, one component of the two models at most there; the CPU copies come back intact."""
    base, refiner = copy.deepcopy(base), copy.deepcopy(refiner)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (base, refiner)]
    first = offload.enable_model_offload(base, "meta")
    second = offload.enable_model_offload(refiner, "meta", share_with=first)
    assert first.group is second.group and first.group == [first, second]
    assert first.parts["text"] is base.conditioner and second.parts["text"] is refiner.conditioner
    parts = {(i, name): part for i, h in enumerate((first, second)) for name, part in h.parts.items()}

    def on_meta() -> list[tuple[int, str]]:
        return [key for key, part in parts.items() if {p.device.type for p in part.parameters()} == {"meta"}]

    meta = torch.device("meta")
    with torch.no_grad():
        for i, model in enumerate((base, refiner)):
            c = model.get_learned_conditioning(conditioning_batch(PROMPTS[:1], (64, 64)))
            assert c["crossattn"].device == meta and on_meta() == [(i, "text")]
            x = model.apply_model(torch.empty(1, 4, 8, 8, device=meta), torch.zeros(1, dtype=torch.long, device=meta),
                                  c)
            assert x.shape == (1, 4, 8, 8) and on_meta() == [(i, "unet")]
            assert model.first_stage_model.decode(x).device == meta and on_meta() == [(i, "vae")]  # no finite check
        base.get_unconditional_conditioning(conditioning_batch(PROMPTS[:1], (64, 64)), ["a negative"])
        assert on_meta() == [(0, "text")] and second.active is None
    second.remove()
    assert first.group == [first]
    first.remove()
    for model, saved in zip((base, refiner), before):
        after = model.state_dict()
        assert all(after[k].device == CPU and torch.equal(after[k], v) for k, v in saved.items())


def test_offload_shares_only_one_device():
    with pytest.raises(ValueError, match="cannot share the device"):
        offload.ModelOffload(tiny("sdxl-refiner-tiny"), "meta", share_with=offload.enable_model_offload(
            tiny("sdxl-tiny"), "cpu"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny SDXL base and refiner, seeded random, fp16 safetensors in the released layout (tests/test_sdxl_apps.py)."""
    d = tmp_path_factory.mktemp("sdxl-speed-ckpts")
    out = {}
    for name, preset in (("base", "sdxl-tiny"), ("refiner", "sdxl-refiner-tiny")):
        out[name] = str(d / f"{name}.safetensors")
        make_random_checkpoint(out[name], from_name(preset), seed=2, dtype="fp16", progress=False)
    return out


def run_txt2img(folder, args: list[str]) -> list[np.ndarray]:
    """txt2img's main in this process; the saved images' pixels, in file order."""
    out = str(folder)
    assert script_main("txt2img")(["--outdir", out, *COMMON, *args]) == 0
    names = sorted(os.listdir(os.path.join(out, "samples")))
    return [np.asarray(Image.open(os.path.join(out, "samples", n))) for n in names]


def test_txt2img_offload_with_the_refiner_matches_and_takes_turns(ckpts, tmp_path, monkeypatch, capsys):
    """--offload on the CPU device (nothing moves, so the images are bit-equal): base and refiner both offloaded,
    their components taking turns on one device."""
    args = ["--ckpt", ckpts["base"], "--refiner_ckpt", ckpts["refiner"], "--refiner_strength", "0.5",
            "--n_iter", "2"]
    expected = run_txt2img(tmp_path / "plain", args)
    turns = []
    activate = offload.ModelOffload.activate

    def spy(self, name):
        moved = name != self.active
        activate(self, name)
        if moved:  # a component entered again while on the device moves nothing
            turns.append((self, name, [h.active for h in self.group]))

    monkeypatch.setattr(offload.ModelOffload, "activate", spy)
    capsys.readouterr()
    got = run_txt2img(tmp_path / "offload", ["--offload", *args])
    err = capsys.readouterr().err
    assert "speed: fused QKV/KV projections, model offload to cpu per component" in err
    assert "refiner speed: fused QKV/KV projections, model offload to cpu per component" in err
    handles = list(dict.fromkeys(h for h, _, _ in turns))
    assert len(handles) == 2 and handles[0].group is handles[1].group
    assert all(sum(a is not None for a in actives) == 1 for _, _, actives in turns)  # one component at a time
    per_image = [(handles.index(h), name) for h, name, _ in turns]
    assert per_image == 2 * [(0, "text"), (0, "unet"), (1, "text"), (1, "unet"), (1, "vae")], per_image
    assert len(got) == len(expected) == 2 and all(np.array_equal(a, b) for a, b in zip(got, expected))


# ----------------------------------------------------------------------------- compile, CUDA graphs

def test_txt2img_compiled_unet_matches_and_never_recompiles(ckpts, tmp_path, monkeypatch):
    """--compile --compile_vae as txt2img runs them (fullgraph, installed on the model), with dynamo's eager backend
    in place of inductor (minutes on one CPU thread: the slow test below): two batches of 3 guided Euler steps and
    their decodes run one UNet graph and one decoder graph, never recompiled; the images bit-equal to eager."""
    args = ["--ckpt", ckpts["base"], "--n_iter", "2"]
    expected = run_txt2img(tmp_path / "eager", args)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, fullgraph, dynamic, options: compile_(
        module, fullgraph=fullgraph, dynamic=dynamic, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = run_txt2img(tmp_path / "compiled", ["--compile", "--compile_vae", *args])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, expected))


@pytest.mark.slow  # a minute and more of inductor compilation on one CPU thread (cold cache)
def test_txt2img_inductor_compile_with_offload_matches_eager(ckpts, tmp_path):
    """The real thing: inductor (default mode: freezing on the CPU) with --offload, two batches, no recompile."""
    args = ["--ckpt", ckpts["base"], "--n_iter", "2"]
    expected = run_txt2img(tmp_path / "eager", args)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = run_txt2img(tmp_path / "compiled", ["--compile", "--offload", *args])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(got, expected))


def test_offload_refuses_cuda_graphs_on_cuda_only(base):
    """--offload with a CUDA-graph compile mode: one line on CUDA (checked before anything is compiled or moved);
    on the CPU the mode runs as default (a warning), so both flags are kept."""
    for mode in ("reduce-overhead", "max-autotune"):
        opt = txt2img.parse_args(["--offload", "--compile", "--compile_mode", mode, "--no_tf32"])
        rt = Runtime(torch.device("cuda"), torch.float32, "full", runtime.sdpa_backends())
        model = copy.deepcopy(base)
        with pytest.raises(UserError, match=f"CUDA graphs \\(--compile_mode {mode}\\) cannot follow"):
            optimize(opt, model, rt)
        assert getattr(model, "_ldm_offload", None) is None and not isinstance(
            model.model.diffusion_model, torch._dynamo.eval_frame.OptimizedModule)
    try:
        with pytest.warns(UserWarning, match="needs CUDA graphs"):
            model, _, done = flagged(base, "--offload", "--compile", "--compile_mode", "reduce-overhead")
        assert done[-2:] == ["model offload to cpu per component", "compiled UNet (reduce-overhead)"]
        assert not isinstance(model.model.diffusion_model, runtime.CloneOutput)
    finally:
        torch._dynamo.reset()


def test_offload_refuses_a_cuda_graph_compiled_sdxl_unet(base):
    """The library's own check (compile_conflict), whatever the caller: a CUDA-graph UNet cannot have its weights
    moved to a device."""
    model = copy.deepcopy(base)
    try:
        assert isinstance(runtime.compile_unet(model, "reduce-overhead", torch.device("cuda")), runtime.CloneOutput)
        with pytest.raises(ValueError, match="--offload cannot be used with CUDA graphs .*diffusion_model"):
            offload.enable_model_offload(model, "meta")
        offload.enable_model_offload(model, "cpu").remove()  # on the CPU nothing moves: allowed
    finally:
        # torch 2.14: the first reset that reaches a CUDA-graph backend imports this module, which registers another
        # backend while reset iterates over them ("dictionary changed size during iteration")
        from torch._inductor import cudagraph_trees  # noqa: F401
        torch._dynamo.reset()


@pytest.mark.gpu
def test_offload_on_cuda_holds_one_component_of_base_and_refiner(base, refiner):
    """On CUDA, base and refiner offloaded to one device: after the base's run only its VAE is held there; the
    refiner's text encoding sends it back. Outputs as the same model resident on the device."""
    cuda = torch.device("cuda")
    rt = Runtime(cuda, torch.float32, "full", runtime.sdpa_backends())
    resident = copy.deepcopy(base).to(cuda)
    expected = [t.cpu() for t in generate(resident, rt)]
    del resident
    base, refiner = copy.deepcopy(base).to(cuda), copy.deepcopy(refiner).to(cuda)
    first = offload.enable_model_offload(base, cuda)
    second = offload.enable_model_offload(refiner, cuda, share_with=first)
    assert torch.cuda.memory_allocated() < 1 << 20  # every weight went to its pinned CPU copy
    size = lambda part: sum(p.numel() * p.element_size() for p in part.parameters())
    latents, images = generate(base, rt)
    held = torch.cuda.memory_allocated() - latents.nbytes - images.nbytes
    vae = size(base.first_stage_model)
    assert first.active == "vae" and vae <= held < vae + (1 << 20)
    with torch.no_grad():
        c = refiner.get_learned_conditioning(conditioning_batch(PROMPTS, **SIZES))
    assert first.active is None and second.active == "text" and c["crossattn"].device.type == "cuda"
    assert {p.device.type for p in base.parameters()} == {"cpu"}
    assert rel_err(latents.cpu(), expected[0]) <= 1e-5 and rel_err(images.cpu(), expected[1]) <= 1e-5
    second.remove()
    first.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_sdxl_on_cuda_matches_eager(base, mode):
    """On CUDA: the UNet compiled (reduce-overhead: CUDA graphs, each output cloned) over two guided Euler runs, the
    second replaying the graphs, against eager; no recompile."""
    cuda = torch.device("cuda")
    model, rt, _ = flagged(base, "--no_tf32")
    model.to(cuda)
    rt = Runtime(cuda, torch.float32, "full", rt.backends)

    def run(seed):
        return [t.cpu() for t in generate(model, rt, seed)]

    eager = run(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = runtime.compile_unet(model, mode, cuda)
        assert isinstance(compiled, runtime.CloneOutput) == (mode == "reduce-overhead")
        with torch._dynamo.config.patch(error_on_recompile=True):
            first, second = run(0), run(0)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    for out in (first, second):
        assert rel_err(out[0], eager[0]) <= 1e-3 and rel_err(out[1], eager[1]) <= 1e-3

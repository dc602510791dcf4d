"""The models of the GPU window (``ldm.benchmark.window``): ours built on the device with seeded random weights, the
diffusers peer holding the same weights in memory (SD 2's pipeline, and SDXL's for part 7), the UNet variants each part
times, and FLOP-based estimates.

No checkpoint file is read or written. Ours is built under ``torch.device(device)`` (its init runs there, the
schedule tables stay real CPU tensors), then every parameter is redrawn from one generator on the device with the
scaling of ``ldm.apps.random_checkpoint`` (matrices N(0, 1/fan_in), norm scales 1 + 0.1 N, other vectors 0.1 N), so
fp16 does not overflow. The peer is converted from our state dict with diffusers' own converters (in memory).
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ldm.model.presets import from_name
from ldm.model.schedule import BUFFER_NAMES
from ldm.speed.offload import component
from ldm.speed.runtime import synchronize

# Published rates the estimates are held against (see docs/benchmarks.md): stable-fast on an H100, SD 1.5 at
# 512x512, 104.6 it/s (one it = one guided UNet call, batch 2). The SD 2 UNet's FLOPs are about SD 1.5's, so one
# compiled call is estimated at 1 / 104.6 s and an eager one at twice that. Compile times are assumptions for a
# fresh H100 process (no cache), replaced by measured ones in the report.
H100_BEST_IT_S = 104.6
EAGER_SLOWDOWN = 2.0
COMPILE_S = {"default": 45.0, "reduce-overhead": 50.0, "max-autotune-no-cudagraphs": 240.0, "int8": 60.0}
# SDXL base (part 7), assumptions for an H100 in bf16/fp16, replaced by measured figures in the report: one eager SDPA
# UNet call at 1024x1024 (guided batch 2, 128x128 latent: 13.5 TFLOP, so about 210 TFLOP/s), the seed's compile gain
# (its A100 table: 3.31 -> 2.54 s an image), a default-mode compile of its 2.6 B-parameter UNet per side, text encoding
# plus the 1024x1024 VAE decode (10.5 TFLOP), and freeing SD 2 then building both SDXL models on the device.
SDXL_PRESET, SDXL_STEPS, SDXL_SIDE = "sdxl-base", 30, 128
SDXL_EAGER_CALL_S = 0.065
SDXL_COMPILE_GAIN = 1.3
SDXL_COMPILE_S = 90.0
SDXL_DECODE_S = 0.2
SDXL_BUILD_S = 20.0


def peer_available() -> bool:
    """Whether diffusers and transformers can be imported (the device image may lack diffusers)."""
    return all(importlib.util.find_spec(m) is not None for m in ("diffusers", "transformers"))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter in place on its own device from one seeded generator (the random checkpoints' scaling).
    The UNet's Q/K/V biases stay zero: SD checkpoints, the original layout and diffusers have none."""
    from ldm.model.attention import CrossAttention
    devices = {p.device for p in module.parameters()}
    g = {d: torch.Generator(d).manual_seed(seed) for d in devices}
    no_bias = {id(m.in_proj_bias) for m in module.modules() if isinstance(m, CrossAttention)}
    for name, p in module.named_parameters():
        if id(p) in no_bias:
            p.zero_()
            continue
        t = torch.randn(p.shape, generator=g[p.device], device=p.device, dtype=torch.float32)
        if p.dim() >= 2:
            t /= p[0].numel() ** 0.5
        elif name.endswith("weight"):
            t = 1.0 + 0.1 * t
        else:
            t *= 0.1
        p.copy_(t)
    return module


def build_ours(preset: str, device: torch.device, seed: int = 0):
    """The whole model (``ldm.weights.loading``'s class, as load_model returns) with seeded random fp32 weights."""
    from ldm.weights.loading import model_class
    cfg = from_name(preset)
    with torch.device(device):
        model = model_class(cfg)(cfg)
    randomize_(model, seed)
    for name in BUFFER_NAMES:  # real CPU tables even under torch.device(device); load_model moves them too
        setattr(model, name, getattr(model, name).to(device))
    if hasattr(model, "denoiser"):  # SDXL's sigmas, as load_model moves them
        model.denoiser.to(device)
    return model.eval().requires_grad_(False)


def cast_(model, dtype: torch.dtype):
    """UNet, VAE and text encoder to ``dtype`` in place (the schedule tables stay fp32), as load_model casts."""
    for part in (model.model, model.first_stage_model, component(model, "text")):
        part.to(dtype=dtype)
    return model


def build_peer(model, device: torch.device, dtype: torch.dtype):
    """diffusers' StableDiffusionPipeline holding ``model``'s weights (converted in memory), on ``device``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from ldm.benchmark import export
    from ldm.benchmark.peer import eps_scheduler, load_part, quiet_peer_logs
    quiet_peer_logs()
    cfg = model.cfg
    parts = export.convert_weights(model.state_dict(), cfg)
    unet = load_part(lambda: UNet2DConditionModel(**export.unet_config(cfg.unet)), parts["unet"])
    vae = load_part(lambda: AutoencoderKL(**export.vae_config(cfg.vae, cfg.scale_factor)), parts["vae"])
    text = load_part(lambda: CLIPTextModel(CLIPTextConfig(**export.text_config(cfg.text))), parts["text_encoder"])
    tok_cfg = export.tokenizer_config(cfg.text)
    with tempfile.TemporaryDirectory() as folder:
        export.write_tokenizer(folder, tok_cfg["kind"])
        tokenizer = export.load_tokenizer(folder, tok_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=eps_scheduler(export.scheduler_config(cfg)), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def build_sdxl_peer(model, device: torch.device, dtype: torch.dtype):
    """diffusers' StableDiffusionXLPipeline holding the SDXL base ``model``'s weights: the released layout converted in
    memory (``export.sdxl_state_dicts``, the conversion ``export.export_sdxl`` writes to disk); Euler with
    "leading" spacing (sgm's start scaling), given our timesteps at each call (tests/test_sdxl_sampling.py)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from ldm.benchmark import export
    from ldm.benchmark.peer import load_part, quiet_peer_logs
    quiet_peer_logs()
    cfg = model.cfg
    weights, unet_cfg, vae_cfg, towers = export.sdxl_state_dicts(cfg, model.state_dict())
    parts = {"unet": load_part(lambda: UNet2DConditionModel(**unet_cfg), weights["unet"]),
             "vae": load_part(lambda: AutoencoderKL(**vae_cfg), weights["vae"])}
    for name, (_, tc) in towers.items():
        tower = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        parts[name] = load_part(lambda: tower(CLIPTextConfig(**tc)), weights[name])
    with tempfile.TemporaryDirectory() as folder:
        for name, kind in (("tokenizer", "sd1"), ("tokenizer_2", "sd2")):
            export.write_tokenizer(folder, kind)
            parts[name] = export.load_tokenizer(folder, {"kind": kind, "max_length": 77})
    d = cfg.denoiser
    scheduler = EulerDiscreteScheduler(num_train_timesteps=d.num_timesteps, beta_start=d.linear_start,
                                       beta_end=d.linear_end, beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(**parts, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=cfg.zeroes_empty_negative, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


@dataclass
class Variant:
    """One timed UNet configuration of one side: the callable, how long its first call took (compile), and notes."""
    side: str  # "ours" or "diffusers"
    name: str
    call: Callable[[], Any]
    first_s: float | None = None
    times: list[float] = field(default_factory=list)


def compiled(module: torch.nn.Module, mode: str, device: torch.device, backend: str) -> torch.nn.Module:
    """``module`` compiled as txt2img compiles (``compile_module``), or with another dynamo backend (``eager``: the
    quick CPU walk, where inductor would spend minutes compiling a tiny UNet)."""
    from ldm.speed.runtime import compile_module
    if backend == "inductor":
        return compile_module(module, mode, device)
    return torch.compile(module, fullgraph=True, backend=backend)


def first_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call with a synchronise after it: a compiled module's compile time (plus one run)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def unet_inputs(cfg, batch: int, side: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x (B, C, side, side), t (B,), context (B, 77, D): one guided step's UNet input (B = 2 x images) exactly as
    ``ldm.samplers`` call the UNet, so the window's own calls and the sampling runs hit the same compiled graph: x in
    float32 (the samplers' latents; the UNet casts), t a float32 (1,) tensor expanded to the batch, the context in
    ``dtype`` (the text encoder's)."""
    g = torch.Generator(device).manual_seed(0) if device.type != "meta" else None
    x = torch.randn(batch, cfg.unet.in_channels, side, side, generator=g, device=device, dtype=torch.float32)
    context = torch.randn(batch, 77, cfg.unet.context_dim, generator=g, device=device, dtype=dtype)
    t = torch.full((1,), 981.0, device=device).expand(batch)  # as the samplers pass it: one compiled graph for both
    return x, t, context


def vector_input(cfg, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """y (B, adm_in_channels): SDXL's vector conditioning (pooled text, Fourier-embedded sizes), as the conditioner
    gives it (in ``dtype``); its values do not change the timing."""
    g = torch.Generator(device).manual_seed(1) if device.type != "meta" else None
    return torch.randn(batch, cfg.unet.adm_in_channels, generator=g, device=device, dtype=dtype)


def pipeline_unet_kwargs(context: torch.Tensor, added: dict | None = None) -> dict:
    """The keyword arguments diffusers' SD and SDXL pipelines give their UNet, every one (a compiled UNet guards on
    their number): ``added`` is SDXL's {"text_embeds", "time_ids"}."""
    return dict(encoder_hidden_states=context, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=added, return_dict=False)


def pipeline_timestep(scheduler, device: torch.device) -> torch.Tensor:
    """A timestep as diffusers' pipelines pass it to the UNet: one 0-dim element of ``scheduler.timesteps`` (int64
    for PNDM, float32 for Euler), so the window's calls of the peer's UNet and its pipeline hit one compiled graph."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(2, device=device)
    return scheduler.timesteps[0]


def plain_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy with separate Q/K/V projections and contiguous weights: the 'eager SDPA' row, while the original is
    fused and channels_last for the rest (the compiled variants share it, so no part compiles it twice)."""
    from ldm.speed.optimize import set_fused_projections
    plain = copy.deepcopy(unet)
    set_fused_projections(plain, False)
    return plain.to(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- estimates

def unet_flops(preset: str, batch: int, side: int) -> float:
    """FLOPs of one UNet call, counted on the meta device (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode
    from ldm.model.unet import UNetModel
    cfg = from_name(preset)
    meta = torch.device("meta")
    with meta:
        unet = UNetModel(cfg.unet)
        x, t, c = unet_inputs(cfg, batch, side, meta, torch.float32)
        y = vector_input(cfg, batch, meta, torch.float32) if cfg.unet.adm_in_channels else None
        with FlopCounterMode(display=False) as counter:
            unet(x, t, c, y=y)
    return float(counter.get_total_flops())


def estimates(preset: str = "sd2", steps: int = 50, iters: int = 20) -> dict[str, float]:
    """Seconds each part should take on an H100 at full size, from the FLOP count and the published rate above."""
    call_s = 1.0 / H100_BEST_IT_S  # compiled, UNet batch 2 at 64x64 (512x512 images)
    eager_s = EAGER_SLOWDOWN * call_s
    image_s = steps * call_s + 0.06  # 50 guided steps, text encoding and the VAE decode
    c = COMPILE_S
    xl_compiled_s = SDXL_EAGER_CALL_S / SDXL_COMPILE_GAIN
    # each side: a warm-up and 2 timed images, text to decoded image (each side's best UNet: eager fused at worst)
    xl_e2e = 2 * 3 * (SDXL_STEPS * SDXL_EAGER_CALL_S + SDXL_DECODE_S)
    return {
        "build": 15.0,  # both models on the device, the peer's weights converted in memory
        "environment": 1.0,
        "checks": c["default"] + c["reduce-overhead"] + 2 * steps * call_s + 3 * 10 * eager_s + 5.0,
        "unet": 2 * 2 * (iters + 3) * eager_s + c["default"] + c["reduce-overhead"] + 2 * 2 * (iters + 3) * call_s,
        "unet_optional": 2 * (c["max-autotune-no-cudagraphs"] + c["int8"]),
        "end_to_end": 2 * 2 * 4 * image_s,
        "end_to_end_batch4": 2 * c["default"] + 2 * 2 * 4 * 4 * image_s,
        "profile": 3.0,
        # 5 methods x 2 sides x 2 repeats, eager, about 0.6 of the plain run's UNet work on average; FLOP counts, decodes
        "fewer_flops": 2 * 2 * 5 * 0.6 * steps * eager_s + 15.0,
        # part 7: free SD 2, build SDXL twice over; eager and fused rows (2 sides, first call + iters); end to end
        "sdxl": SDXL_BUILD_S + 2 * 2 * (iters + 1) * SDXL_EAGER_CALL_S + xl_e2e,
        "sdxl_end_to_end": xl_e2e,
        "sdxl_compile": 2 * SDXL_COMPILE_S + 2 * (iters + 1) * xl_compiled_s,  # its compiled row, when time is left
        "blog_table": 300.0,  # a 5.2 GB random checkpoint written, then six fresh 512x512 processes, one compiling
        "unet_tflop": unet_flops(preset, 2, 64) / 1e12,
    }

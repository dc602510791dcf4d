"""The benchmark's peer: diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL:
``ldm.benchmark.export.export_sdxl``) built offline from the same checkpoint.

    python -m ldm.benchmark.peer export --config CFG --ckpt CKPT --out DIR        # convert once
    python -m ldm.benchmark.peer run --weights DIR --prompt "A photo" --seed 1 --steps 50 --n_iter 2 \
        --n_samples 1 --H 512 --W 512 --skip_first --time_file T --stats S [--compile]
    python -m ldm.benchmark.peer check --config CFG --ckpt CKPT --weights DIR --json OUT

The weights, configs and tokenizer come from ``ldm.benchmark.export`` (diffusers' own converters,
offline). PLMS is ``PNDMScheduler(skip_prk_steps=True)`` with SD's schedule: same timesteps (steps_offset=1), same first
pseudo improved-Euler step (two UNet calls), same final alpha_bar (set_alpha_to_one=False). For v models
(768-v) each UNet call's v is turned into eps at that call's (t, x_t) before the multistep update, as ldm's
PLMS does (``eps_scheduler``): diffusers' own ``prediction_type="v_prediction"`` instead converts the
multistep combination of past v's at the current step's (t, x_t), a different sampler (0.3 relative
apart after 4 steps on the tiny model). An inpainting checkpoint exports too (9-channel
UNet), for the UNet microbenchmark: the text-to-image pipeline cannot run it. diffusers, transformers and
open_clip are imported inside functions: they are optional here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from ldm.apps.fewer_flops import add_caching_args, caching_from
from ldm.benchmark.export import export, load_tokenizer
from ldm.benchmark.measure import environment, peak_memory, write_json
from ldm.benchmark.peer_caching import reference_call
from ldm.fileio import write_text
from ldm.model.config import DTYPES
from ldm.speed.runtime import COMPILE_MODES, synchronize


def load_part(factory, source: str | dict) -> torch.nn.Module:
    """Build on the meta device and load strictly with assign=True, from an export file (mmap'd) or a state dict.

    transformers >= 5.6 dropped CLIPTextModel's ``text_model.`` prefix, which the converter still writes;
    the position ids (derived, not in SD checkpoints) are filled in.
    """
    path = source if isinstance(source, str) else "state dict"
    sd = torch.load(source, map_location="cpu", mmap=True, weights_only=True) if isinstance(source, str) else source
    with torch.device("meta"):
        module = factory()
    own = dict(module.state_dict(keep_vars=True))
    sd = {k if k in own else k.removeprefix("text_model."): v for k, v in sd.items()}
    buffers = dict(module.named_buffers())
    for name, buf in [*own.items(), *buffers.items()]:
        if name.endswith("position_ids") and name not in sd:
            sd[name] = torch.arange(buf.shape[-1]).expand(buf.shape)
    unknown = [k for k in sd if k not in own and k not in buffers]
    if unknown:
        raise RuntimeError(f"{path}: unexpected keys {unknown[:5]}")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True, assign=True)
    for name, value in sd.items():
        if name not in own:  # a non-persistent buffer
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner).register_buffer(leaf, value, persistent=False)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: not loaded: {left[:5]}")
    return module.eval()


def quiet_peer_logs() -> None:
    """diffusers/transformers warnings (e.g. about casting with ``.to``) would bury the benchmark's output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def v_to_eps(scheduler, v: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t, at the (t, x_t) the UNet was called with."""
    alpha_bar = scheduler.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype)
    return alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * x_t


def eps_scheduler(cfg: dict):
    """PNDMScheduler from its export config; for v models one whose ``step`` takes v and steps on its eps."""
    from diffusers import PNDMScheduler
    if cfg.get("prediction_type") != "v_prediction":
        return PNDMScheduler(**cfg)

    class VToEpsPNDMScheduler(PNDMScheduler):
        """PLMS over per-call eps: each v converted before it joins the multistep history (as ldm's PLMS)."""

        def step(self, model_output, timestep, sample, return_dict: bool = True):
            return super().step(v_to_eps(self, model_output, timestep, sample), timestep, sample, return_dict)

    return VToEpsPNDMScheduler(**{**cfg, "prediction_type": "epsilon"})


def build_pipeline(weights: str, device: torch.device, dtype: torch.dtype):
    """StableDiffusionPipeline (no safety checker) from an ``export`` folder, on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with open(os.path.join(weights, "configs.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("family") == "sdxl":
        return build_sdxl_pipeline(weights, device, dtype)
    unet = load_part(lambda: UNet2DConditionModel(**cfg["unet"]), os.path.join(weights, "unet.pt"))
    vae = load_part(lambda: AutoencoderKL(**cfg["vae"]), os.path.join(weights, "vae.pt"))
    text = load_part(lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                     os.path.join(weights, "text_encoder.pt"))
    tokenizer = load_tokenizer(weights, cfg.get("tokenizer"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=eps_scheduler(cfg["scheduler"]), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def build_sdxl_pipeline(weights: str, device: torch.device, dtype: torch.dtype):
    """StableDiffusionXLPipeline (or the img2img pipeline for a refiner export) from an SDXL ``export`` folder (``ldm.benchmark.export.export_sdxl``)."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with open(os.path.join(weights, "configs.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    part = lambda name: os.path.join(weights, f"{name}.pt")
    parts = {"unet": load_part(lambda: UNet2DConditionModel(**cfg["unet"]), part("unet")),
             "vae": load_part(lambda: AutoencoderKL(**cfg["vae"]), part("vae")),
             "scheduler": PNDMScheduler(**cfg["scheduler"])}
    parts["text_encoder_2"] = load_part(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
                                        part("text_encoder_2"))
    parts["tokenizer_2"] = load_tokenizer(os.path.join(weights, "tokenizer_2"), {"kind": "sd2", "max_length": 77})
    if "text_encoder" in cfg:
        parts["text_encoder"] = load_part(lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                                          part("text_encoder"))
        parts["tokenizer"] = load_tokenizer(os.path.join(weights, "tokenizer"), {"kind": "sd1", "max_length": 77})
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=cfg["force_zeros_for_empty_prompt"])
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def compile_peer_unet(pipe, mode: str, device: torch.device) -> None:
    """torch.compile diffusers' UNet as ``ldm.speed.runtime.compile_unet`` compiles ours: the same inductor settings
    and, with CUDA graphs, outputs cloned (PNDM keeps its earlier model outputs, as PLMS does)."""
    from ldm.speed.runtime import compile_module
    pipe.unet = compile_module(pipe.unet, mode, device)


def set_peer_attention(unet, attention: str) -> None:
    """``math``: diffusers' classic AttnProcessor, softmax(QK^T)V in three ops as the original; else its default."""
    if attention == "math":
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())


def optimize_peer_unet(unet, opt: argparse.Namespace) -> None:
    """The UNet's speed flags (attention, fused projections, channels_last, int8), the peer's own equivalents of
    ours (see ldm.benchmark.ladder); used by the pipeline and by the UNet microbenchmark."""
    set_peer_attention(unet, opt.attention)
    if opt.fuse_projections:
        unet.fuse_qkv_projections()  # ours fuses the UNet's attention only, not the VAE's
    if opt.channels_last:
        unet.to(memory_format=torch.channels_last)
    if opt.int8:
        from ldm.speed.optimize import quantize_int8
        quantize_int8(unet)


def optimize_peer(pipe, opt: argparse.Namespace, device: torch.device) -> None:
    """The speed flags on diffusers' pipeline: its UNet's (``optimize_peer_unet``), the VAE's channels_last, compile."""
    optimize_peer_unet(pipe.unet, opt)
    if opt.channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    if opt.compile:
        compile_peer_unet(pipe, opt.compile_mode, device)


def generate(pipe, prompts: list[str], negative: str, steps: int, scale: float, x_T: torch.Tensor,
             output_type: str = "pt", call=None) -> torch.Tensor:
    """One pipeline call from the start noise ``x_T``: latents ("latent") or images in [0, 1] ("pt"); ``call``:
    the pipeline through the reference packages (``ldm.benchmark.peer_caching.reference_call``)."""
    # SDXL: None lets force_zeros_for_empty_prompt zero the empty negative prompt, as ours does (sgm's)
    zeroed = negative == "" and hasattr(pipe, "text_encoder_2")
    return (call or pipe)(prompt=prompts, negative_prompt=None if zeroed else [negative] * len(prompts),
                          num_inference_steps=steps,
                guidance_scale=scale, height=x_T.shape[-2] * pipe.vae_scale_factor,
                width=x_T.shape[-1] * pipe.vae_scale_factor, latents=x_T, output_type=output_type).images


def run(opt: argparse.Namespace) -> dict:
    """txt2img's timing protocol for the peer: a warm-up iteration, then ``n_iter`` timed ones (seed, noise alike)."""
    from ldm.speed import runtime
    device = runtime.pick_device(opt.device)
    dtype = DTYPES[opt.dtype]
    pipe = build_pipeline(opt.weights, device, dtype)
    optimize_peer(pipe, opt, device)
    call, _ = reference_call(pipe, caching_from(opt, opt.steps), opt.steps)  # one setting for the process
    shape = [4, opt.H // 8, opt.W // 8]
    gen = torch.Generator(device).manual_seed(opt.seed)
    prompts = opt.n_samples * [opt.prompt]
    sdxl = hasattr(pipe, "text_encoder_2")
    scale = opt.scale if opt.scale is not None else 5.0 if sdxl else 9.0  # txt2img's defaults

    def once() -> torch.Tensor:
        x_T = torch.randn([opt.n_samples, *shape], generator=gen, device=device).to(dtype)
        images = generate(pipe, prompts, "", opt.steps, scale, x_T, call=call)
        return (255.0 * images.float()).to(torch.uint8).permute(0, 2, 3, 1).cpu()  # as ldm.apps.images.to_uint8

    timed = 0.0
    with torch.no_grad():
        if opt.skip_first:
            once()
            synchronize(device)
            gen.manual_seed(opt.seed)
        for _ in range(opt.n_iter):
            synchronize(device)
            t0 = time.perf_counter()
            once()
            synchronize(device)
            timed += time.perf_counter() - t0
    if opt.time_file:
        write_text(opt.time_file, f"{timed:.6f}\n")
    return {"seconds": timed, "images": opt.n_iter * opt.n_samples, "device": device}


def check(config: str, ckpt: str, weights: str, steps: int = 4, size: int = 64, seed: int = 1,
          prompt: str = "A photo", scale: float = 9.0) -> dict[str, float]:
    """max|ours - peer| / max|peer| of the text context, the sampled latents and the decoded images, fp32 CPU.

    Both start from the same noise x_T and run PLMS with classifier-free guidance: small numbers say the
    peer is the same model with the same sampler. One model is in memory at a time.
    """
    import gc
    from ldm.weights.loading import load_model
    from ldm.models.diffusion.plms import PLMSSampler
    device, dtype = torch.device("cpu"), torch.float32
    shape = [4, size // 8, size // 8]
    x_T = torch.randn([1, *shape], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model, _ = load_model(config, ckpt, device=device, dtype=dtype)
        c, uc = model.get_learned_conditioning([prompt]), model.get_learned_conditioning([""])
        z, _ = PLMSSampler(model).sample(S=steps, conditioning=c, batch_size=1, shape=shape, verbose=False,
                                        unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                        eta=0.0, x_T=x_T.clone())
        ours = {"text": c, "latents": z, "images": model.decode_first_stage(z)}
        del model
        gc.collect()
        pipe = build_pipeline(weights, device, dtype)
        peer_z = generate(pipe, [prompt], "", steps, scale, x_T.clone(), output_type="latent")
        peer = {"text": pipe.encode_prompt(prompt, device, 1, False)[0], "latents": peer_z,
                "images": pipe.vae.decode(peer_z / pipe.vae.config.scaling_factor).sample}
    return {k: ((ours[k].double() - peer[k].double()).abs().max() / peer[k].double().abs().max()).item()
            for k in ours}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm.benchmark.peer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="convert a checkpoint for diffusers")
    e.add_argument("--config", required=True)
    e.add_argument("--ckpt", required=True)
    e.add_argument("--out", required=True)
    r = sub.add_parser("run", help="time the pipeline like scripts/txt2img.py --skip_first --time_file")
    r.add_argument("--weights", required=True, help="a folder written by 'export'")
    r.add_argument("--prompt", default="A photo")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--scale", type=float, default=None, help="default: txt2img's (9.0; SDXL 5.0)")
    r.add_argument("--n_iter", type=int, default=2)
    r.add_argument("--n_samples", type=int, default=1)
    r.add_argument("--H", type=int, default=512)
    r.add_argument("--W", type=int, default=512)
    r.add_argument("--device", default=None)
    r.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    r.add_argument("--compile", action="store_true")
    r.add_argument("--compile_mode", default="default",
                   choices=list(COMPILE_MODES))
    r.add_argument("--attention", choices=["sdpa", "math"], default="sdpa", help="math: diffusers' AttnProcessor")
    r.add_argument("--fuse_projections", action="store_true", help="pipe.fuse_qkv_projections()")
    r.add_argument("--channels_last", action="store_true", help="UNet and VAE in channels_last")
    r.add_argument("--int8", action="store_true", help="dynamic int8 quantization of the UNet's linears (torchao)")
    r.add_argument("--skip_first", action="store_true")
    add_caching_args(r)  # DeepCache, T-GATE, --cfg_end through the reference packages (ldm.benchmark.peer_caching)
    r.add_argument("--time_file", default=None)
    r.add_argument("--stats", default=None, help="write seconds, peak memory and the environment here (json)")
    c = sub.add_parser("check", help="compare the peer's latents and images with ours from the same noise")
    c.add_argument("--config", required=True)
    c.add_argument("--ckpt", required=True)
    c.add_argument("--weights", default=None, help="an 'export' folder (default: convert into a temp folder)")
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--size", type=int, default=64)
    c.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    torch.set_grad_enabled(False)
    quiet_peer_logs()
    if opt.cmd == "export":
        export(opt.config, opt.ckpt, opt.out)
        print(f"wrote {opt.out}")
    elif opt.cmd == "run":
        summary = run(opt)
        peak, kind = peak_memory(summary["device"])
        if opt.stats:
            write_json(opt.stats, {"seconds": summary["seconds"], "images": summary["images"], "peak_bytes": peak,
                                   "peak_kind": kind, **environment(summary["device"])})
        print(f"diffusers: {summary['images']} images in {summary['seconds']:.2f}s (timed)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            weights = opt.weights or export(opt.config, opt.ckpt, tmp)
            errors = check(opt.config, opt.ckpt, weights, steps=opt.steps, size=opt.size)
        if opt.json:
            write_json(opt.json, errors)
        print("ours vs diffusers, max|diff|/max|diffusers|: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

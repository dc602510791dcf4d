"""Text-to-image with the original txt2img.py command line, plus the PyTorch 2 blog's speed flags.

    python scripts/txt2img.py --prompt "A photo" --seed 1 --plms \
        --config configs/stable-diffusion/v2-inference_native_mha.yaml --ckpt /tmp/model_native_mha.ckpt \
        --n_iter 2 --n_samples 1 --compile --skip_first
    python scripts/txt2img.py --prompt "A photo" --ckpt sd_xl_base_1.0.safetensors --refiner_ckpt sd_xl_refiner_1.0.safetensors
    torchrun --standalone --nproc_per_node 8 scripts/txt2img.py --from-file prompts.txt ...   # README "Many GPUs"

Flags parse here; the work is done by the ldm package. Errors are one line on stderr and exit 1
(``--debug`` shows the traceback); image files are written atomically, so none is ever partial.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ldm.apps import distributed
from ldm.apps.cli import (UserError, add_model_args, add_sampler_arg, add_speed_args, build_model, check_latent_flags,
                          check_latent_size, check_model_args, check_numbers, check_sampler_args, guidance_conditioning,
                          make_sampler, native_size, optimize, read_prompts, run_script, sampler_flag, setup)
from ldm.apps.fewer_flops import add_caching_args, caching_fields, caching_from, check_branch, check_caching
from ldm.apps.loop import sample_and_save
from ldm.apps.sdxl import SD_SCALE, SDXL_SCALE, add_sdxl_args, check_sdxl_args, check_sdxl_model, is_sdxl


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=str, nargs="?", default="a professional photograph of an astronaut riding a triceratops")
    p.add_argument("--negative_prompt", type=str, default="", help="the unconditional prompt of classifier-free guidance")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples")
    p.add_argument("--steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling")
    p.add_argument("--dpm", action="store_true", help="use the DPM-Solver++ (2M) sampler")
    add_sampler_arg(p)
    p.add_argument("--fixed_code", action="store_true", help="the same starting code for every iteration")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--n_iter", type=int, default=3, help="sample this often")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size: 1024 for SDXL, 768 for SD 2 768-v, 512 "
                        "otherwise, 64 with --demo)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: as --H)")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor of the VAE")
    p.add_argument("--n_samples", type=int, default=3, help="batch size: samples per prompt")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=float, default=None,
                   help=f"classifier-free guidance scale (default {SD_SCALE}; SDXL: {SDXL_SCALE}, sgm's)")
    p.add_argument("--from-file", type=str, help="read prompts from this file, one per line")
    p.add_argument("--repeat", type=int, default=1, help="repeat each prompt of --from-file this often")
    p.add_argument("--torchscript", action="store_true", help="not supported: use --compile")
    p.add_argument("--ipex", action="store_true", help="not supported: use --compile")
    add_model_args(p)
    add_speed_args(p)
    add_caching_args(p)
    add_sdxl_args(p)
    return p.parse_args(argv)


def check_args(opt: argparse.Namespace) -> None:
    """Reject bad combinations before anything is loaded."""
    if opt.torchscript or opt.ipex:
        raise UserError("--torchscript/--ipex are not supported here; use --compile (torch.compile of the UNet)")
    check_numbers(opt)
    check_sampler_args(opt, ("steps", "n_iter", "n_samples", "f", "C", "repeat"))
    check_size(opt)
    check_caching(opt)
    check_sdxl_args(opt)
    check_model_args(opt)


def check_size(opt: argparse.Namespace) -> None:
    for name in ("H", "W"):
        v = getattr(opt, name)
        if v is None:
            continue
        if v < 8 or v % 8 or v % opt.f:
            raise UserError(f"--{name} {v} must be a positive multiple of 8 and of the latent factor --f {opt.f}")


def run(opt: argparse.Namespace) -> dict:
    """Load, (compile,) sample, decode and save; returns the timing summary."""
    import torch
    from ldm.apps import images
    from ldm.speed import runtime

    rt = setup(opt)
    device, dtype = rt.device, rt.dtype
    batches = read_prompts(opt)

    model, model_name = build_model(opt, rt)
    check_sdxl_model(opt, model)
    if getattr(model.cfg, "conditioning_key", "crossattn") != "crossattn":
        raise UserError("txt2img needs a text-to-image model; this is an inpainting model (use ldm-inpaint, "
                        "scripts/inpaint.py)")
    check_latent_flags(model, opt.f, opt.C)  # before sampling: a wrong --f would write images of another size
    caching = caching_from(opt, opt.steps)
    check_branch(caching, model)
    opt.scale = opt.scale if opt.scale is not None else SDXL_SCALE if is_sdxl(model) else SD_SCALE
    refiner = None
    if opt.refiner_ckpt:
        refiner, refiner_name = load_refiner(opt, rt)
        model_name += f" + {refiner_name}"
    name = sampler_flag(opt, model)
    stop = expert_steps(opt, model, name) if refiner is not None else None
    sampler, sampler_name = make_sampler(name, model, device, caching, stop_after=stop)
    if refiner is not None:
        refiner_sampler, _ = make_sampler(name, refiner, device)
    if opt.H is None or opt.W is None:
        size = native_size(model, opt.demo)
        opt.H = opt.H or opt.W or size  # a side not given follows the other, else the model's native size
        opt.W = opt.W or opt.H
        print(f"--H/--W not given: {opt.H}x{opt.W} (this model's native size is {size})", file=sys.stderr)
        check_size(opt)
    check_latent_size(model, opt.H, opt.W, opt.f)
    print("speed: " + ", ".join(optimize(opt, model, rt)), file=sys.stderr)
    if refiner is not None:
        check_latent_size(refiner, opt.H, opt.W, opt.f)
        print("refiner speed: " + ", ".join(optimize(opt, refiner, rt, offload_with=model)), file=sys.stderr)

    shape = [opt.C, opt.H // opt.f, opt.W // opt.f]
    gen = torch.Generator(device).manual_seed(opt.seed)

    def start_code(n):
        return torch.randn([n, *shape], generator=gen, device=device)

    def generate(prompts, x_T):
        c, uc = guidance_conditioning(model, prompts, opt.negative_prompt, opt.scale, (opt, opt.H, opt.W))
        verbose = distributed.current().step_bars
        samples, _ = sampler.sample(S=opt.steps, conditioning=c, batch_size=len(prompts), shape=shape,
                                    verbose=verbose, unconditional_guidance_scale=opt.scale,
                                    unconditional_conditioning=uc, eta=opt.ddim_eta, x_T=x_T, generator=gen)
        if refiner is not None:
            from ldm.apps.sdxl import refine, size_batch
            samples = refine(refiner, refiner_sampler, samples, size_batch(opt, prompts, opt.H, opt.W), opt, stop,
                             gen, verbose)
            return images.to_uint8(refiner.decode_first_stage(samples))
        return images.to_uint8(model.decode_first_stage(samples))

    def caption(prompt: str, **fields) -> str:
        sdxl = sdxl_fields(opt) if is_sdxl(model) else {}
        return images.parameters_text(prompt, opt.negative_prompt, opt.steps, sampler_name, opt.scale, opt.seed,
                                      opt.W, opt.H, model_name, **sdxl, **caching_fields(caching), **fields)

    with torch.no_grad(), runtime.attention_scope(rt.backends), runtime.precision_scope(rt.precision, device, dtype):
        return sample_and_save(opt, batches, gen, start_code, generate, caption, dtype, model)


def load_refiner(opt: argparse.Namespace, rt: Any) -> tuple[Any, str]:
    """(the refiner model, its name) from --refiner_ckpt / --refiner_config, checked to be a refiner."""
    demo = "sdxl-refiner" if opt.demo else None  # --demo: the tiny refiner, random
    ns = argparse.Namespace(**{**vars(opt), "ckpt": opt.refiner_ckpt, "config": opt.refiner_config, "demo": demo})
    model, name = build_model(ns, rt)
    check_sdxl_model(opt, model, "refiner")
    print(f"refiner: {name}", file=sys.stderr)
    return model, name


def expert_steps(opt: argparse.Namespace, model, name: str) -> int | None:
    """With --denoising_end, how many of the --steps the base runs before the refiner takes over (else None)."""
    if opt.denoising_end is None:
        return None
    if name not in ("euler", "euler_a", "dpmpp_2m"):
        raise UserError(f"--denoising_end hands a noisy latent along one sigma schedule: use --sampler euler, "
                        f"euler_a or dpmpp_2m (not {name})")
    from ldm.samplers import discrete_sigma_schedule, expert_split
    from ldm.samplers.api import model_alpha_bar
    return expert_split(discrete_sigma_schedule(model_alpha_bar(model), opt.steps), opt.denoising_end)


def sdxl_fields(opt: argparse.Namespace) -> dict:
    """The PNG parameters of SDXL's size conditioning and refiner stage."""
    size = lambda v: f"{v[1]}x{v[0]}"  # (height, width) -> WxH, as "Size"
    out = {"Original size": size(opt.original_size or (opt.H, opt.W)), "Crop": f"{opt.crop[0]},{opt.crop[1]}",
           "Target size": size(opt.target_size or (opt.H, opt.W))}
    if opt.refiner_ckpt:
        out.update({"Denoising end": opt.denoising_end} if opt.denoising_end is not None
                   else {"Refiner strength": opt.refiner_strength})
    return out


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args(argv), check_args, run)


if __name__ == "__main__":
    sys.exit(main())

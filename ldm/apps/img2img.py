"""Image-to-image with the original img2img.py command line, plus the PyTorch 2 blog's speed flags.

    python scripts/img2img.py --prompt "A fantasy landscape" --init-img sketch.png --strength 0.75 \
        --config configs/stable-diffusion/v2-inference.yaml --ckpt /tmp/v2-1_512-ema-pruned.ckpt

The init image shrinks to a multiple of 64 per side (LANCZOS), is encoded by the VAE, noised to step
int(strength * steps) and denoised from there (DDIM by default; --plms/--dpm start partway too). SDXL counts
the steps as generative-models does (``pipelines.strength_to_steps``: at most one fewer).
Errors are one line on stderr and exit 1 (``--debug`` shows the traceback); PNGs are written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

from ldm.apps import distributed
from ldm.apps.cli import (UserError, add_model_args, add_sampler_arg, add_speed_args, build_model, check_latent_flags, check_model_args,
                          check_numbers, check_sampler_args, guidance_conditioning, make_sampler, optimize,
                          read_prompts, run_script, sampler_flag, setup)
from ldm.apps.fewer_flops import add_caching_args, caching_fields, caching_from, check_branch, check_caching
from ldm.apps.loop import refuse_nonfinite_input, sample_and_save
from ldm.apps.sdxl import SD_SCALE, SDXL_SCALE, add_sdxl_args, check_sdxl_args, check_sdxl_model, is_sdxl


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar")
    p.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    p.add_argument("--negative_prompt", type=str, default="", help="the unconditional prompt of classifier-free guidance")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/img2img-samples")
    p.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling")
    p.add_argument("--dpm", action="store_true", help="use the DPM-Solver++ (2M) sampler")
    add_sampler_arg(p)
    p.add_argument("--fixed_code", action="store_true", help="the same noise for every iteration")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--n_iter", type=int, default=1, help="sample this often")
    p.add_argument("--C", type=int, default=4, help="latent channels (checked against the model)")
    p.add_argument("--f", type=int, default=8, help="downsampling factor of the VAE (checked against the model)")
    p.add_argument("--n_samples", type=int, default=2, help="batch size: samples per prompt")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=float, default=None,
                   help=f"classifier-free guidance scale (default {SD_SCALE}; SDXL: {SDXL_SCALE}, sgm's)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="noising strength in [0, 1]: 1.0 all but destroys the init image")
    p.add_argument("--from-file", type=str, help="read prompts from this file, one per line")
    add_model_args(p)
    add_speed_args(p)
    add_caching_args(p)
    add_sdxl_args(p, refiner=False)
    return p.parse_args(argv)


def check_args(opt: argparse.Namespace) -> None:
    """Reject bad flags before anything is loaded."""
    check_numbers(opt)
    check_sampler_args(opt, ("ddim_steps", "n_iter", "n_samples", "f", "C"))
    if not 0.0 <= opt.strength <= 1.0:
        raise UserError(f"--strength {opt.strength} must be in [0, 1]")
    if not opt.init_img:
        raise UserError("--init-img is required: the image to start from")
    if not os.path.isfile(opt.init_img):
        raise UserError(f"init image not found: {opt.init_img}")
    check_caching(opt)
    check_sdxl_args(opt)
    check_model_args(opt)


def run(opt: argparse.Namespace) -> dict:
    """Load, encode the init image, (compile,) sample, decode and save; returns the timing summary."""
    import torch
    from ldm.apps import images, pipelines
    from ldm.speed import runtime

    rt = setup(opt)
    device, dtype = rt.device, rt.dtype
    batches = read_prompts(opt)
    init_image = pipelines.load_init_image(opt.init_img)  # (1, 3, H, W): read before the model loads
    height, width = init_image.shape[-2:]
    print(f"loaded input image of size ({width}, {height}) from {opt.init_img}", file=sys.stderr)

    model, model_name = build_model(opt, rt)
    check_sdxl_model(opt, model, "any")  # the SDXL base or refiner
    opt.scale = opt.scale if opt.scale is not None else SDXL_SCALE if is_sdxl(model) else SD_SCALE
    if getattr(model.cfg, "conditioning_key", "crossattn") != "crossattn":
        raise UserError("img2img needs a text-to-image model; this is an inpainting model (use ldm-inpaint, scripts/inpaint.py)")
    check_latent_flags(model, opt.f, opt.C)
    t_enc = pipelines.strength_to_steps(opt.strength, opt.ddim_steps, sgm=is_sdxl(model))  # SDXL: sgm's count
    caching = caching_from(opt, t_enc)  # T-GATE and --cfg_end count the steps img2img runs
    check_branch(caching, model)
    sampler, sampler_name = make_sampler(sampler_flag(opt, model), model, device, caching)
    print("speed: " + ", ".join(optimize(opt, model, rt)), file=sys.stderr)

    gen = torch.Generator(device).manual_seed(opt.seed)
    print(f"target t_enc is {t_enc} of {opt.ddim_steps} steps", file=sys.stderr)

    with torch.no_grad(), runtime.attention_scope(rt.backends), runtime.precision_scope(rt.precision, device, dtype):
        init_latent = pipelines.encode_image(model, init_image.expand(opt.n_samples, -1, -1, -1), gen)
        refuse_nonfinite_input(opt, init_latent, "the init image")
        shape = tuple(init_latent.shape)

        def noise(n: int):
            return torch.randn(shape, generator=gen, device=device)[:n]

        def generate(prompts: list[str], eps):
            n = len(prompts)
            c, uc = guidance_conditioning(model, prompts, opt.negative_prompt, opt.scale, (opt, height, width))
            samples = pipelines.img2img(sampler, init_latent[:n], c, uc, opt.scale, opt.ddim_steps, opt.strength,
                                        opt.ddim_eta, gen, noise=eps, verbose=distributed.current().step_bars,
                                        sgm=is_sdxl(model))
            return images.to_uint8(model.decode_first_stage(samples))

        def caption(prompt: str, **fields) -> str:
            return images.parameters_text(prompt, opt.negative_prompt, opt.ddim_steps, sampler_name, opt.scale,
                                          opt.seed, width, height, model_name,
                                          **{"Denoising strength": opt.strength, **caching_fields(caching), **fields})

        return sample_and_save(opt, batches, gen, noise, generate, caption, dtype, model)


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args(argv), check_args, run)


if __name__ == "__main__":
    sys.exit(main())

"""Inpainting with an SD 2 inpainting model: repaint the white part of a mask, plus the speed flags.

    python scripts/inpaint.py --prompt "a red sofa" --image room.png --mask sofa-mask.png \
        --config configs/stable-diffusion/v2-inpainting-inference.yaml --ckpt /tmp/512-inpainting-ema.ckpt

As the original inpainting demos: mask pixels >= 0.5 (white) are repainted, the rest is kept; the UNet
sees the latents, the mask and the masked image's latent (9 channels) and the prompt. Image and mask must
be the same size; both shrink to a multiple of 64 per side. Errors are one line on stderr and exit 1
(``--debug`` shows the traceback); PNGs are written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

from ldm.apps import distributed
from ldm.apps.cli import (UserError, add_model_args, add_speed_args, build_model, check_model_args, check_numbers,
                          check_sampler_args, guidance_conditioning, make_sampler, optimize, read_prompts, run_script,
                          sampler_flag, setup)
from ldm.apps.fewer_flops import add_caching_args, caching_fields, caching_from, check_branch, check_caching
from ldm.apps.loop import refuse_nonfinite_input, sample_and_save

DEMO_PRESET = "tiny-inpainting"
CONFIG_HELP = "an SD 2 inpainting checkpoint (its config, v2-inpainting-inference.yaml, is found from its keys)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=str, nargs="?", default="a professional photograph of a cat sitting on a bench")
    p.add_argument("--image", type=str, help="the image to inpaint")
    p.add_argument("--mask", type=str, help="the mask, same size as the image: white (>= 0.5) is repainted")
    p.add_argument("--negative_prompt", type=str, default="", help="the unconditional prompt of classifier-free guidance")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/inpaint-samples")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling")
    p.add_argument("--dpm", action="store_true", help="use the DPM-Solver++ (2M) sampler")
    p.add_argument("--fixed_code", action="store_true", help="the same starting code for every iteration")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic; the gradio demo used 1)")
    p.add_argument("--n_iter", type=int, default=1, help="sample this often")
    p.add_argument("--n_samples", type=int, default=1, help="batch size: samples per prompt")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=float, default=10.0, help="classifier-free guidance scale (the demos' default 10)")
    p.add_argument("--from-file", type=str, help="read prompts from this file, one per line")
    add_model_args(p)
    add_speed_args(p)
    add_caching_args(p)
    return p.parse_args(argv)


def check_args(opt: argparse.Namespace) -> None:
    """Reject bad flags and missing files before anything is loaded."""
    check_numbers(opt)
    check_sampler_args(opt, ("steps", "n_iter", "n_samples"))
    for flag, path in (("--image", opt.image), ("--mask", opt.mask)):
        if not path:
            raise UserError(f"{flag} is required")
        if not os.path.isfile(path):
            raise UserError(f"{flag[2:]} not found: {path}")
    check_caching(opt)
    check_model_args(opt)


def run(opt: argparse.Namespace) -> dict:
    """Load, encode the masked image, (compile,) sample, decode and save; returns the timing summary."""
    import torch
    from ldm.apps import images, pipelines
    from ldm.speed import runtime

    rt = setup(opt)
    device, dtype = rt.device, rt.dtype
    batches = read_prompts(opt)
    inputs = pipelines.load_inpaint_inputs(opt.image, opt.mask)  # read and checked before the model loads
    height, width = inputs.image.shape[-2:]

    model, model_name = build_model(opt, rt, demo_preset=DEMO_PRESET)
    if not getattr(model, "concat_keys", None):
        raise UserError(f"this is not an inpainting model (its UNet takes no mask); use {CONFIG_HELP}")
    caching = caching_from(opt, opt.steps)
    check_branch(caching, model)
    sampler, sampler_name = make_sampler(sampler_flag(opt, model), model, device, caching)
    print("speed: " + ", ".join(optimize(opt, model, rt)), file=sys.stderr)

    gen = torch.Generator(device).manual_seed(opt.seed)

    with torch.no_grad(), runtime.attention_scope(rt.backends), runtime.precision_scope(rt.precision, device, dtype):
        c_concat = pipelines.inpaint_conditioning(model, inputs, opt.n_samples, gen)  # (B, 1 + C, h, w)
        refuse_nonfinite_input(opt, c_concat, "the masked image")
        shape = (opt.n_samples, model.cfg.unet.out_channels, *c_concat.shape[-2:])

        def start_code(n: int):
            return torch.randn(shape, generator=gen, device=device)[:n]

        def generate(prompts: list[str], x_T):
            n = len(prompts)
            c, uc = guidance_conditioning(model, prompts, opt.negative_prompt, opt.scale)
            samples = pipelines.inpaint(sampler, c_concat[:n], c, uc, opt.scale, opt.steps, opt.ddim_eta, x_T, gen,
                                        verbose=distributed.current().step_bars)
            return images.to_uint8(model.decode_first_stage(samples))

        def caption(prompt: str, **fields) -> str:
            return images.parameters_text(prompt, opt.negative_prompt, opt.steps, sampler_name, opt.scale, opt.seed,
                                          width, height, model_name,
                                          **{"Mask": os.path.basename(opt.mask), **caching_fields(caching), **fields})

        return sample_and_save(opt, batches, gen, start_code, generate, caption, dtype, model)


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args(argv), check_args, run, demo_model="a tiny inpainting model")


if __name__ == "__main__":
    sys.exit(main())

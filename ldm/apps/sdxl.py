"""SDXL in the scripts: its flags (the size conditioning, the refiner, the ensemble of experts), its conditioning
batch, and the refiner stage after the base, as generative-models' demo and diffusers run them.

Defaults are the reference's (``scripts/demo/sampling.py``): original and target size = the image size, crop
(0, 0), aesthetic score 6.0 (2.5 for the negative side), refinement strength 0.15, guidance scale 5.0.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

SDXL_SCALE = 5.0  # sgm's VanillaCFG default for SDXL
SD_SCALE = 9.0    # the original SD 2 scripts' default


class SDXLFlagError(ValueError):
    """An SDXL flag used with a model that is not SDXL (or the reverse); one line."""


def is_sdxl(model: Any) -> bool:
    """SDXL base or refiner (generative-models' ``DiffusionEngine``: a ``conditioner``, not a ``cond_stage_model``)."""
    return hasattr(model, "conditioner")


def is_refiner(model: Any) -> bool:
    """The refiner: its conditioner reads the aesthetic score (the base reads the target size instead)."""
    return is_sdxl(model) and "aesthetic_score" in model.cfg.conditioner.input_keys


def add_sdxl_args(p: argparse.ArgumentParser, refiner: bool = True) -> None:
    """SDXL's size conditioning, and (txt2img) the refiner stage."""
    p.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL: the size conditioning's original (height, width) (default: --H --W, as sgm's demo)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("TOP", "LEFT"), default=(0, 0),
                   help="SDXL: the crop's top-left corner the model is conditioned on (default 0 0)")
    p.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL: the size conditioning's target (height, width) (default: --H --W)")
    p.add_argument("--aesthetic_score", type=float, default=6.0,
                   help="SDXL refiner: the aesthetic score conditioning (default 6.0; the negative side gets 2.5)")
    if not refiner:
        return
    p.add_argument("--refiner_ckpt", type=str, default=None,
                   help="SDXL: refine the base's latents with this refiner checkpoint (img2img on them, as sgm)")
    p.add_argument("--refiner_config", type=str, default=None,
                   help="the refiner's yaml (default: chosen from its keys)")
    p.add_argument("--refiner_strength", type=float, default=0.15,
                   help="the refiner's img2img strength on the base's latents (default 0.15, sgm's demo)")
    p.add_argument("--denoising_end", type=float, default=None,
                   help="ensemble of experts (diffusers): the base stops after this fraction of the noise (e.g. "
                        "0.8) and the refiner finishes the same schedule without new noise")


def check_sdxl_args(opt: argparse.Namespace) -> None:
    """Flag checks that need no model: ranges, and what the refiner flags need."""
    for name in ("original_size", "target_size"):
        v = getattr(opt, name, None)
        if v is not None and min(v) < 1:
            raise SDXLFlagError(f"--{name} {v[0]} {v[1]}: both sides must be at least 1")
    if min(opt.crop) < 0:
        raise SDXLFlagError(f"--crop {opt.crop[0]} {opt.crop[1]}: the corner cannot be negative")
    if getattr(opt, "refiner_ckpt", None) is None:
        for name in ("refiner_config", "denoising_end"):
            if getattr(opt, name, None) is not None:
                raise SDXLFlagError(f"--{name} needs --refiner_ckpt")
        return
    if not 0.0 <= opt.refiner_strength <= 1.0:
        raise SDXLFlagError(f"--refiner_strength {opt.refiner_strength} must be in [0, 1]")
    if opt.denoising_end is not None and not 0.0 < opt.denoising_end < 1.0:
        raise SDXLFlagError(f"--denoising_end {opt.denoising_end} must be between 0 and 1 (exclusive)")


def check_sdxl_model(opt: argparse.Namespace, model: Any, role: str = "base") -> None:
    """The loaded model fits the flags: SDXL flags need SDXL; ``role`` "base": not the refiner, "refiner": the
    refiner, "any": either."""
    defaults = {"original_size": None, "target_size": None, "crop": (0, 0), "refiner_ckpt": None}
    if not is_sdxl(model):
        used = [k for k, v in defaults.items() if getattr(opt, k, v) not in (v, [0, 0])]
        if used:
            raise SDXLFlagError(f"--{used[0]} is an SDXL flag; this model is not SDXL")
        return
    if role == "any":  # img2img: base or refiner
        return
    if role == "base" and is_refiner(model):
        raise SDXLFlagError("this checkpoint is the SDXL refiner; give the base as --ckpt and the refiner as "
                            "--refiner_ckpt (or use ldm-img2img, which takes the refiner)")
    if role == "refiner" and not is_refiner(model):
        raise SDXLFlagError("--refiner_ckpt is not an SDXL refiner (its conditioner has no aesthetic score)")


def size_batch(opt: argparse.Namespace, prompts: list[str], height: int, width: int) -> dict:
    """The batch SDXL's embedders read: the prompts and the size conditioning of the flags (default: the image)."""
    from ldm.model.conditioner import conditioning_batch
    return conditioning_batch(prompts, tuple(opt.original_size or (height, width)), tuple(opt.crop),
                              tuple(opt.target_size or (height, width)), opt.aesthetic_score)


def sdxl_conditioning(model: Any, batch: dict, negative_prompt: str, scale: float) -> tuple[dict, dict | None]:
    """(c, uc) of classifier-free guidance: uc None at scale 1; the base zeroes an empty negative prompt."""
    n = len(batch["txt"])
    uc = None if scale == 1.0 else model.get_unconditional_conditioning(batch, n * [negative_prompt])
    return model.get_learned_conditioning(batch), uc


def refine(refiner: Any, sampler: Any, latents: Any, batch: dict, opt: argparse.Namespace, stopped_at: int | None,
           generator: Any, verbose: bool) -> Any:
    """The refiner stage on the base's latents: img2img at --refiner_strength (noised afresh, sgm), or, after a
    base that stopped at step ``stopped_at`` (--denoising_end), the rest of the same schedule (diffusers)."""
    from ldm.apps import pipelines
    c, uc = sdxl_conditioning(refiner, batch, opt.negative_prompt, opt.scale)
    if stopped_at is None:
        return pipelines.img2img(sampler, latents, c, uc, opt.scale, opt.steps, opt.refiner_strength,
                                 generator=generator, verbose=verbose, sgm=True)
    sampler.make_schedule(ddim_num_steps=opt.steps, verbose=False)
    return sampler.decode(latents, c, opt.steps - stopped_at, unconditional_guidance_scale=opt.scale,
                          unconditional_conditioning=uc, generator=generator, verbose=verbose)


__all__ = ["is_sdxl", "is_refiner", "add_sdxl_args", "check_sdxl_args", "check_sdxl_model", "size_batch",
           "sdxl_conditioning", "refine", "SDXLFlagError", "SDXL_SCALE", "SD_SCALE"]

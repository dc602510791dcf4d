"""The scripts' common loop (txt2img, img2img, inpaint): warm-up, timed passes, the non-finite check, PNGs, grid,
time file."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import torch

from ldm.apps import images
from ldm.apps.cli import Interrupted, UserError
from ldm.apps.finite import FiniteWatch
from ldm.fileio import write_text
from ldm.speed import runtime


def sample_and_save(opt: argparse.Namespace, batches: list[list[str]], gen, noise: Callable[[int], Any],
                    generate: Callable[[list[str], Any], Any], caption: Callable[..., str], dtype, model) -> dict:
    """The scripts' common loop: an optional untimed warm-up (compilation happens there; ``gen`` is rewound
    after it, so saved images do not depend on --skip_first), then n_iter timed passes over the prompt
    batches, each image saved atomically as it comes, the grid and the time file; returns the summary.

    ``noise(n)`` draws start noise, ``generate(prompts, noise)`` returns uint8 images (B, H, W, 3), and
    ``caption(prompt, **fields)`` the PNG "parameters" text (the grid's without per-image fields). Ctrl-C in the
    timed passes raises ``Interrupted``, whose message says which files were written. A batch whose text
    conditioning, latents or decoded images are not finite is refused, naming the stage (``FiniteWatch``: read
    once per batch, after the sampling loop), unless --keep_nonfinite.
    """
    device = gen.device
    with FiniteWatch(model, per_call=opt.debug) as watch:
        return _passes(opt, batches, gen, noise, generate, caption, dtype, device, watch)


def refuse_nonfinite(opt: argparse.Namespace, watch: FiniteWatch, prompts: list[str]) -> None:
    """One line naming the stage that went NaN/inf; nothing of the batch is written (unless --keep_nonfinite)."""
    bad = watch.first_bad()
    watch.reset()
    if bad and not getattr(opt, "keep_nonfinite", False):
        hint = "" if opt.debug else " (--debug finds the first such UNet call)"
        raise UserError(f"the {bad} went non-finite (NaN or inf) for {prompts[0]!r}{hint}; no image was written for "
                        f"this batch. Try --dtype fp32 or bf16, or --keep_nonfinite to save such images anyway")


def refuse_nonfinite_input(opt: argparse.Namespace, latent, what: str) -> None:
    """The VAE encode of the input image, made once before the passes: one line if it went NaN/inf."""
    if not getattr(opt, "keep_nonfinite", False) and not bool(torch.isfinite(latent).all()):
        raise UserError(f"the VAE encode of {what} went non-finite (NaN or inf); nothing was written. Try --dtype "
                        f"fp32 or bf16, or --keep_nonfinite to go on anyway")


def _passes(opt, batches, gen, noise, generate, caption, dtype, device, watch) -> dict:
    sample_dir = os.path.join(opt.outdir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    if opt.skip_first:
        state = gen.get_state()
        generate(batches[0], noise(len(batches[0])))
        runtime.synchronize(device)
        refuse_nonfinite(opt, watch, batches[0])
        gen.set_state(state)
    fixed = noise(opt.n_samples) if opt.fixed_code else None
    all_images, timed, samples, grid_path = [], 0.0, [], None
    index = images.next_index(sample_dir)
    try:
        for it in range(opt.n_iter):
            for prompts in batches:
                start = fixed[: len(prompts)] if fixed is not None else noise(len(prompts))
                runtime.synchronize(device)
                t0 = time.perf_counter()
                out = generate(prompts, start)
                runtime.synchronize(device)
                timed += time.perf_counter() - t0
                refuse_nonfinite(opt, watch, prompts)
                for i, (img, prompt) in enumerate(zip(out, prompts)):
                    text = caption(prompt, **{"Batch size": len(prompts), "Batch pos": i, "Iteration": it,
                                              "Eta": opt.ddim_eta, "Dtype": str(dtype).split(".")[-1]})
                    path = os.path.join(sample_dir, f"{index:05}.png")
                    images.save_png(images.to_pil(img), path, text)
                    samples.append(path)
                    index += 1
                all_images.append(out)
        grid = images.make_grid(torch.cat(all_images), opt.n_rows or opt.n_samples)
        grid_index = images.next_index(opt.outdir, r"^grid-(\d+)\.png$")
        path = os.path.join(opt.outdir, f"grid-{grid_index:04}.png")
        images.save_png(images.to_pil(grid), path, caption(batches[0][0]))
        grid_path = path
        write_time_file(opt.time_file, timed)
    except KeyboardInterrupt as e:
        raise Interrupted(images.written_text(samples, grid_path)) from e
    return {"seconds": timed, "images": len(samples), "grid": grid_path}


def write_time_file(path: str | None, seconds: float) -> None:
    """The timed seconds as plain text (--time_file), written atomically; missing folders are made."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_text(path, f"{seconds:.6f}\n")

"""The scripts' common loop (txt2img, img2img, inpaint): warm-up, timed passes, the non-finite check, PNGs, grid,
time file."""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

from ldm.apps import distributed, images
from ldm.apps.cli import Interrupted, UserError
from ldm.apps.finite import FiniteWatch
from ldm.fileio import write_text
from ldm.speed import runtime

GRID_PATTERN = r"^grid-(\d+)\.png$"


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

    Under torchrun (``ldm.apps.distributed``) each rank takes every world_size-th batch of the n_iter passes;
    with it, or with --seed_per_item, image g's start noise comes from seed + g, and its file is number
    start + g, start being the first free number rank 0 found: the same files whatever the number of ranks.
    Rank 0 writes the grid and the time file (the slowest rank's seconds, summed over the rounds) at the end.
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
    job = distributed.current()
    per_item = job.launched or getattr(opt, "seed_per_item", False)
    # each node's first rank compiles first; the others then find its graphs in the inductor FX graph cache
    staged = job.world_size > 1 and (getattr(opt, "compile", False) or getattr(opt, "compile_vae", False))
    sample_dir = os.path.join(opt.outdir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    work = [(it, prompts) for it in range(opt.n_iter) for prompts in batches]  # work item k: one batch
    firsts = list(itertools.accumulate((len(p) for _, p in work), initial=0))  # global index of k's first image
    first_call: list[float] = []  # this rank's first generate call, where compilation happens

    def timed(prompts, start) -> tuple[Any, float]:
        runtime.synchronize(device)
        t0 = time.perf_counter()
        out = generate(prompts, start)
        runtime.synchronize(device)
        secs = time.perf_counter() - t0
        if not first_call:
            first_call.append(secs)
        return out, secs

    if opt.skip_first:
        def warm_up() -> None:
            state = gen.get_state()
            timed(batches[0], noise(len(batches[0])))
            refuse_nonfinite(opt, watch, batches[0])
            gen.set_state(state)
        _node_first(job, staged, warm_up)
    fixed = noise(opt.n_samples) if opt.fixed_code and not per_item else None
    mine, samples, grid_path, total, seconds, shift = {}, [], None, 0, 0.0, 0
    index = job.share(images.next_index(sample_dir) if job.main else None)

    def one_batch(k: int) -> tuple[float, int]:
        nonlocal shift
        if k >= len(work):
            return 0.0, 0
        it, prompts = work[k]
        keys = range(len(prompts)) if opt.fixed_code else range(firsts[k], firsts[k] + len(prompts))
        start = (fixed[: len(prompts)] if fixed is not None else item_noise(noise, gen, opt.seed, keys) if per_item
                 else noise(len(prompts)))
        out, secs = timed(prompts, start)
        refuse_nonfinite(opt, watch, prompts)
        for i, (img, prompt, key) in enumerate(zip(out, prompts, keys)):
            seed = {"Item seed": distributed.item_seed(opt.seed, key)} if per_item else {}
            text = caption(prompt, **{"Batch size": len(prompts), "Batch pos": i, "Iteration": it,
                                      "Eta": opt.ddim_eta, "Dtype": str(dtype).split(".")[-1], **seed})
            wanted = index + firsts[k] + i + shift
            path, number = images.save_new_png(images.to_pil(img), sample_dir, wanted, text)
            shift += number - wanted  # another writer took the name: this rank's later names follow the new one
            samples.append(path)
        mine[k] = out
        return secs, len(prompts)

    bar = tqdm(total=firsts[-1], desc="images", unit="img", disable=not (job.main and job.world_size > 1))
    t_wall = time.perf_counter()
    try:
        for r in range(-(-len(work) // job.world_size)):
            k, done, error = r * job.world_size + job.rank, (0.0, 0), None
            try:
                done = _node_first(job, staged and r == 0 and not opt.skip_first, lambda: one_batch(k))
            except distributed.RankFailed:
                raise
            except Exception as e:
                error = e
            report = job.agree(error, done)
            seconds += max(s for s, _ in report)  # the ranks run side by side: the slowest one's time counts
            total += sum(n for _, n in report)
            bar.update(sum(n for _, n in report))
        bar.close()  # before the grid: the summary line follows the finished bar
        gathered = job.gather((mine, first_call[:1]))
        if job.main:
            every = {k: out for m, _ in gathered for k, out in m.items()}
            grid = images.make_grid(torch.cat([every[k] for k in range(len(work))]), opt.n_rows or opt.n_samples)
            grid_path, _ = images.save_new_png(images.to_pil(grid), opt.outdir,
                                               images.next_index(opt.outdir, GRID_PATTERN), caption(batches[0][0]),
                                               name="grid-{:04}.png", pattern=GRID_PATTERN)
            write_time_file(opt.time_file, seconds)
    except KeyboardInterrupt as e:
        raise Interrupted(images.written_text(samples, grid_path)) from e
    finally:
        bar.close()
    summary = {"seconds": seconds, "images": total, "grid": grid_path}
    if job.launched:
        summary.update(ranks=job.world_size, wall_seconds=time.perf_counter() - t_wall,
                       first_call_seconds=[f[0] if f else None for _, f in gathered] if job.main else first_call)
    return summary


def _node_first(job: distributed.Job, staged: bool, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; when ``staged``, first on each node's local rank 0 (rank 0 on one node), then on
    the others once those are done or failed: they find the compiled graphs in their node's inductor cache."""
    if not staged:
        return fn()
    if job.local_rank == 0:
        try:
            result = fn()
        except Exception as e:
            job.agree(e)
            raise
        job.agree()
        return result
    job.agree()
    return fn()


def item_noise(noise: Callable[[int], Any], gen, seed: int, keys) -> Any:
    """Start noise of a batch whose items are ``keys``: item g's from the generator seeded with seed + g, so an
    image does not depend on which rank or batch made it. The generator goes on from the last item's state."""
    parts = []
    for key in keys:
        gen.manual_seed(distributed.item_seed(seed, key))
        parts.append(noise(1))
    return torch.cat(parts)


def write_time_file(path: str | None, seconds: float) -> None:
    """The timed seconds as plain text (--time_file), written atomically; missing folders are made."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_text(path, f"{seconds:.6f}\n")

"""Turning decoded samples into PNG files: conversion, grids, metadata, never-overwriting names, and whether the
output paths can be written at all (checked before any model work)."""

from __future__ import annotations

import os
import re

import torch
from PIL import Image, PngImagePlugin

from ldm.fileio import atomic_write


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in about [-1, 1], any dtype/device -> (B, H, W, 3) uint8 on the CPU."""
    x = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (255.0 * x).to(torch.uint8, copy=False).permute(0, 2, 3, 1).cpu()


def to_pil(img: torch.Tensor) -> Image.Image:
    """(H, W, 3) uint8 -> PIL image."""
    data = bytes(img.contiguous().clone().untyped_storage())  # a fresh storage of exactly H*W*3 bytes
    return Image.frombytes("RGB", (img.shape[1], img.shape[0]), data)


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> one (rows*(H+p)+p, cols*(W+p)+p, 3) grid, ``nrow`` images per row, black padding."""
    n, h, w, c = images.shape
    cols = max(1, min(nrow, n))
    rows = (n + cols - 1) // cols
    grid = torch.zeros(rows * (h + padding) + padding, cols * (w + padding) + padding, c, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def parameters_text(prompt: str, negative_prompt: str, steps: int, sampler: str, scale: float, seed: int,
                    width: int, height: int, model: str, **extra) -> str:
    """Generation parameters in the widely read "parameters" PNG text form (prompt, negative, then key: value)."""
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": scale, "Seed": seed, "Size": f"{width}x{height}",
              "Model": model, **extra}
    return f"{prompt}\nNegative prompt: {negative_prompt}\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())


def save_png(img: Image.Image, path: str, parameters: str | None = None, replace: bool = True) -> None:
    """Write atomically (``ldm.fileio.atomic_write``): never a half-written PNG; with ``replace=False``,
    FileExistsError when ``path`` is taken, and nothing is written."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    atomic_write(path, lambda f, _tmp: img.save(f, format="PNG", pnginfo=info), replace=replace)


def save_new_png(img: Image.Image, folder: str, index: int, parameters: str | None = None,
                 name: str = "{:05}.png", pattern: str = r"^(\d+)\.png$") -> tuple[str, int]:
    """(path, number) of ``img`` saved as ``name.format(index)`` in ``folder``, or, where another process took
    that name first, as the next free number: a name is claimed atomically, so no image overwrites another."""
    while True:
        path = os.path.join(folder, name.format(index))
        try:
            save_png(img, path, parameters, replace=False)
            return path, index
        except FileExistsError:
            index = max(index + 1, next_index(folder, pattern))


def next_index(folder: str, pattern: str = r"^(\d+)\.png$") -> int:
    """1 + the highest number among existing files matching ``pattern`` (0 if none): where numbering starts
    (``save_new_png`` claims each name atomically, so two writers starting at the same number do not collide)."""
    best = -1
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = re.match(pattern, name)
            if m:
                best = max(best, int(m.group(1)))
    return best + 1


def unwritable_folder(folder: str) -> str | None:
    """Why files cannot be written in ``folder`` (made first where missing), or None when they can: its nearest
    existing ancestor must be a folder this process may write in."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {existing} is read-only"
    return None


def check_outputs(outdir: str | None, time_file: str | None) -> None:
    """One-line ValueError when --outdir (or its samples/ folder) or --time_file cannot be written, so a bad path
    never costs a model load, nor leaves images without their time file."""
    if not outdir:  # "--outdir" given without a value
        raise ValueError("--outdir needs the path of a folder")
    for folder in (outdir, os.path.join(outdir, "samples")):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise ValueError(f"--outdir {outdir} cannot be used: {folder} exists and is not a folder")
    if why := unwritable_folder(outdir):
        raise ValueError(f"--outdir {outdir} cannot be written: {why}")
    if not time_file:
        return
    if os.path.isdir(time_file):
        raise ValueError(f"--time_file {time_file} is a folder; give the path of a file")
    if os.path.exists(time_file) and not os.path.isfile(time_file):  # /dev/stdout, a FIFO: written in place
        why = None if os.access(time_file, os.W_OK) else "it is not writable"
    else:  # a file is replaced atomically: its folder must be writable, not the file itself
        why = unwritable_folder(os.path.dirname(os.path.abspath(time_file)))
    if why:
        raise ValueError(f"--time_file {time_file} cannot be written: {why}")


def written_text(samples: list[str], grid: str | None) -> str:
    """What an interrupted run left on disk, in one line: the sample files (first to last) and the grid."""
    if not samples:
        return "no image was written"
    where = samples[0] if len(samples) == 1 else f"{samples[0]} to {samples[-1]}"
    return f"{len(samples)} image(s) written ({where}); " + (f"grid {grid}" if grid else "no grid")

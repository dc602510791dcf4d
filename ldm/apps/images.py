"""Turning decoded samples into PNG files: conversion, grids, metadata, never-overwriting names."""

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


def save_png(img: Image.Image, path: str, parameters: str | None = None) -> None:
    """Write atomically (``ldm.fileio.atomic_write``): never a half-written PNG."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    atomic_write(path, lambda f, _tmp: img.save(f, format="PNG", pnginfo=info))


def next_index(folder: str, pattern: str = r"^(\d+)\.png$") -> int:
    """1 + the highest number among existing files matching ``pattern`` (0 if none), so nothing is overwritten."""
    best = -1
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = re.match(pattern, name)
            if m:
                best = max(best, int(m.group(1)))
    return best + 1

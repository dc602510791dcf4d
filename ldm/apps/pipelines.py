"""img2img and inpainting steps around the samplers: input images to tensors, masks, latents, c_concat.

The original scripts' conventions (Stability-AI/stablediffusion ``scripts/img2img.py`` and the inpainting
demos): images shrink to a multiple of 64 per side (LANCZOS) and map to [-1, 1]; a mask pixel >= 0.5
(white) is repainted and is zeroed in the masked image; img2img runs the last ``int(strength * steps)``
steps from the init latent noised by ``stochastic_encode``. Every Pillow mode is read at its full range
(``standardize``): 16-bit and 32-bit pixels are scaled to [0, 1], never clipped at 255, and what was converted
is said on stderr.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

MULTIPLE = 64  # the original resizes every input side down to a multiple of 64


# Pillow modes whose pixels have more than 8 bits: read at full range as one float channel ("F") in [0, 1].
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_MODE_WORDS = {"1": "1-bit black and white", "L": "8-bit grayscale", "P": "palette", "PA": "palette with alpha",
               "LA": "grayscale with alpha", "La": "grayscale with premultiplied alpha", "RGB": "RGB", "RGBA": "RGBA",
               "RGBa": "premultiplied RGBA", "RGBX": "RGBX", "CMYK": "CMYK (no ICC profile applied)"}


def _deep_to_unit(img: Image.Image) -> tuple[np.ndarray, str]:
    """A 16-bit, 32-bit integer or 32-bit float grayscale image -> (H, W) float32 in [0, 1], and what was done."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        # one float32 division of exact integers: v16 = 257 * v8 gives bit for bit the 8-bit image's v8 / 255
        return a.astype(np.float32) / np.float32(65535), f"16-bit grayscale ({img.mode}) scaled to 0..1"
    if img.mode == "I":
        low, high = int(a.min()), int(a.max())
        if low < 0:
            raise ValueError(f"32-bit integer pixels go down to {low}; only 0 and up can be read as brightness")
        if high <= 65535:
            return (a.astype(np.float32) / np.float32(65535),
                    f"32-bit integer grayscale with values up to {high}, taken as 16-bit, scaled to 0..1")
        return ((a.astype(np.float64) / (2**31 - 1)).astype(np.float32),
                f"32-bit integer grayscale with values up to {high}, taken as 32-bit, scaled to 0..1")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("32-bit float pixels include NaN or infinity")
    low, high = float(a.min()), float(a.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"32-bit float pixels range over {low:g}..{high:g}; they are read as 0..1 (black..white)")
    return a, "32-bit float grayscale taken as 0..1"


def standardize(img: Image.Image, mode: str = "RGB") -> tuple[Image.Image, str | None]:
    """``img`` in ``mode`` ("RGB" or "L") when its pixels are 8-bit, or as "F" (one float channel in [0, 1]) when
    they are deeper (16-bit, 32-bit integer, 32-bit float), never clipped; with a note saying what was converted
    (None when nothing was). Alpha is dropped, as the original's ``convert("RGB")`` does."""
    src = img.mode
    if src in DEEP_MODES:
        a, note = _deep_to_unit(img)
        return Image.fromarray(a, mode="F"), note + (" (gray copied to R, G and B)" if mode == "RGB" else "")
    if src == mode:
        return img, None
    transparent = src == "P" and "transparency" in img.info
    if src in ("P", "PA", "La", "RGBa"):  # palettes (with their transparency), premultiplied alpha: unpremultiplied
        img = img.convert("LA" if src == "La" else "RGBA")
    try:
        out = img.convert(mode)
    except ValueError as e:
        raise ValueError(f"Pillow mode {src} cannot be converted to {mode} ({e}); save it as RGB or grayscale") from e
    words = "palette with transparency" if transparent else _MODE_WORDS.get(src, f"Pillow mode {src}")
    target = "RGB" if mode == "RGB" else "grayscale" if src in ("1", "LA", "La") else "grayscale by ITU-R 601-2 luma"
    return out, f"{words} converted to {target}" + (" (alpha ignored)" if src in _ALPHA_MODES or transparent else "")


def open_image(path: str, mode: str = "RGB", what: str = "image") -> Image.Image:
    """The file at ``path`` as ``standardize`` returns it (``mode``, or "F" in [0, 1] for 16/32-bit pixels); what was
    converted is said in one line on stderr; one-line errors for missing, non-image or unreadable-mode files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            out, note = standardize(img, mode)
            out = out.copy() if out is img else out  # pixels that outlive the file
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {path} is not a readable image ({' '.join(str(e).split())})") from e
    except ValueError as e:
        raise ValueError(f"{what} {path}: {' '.join(str(e).split())}") from e
    if note:
        print(f"{what}: {note}", file=sys.stderr)
    return out


def resize_to_multiple(img: Image.Image, multiple: int = MULTIPLE) -> Image.Image:
    """Shrink each side down to a multiple of ``multiple`` with LANCZOS, as the original img2img.py; an "F" image
    is resized in float (a 16-bit input keeps its levels) and clipped to [0, 1] as 8-bit resizing clips."""
    w, h = img.size
    new_w, new_h = w - w % multiple, h - h % multiple
    if new_w == 0 or new_h == 0:
        raise ValueError(f"the image is {w}x{h}; each side must be at least {multiple} pixels")
    if (new_w, new_h) == (w, h):
        return img
    out = img.resize((new_w, new_h), resample=Image.LANCZOS)
    if out.mode == "F":  # LANCZOS overshoots near edges
        out = Image.fromarray(np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0), mode="F")
    return out


def _unit(img: Image.Image, mode: str) -> np.ndarray:
    """(H, W) for ``mode`` "L", (H, W, 3) for "RGB": float32 in [0, 1] from an image of any Pillow mode."""
    img, _ = standardize(img, mode)  # deep modes at full range, as one "F" channel
    if img.mode == "F":
        a = np.array(img, dtype=np.float32)  # a writable copy, for torch.from_numpy
        return np.repeat(a[..., None], 3, axis=-1) if mode == "RGB" else a
    return np.asarray(img, dtype=np.float32) / 255.0


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """An image of any Pillow mode (``standardize``: 16/32-bit at full range) -> (1, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(_unit(img, "RGB"))  # (H, W, 3)
    return (2.0 * x - 1.0).permute(2, 0, 1)[None].contiguous()


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """A mask of any Pillow mode (color by luma) -> (1, 1, H, W) float32 in {0, 1}: 1 (>= 0.5, white) is repainted."""
    m = torch.from_numpy(_unit(mask, "L"))  # (H, W)
    return (m >= 0.5).float()[None, None]


def load_init_image(path: str, multiple: int = MULTIPLE) -> torch.Tensor:
    """img2img's input: (1, 3, H, W) in [-1, 1], each side shrunk to a multiple of ``multiple``."""
    return image_to_tensor(resize_to_multiple(open_image(path, "RGB", "init image"), multiple))


@dataclass(frozen=True)
class InpaintInputs:
    """The original's inpainting batch for one image: all (1, C, H, W) float32."""

    image: torch.Tensor         # (1, 3, H, W) in [-1, 1]
    mask: torch.Tensor          # (1, 1, H, W) in {0, 1}, 1 = repaint
    masked_image: torch.Tensor  # image * (mask < 0.5): the kept pixels, the repainted region zero (grey)


def check_same_size(image: Image.Image, mask: Image.Image) -> None:
    """A mask must cover its image pixel for pixel."""
    if mask.size != image.size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is "
                         f"{image.size[0]}x{image.size[1]}; they must be the same size")


def make_inpaint_inputs(image: Image.Image, mask: Image.Image) -> InpaintInputs:
    """Image and mask of the same size (sides multiples of 8, for the VAE) -> the inpainting tensors."""
    check_same_size(image, mask)
    x, m = image_to_tensor(image), mask_to_tensor(mask)
    return InpaintInputs(x, m, x * (m < 0.5))


def load_inpaint_inputs(image_path: str, mask_path: str, multiple: int = MULTIPLE) -> InpaintInputs:
    """Read image and mask (same size required), shrink both to a multiple of ``multiple``, build the tensors."""
    image = open_image(image_path, "RGB", "image")
    mask = open_image(mask_path, "L", "mask")
    check_same_size(image, mask)  # on the files as given, before resizing
    return make_inpaint_inputs(resize_to_multiple(image, multiple), resize_to_multiple(mask, multiple))


def encode_image(model: Any, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), sampled from the VAE posterior with ``generator``."""
    x = image.to(model.device)
    return model.get_first_stage_encoding(model.encode_first_stage(x), generator)


def inpaint_conditioning(model: Any, inputs: InpaintInputs, batch_size: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """c_concat (B, 1 + C, h, w) in ``model.concat_keys`` order: the mask resized (nearest) to the latent size,
    and the masked image's latent (one posterior sample per batch entry, as the original)."""
    masked = inputs.masked_image.expand(batch_size, -1, -1, -1)
    z = encode_image(model, masked, generator)  # (B, C, h, w)
    m = F.interpolate(inputs.mask.to(z.device), size=z.shape[-2:])  # (1, 1, h, w), nearest as the original
    m = m.to(z.dtype).expand(batch_size, -1, -1, -1)
    return torch.cat([z if key == model.masked_image_key else m for key in model.concat_keys], 1)


def hybrid_cond(c_concat: torch.Tensor, context: torch.Tensor | None) -> dict | None:
    """The original dict conditioning; the unconditional one shares c_concat (as the original scripts)."""
    return None if context is None else {"c_concat": [c_concat], "c_crossattn": [context]}


def strength_to_steps(strength: float, steps: int, sgm: bool = False) -> int:
    """The denoising steps of img2img at ``strength`` in [0, 1]: the original's t_enc = int(strength * steps); with
    ``sgm`` (SDXL), generative-models' count: its Img2ImgDiscretizationWrapper keeps the max(int(strength *
    (steps + 1)), 1) smallest of the steps + 1 sigmas (the final 0 among them), one step fewer than that (40 steps at
    0.15: 5, where the original's rule gives 6)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength {strength} must be in [0, 1] (1 = start from pure noise at the top step)")
    return max(int(strength * (steps + 1)), 1) - 1 if sgm else int(strength * steps)


@torch.no_grad()
def img2img(sampler: Any, init_latent: torch.Tensor, cond: Any, uncond: Any, scale: float, steps: int,
            strength: float, eta: float = 0.0, generator: torch.Generator | None = None,
            noise: torch.Tensor | None = None, verbose: bool = True, sgm: bool = False) -> torch.Tensor:
    """Noise ``init_latent`` (B, C, h, w) to step ``strength_to_steps(strength, steps, sgm)`` and denoise it: the
    original img2img (``sgm``: generative-models' step count, SDXL's)."""
    t_enc = strength_to_steps(strength, steps, sgm)
    sampler.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
    t = torch.full((init_latent.shape[0],), t_enc, dtype=torch.long)
    z = sampler.stochastic_encode(init_latent, t, noise=noise, generator=generator)
    return sampler.decode(z, cond, t_enc, unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                          generator=generator, verbose=verbose)


@torch.no_grad()
def inpaint(sampler: Any, c_concat: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
            steps: int, eta: float = 0.0, x_T: torch.Tensor | None = None,
            generator: torch.Generator | None = None, verbose: bool = True) -> torch.Tensor:
    """Latents (B, C, h, w) of an inpainting model sampled with hybrid conditioning (the original demos)."""
    b, _, h, w = c_concat.shape
    shape = [sampler.model.cfg.unet.out_channels, h, w]
    samples, _ = sampler.sample(S=steps, batch_size=b, shape=shape, conditioning=hybrid_cond(c_concat, cond),
                                unconditional_guidance_scale=scale,
                                unconditional_conditioning=hybrid_cond(c_concat, uncond), eta=eta, x_T=x_T,
                                generator=generator, verbose=verbose)
    return samples


__all__ = ["DEEP_MODES", "standardize", "open_image", "resize_to_multiple", "image_to_tensor", "mask_to_tensor",
           "load_init_image", "InpaintInputs", "check_same_size", "make_inpaint_inputs", "load_inpaint_inputs", "encode_image", "inpaint_conditioning",
           "hybrid_cond", "strength_to_steps", "img2img", "inpaint", "MULTIPLE"]

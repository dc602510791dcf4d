"""The one table of model families: what a checkpoint's keys and shapes say it is, and which presets fit it.

What the weights tell: the text encoder (CLIP ``cond_stage_model.transformer.*`` for SD 1.x, OpenCLIP
``cond_stage_model.model.*`` for SD 2.x; for SDXL the towers of ``conditioner.embedders.N.*`` in order: CLIP then
OpenCLIP for the base, OpenCLIP alone for the refiner), the cross-attention context width, the UNet's width and
input channels (9 = inpainting), the width of its vector conditioning (SDXL's ``label_emb``: 2816 base, 2560
refiner), and the attention layout. What they cannot tell: SD 2.x eps vs v prediction
(the 512px base models predict eps, the 768px models v, with identical shapes). Config detection
(``ldm.weights.detect``) and the converter's report both read this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ldm.weights.layout import detect_layout
from ldm.weights.reading import CheckpointError

UNET = "model.diffusion_model."
FIRST_CONV = UNET + "input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)
LABEL_EMB = UNET + "label_emb.0.0.weight"  # (time embedding width, vector width)
TEXT_PREFIXES = {"cond_stage_model.transformer.": "CLIP", "cond_stage_model.model.": "OpenCLIP"}
SDXL_TOWERS = {"transformer": "CLIP", "model": "OpenCLIP"}
_SDXL_TOWER = re.compile(r"^conditioner\.embedders\.(\d+)\.(transformer|model)\.")


@dataclass(frozen=True)
class Family:
    """One known model shape and its presets (``ldm.model.presets``); the first is the default guess."""
    name: str
    text: str  # "CLIP" or "OpenCLIP"; SDXL's towers in order, "CLIP+OpenCLIP"
    context: int
    model_channels: int
    in_channels: int
    presets: tuple[tuple[str, str], ...]  # ((prediction, preset name), ...); several: the weights cannot tell
    unsupported: str | None = None
    vector: int | None = None  # the UNet's vector conditioning width (SDXL's label_emb); None: no label_emb


FAMILIES = (
    Family("SD 1.x (CLIP ViT-L/14 text encoder)", "CLIP", 768, 320, 4, (("eps", "sd1"),)),
    Family("SD 2.x (OpenCLIP ViT-H/14 text encoder)", "OpenCLIP", 1024, 320, 4, (("v", "sd2-v"), ("eps", "sd2"))),
    Family("SD 2.x inpainting (9-channel UNet input)", "OpenCLIP", 1024, 320, 9, (("eps", "sd2-inpainting"),)),
    Family("SD 1.x inpainting (9-channel UNet input)", "CLIP", 768, 320, 9, (("eps", "sd1-inpainting"),)),
    Family("SD 2.x depth-to-image (5-channel UNet input)", "OpenCLIP", 1024, 320, 5, (),
           unsupported="SD 2.x depth-to-image checkpoints are not supported"),
    Family("tiny SD1-shaped test model", "CLIP", 64, 32, 4, (("eps", "sd1-tiny"),)),
    Family("tiny SD2-shaped test model", "OpenCLIP", 64, 32, 4, (("v", "tiny-v"), ("eps", "tiny"))),
    Family("tiny SD2-shaped inpainting test model", "OpenCLIP", 64, 32, 9, (("eps", "tiny-inpainting"),)),
    Family("SDXL base (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders)", "CLIP+OpenCLIP", 2048, 320, 4,
           (("eps", "sdxl-base"),), vector=2816),
    Family("SDXL refiner (OpenCLIP ViT-bigG/14 text encoder, aesthetic score)", "OpenCLIP", 1280, 384, 4,
           (("eps", "sdxl-refiner"),), vector=2560),
    Family("tiny SDXL-shaped test model", "CLIP+OpenCLIP", 96, 32, 4, (("eps", "sdxl-tiny"),), vector=96),
    Family("tiny SDXL-refiner-shaped test model", "OpenCLIP", 64, 32, 4, (("eps", "sdxl-refiner-tiny"),), vector=88),
)


@dataclass(frozen=True)
class Fingerprint:
    """What a state dict says about its model."""
    text: str | None  # "CLIP", "OpenCLIP", SDXL's "CLIP+OpenCLIP", or None (none, or both SD and SDXL forms)
    context: int | None
    model_channels: int | None
    in_channels: int | None
    layout: str | None
    vector: int | None = None

    def family(self) -> Family | None:
        return next((f for f in FAMILIES if (f.text, f.context, f.model_channels, f.in_channels, f.vector) ==
                     (self.text, self.context, self.model_channels, self.in_channels, self.vector)), None)


def fingerprint(sd: dict[str, torch.Tensor]) -> Fingerprint:
    """Read the text encoder, context width, UNet width and input channels and the layout; never raises
    for a merely unknown model (missing parts read as None)."""
    texts = {name for prefix, name in TEXT_PREFIXES.items() if any(k.startswith(prefix) for k in sd)}
    towers = {int(m.group(1)): SDXL_TOWERS[m.group(2)] for k in sd if (m := _SDXL_TOWER.match(k))}
    if towers:  # SD's cond_stage_model beside SDXL's conditioner is two kinds, even where the names agree
        texts = {"+".join(towers[i] for i in sorted(towers))} if not texts else texts | {"conditioner"}
    context = next((int(v.shape[1]) for k, v in sd.items() if k.startswith(UNET) and
                    k.endswith((".attn2.to_k.weight", ".attn2.k_proj_weight"))), None)
    first = sd.get(FIRST_CONV)
    model_channels, in_channels = (int(n) for n in first.shape[:2]) if first is not None else (None, None)
    layout = detect_layout({k: v for k, v in sd.items() if k.startswith(UNET)})
    emb = sd.get(LABEL_EMB)
    vector = int(emb.shape[1]) if emb is not None and emb.dim() == 2 else None
    return Fingerprint(texts.pop() if len(texts) == 1 else None, context, model_channels, in_channels, layout, vector)


def identify(sd: dict[str, torch.Tensor]) -> tuple[Family, Fingerprint]:
    """The supported family of a full SD or SDXL checkpoint; one-line CheckpointError for anything else."""
    fp = fingerprint(sd)
    if fp.layout is None or fp.model_channels is None:
        raise CheckpointError("not an ldm Stable Diffusion checkpoint: no model.diffusion_model.* UNet attention "
                              "weights (a diffusers folder file or a UNet-only file?)")
    if fp.text is None:
        some = any(k.startswith(tuple(TEXT_PREFIXES)) or _SDXL_TOWER.match(k) for k in sd)
        found = "text encoder weights of more than one model kind" if some else "no text encoder weights"
        raise CheckpointError(f"cannot tell the model family: the checkpoint holds {found} "
                              f"(cond_stage_model.transformer.*, cond_stage_model.model.* or SDXL's "
                              f"conditioner.embedders.*); pass --config")
    family = fp.family()
    sdxl = any(k.startswith("conditioner.embedders.") for k in sd)
    if (family is None or family.vector is None) and not sdxl and any(k.startswith(UNET + "label_emb.") for k in sd):
        raise CheckpointError("the UNet has a class/image embedding (label_emb, e.g. SD 2.x unCLIP): not supported")
    if family is None:
        vector = f", vector conditioning width {fp.vector}" if fp.vector else ""
        raise CheckpointError(f"no known model matches this checkpoint ({fp.text} text encoder, context width "
                              f"{fp.context}, UNet width {fp.model_channels}, {fp.in_channels} input channels"
                              f"{vector}); pass --config")
    if family.unsupported:
        raise CheckpointError(f"{family.unsupported}; detected {family.name}")
    return family, fp


def describe(sd: dict[str, torch.Tensor]) -> str:
    """The family's name and context width, for reports; a partial or unknown model is described, not refused."""
    fp = fingerprint(sd)
    family = fp.family()
    if family is None:  # a partial dict: the context width alone tells SD 1.x from 2.x
        family = next((f for f in FAMILIES if f.context == fp.context and f.in_channels == (fp.in_channels or 4)
                       and f.model_channels == 320), None)
    if family is None:
        clip = ", SD 1.x-style CLIP text encoder" if fp.text == "CLIP" else ""
        return f"unknown family (cross-attention context width {fp.context}{clip})"
    return f"{family.name}, context width {family.context}"

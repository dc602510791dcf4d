"""Which repo config fits a checkpoint: read from its keys and shapes, for runs without ``--config``.

What the weights tell: the text encoder (CLIP ``cond_stage_model.transformer.*`` for SD 1.x, OpenCLIP
``cond_stage_model.model.*`` for SD 2.x), the cross-attention context width, the UNet's width and
input channels (9 = inpainting), and the attention layout. What they cannot tell: SD 2.x eps vs v
prediction (the 512px base models predict eps, the 768px models v, with identical shapes). That is
guessed from the file name when it says 512 or 768, and otherwise assumed to be v (768px
v2-inference-v.yaml, the default SD 2.x release); the message says so and how to override it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ldm.checkpoint import CheckpointError, detect_layout, unwrap_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = "model.diffusion_model."
FIRST_CONV = UNET + "input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)
TEXT_PREFIXES = {"cond_stage_model.transformer.": "CLIP", "cond_stage_model.model.": "OpenCLIP"}


@dataclass(frozen=True)
class Family:
    """One known model shape and its repo configs (repo-relative, original layout); the first is the default."""
    name: str
    text: str  # "CLIP" or "OpenCLIP"
    context: int
    model_channels: int
    in_channels: int
    configs: tuple[tuple[str, str], ...]  # ((prediction, yaml), ...); several means the weights cannot tell
    unsupported: str | None = None


SD = "configs/stable-diffusion/"
FAMILIES = (
    Family("SD 1.x (CLIP ViT-L/14 text encoder)", "CLIP", 768, 320, 4, (("eps", SD + "v1-inference.yaml"),)),
    Family("SD 2.x (OpenCLIP ViT-H/14 text encoder)", "OpenCLIP", 1024, 320, 4,
           (("v", SD + "v2-inference-v.yaml"), ("eps", SD + "v2-inference.yaml"))),
    Family("SD 2.x inpainting (9-channel UNet input)", "OpenCLIP", 1024, 320, 9,
           (("eps", SD + "v2-inpainting-inference.yaml"),)),
    Family("SD 1.x inpainting (9-channel UNet input)", "CLIP", 768, 320, 9,
           (("eps", SD + "v1-inpainting-inference.yaml"),)),
    Family("SD 2.x depth-to-image (5-channel UNet input)", "OpenCLIP", 1024, 320, 5, (),
           unsupported="SD 2.x depth-to-image checkpoints are not supported"),
    Family("tiny SD1-shaped test model", "CLIP", 64, 32, 4, (("eps", "configs/tiny/v1-tiny.yaml"),)),
    Family("tiny SD2-shaped test model", "OpenCLIP", 64, 32, 4,
           (("v", "configs/tiny/v2-tiny-v.yaml"), ("eps", "configs/tiny/v2-tiny.yaml"))),
    Family("tiny SD2-shaped inpainting test model", "OpenCLIP", 64, 32, 9,
           (("eps", "configs/tiny/v2-tiny-inpainting.yaml"),)),
)
PREDICTION_WORDS = {"v": "v-prediction (as the 768px SD 2.x models)",
                    "eps": "eps-prediction (as the 512px SD 2.x models)"}


def fingerprint(sd: dict[str, torch.Tensor]) -> tuple[str, int, int, int, str]:
    """(text encoder, context width, model_channels, in_channels, layout) read from the state dict's keys and shapes."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError("this looks like an SDXL checkpoint (conditioner.embedders.*); only SD 1.x/2.x are "
                              "supported")
    layout = detect_layout({k: v for k, v in sd.items() if k.startswith(UNET)})
    if layout is None or FIRST_CONV not in sd:
        raise CheckpointError("not an ldm Stable Diffusion checkpoint: no model.diffusion_model.* UNet attention "
                              "weights (a diffusers folder file or a UNet-only file?)")
    texts = {name for prefix, name in TEXT_PREFIXES.items() if any(k.startswith(prefix) for k in sd)}
    if len(texts) != 1:
        found = "both CLIP and OpenCLIP" if texts else "no"
        raise CheckpointError(f"cannot tell the model family: the checkpoint holds {found} text encoder weights "
                              f"(cond_stage_model.transformer.* or cond_stage_model.model.*); pass --config")
    if any(k.startswith(UNET + "label_emb.") for k in sd):
        raise CheckpointError("the UNet has a class/image embedding (label_emb, e.g. SD 2.x unCLIP): not supported")
    context = next((int(v.shape[1]) for k, v in sd.items() if k.startswith(UNET) and
                    k.endswith((".attn2.to_k.weight", ".attn2.k_proj_weight"))), 0)
    model_channels, in_channels = (int(n) for n in sd[FIRST_CONV].shape[:2])
    return texts.pop(), context, model_channels, in_channels, layout


def _prediction_hint(name: str | None) -> str | None:
    """'v' or 'eps' when the file name says 768 or 512 (and not both), else None."""
    base = os.path.basename(name or "")
    says = {p for p, pattern in (("v", r"768"), ("eps", r"512")) if re.search(pattern, base)}
    return says.pop() if len(says) == 1 else None


def _with_layout(config: str, layout: str) -> str:
    """The ``_native_mha`` variant for a native-layout checkpoint when the repo has one (either config loads either)."""
    native = config[: -len(".yaml")] + "_native_mha.yaml"
    return native if layout == "native_mha" and os.path.isfile(os.path.join(ROOT, native)) else config


def guess_config(sd: dict[str, torch.Tensor], name: str | None = None) -> tuple[str, str]:
    """(absolute path of the repo yaml to use, one-line message for the user) for a checkpoint's state dict.

    ``name`` (the checkpoint's file name, optional) only settles SD 2.x eps vs v when it contains 512 or 768.
    Raises CheckpointError with one line when no supported model matches.
    """
    text, context, model_channels, in_channels, layout = fingerprint(unwrap_state_dict(sd))
    family = next((f for f in FAMILIES if (f.text, f.context, f.model_channels, f.in_channels) ==
                   (text, context, model_channels, in_channels)), None)
    if family is None:
        raise CheckpointError(f"no known model matches this checkpoint ({text} text encoder, context width {context}, "
                              f"UNet width {model_channels}, {in_channels} input channels); pass --config")
    if family.unsupported:
        raise CheckpointError(f"{family.unsupported}; detected {family.name}")
    configs = dict(family.configs)
    hint = _prediction_hint(name) if len(configs) > 1 else None
    prediction = hint or family.configs[0][0]
    config = _with_layout(configs[prediction], layout)
    path = os.path.join(ROOT, config)
    if not os.path.isfile(path):
        raise CheckpointError(f"detected {family.name}, but its config {config} is missing from this checkout")
    message = f"detected {family.name}, {layout} layout: using {config}"
    if len(configs) > 1:
        why = f"the file name says {'768' if hint == 'v' else '512'}" if hint else "the weights cannot tell"
        other = next(p for p in configs if p != prediction)
        message += (f"; assumed {PREDICTION_WORDS.get(prediction, prediction)} because {why}; "
                    f"for {PREDICTION_WORDS.get(other, other)} pass --config {_with_layout(configs[other], layout)}")
    return path, message

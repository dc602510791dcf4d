"""Which repo config fits a checkpoint: read from its keys and shapes, for runs without ``--config``.

What the weights tell: the text encoder (CLIP ``cond_stage_model.transformer.*`` for SD 1.x, OpenCLIP
``cond_stage_model.model.*`` for SD 2.x, SDXL's ``conditioner.embedders.*``), the cross-attention context
width, the UNet's width and input channels (9 = inpainting), its vector conditioning width (SDXL base 2816,
refiner 2560), and the attention layout (``ldm.weights.families``). What they cannot tell: SD 2.x eps vs v
prediction (the 512px base models predict eps, the 768px models v, with identical shapes). That is
guessed from the file name when it says 512 or 768, and otherwise assumed to be v (768px
v2-inference-v.yaml, the default SD 2.x release); the message says so and how to override it.
"""

from __future__ import annotations

import os
import re

import torch

from ldm.model.presets import PRESETS, config_file, config_shown
from ldm.weights.families import Family, identify
from ldm.weights.reading import CheckpointError, read_shapes, unwrap_state_dict

PREDICTION_WORDS = {"v": "v-prediction (as the 768px SD 2.x models)",
                    "eps": "eps-prediction (as the 512px SD 2.x models)"}


def _prediction_hint(name: str | None) -> str | None:
    """'v' or 'eps' when the file name says 768 or 512 (and not both), else None."""
    base = os.path.basename(name or "")
    says = {p for p, pattern in (("v", r"768"), ("eps", r"512")) if re.search(pattern, base)}
    return says.pop() if len(says) == 1 else None


def yaml_for(preset: str, layout: str) -> str:
    """The shipped yaml (relative to configs/) of a preset: its ``_native_mha`` variant for a native-layout
    checkpoint when one is shipped (either yaml loads either layout)."""
    p = PRESETS[preset]
    return (p.native_yaml() if layout == "native_mha" else None) or p.yaml


def config_note(family: Family, layout: str) -> str:
    """Which shipped yaml goes with a family, in words: one, or eps vs v when the weights cannot tell."""
    names = {pred: config_shown(yaml_for(preset, layout)) for pred, preset in family.presets}
    if len(names) == 1:
        (pred, name), = names.items()
        return f"{family.name} predicts {pred}: use {name}"
    return ("eps vs v prediction is not stored in the weights; the config decides: " +
            ", ".join(f"{name} for {PREDICTION_WORDS.get(pred, pred)}" for pred, name in names.items()))


def config_for(ckpt: str, config: str | None = None) -> tuple[str, str | None]:
    """(yaml, message): ``config`` when given (it must exist), else the shipped yaml that fits the checkpoint's
    keys and shapes, read from its header only, with the one-line message that says so."""
    if config:
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config not found: {config}")
        return config, None
    return guess_config(read_shapes(ckpt), os.path.basename(ckpt))


def guess_config(sd: dict[str, torch.Tensor], name: str | None = None) -> tuple[str, str]:
    """(absolute path of the shipped yaml to use, one-line message for the user) for a checkpoint's state dict.

    ``name`` (the checkpoint's file name, optional) only settles SD 2.x eps vs v when it contains 512 or 768.
    Raises CheckpointError with one line when no supported model matches.
    """
    family, fp = identify(unwrap_state_dict(sd))
    presets = dict(family.presets)
    hint = _prediction_hint(name) if len(presets) > 1 else None
    prediction = hint or family.presets[0][0]
    config = yaml_for(presets[prediction], fp.layout)
    path = config_file(config)
    if not os.path.isfile(path):
        raise CheckpointError(f"detected {family.name}, but its config {config_shown(config)} is missing")
    message = f"detected {family.name}, {fp.layout} layout: using {config_shown(config)}"
    if len(presets) > 1:
        why = f"the file name says {'768' if hint == 'v' else '512'}" if hint else "the weights cannot tell"
        other = next(p for p in presets if p != prediction)
        message += (f"; assumed {PREDICTION_WORDS.get(prediction, prediction)} because {why}; "
                    f"for {PREDICTION_WORDS.get(other, other)} pass --config {config_shown(yaml_for(presets[other], fp.layout))}")
    return path, message

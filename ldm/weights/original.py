"""The classes the original yamls name (``ldm.models.diffusion.ddpm.LatentDiffusion``, ``LatentInpaintDiffusion``):
the model with the original ``load_state_dict`` contract on top.

The original scripts build the model from the yaml and call ``model.load_state_dict(sd, strict=False)`` with a
checkpoint as released (the original attention layout, EMA and other training-only entries). Here that call
prepares the state dict (``ldm.weights.loading.prepare_state_dict``: layout renames, training-only entries
dropped, derived buffers filled) and then loads it. The fast path, ``load_model``, prepares once and loads
the core ``ldm.model.diffusion`` classes directly.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ldm.model import diffusion
from ldm.weights.loading import prepare_state_dict


class LoadsReleasedCheckpoints:
    """``load_state_dict`` that accepts either attention layout and ignores known training-only entries."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        sd = prepare_state_dict(self, dict(state_dict), strict=strict)
        return torch.nn.Module.load_state_dict(self, sd, strict=strict, assign=assign)


class LatentDiffusion(LoadsReleasedCheckpoints, diffusion.LatentDiffusion):
    """``ldm.model.diffusion.LatentDiffusion`` as the original yamls build it."""


class LatentInpaintDiffusion(LoadsReleasedCheckpoints, diffusion.LatentInpaintDiffusion):
    """``ldm.model.diffusion.LatentInpaintDiffusion`` as the original yamls build it."""


__all__ = ["LatentDiffusion", "LatentInpaintDiffusion"]

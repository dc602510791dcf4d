"""The original yamls' ``target: ldm.models.diffusion.ddpm.LatentDiffusion`` (and ``LatentInpaintDiffusion``):
the model (``ldm.model.diffusion``) with the original ``load_state_dict`` (``ldm.weights.original``)."""

from ldm.model.diffusion import DiffusionWrapper
from ldm.weights.original import LatentDiffusion, LatentInpaintDiffusion

__all__ = ["LatentDiffusion", "LatentInpaintDiffusion", "DiffusionWrapper"]

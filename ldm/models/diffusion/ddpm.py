"""The original yamls' ``target: ldm.models.diffusion.ddpm.LatentDiffusion`` (and ``LatentInpaintDiffusion``):
the model (``ldm.model.diffusion``) with the original ``load_state_dict`` (``ldm.weights.loading``)."""

from ldm.model.diffusion import DiffusionWrapper
from ldm.weights.loading import LatentDiffusion, LatentInpaintDiffusion

__all__ = ["LatentDiffusion", "LatentInpaintDiffusion", "DiffusionWrapper"]

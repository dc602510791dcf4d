"""Import path of the original yamls' ``target: ldm.models.diffusion.ddpm.LatentDiffusion`` (and ``LatentInpaintDiffusion``)."""

from ldm.latent_diffusion import DiffusionWrapper, LatentDiffusion, LatentInpaintDiffusion

__all__ = ["LatentDiffusion", "LatentInpaintDiffusion", "DiffusionWrapper"]

"""Import path of the original yamls' ``target: ldm.models.diffusion.ddpm.LatentDiffusion``."""

from ldm.latent_diffusion import DiffusionWrapper, LatentDiffusion

__all__ = ["LatentDiffusion", "DiffusionWrapper"]

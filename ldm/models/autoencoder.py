"""Import path of the original yamls' ``target: ldm.models.autoencoder.AutoencoderKL``."""

from ldm.model.vae import AutoencoderKL

__all__ = ["AutoencoderKL"]

"""The model: attention, UNet blocks and UNet, VAE, the two text encoders, the noise schedule, ``LatentDiffusion``,
and the typed configs with their preset table (``ldm.model.presets``). Imports nothing else of ldm."""

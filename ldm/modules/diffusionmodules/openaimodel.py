"""Import path of the original yamls' ``target: ldm.modules.diffusionmodules.openaimodel.UNetModel``."""

from ldm.model.unet import UNetModel
from ldm.model.unet_blocks import Downsample, ResBlock, TimestepEmbedSequential, Upsample

__all__ = ["UNetModel", "ResBlock", "Downsample", "Upsample", "TimestepEmbedSequential"]

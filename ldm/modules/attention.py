"""Import path of the original ``ldm.modules.attention``; the code lives in ldm.model.attention / ldm.model.unet_blocks."""

from ldm.model.attention import CrossAttention
from ldm.model.unet_blocks import BasicTransformerBlock, FeedForward, SpatialTransformer

__all__ = ["CrossAttention", "BasicTransformerBlock", "FeedForward", "SpatialTransformer"]

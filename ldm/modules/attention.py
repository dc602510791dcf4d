"""Import path of the original ``ldm.modules.attention``; the code lives in ldm.attention / ldm.unet_blocks."""

from ldm.attention import CrossAttention
from ldm.unet_blocks import BasicTransformerBlock, FeedForward, SpatialTransformer

__all__ = ["CrossAttention", "BasicTransformerBlock", "FeedForward", "SpatialTransformer"]

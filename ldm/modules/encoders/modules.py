"""Import path of the original yamls' ``target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder``."""

from ldm.text_encoder import FrozenOpenCLIPEmbedder

__all__ = ["FrozenOpenCLIPEmbedder"]

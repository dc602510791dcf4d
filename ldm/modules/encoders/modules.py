"""Import path of the original yamls' ``target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder`` (SD 2.x)
and ``FrozenCLIPEmbedder`` (SD 1.x)."""

from ldm.clip_text import FrozenCLIPEmbedder
from ldm.text_encoder import FrozenOpenCLIPEmbedder

__all__ = ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"]

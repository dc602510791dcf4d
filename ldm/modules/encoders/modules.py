"""Import path of the original yamls' ``target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder`` (SD 2.x)
and ``FrozenCLIPEmbedder`` (SD 1.x)."""

from ldm.model.clip import FrozenCLIPEmbedder
from ldm.model.openclip import FrozenOpenCLIPEmbedder

__all__ = ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"]

"""The original ``ldm.util`` import path (``instantiate_from_config``); the code is ``ldm.model.presets``."""

from ldm.model.presets import get_obj_from_str, instantiate_from_config

__all__ = ["get_obj_from_str", "instantiate_from_config"]

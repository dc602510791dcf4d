"""The original ``ldm.util`` entry points that scripts import (``instantiate_from_config``)."""

from __future__ import annotations

import importlib
from typing import Any


def get_obj_from_str(string: str) -> Any:
    """'pkg.module.Name' -> the object."""
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config: Any) -> Any:
    """Build ``config.target(**config.params)``, as the original does.

    For LatentDiffusion this constructs the model with random weights on the CPU (as the original);
    ``ldm.checkpoint.load_model`` is the fast path that builds on the meta device and loads strictly.
    """
    from ldm.config_utils import to_plain
    node = to_plain(config)
    if "target" not in node:
        if node in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(node["target"])(**(node.get("params") or {}))

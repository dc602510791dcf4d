"""Helpers that turn the original yaml ``params`` blocks into plain, checked dicts, and the dtype names."""

from __future__ import annotations

from typing import Any

import torch

# The dtype names of every --dtype flag and config: the one table.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_plain(obj: Any) -> Any:
    """OmegaConf containers (or anything mapping-like) to plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # omegaconf is a runtime dependency, but plain dicts need no import
        pass
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def take_params(owner: str, params: Any, ignored: set[str], fixed: dict[str, Any],
                known: set[str] | None = None) -> dict:
    """Drop training-only keys, check keys with a single supported value, and reject unknown keys.

    ``known`` (when given) lists every accepted key besides ``ignored`` and ``fixed``.
    """
    p = to_plain(params or {})
    for key, want in fixed.items():
        if key in p and p[key] != want:
            raise ValueError(f"{owner}: {key}={p[key]!r} is not supported (only {want!r})")
    out = {k: v for k, v in p.items() if k not in ignored and k not in fixed}
    if known is not None:
        unknown = sorted(set(out) - known)
        if unknown:
            raise ValueError(f"{owner}: unknown config key(s) {', '.join(unknown)}")
    return out

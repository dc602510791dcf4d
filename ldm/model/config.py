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


# ----- type checks of yaml values against the typed configs' hints (ldm.model.presets.load_config)

def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def fits(value: Any, hint: Any) -> bool:
    """Whether a yaml value fits a config field's type hint (int, float, bool, str, tuple[X, ...], X | None)."""
    import types
    from typing import Union, get_args, get_origin
    origin, args = get_origin(hint), get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(fits(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # not a yaml scalar type: checked by the mapping itself


def kind(hint: Any) -> str:
    """A type hint in words: 'an integer', 'a list of integers', 'a string or null', ..."""
    import types
    from typing import Union, get_args, get_origin
    origin, args = get_origin(hint), get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(kind(a) for a in args)
    if origin is tuple:
        return "a list of " + {int: "integers", float: "numbers", bool: "true/false", str: "strings"}.get(
            args[0], "values")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"

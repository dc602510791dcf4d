"""No silent black or NaN image: which stage of a generation went non-finite, found without syncing the sampling loop.

``FiniteWatch(model)`` wraps the model's stage entry points on the instance (text conditioning, VAE encode,
VAE decode; with ``per_call`` also every UNet call) and records, on the device, whether each output (and the
latents handed to the decoder, i.e. the sampler's result) is finite. Nothing is read back until ``first_bad()``,
called once per batch after the loop: one host sync where the scripts synchronise for their timing anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

STAGES = ("text conditioning", "VAE encode", "sampling", "VAE decode")
_NONE = object()


def _all_finite(x: Any) -> torch.Tensor | None:
    """A 0-d device bool: every tensor in ``x`` (a tensor, or a posterior with .mean, or a dict/list) is finite."""
    if isinstance(x, torch.Tensor):
        return torch.isfinite(x).all() if x.is_floating_point() else None
    if hasattr(x, "mean") and isinstance(getattr(x, "mean"), torch.Tensor):  # DiagonalGaussianDistribution
        return torch.isfinite(x.mean).all()
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        flags = [f for f in (_all_finite(v) for v in x) if f is not None]
        return torch.stack(flags).all() if flags else None
    return None


class FiniteWatch:
    """Records per stage whether its outputs were finite; ``first_bad()`` names the first stage that was not."""

    def __init__(self, model: Any, per_call: bool = False):
        self.model = model
        self.flags: list[tuple[str, torch.Tensor]] = []
        self.unet_calls: list[torch.Tensor] = []
        self._wrapped: list[tuple[str, Any]] = []  # (name, the instance attribute it replaced, or _NONE)
        self._wrap("get_learned_conditioning", lambda out, args: [("text conditioning", out)])
        self._wrap("encode_first_stage", lambda out, args: [("VAE encode", out)])
        self._wrap("decode_first_stage", lambda out, args: [("sampling", args[0]), ("VAE decode", out)])
        if per_call:
            self._wrap("apply_model", lambda out, args: self.unet_calls.append(_all_finite(out)) or [])

    def _wrap(self, name: str, record: Callable[[Any, tuple], list]) -> None:
        inner = getattr(self.model, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            for stage, value in record(out, args):
                flag = _all_finite(value)
                if flag is not None:
                    self.flags.append((stage, flag))
            return out
        self._wrapped.append((name, vars(self.model).get(name, _NONE)))
        setattr(self.model, name, wrapper)  # an instance attribute: the class's method is untouched

    def reset(self) -> None:
        self.flags.clear()
        self.unet_calls.clear()

    def first_bad(self) -> str | None:
        """The first stage (in pipeline order) with a non-finite output since the last reset, or None (one sync)."""
        if not self.flags:
            return None
        finite = torch.stack([f for _, f in self.flags]).tolist()
        bad = {stage for (stage, _), ok in zip(self.flags, finite) if not ok}
        stage = next((s for s in STAGES if s in bad), None)
        if stage == "sampling" and self.unet_calls:
            ok = torch.stack(self.unet_calls).tolist()
            first = ok.index(False) + 1 if False in ok else None
            if first is not None:
                stage += f" (first non-finite UNet output at call {first} of {len(ok)})"
        return stage

    def close(self) -> None:
        for name, before in reversed(self._wrapped):  # what was there before, a nested watch's wrapper too
            if before is _NONE:
                delattr(self.model, name)
            else:
                setattr(self.model, name, before)
        self._wrapped.clear()

    def __enter__(self) -> "FiniteWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""The denoiser the samplers call: a LatentDiffusion with classifier-free guidance, returning eps.

Samplers see ``denoise(x, t, alpha, sigma) -> eps`` where x_t = alpha * x0 + sigma * eps and t is a (1,)
model-time tensor on x's device. The guidance scale and the v -> eps conversion are eager Python-float
arithmetic around ``model.apply_model``, so a compiled UNet never sees them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]  # (x, t, alpha, sigma) -> eps
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, x after the step, its x0 prediction)


def cat_cond(uncond: Any, cond: Any) -> Any:
    """Concatenate [uncond, cond] along the batch, leaf by leaf for the original's dict/list conditionings."""
    if isinstance(cond, dict):
        missing = [k for k in cond if not isinstance(uncond, dict) or k not in uncond]
        if missing:  # e.g. inpainting: the unconditional half shares the conditional c_concat
            raise ValueError(f"the unconditional conditioning lacks {missing}: give it the same entries as the "
                             f"conditioning (e.g. {{'c_concat': c['c_concat'], 'c_crossattn': [uc]}})")
        return {k: cat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return [cat_cond(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


class CFGDenoiser:
    """eps(x, t) of ``model`` guided by ``scale`` (Ho & Salimans 2022), one batched [uncond, cond] UNet call.

    With an unconditional context the UNet batch is always 2B, whatever the scale (scale 1 included), so
    that a compiled UNet keeps one shape across runs.
    """

    def __init__(self, model: Any, cond: Any, uncond: Any = None, scale: float = 1.0):
        self.apply_model = model.apply_model
        self.v = model.parameterization == "v"
        self.scale = float(scale)
        self.guided = uncond is not None
        self.context = cat_cond(uncond, cond) if self.guided else cond  # built once, not per step

    def __call__(self, x: torch.Tensor, t: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """eps at x (B, C, H, W); t is (1,) and is expanded (a view) to the UNet's batch."""
        if self.guided:
            out_u, out_c = self.apply_model(torch.cat([x, x]), t.expand(2 * x.shape[0]), self.context).chunk(2)
            out = out_u + self.scale * (out_c - out_u)
        else:
            out = self.apply_model(x, t.expand(x.shape[0]), self.context)
        # v = alpha * eps - sigma * x0 and x = alpha * x0 + sigma * eps give eps = alpha * v + sigma * x;
        # guiding v then converting equals converting then guiding (the map is affine in v).
        return alpha * out + sigma * x if self.v else out

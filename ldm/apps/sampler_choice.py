"""Which sampler a script runs: --sampler NAME (or the original --plms/--dpm), else the model's default, and the
sampler object with the original interface for it."""

from __future__ import annotations

import argparse

# --sampler NAME -> display name; None picks the model's default (DDIM for SD 1/2, Euler for SDXL, as sgm)
SAMPLERS = {"ddim": "DDIM", "plms": "PLMS", "dpm": "DPM++ 2M", "euler": "Euler", "euler_a": "Euler a",
            "dpmpp_2m": "DPM++ 2M (discrete sigmas)"}


def sampler_flag(opt: argparse.Namespace, model=None) -> str:
    """A key of SAMPLERS from --sampler/--plms/--dpm, else the model's default: Euler for SDXL, DDIM otherwise."""
    if getattr(opt, "sampler", None):
        return opt.sampler
    if opt.plms or opt.dpm:
        return "plms" if opt.plms else "dpm"
    return "euler" if hasattr(model, "conditioner") else "ddim"


def make_sampler(name: str, model, device, caching=None, stop_after: int | None = None):
    """(sampler with the original API, display name) for a key of SAMPLERS (``sampler_flag(opt, model)``);
    ``caching``: the fewer-FLOPs methods (``ldm.apps.fewer_flops.caching_from``), None for none; ``stop_after``:
    the discrete-sigma samplers stop after that many steps (the base of an ensemble of experts)."""
    if name in ("euler", "euler_a", "dpmpp_2m"):
        from ldm.samplers import sigma_api
        cls = {"euler": sigma_api.EulerSampler, "euler_a": sigma_api.EulerAncestralSampler,
               "dpmpp_2m": sigma_api.DPMPP2MSampler}[name]
        return cls(model, device=device, caching=caching, stop_after=stop_after), SAMPLERS[name]
    if name == "plms":
        from ldm.models.diffusion.plms import PLMSSampler
        return PLMSSampler(model, device=device, caching=caching), "PLMS"
    if name == "dpm":
        from ldm.models.diffusion.dpm_solver import DPMSolverSampler
        return DPMSolverSampler(model, device=device, caching=caching), "DPM++ 2M"
    from ldm.models.diffusion.ddim import DDIMSampler
    return DDIMSampler(model, device=device, caching=caching), "DDIM"

"""The original import path of ``DDIMSampler``; the code is ``ldm.samplers.api``."""

from ldm.samplers.api import DDIMSampler

__all__ = ["DDIMSampler"]

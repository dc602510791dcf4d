"""The original import path of ``PLMSSampler``; the code is ``ldm.samplers.api``."""

from ldm.samplers.api import PLMSSampler

__all__ = ["PLMSSampler"]

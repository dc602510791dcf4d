"""The original import path of ``DPMSolverSampler``; the code is ``ldm.samplers.api``."""

from ldm.samplers.api import DPMSolverSampler

__all__ = ["DPMSolverSampler"]

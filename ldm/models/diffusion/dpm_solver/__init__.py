"""Import path of the original ``ldm.models.diffusion.dpm_solver.DPMSolverSampler``."""

from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler"]

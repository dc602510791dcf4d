"""Fast, inference-only Stable Diffusion 1.x/2.x on native PyTorch attention.

Layers, imported one way: ``apps`` and ``benchmark`` -> ``speed`` -> ``weights`` -> ``model``; ``samplers`` see only
a denoiser; ``fileio`` is a leaf. ``models``, ``modules`` and ``util`` are the original import paths, re-exports only.
"""

__version__ = "0.1.0"

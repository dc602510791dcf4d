#!/usr/bin/env python
"""Speed and memory of text-to-image generation in the PyTorch 2 blog's protocol (see ldm/benchmark.py).

    python scripts/benchmark.py --random tiny --device cpu --H 64 --W 64 --steps 4 --repeats 2
    python scripts/benchmark.py --ckpt checkpoints/v2-1_512-ema-pruned.ckpt \
        --config configs/stable-diffusion/v2-inference.yaml --batch 1,2,4

Installed, the same is the console command ``ldm-benchmark``.
"""

import os
import sys

try:
    import ldm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

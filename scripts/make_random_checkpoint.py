#!/usr/bin/env python
"""Write a Stable Diffusion checkpoint with seeded random weights, for tests and benchmarks.

The code is ``ldm.apps.random_checkpoint``; installed, the same command is ``ldm-random-checkpoint``. Run from a checkout, this checkout's
``ldm`` is imported.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.apps.random_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

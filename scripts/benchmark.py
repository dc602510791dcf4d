#!/usr/bin/env python
"""Speed and memory of text-to-image generation in the PyTorch 2 blog's protocol.

The code is ``ldm.benchmark.harness``; installed, the same command is ``ldm-benchmark``. Run from a checkout, this checkout's
``ldm`` is imported.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.benchmark.harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

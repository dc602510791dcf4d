#!/usr/bin/env python
"""Image-to-image with the original img2img.py command line, plus the PyTorch 2 blog's speed flags.

The code is ``ldm.apps.img2img``; installed, the same command is ``ldm-img2img``. Run from a checkout, this checkout's
``ldm`` is imported.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.apps.img2img import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Inpainting with an SD 2 inpainting model: repaint the white part of a mask, plus the speed flags.

The code is ``ldm.apps.inpaint``; installed, the same command is ``ldm-inpaint``. Run from a checkout, this checkout's
``ldm`` is imported.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.apps.inpaint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert a Stable Diffusion checkpoint to the native-MHA layout (and back).

The code is ``ldm.apps.convert``; installed, the same command is ``ldm-convert``. Run from a checkout, this checkout's
``ldm`` is imported.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.apps.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

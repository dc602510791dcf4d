#!/usr/bin/env python
"""Convert a Stable Diffusion checkpoint to the native-MHA layout (and back); see ``ldm.convert``.

    python scripts/convert_checkpoint.py checkpoints/v2-1_512-ema-pruned.ckpt /tmp/model_native_mha.ckpt
    python scripts/convert_checkpoint.py model.ckpt model_native_mha.safetensors --dtype fp16 --check
    python scripts/convert_checkpoint.py model_native_mha.ckpt model.ckpt --to original
"""

import os
import sys

try:
    import ldm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.convert import main

if __name__ == "__main__":
    sys.exit(main())

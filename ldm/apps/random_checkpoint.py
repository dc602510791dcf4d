"""Write a Stable Diffusion checkpoint with seeded random weights, for tests and benchmarks.

    python scripts/make_random_checkpoint.py /tmp/sd2_random.ckpt                      # full SD2, 5.2 GB
    python scripts/make_random_checkpoint.py tiny.safetensors --config configs/tiny/v2-tiny.yaml --seed 1
    python scripts/make_random_checkpoint.py /tmp/sd2_native.ckpt --layout native_mha --dtype fp16
    python scripts/make_random_checkpoint.py /tmp/sd1_random.ckpt --model sd1                    # full SD1, 4.3 GB
    python scripts/make_random_checkpoint.py /tmp/sd_xl_base_1.0.safetensors --model sdxl-base --dtype fp16  # 6.9 GB

The model is built on the meta device (no memory), and each tensor is drawn from its own generator
(seeded by --seed and the tensor's name). A .safetensors file in the original layout is streamed to
disk, one tensor in memory at a time. Other outputs (.ckpt, --layout native_mha) are assembled in
memory first, each tensor cast (--dtype) as it is drawn, so RAM peaks near the file's size (5.2 GB for a
float32 SD2), then written once: the disk never holds more than the file itself, and its free space is
checked before anything is drawn. Same --seed, same weights, whatever the layout, dtype or format; the
noise-schedule buffers hold their real values. SD 1.x files (a CLIP text encoder) also get the
``...embeddings.position_ids`` buffer (int64 arange) that the released SD 1.x checkpoints carry.
Errors are one line: exit 2 for a bad command line (suffix, missing folder), 1 otherwise (a full
disk); nothing half-written is left.
"""

import argparse
import os
import sys
import zlib
from typing import Any

import torch

from ldm.fileio import atomic_write, check_disk
from ldm.model.clip import FrozenCLIPEmbedder
from ldm.model.config import DTYPES
from ldm.model.diffusion import LAYOUTS
from ldm.model.presets import PRESETS, config_file, load_config
from ldm.weights.convert import UsageError, nbytes, output_format, target_dtype, write_safetensors
from ldm.weights.layout import to_native, to_original
from ldm.weights.loading import model_class
from ldm.weights.reading import CLIP_POSITION_IDS, CheckpointError



def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded by (seed, name): matrices N(0, 1/fan_in), 1-D weights (norm scales) 1 + 0.1 N(0,1), others 0.1 N(0,1)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))  # CPU seeds are 32-bit
    t = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        return t.div_(t[0].numel() ** 0.5)
    return t.mul_(0.1).add_(1.0) if name.endswith("weight") and len(shape) == 1 else t.mul_(0.1)


def make_random_checkpoint(out: str, config: Any = None, layout: str = "original", seed: int = 0,
                           dtype: str | None = None, progress: bool | None = None) -> None:
    """Write ``out`` (.ckpt/.pt/.pth/.safetensors) holding random weights for the model of ``config`` (a yaml
    path, a DiffusionConfig or an SDXLConfig; default: the full SD 2 preset). SDXL files have the released key set
    (generative-models' ``DiffusionEngine``: ``model.diffusion_model.*``, ``conditioner.embedders.*``,
    ``first_stage_model.*``, ``denoiser.sigmas``)."""
    fmt = output_format(out)
    cfg = load_config(config if config is not None else PRESETS["sd2"].config)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    sd = to_original(model.state_dict())  # meta tensors, except the real schedule buffers
    if isinstance(getattr(model, "cond_stage_model", None), FrozenCLIPEmbedder):
        # (1, 77) int64, as the released SD 1.x files hold it
        sd[CLIP_POSITION_IDS] = torch.arange(model.cond_stage_model.cfg.context_length)[None]
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}

    def produce(name: str) -> torch.Tensor:
        t = sd.pop(name)
        return random_tensor(name, specs[name][1], seed) if t.is_meta else t

    cast = DTYPES.get(dtype)
    final = {k: (target_dtype(k, v, cast), tuple(v.shape)) for k, v in sd.items()}
    check_disk(out, nbytes(final))  # before minutes of drawing (native adds only small zero biases)
    metadata = {"format": "pt", "layout": layout, "seed": str(seed)}
    if fmt == "safetensors" and layout == "original":  # streamed: one tensor in memory at a time
        atomic_write(out, lambda f, _tmp: write_safetensors(f, final, lambda k: produce(k).to(final[k][0]),
                                                             metadata, progress))
        return
    sd = {k: produce(k).to(final[k][0]) for k in specs}  # cast as drawn: RAM peaks near the file's size
    if layout == "native_mha":
        sd = to_native(sd)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}
    if fmt == "safetensors":
        atomic_write(out, lambda f, _tmp: write_safetensors(f, specs, sd.pop, metadata, progress), nbytes(specs))
    else:
        atomic_write(out, lambda f, _tmp: torch.save({"state_dict": sd}, f), nbytes(specs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output", help=".ckpt/.pt/.pth or .safetensors file to write")
    p.add_argument("--config", default=None, help="model yaml (default: the yaml of the --model preset)")
    p.add_argument("--model", choices=list(PRESETS), default="sd2",
                   help="a preset of ldm.model.presets (default sd2: v2-inference.yaml; sd1: v1-inference.yaml; "
                        "sdxl-base/sdxl-refiner: generative-models' yamls, the released files' keys); ignored with "
                        "--config")
    p.add_argument("--layout", choices=list(LAYOUTS), default="original")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        make_random_checkpoint(args.output, args.config or config_file(PRESETS[args.model].yaml), args.layout, args.seed, args.dtype,
                               progress=False if args.quiet else None)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"make_random_checkpoint: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e9:.2f} GB, {args.layout} layout, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

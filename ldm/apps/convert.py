"""``ldm-convert`` (scripts/convert_checkpoint.py): the converter's command line over ``ldm.weights.convert``."""

from __future__ import annotations

import argparse
import sys

from ldm.model.config import DTYPES
from ldm.weights.convert import ConversionReport, UsageError, convert
from ldm.weights.reading import CheckpointError, name_list


def _group(names: list[str]) -> str:
    """'model_ema.* (688), global_step' - prefixes with several names are counted, not listed."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split(".")[0], []).append(n)
    return ", ".join(f"{p}.* ({len(ns)})" if len(ns) > 1 or ns[0] != p else p for p, ns in groups.items())


def summary(r: ConversionReport) -> list[str]:
    """The lines ``ldm-convert`` prints for a finished conversion."""
    change = "unchanged" if r.layout_in == r.layout_out else f"{r.layout_in} -> {r.layout_out}"
    lines = [f"read:    {r.source} ({r.layout_in} layout)",
             f"model:   {r.family}",
             f"note:    {r.note}"]
    if r.ema:
        lines.append("ema:     UNet weights taken from model_ema.*")
    if r.clamped:
        lines.append(f"clamped: {sum(r.clamped.values())} value(s) in {len(r.clamped)} tensor(s) to the {r.dtype} "
                     f"range: {name_list(list(r.clamped), 4)}")
    if r.dropped:
        lines.append(f"dropped: {len(r.dropped)} training-only tensors: {_group(r.dropped)}")
    if r.not_carried:
        lines.append(f"dropped: non-tensor entries: {', '.join(r.not_carried)}")
    lines.append(f"wrote:   {r.target} ({change}, {r.tensors} tensors, dtype {r.dtype}, "
                 f"{r.bytes_written / 1e9:.2f} GB) in {r.seconds:.1f} s")
    if r.max_diff is not None:
        lines.append(f"check:   UNet output max |difference| = {r.max_diff:.3g} "
                     f"(max |output| {r.ref_scale:.3g}; float32, seeded input)")
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-convert", description=(
        "Convert a Stable Diffusion checkpoint (.ckpt/.safetensors) between the original attention layout "
        "(to_q/to_k/to_v) and the native nn.MultiheadAttention layout (in_proj_weight), and back."))
    p.add_argument("input", help="checkpoint to read (.ckpt/.pt/.pth pickle, read weights-only, or .safetensors)")
    p.add_argument("output", help="file to write; the suffix picks the format (.ckpt/.pt/.pth or .safetensors)")
    p.add_argument("--to", choices=["native", "original"], default="native", help="target layout (default: native)")
    p.add_argument("--ema", action="store_true", help="take the UNet's EMA weights (model_ema.*), not the live ones")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="dtype of the saved floating weights (default: as stored); schedule buffers stay fp32")
    p.add_argument("--half", action="store_const", dest="dtype", const="fp16", help="same as --dtype fp16")
    p.add_argument("--clamp", action="store_true",
                   help="with --dtype: clamp finite values beyond the dtype's range (they would become inf) "
                        "instead of refusing the file")
    p.add_argument("--check", action="store_true",
                   help="compare the UNet output of the input and the written file on a seeded input")
    p.add_argument("--config", default=None,
                   help="model yaml for --check (default: the repo config that fits the weights, see ldm.weights.detect)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """``ldm-convert``: exit 0 on success, 1 for a bad checkpoint, 2 for a bad command line."""
    args = parser().parse_args(argv)
    try:
        report = convert(args.input, args.output, to=args.to, ema=args.ema, dtype=args.dtype, check=args.check,
                         config=args.config, progress=False if args.quiet else None, clamp=args.clamp)
    except Exception as e:
        if args.debug:
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (CheckpointError, OSError)):
            text = f"{type(e).__name__}: {text} (run with --debug for the traceback)"
        print(f"ldm-convert: error: {text}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        print("ldm-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    print("\n".join(summary(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

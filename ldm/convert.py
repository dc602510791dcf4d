"""Converting a Stable Diffusion checkpoint between the original and the native-MHA attention layouts.

``python scripts/convert_checkpoint.py model.ckpt model_native_mha.ckpt`` (or ``ldm-convert``) is the
step the PyTorch 2 blog describes as "converted model weights to the new architecture". The key
renames themselves live in ``ldm.checkpoint.to_native``/``to_original``; this module adds the file
handling around them: safe reading, EMA selection, dtype casting, dropping training-only entries,
an atomic write, and an optional check that both layouts give the same UNet output.

Memory: inputs are mmap'd, so unchanged tensors are written straight from the page cache;
.safetensors output is streamed one tensor at a time (casting as it goes); a .ckpt with a new dtype
is staged through a temporary .safetensors, because ``torch.save`` needs every tensor at once.
The peak RSS stays near the input's size (measured: 5.8 GB for a 5.2 GB SD2 checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

import torch

from ldm.checkpoint import (CheckpointError, detect_layout, read_checkpoint, take_ema, split_extras,
                            to_native, to_original)
from ldm.runtime import DTYPES
from ldm.schedule import BUFFER_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_PREFIX = "model.diffusion_model."
LAYOUTS = {"native": "native_mha", "native_mha": "native_mha", "original": "original"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
# Cross-attention context width (attn2 key weight columns) -> model family.
FAMILIES = {768: "SD 1.x (CLIP ViT-L/14 text encoder, context width 768)",
            1024: "SD 2.x (OpenCLIP ViT-H/14 text encoder, context width 1024)"}
SD2_CONFIG = os.path.join(ROOT, "configs", "stable-diffusion", "v2-inference.yaml")
SD1_CONFIG = os.path.join(ROOT, "configs", "stable-diffusion", "v1-inference.yaml")
EPS_OR_V = ("eps vs v prediction is not stored in the weights; the config decides: v2-inference{0}.yaml for "
            "512px eps models (e.g. v2-1_512-ema-pruned), v2-inference-v{0}.yaml for 768px v models (v2-1_768-*)")
SD1_NOTE = "SD 1.x models predict eps: use configs/stable-diffusion/v1-inference{0}.yaml"
INPAINT_NOTE = "a 9-channel inpainting UNet: use configs/stable-diffusion/{1}-inpainting-inference{0}.yaml"
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class UsageError(CheckpointError):
    """A bad command line (unknown suffix, output == input); exit code 2 rather than 1."""


@dataclass
class ConversionReport:
    source: str
    target: str
    layout_in: str
    layout_out: str
    family: str
    tensors: int = 0
    dtype: str = "as stored"
    ema: bool = False
    dropped: list[str] = field(default_factory=list)      # training-only tensors left out
    not_carried: list[str] = field(default_factory=list)  # non-tensor entries / metadata left out
    bytes_written: int = 0
    seconds: float = 0.0
    max_diff: float | None = None
    ref_scale: float | None = None


# ----------------------------------------------------------------------------- what the weights say

def context_width(sd: dict[str, torch.Tensor]) -> int | None:
    """Columns of the first UNet cross-attention key weight: the text encoder's width."""
    for k, v in sd.items():
        if k.startswith(UNET_PREFIX) and k.endswith((".attn2.to_k.weight", ".attn2.k_proj_weight")):
            return int(v.shape[1])
    return None


def model_family(sd: dict[str, torch.Tensor]) -> str:
    """'SD 1.x (...)', 'SD 2.x (...)' or 'unknown (...)' from the context width (and the text encoder's keys)."""
    width = context_width(sd)
    first = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    inpaint = ", inpainting: 9-channel UNet input" if first is not None and first.shape[1] == 9 else ""
    if width in FAMILIES:
        return FAMILIES[width][:-1] + inpaint + ")"
    clip = any(k.startswith("cond_stage_model.transformer.") for k in sd)
    return f"unknown family (cross-attention context width {width}{', SD 1.x-style CLIP text encoder' if clip else ''})"


def source_layout(sd: dict[str, torch.Tensor]) -> str:
    """The attention layout of a full SD checkpoint; one-line errors for anything else."""
    if detect_layout({k: v for k, v in sd.items() if not k.startswith(UNET_PREFIX)}) is not None:
        raise CheckpointError("unknown layout: attention weights outside model.diffusion_model.* "
                              "(a diffusers or UNet-only file?); expected an ldm Stable Diffusion checkpoint")
    layout = detect_layout(sd)
    if layout is None:
        raise CheckpointError("not a Stable Diffusion checkpoint: no UNet attention weights "
                              "(model.diffusion_model.*.attn1.to_q.weight or .in_proj_weight)")
    return layout


# ----------------------------------------------------------------------------- EMA and dtypes

def target_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` for floating weights; the noise-schedule buffers stay float32; other tensors as stored."""
    if dtype is None or not t.is_floating_point():
        return t.dtype
    return torch.float32 if name in BUFFER_NAMES else dtype


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns its storage (chunks of a packed in_proj_weight are views into one)."""
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


# ----------------------------------------------------------------------------- writing

def write_safetensors(f: BinaryIO, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                      progress: bool | None = None) -> None:
    """Stream a .safetensors file: header from ``specs`` (name -> dtype, shape), then ``produce(name)`` one by one.

    Format: u64 little-endian header length, a JSON header padded with spaces to 8 bytes, raw data.
    Only one produced tensor is alive at a time, unlike ``safetensors.torch.save_file``.
    """
    from tqdm import tqdm
    if sys.byteorder != "little":
        raise CheckpointError("writing .safetensors needs a little-endian machine")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, (dtype, shape) in tqdm(specs.items(), desc="writing", unit="tensor", disable=_no_bar(progress)):
        t = produce(name)
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{name}: produced {t.dtype} {tuple(t.shape)}, header says {dtype} {tuple(shape)}")
        f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # (nbytes,) no copy


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: progress=None shows the bar only on a terminal."""
    return None if progress is None else not progress


def nbytes(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Bytes of tensor data that ``specs`` (name -> dtype, shape) describe."""
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())


def check_disk(path: str, need: int) -> None:
    """One-line CheckpointError when the folder of ``path`` has less than ``need`` bytes free."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CheckpointError(f"not enough disk space for {path}: it needs about {need / 1e9:.1f} GB, "
                              f"{free / 1e9:.1f} GB are free in {folder}")


def _disk_full(e: BaseException, folder: str) -> bool:
    """Whether ``e`` says the disk filled up: ENOSPC, or torch.save's RuntimeError for a failed write
    ("unexpected pos", "file write failed") with almost nothing left free."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    if not (isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e))):
        return False
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


def atomic_write(path: str, write: Callable[[BinaryIO, str], None], need: int = 0) -> int:
    """Run ``write(file, temp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    On any error (or Ctrl-C) the temporary file is removed and ``path`` is untouched. The temporary
    name keeps the suffix so readers that sniff it still work. ``need`` (bytes, 0 = unknown) is checked
    against the free disk space first, and a full disk is reported in one line either way.
    Returns the bytes written.
    """
    check_disk(path, need)
    folder, name = os.path.split(os.path.abspath(path))
    stem, suffix = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.partial-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f, tmp)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
        return size
    except BaseException as e:
        full = _disk_full(e, folder)  # before the partial file is removed and its space freed
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise CheckpointError(f"the disk filled up while writing {path} ({folder}: "
                                  f"{shutil.disk_usage(folder).free / 1e9:.1f} GB free now); nothing was written") from e
        raise


@contextlib.contextmanager
def staged(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], produce: Callable[[str], torch.Tensor],
           beside: str, progress: bool | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Stream ``produce``'d tensors to a temporary .safetensors beside ``beside``; yield them memory-mapped.

    ``torch.save`` needs every tensor at once: cast tensors staged on disk cost page cache, not
    RAM, and the caller's mmap'd input is unmapped once ``produce`` has popped its last tensor.
    """
    fd, path = tempfile.mkstemp(prefix=".staged-", suffix=".safetensors", dir=os.path.dirname(os.path.abspath(beside)))
    try:
        with os.fdopen(fd, "wb") as f:
            write_safetensors(f, specs, produce, None, progress)
        yield read_checkpoint(path)[0]
    finally:
        os.remove(path)


# ----------------------------------------------------------------------------- the --check

def unet_config(config: str):
    """The UNetConfig of an original yaml: --check needs only the UNet (so an SD 1.x yaml works too)."""
    from omegaconf import OmegaConf
    from ldm.config_utils import to_plain
    from ldm.unet import UNetConfig
    if not os.path.isfile(config):
        raise UsageError(f"config not found: {config}")
    try:
        node = to_plain(OmegaConf.load(config))
        return UNetConfig.from_params(node["model"]["params"]["unet_config"]["params"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"--config {config}: no usable model.params.unet_config ({e})") from e


@torch.no_grad()
def unet_output(sd: dict[str, torch.Tensor], unet_cfg, size: int = 8, seed: int = 0) -> torch.Tensor:
    """UNet output in float32 on a seeded (1, C, size, size) latent, t=500 and a (1, 77, context) context."""
    from ldm.checkpoint import check_keys
    from ldm.unet import UNetModel
    unet_sd = {k[len(UNET_PREFIX):]: v.float() for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    if detect_layout(unet_sd) == "original":
        unet_sd = to_native(unet_sd)
    with torch.device("meta"):
        unet = UNetModel(unet_cfg)
    check_keys(unet.state_dict(), unet_sd)
    unet.load_state_dict(unet_sd, strict=True, assign=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, unet_cfg.in_channels, size, size, generator=g)
    context = torch.randn(1, 77, unet_cfg.context_dim, generator=g)
    return unet(x, torch.tensor([500]), context)


def compare_unets(source: str, written: str, unet_cfg, ema: bool = False) -> tuple[float, float]:
    """(max |difference|, max |reference|) of the UNet built from each file; one model alive at a time."""
    sd, _ = read_checkpoint(source)
    ref = unet_output(take_ema(sd) if ema else sd, unet_cfg)
    del sd
    sd, _ = read_checkpoint(written)
    out = unet_output(sd, unet_cfg)
    if not (torch.isfinite(ref).all() and torch.isfinite(out).all()):
        raise CheckpointError("--check: the UNet output is not finite")
    return float((out - ref).abs().max()), float(ref.abs().max())


# ----------------------------------------------------------------------------- the conversion

def output_format(path: str) -> str:
    """'pickle' or 'safetensors' from the output suffix, with its folder checked to exist (before any long
    work); anything else is refused."""
    if path.endswith(".safetensors"):
        fmt = "safetensors"
    elif path.endswith(PICKLE_SUFFIXES):
        fmt = "pickle"
    else:
        raise UsageError(f"unknown output suffix for {path}: use .ckpt, .pt, .pth or .safetensors")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder does not exist: {folder}")
    return fmt


def convert(source: str | os.PathLike, target: str | os.PathLike, to: str = "native_mha", ema: bool = False,
            dtype: str | None = None, check: bool = False, config: str | None = None,
            progress: bool | None = None) -> ConversionReport:
    """Convert ``source`` to layout ``to`` and write ``target`` atomically; see the module docstring."""
    from tqdm import tqdm
    start = time.perf_counter()
    source, target = os.fspath(source), os.fspath(target)
    fmt = output_format(target)
    if to not in LAYOUTS:
        raise UsageError(f"unknown layout {to!r}: use native or original")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if os.path.exists(source) and os.path.exists(target) and os.path.samefile(source, target):
        raise UsageError(f"refusing to overwrite the input file {source}")
    to = LAYOUTS[to]

    sd, meta = read_checkpoint(source)
    layout_in = source_layout(sd)
    if ema:
        sd = take_ema(sd)
    sd, dropped = split_extras(sd)
    report = ConversionReport(source, target, layout_in, to, model_family(sd), dtype=dtype or "as stored", ema=ema,
                              dropped=dropped, not_carried=sorted(meta))
    if check and config is None:
        from ldm.detect import guess_config
        try:
            config = guess_config(sd)[0]
        except CheckpointError as e:
            raise UsageError(f"--check needs --config for this checkpoint ({report.family}): {e}") from e
    unet_cfg = unet_config(config) if check else None  # fail before the long part
    if to != layout_in:
        sd = to_native(sd) if to == "native_mha" else to_original(sd)

    cast = DTYPES.get(dtype)
    specs = {k: (target_dtype(k, v, cast), tuple(v.shape)) for k, v in sd.items()}
    report.tensors = len(specs)

    def produce(name: str) -> torch.Tensor:
        t = sd.pop(name)  # free the source reference as we go
        return _own_storage(t.to(specs[name][0]))

    restage = fmt != "safetensors" and any(specs[k][0] != v.dtype for k, v in sd.items())

    def write(f: BinaryIO, tmp: str) -> None:
        if fmt == "safetensors":
            metadata = {"format": "pt", "layout": to, "source": os.path.basename(source),
                        "dtype": dtype or "as stored", "ema": str(ema).lower(), "converted_by": "ldm.convert"}
            write_safetensors(f, specs, produce, metadata, progress)
        elif restage:
            with staged(specs, produce, tmp, progress) as state:  # the mmap'd input is released first
                torch.save({"state_dict": state}, f)
        else:
            names = tqdm(list(specs), desc="preparing", unit="tensor", disable=_no_bar(progress))
            torch.save({"state_dict": {k: produce(k) for k in names}}, f)
        if check:
            f.flush()
            report.max_diff, report.ref_scale = compare_unets(source, tmp, unet_cfg, ema)

    report.bytes_written = atomic_write(target, write, need=nbytes(specs) * (2 if restage else 1))
    report.seconds = time.perf_counter() - start
    return report


# ----------------------------------------------------------------------------- the command line

def _group(names: list[str]) -> str:
    """'model_ema.* (688), global_step' - prefixes with several names are counted, not listed."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split(".")[0], []).append(n)
    return ", ".join(f"{p}.* ({len(ns)})" if len(ns) > 1 or ns[0] != p else p for p, ns in groups.items())


def note(family: str) -> str:
    """Which repo config goes with this family (a format string of the layout suffix and v1/v2)."""
    if "inpainting" in family:
        return INPAINT_NOTE
    return SD1_NOTE if "SD 1.x" in family else EPS_OR_V


def summary(r: ConversionReport) -> list[str]:
    """The lines ``ldm-convert`` prints for a finished conversion."""
    change = "unchanged" if r.layout_in == r.layout_out else f"{r.layout_in} -> {r.layout_out}"
    suffix = "_native_mha" if r.layout_out == "native_mha" else ""
    lines = [f"read:    {r.source} ({r.layout_in} layout)",
             f"model:   {r.family}",
             f"note:    {note(r.family).format(suffix, 'v1' if 'SD 1.x' in r.family else 'v2')}"]
    if r.ema:
        lines.append("ema:     UNet weights taken from model_ema.*")
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
    p.add_argument("--check", action="store_true",
                   help="compare the UNet output of the input and the written file on a seeded input")
    p.add_argument("--config", default=None,
                   help="model yaml for --check (default: the repo config that fits the weights, see ldm.detect)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """``ldm-convert``: exit 0 on success, 1 for a bad checkpoint, 2 for a bad command line."""
    args = parser().parse_args(argv)
    try:
        report = convert(args.input, args.output, to=args.to, ema=args.ema, dtype=args.dtype, check=args.check,
                         config=args.config, progress=False if args.quiet else None)
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

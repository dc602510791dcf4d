"""Reading checkpoints safely: .ckpt (weights-only pickle) and .safetensors, nested state dicts, training-only
entries and EMA weights. Nothing here knows the model: it reads names and tensors.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message is one line for users."""



class _IgnoredObject:
    """Stand-in for training-time objects pickled into some .ckpt files (e.g. Lightning callbacks)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _safe_globals() -> list:
    allowed: list = [(_IgnoredObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]
    try:
        import numpy as np
        core = getattr(np, "_core", None) or np.core
        # numpy scalars (e.g. global_step) pickled under numpy 1.x or 2.x module names
        allowed += [core.multiarray.scalar, (core.multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype]
        allowed += [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")
                    if hasattr(getattr(np, "dtypes", None), n)]
    except ImportError:
        pass
    return allowed


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat state dict, metadata) from a .ckpt/.pt/.pth (weights_only pickle) or .safetensors file.

    A pickle is never allowed to run code: only tensors, containers and a short allow-list of
    globals real SD checkpoints carry are accepted. Nested ``state_dict`` entries are unwrapped.
    Metadata: the safetensors header's, or for a pickle its non-tensor entries (``global_step``,
    ``optimizer_states``...) as short text, so that callers can say what they leave behind.
    A torch zip is memory-mapped only when ``check_zip`` finds every tensor record mappable; anything else
    (e.g. a file re-zipped with DEFLATE) is read through the zip reader, so one file gives one set of weights.
    """
    path = os.fspath(path)
    if _is_safetensors(path):
        return _read_safetensors(path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # what torch.load tests; an old-format pickle is no zip
    mmap = is_zip and check_zip(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError(f"refusing to load {path}: it holds objects outside the allowed set "
                                  f"(a pickle that could run code); convert it to .safetensors from a trusted source "
                                  f"[{msg}]") from e
        raise CheckpointError(f"not a readable checkpoint: {path} ({msg})") from e
    return unwrap_state_dict(obj, path), pickle_metadata(obj)


def _is_safetensors(path: str) -> bool:
    """True for a safetensors file, False for a torch zip or pickle; one-line errors for anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header size, then the JSON header; torch: a zip or a raw pickle.
    if path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{"):
        return True
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(f"not a checkpoint: {path} is neither a torch .ckpt (zip or pickle) nor safetensors")
    return False


# Bytes per element of the storage classes a torch pickle names (torch.<Name>); UntypedStorage counts bytes.
_ITEMSIZES = {"UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "ShortStorage": 2,
              "HalfStorage": 2, "BFloat16Storage": 2, "IntStorage": 4, "FloatStorage": 4, "LongStorage": 8,
              "DoubleStorage": 8, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16}
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}  # what torch's zip reader reads


def check_zip(path: str) -> bool:
    """Check every tensor record of a torch zip checkpoint against its pickle; True when all may be mmap'd.

    ``torch.load(mmap=True)`` maps ``<archive>/data/<key>`` from its offset in the file for the byte count the
    pickle declares, whatever the zip says: a compressed record is read as its compressed bytes and a short one
    runs into its neighbour. So each record must hold exactly the declared bytes (else a one-line
    CheckpointError naming it), and is mmap'd only if stored uncompressed at an offset aligned to its elements.
    """
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            infos = {i.filename: i for i in zf.infolist()}
            first = next(iter(infos), "")
            pkl = f"{first.split('/')[0]}/data.pkl"  # torch reads the archive named by the first record's folder
            if pkl not in infos:
                raise CheckpointError(f"not a torch checkpoint: {path} is a zip without {pkl}")
            if infos[pkl].file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"refusing {path}: its {pkl} declares {infos[pkl].file_size} bytes "
                                      f"(a checkpoint's is well under 1 MB)")
            records = _declared_records(zf.read(pkl))
            size = os.fstat(f.fileno()).st_size
            mappable, spans = True, []
            for key, (nbytes, itemsize) in records.items():
                name = f"{pkl[:-len('data.pkl')]}data/{key}"
                info = infos.get(name)
                if info is None:
                    raise CheckpointError(f"damaged checkpoint {path}: tensor record {name} is missing")
                if info.compress_type not in _ZIP_METHODS or info.flag_bits & 1:
                    raise CheckpointError(f"unreadable checkpoint {path}: record {name} is encrypted or compressed "
                                          f"with zip method {info.compress_type}; torch reads stored or deflate")
                stored = info.compress_type == zipfile.ZIP_STORED
                if nbytes is not None and info.file_size != nbytes:
                    raise CheckpointError(f"damaged checkpoint {path}: record {name} holds {info.file_size} bytes, "
                                          f"its tensor data needs {nbytes}")
                if stored and info.compress_size != info.file_size:
                    raise CheckpointError(f"damaged checkpoint {path}: stored record {name} declares "
                                          f"{info.file_size} bytes but spans {info.compress_size}")
                start = _data_offset(f, info, path)
                if start + info.compress_size > size:
                    raise CheckpointError(f"damaged checkpoint {path}: record {name} runs past the end of the file")
                spans.append((start, start + info.compress_size, name))
                mappable &= stored and nbytes is not None and start % itemsize == 0
    except CheckpointError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError, and whatever a damaged pickle makes the scan raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"not a readable checkpoint: {path} ({type(e).__name__}: {msg})") from e
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"damaged checkpoint {path}: records {a} and {b} overlap")
    return mappable


def _data_offset(f, info: zipfile.ZipInfo, path: str) -> int:
    """Where a zip record's data starts: after its local header (30 bytes), name and extra field."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"damaged checkpoint {path}: the zip header of {info.filename} is broken")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


class _Stub:
    """Whatever a global names in a torch pickle, while it is scanned for its storage records: never run."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Stub":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _RecordScan(pickle.Unpickler):
    """Collects a torch pickle's storage records (key -> (bytes, bytes per element)); every global is a _Stub."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.records: dict[str, tuple[int | None, int]] = {}

    def find_class(self, module: str, name: str) -> type:
        # one fixed stand-in per storage class, _Stub for everything else: a pickle of many globals costs nothing
        return _STORAGE_STUBS.get((module, name), _Stub)

    def persistent_load(self, pid: Any) -> _Stub:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, storage_type, key, _, numel = pid
            itemsize = _ITEMSIZES.get(getattr(storage_type, "storage_name", None))
            nbytes = numel * itemsize if itemsize and isinstance(numel, int) else None  # None: torch checks it
            self.records.setdefault(str(key), (nbytes, itemsize or 1))
        return _Stub()


_STORAGE_STUBS = {(module, name): type(name, (_Stub,), {"storage_name": name})
                  for module in ("torch", "torch.storage") for name in _ITEMSIZES}
MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl of a real SD checkpoint is well under 1 MB; more is refused unread


def _declared_records(data: bytes) -> dict[str, tuple[int | None, int]]:
    scan = _RecordScan(data)
    scan.load()
    return scan.records


def read_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Name -> a tensor of the stored shape, for config detection: a .safetensors file's header only (meta
    tensors, float32 stand-ins), a .ckpt memory-mapped (its data is not read until touched)."""
    path = os.fspath(path)
    if not _is_safetensors(path):
        return read_checkpoint(path)[0]
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"not a readable safetensors file: {path} ({str(e).splitlines()[0]})") from e


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(path, device="cpu"), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"not a readable safetensors file: {path} ({str(e).splitlines()[0]})") from e


def pickle_metadata(obj: Any) -> dict[str, str]:
    """Name -> short text for every non-tensor entry around and inside a pickle's state dict."""
    meta: dict[str, str] = {}
    while isinstance(obj, dict):
        inner = obj.get("state_dict")
        for k, v in obj.items():
            if k != "state_dict" and not isinstance(v, torch.Tensor):
                scalar = isinstance(v, (int, float, str, bool)) or getattr(v, "shape", None) == ()  # numpy too
                meta[str(k)] = str(v)[:80] if scalar else type(v).__name__
        if not isinstance(inner, dict):
            break
        obj = inner
    return meta


def unwrap_state_dict(obj: Any, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Follow nested ``state_dict`` entries down to the flat name -> tensor mapping."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors




_EXTRA_PREFIXES = ("model_ema.", "loss.", "first_stage_model.loss.", "cond_stage_model.model.visual.",
                   "optimizer", "lr_scheduler")
_EXTRA_KEYS = {"lvlb_weights", "logvar", "global_step", "epoch"}
# Kept by the converter, ignored when loading: transformers' CLIP saved its arange(77) position ids (a buffer,
# not a weight) until 4.31, so SD 1.x files carry them; the text tower uses positions 0..T-1 as newer transformers.
CLIP_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
SDXL_POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"  # SDXL's CLIP ViT-L
DERIVED_KEYS = {CLIP_POSITION_IDS, SDXL_POSITION_IDS}


def split_extras(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(model entries, names of training-only entries dropped on purpose)."""
    dropped = sorted(k for k in sd if k in _EXTRA_KEYS or k.startswith(_EXTRA_PREFIXES))
    return {k: v for k, v in sd.items() if k not in set(dropped)}, dropped


def ema_name(key: str) -> str:
    """model.X.Y -> model_ema.XY: the original LitEma stores each UNet parameter with its dots removed."""
    return "model_ema." + key[len("model."):].replace(".", "")


def take_ema(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every UNet weight ``model.X.Y`` by its EMA copy ``model_ema.XY``: one to one, shapes equal."""
    live = [k for k in sd if k.startswith("model.")]
    table = {ema_name(k): k for k in live}  # model_ema.XY -> model.X.Y
    if len(table) != len(live):
        raise CheckpointError("EMA names are ambiguous: two UNet weights map to the same model_ema.* name")
    ema_keys = [k for k in sd if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")]
    if not ema_keys:
        raise CheckpointError("no EMA weights (model_ema.*) in this checkpoint; drop --ema "
                              "(*-ema-pruned files already hold the EMA weights as model.*)")
    missing = [table[e] for e in table if e not in sd]
    orphans = [e for e in ema_keys if e not in table]
    shapes = [e for e in ema_keys if e in table and sd[e].shape != sd[table[e]].shape]
    for what, names in (("UNet weights without an EMA copy", missing), ("EMA weights without a UNet weight", orphans),
                        ("EMA weights whose shape differs from the UNet weight", shapes)):
        if names:
            raise CheckpointError(f"--ema: {len(names)} {what}, e.g. {names[0]}")
    out = dict(sd)
    for e, k in table.items():
        out[k] = sd[e]
    return out


def name_list(keys: list[str], limit: int = 6) -> str:
    """The first ``limit`` names, then how many more: key lists in one-line errors."""
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")



"""Reading checkpoints safely, converting between layouts, and loading a ready model strictly.

Layouts:
  original    ``...attn1.to_q.weight``, ``to_k``, ``to_v`` (no bias), ``to_out.0.weight/bias``
  native_mha  ``...attn1.in_proj_weight`` (self-attention: Q,K,V packed), ``...attn2.q_proj_weight``/
              ``k_proj_weight``/``v_proj_weight`` (cross-attention), ``in_proj_bias``, ``out_proj.weight/bias``
Every rename between the two lives in ``to_native``/``to_original`` below.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ldm.schedule import BUFFER_NAMES


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message is one line for users."""


# ----------------------------------------------------------------------------- reading

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
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header size, then the JSON header; torch: a zip or a raw pickle.
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if path.endswith(".safetensors") or looks_safetensors:
        return _read_safetensors(path)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(f"not a checkpoint: {path} is neither a torch .ckpt (zip or pickle) nor safetensors")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError(f"refusing to load {path}: it holds objects outside the allowed set "
                                  f"(a pickle that could run code); convert it to .safetensors from a trusted source "
                                  f"[{msg}]") from e
        raise CheckpointError(f"not a readable checkpoint: {path} ({msg})") from e
    return unwrap_state_dict(obj, path), pickle_metadata(obj)


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


# ----------------------------------------------------------------------------- layouts

_ORIG_ATTN = re.compile(r"^(.*\.attn[12])\.to_q\.weight$")
_NATIVE_ATTN = re.compile(r"^(.*\.attn[12])\.(in_proj_weight|q_proj_weight)$")


def detect_layout(sd: dict[str, torch.Tensor]) -> str | None:
    """'original', 'native_mha', or None when the dict has no UNet attention keys."""
    orig = any(_ORIG_ATTN.match(k) for k in sd)
    native = any(_NATIVE_ATTN.match(k) for k in sd)
    if orig and native:
        raise CheckpointError("checkpoint mixes the original (to_q/to_k/to_v) and native (in_proj) attention layouts")
    return "original" if orig else "native_mha" if native else None


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original -> native layout. Self-attention (query and key widths equal in attn1) is packed."""
    out = dict(sd)
    for key in [k for k in sd if _ORIG_ATTN.match(k)]:
        p = _ORIG_ATTN.match(key).group(1)
        try:
            q, k, v = (out.pop(f"{p}.to_{n}.weight") for n in "qkv")
            out[f"{p}.out_proj.weight"] = out.pop(f"{p}.to_out.0.weight")
            out[f"{p}.out_proj.bias"] = out.pop(f"{p}.to_out.0.bias")
        except KeyError as e:
            raise CheckpointError(f"incomplete attention weights at {p}: missing {e.args[0]}") from None
        if p.endswith("attn1") and k.shape[1] == q.shape[1]:
            out[f"{p}.in_proj_weight"] = torch.cat([q, k, v])
        else:
            out[f"{p}.q_proj_weight"], out[f"{p}.k_proj_weight"], out[f"{p}.v_proj_weight"] = q, k, v
        out[f"{p}.in_proj_bias"] = torch.zeros(3 * q.shape[0], dtype=q.dtype)
    return out


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native -> original layout; refuses non-zero in_proj_bias, which the original cannot hold."""
    out = dict(sd)
    for key in [k for k in sd if _NATIVE_ATTN.match(k)]:
        p = _NATIVE_ATTN.match(key).group(1)
        bias = out.pop(f"{p}.in_proj_bias", None)
        if bias is not None and not bias.is_meta and bool(bias.any()):
            raise CheckpointError(f"{p}.in_proj_bias is non-zero: the original layout has no Q/K/V bias")
        if key.endswith("in_proj_weight"):
            q, k, v = out.pop(key).chunk(3)
        else:
            q, k, v = (out.pop(f"{p}.{n}_proj_weight") for n in "qkv")
        out[f"{p}.to_q.weight"], out[f"{p}.to_k.weight"], out[f"{p}.to_v.weight"] = \
            q.contiguous(), k.contiguous(), v.contiguous()
        out[f"{p}.to_out.0.weight"] = out.pop(f"{p}.out_proj.weight")
        out[f"{p}.to_out.0.bias"] = out.pop(f"{p}.out_proj.bias")
    return out


# ----------------------------------------------------------------------------- training-only entries

_EXTRA_PREFIXES = ("model_ema.", "loss.", "first_stage_model.loss.", "cond_stage_model.model.visual.",
                   "optimizer", "lr_scheduler")
_EXTRA_KEYS = {"lvlb_weights", "logvar", "global_step", "epoch"}
# Kept by the converter, ignored when loading: transformers' CLIP saved its arange(77) position ids (a buffer,
# not a weight) until 4.31, so SD 1.x files carry them; the text tower uses positions 0..T-1 as newer transformers.
CLIP_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
DERIVED_KEYS = {CLIP_POSITION_IDS}


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


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def prepare_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], strict: bool = True,
                       ema: bool = False) -> dict[str, torch.Tensor]:
    """Unwrap, pick EMA if asked, drop training extras, convert the layout, fill derived schedule buffers,
    and (strict) check keys and shapes against ``model``, raising one CheckpointError naming them."""
    sd = unwrap_state_dict(dict(sd))
    if ema:
        sd = take_ema(sd)
    sd, _ = split_extras(sd)
    sd = {k: v for k, v in sd.items() if k not in DERIVED_KEYS}
    if detect_layout(sd) == "original":
        sd = to_native(sd)
    own = model.state_dict()
    for name in BUFFER_NAMES:  # derived from the config; older or hand-made files may omit them
        if name in own and name not in sd:
            sd[name] = own[name]
    if strict:
        check_keys(own, sd)
    return sd


def check_keys(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> None:
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_names(shapes, 3)}")
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


# ----------------------------------------------------------------------------- loading a ready model

@dataclass
class LoadReport:
    path: str
    layout: str | None
    converted: bool
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def load_config(config: Any):
    """A DiffusionConfig from a yaml path, an OmegaConf/dict of the whole file or of ``model``, or itself."""
    from ldm.latent_diffusion import INPAINT_TARGETS, DiffusionConfig, model_config
    from ldm.config_utils import to_plain
    if isinstance(config, DiffusionConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        from omegaconf import OmegaConf
        if not os.path.isfile(config):
            raise CheckpointError(f"config not found: {config}")
        config = OmegaConf.load(config)
    node = to_plain(config)
    node = node.get("model", node)
    target = node.get("target", "ldm.models.diffusion.ddpm.LatentDiffusion")
    if not target.endswith("LatentDiffusion") and target not in INPAINT_TARGETS:
        raise CheckpointError(f"config model target {target!r} is not supported (LatentDiffusion, "
                              f"LatentInpaintDiffusion)")
    return model_config(target, node.get("params", {}))


def load_model(config: Any, ckpt: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, ema: bool = False, attention: str | None = None,
               progress: Callable[[str], None] | None = None):
    """Build on the meta device, load ``ckpt`` (either layout) strictly with assign=True, move once.

    Returns (model, LoadReport). ``dtype`` (None keeps the stored dtype) applies to the UNet, VAE and
    text encoder; the schedule buffers stay float32. ``progress(stage)`` is called as each stage ends.
    """
    step = progress or (lambda stage: None)
    from ldm.attention import set_attention_backend
    from ldm.latent_diffusion import model_class
    start = time.perf_counter()
    cfg = load_config(config)
    raw, _ = read_checkpoint(ckpt)
    step("read")
    layout = detect_layout(raw)
    _, dropped = split_extras(raw)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model.load_state_dict(prepare_state_dict(model, raw, strict=True, ema=ema), strict=True, assign=True)
    step("load")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"weights not loaded: {_names(left)}")
    for part in (model.model, model.first_stage_model, model.cond_stage_model):
        part.to(device=device, dtype=dtype)
    for name in BUFFER_NAMES:
        setattr(model, name, getattr(model, name).to(device))
    if attention is not None:
        set_attention_backend(model, attention)
    model.eval()
    step("move")
    report = LoadReport(os.fspath(ckpt), layout, layout == "original", dropped, time.perf_counter() - start)
    return model, report

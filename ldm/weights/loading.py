"""Loading a model: the fast path (``load_model``: meta-device build, the state dict prepared once, a strict
``assign=True`` load) and the classes the original yamls name, whose ``load_state_dict`` keeps the original
contract (either attention layout, training-only entries ignored).

The original scripts build the model from the yaml (``ldm.models.diffusion.ddpm.LatentDiffusion``) and call
``model.load_state_dict(sd, strict=False)`` with a checkpoint as released; that call prepares the state dict
(``prepare_state_dict``) and then loads it. ``load_model`` returns the same classes, prepared once.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ldm.model import diffusion, sdxl
from ldm.model.attention import set_attention_backend
from ldm.model.presets import load_config
from ldm.model.schedule import BUFFER_NAMES
from ldm.weights.layout import canonical_text_keys, detect_layout, to_native
from ldm.weights.reading import (DERIVED_KEYS, CheckpointError, name_list, read_checkpoint, split_extras, take_ema,
                                 unwrap_state_dict)


def prepare_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], strict: bool = True,
                       ema: bool = False) -> dict[str, torch.Tensor]:
    """Unwrap, pick EMA if asked, drop training extras, rename the text tower and convert the attention layout,
    fill derived schedule buffers, and check against ``model``: dtype kinds always, keys and shapes if
    ``strict``, raising one CheckpointError naming them."""
    sd = canonical_text_keys(unwrap_state_dict(dict(sd)))
    if ema:
        sd = take_ema(sd)
    sd, _ = split_extras(sd)
    sd = {k: v for k, v in sd.items() if k not in DERIVED_KEYS}
    if detect_layout(sd) == "original":
        sd = to_native(sd)
    own = model.state_dict()
    for name in (*BUFFER_NAMES, *sdxl.BUFFER_NAMES):  # derived from the config; some files omit them
        if name in own and name not in sd:
            sd[name] = own[name]
    if strict:
        check_keys(own, sd)
    elif wrong := dtype_mismatches(own, sd):
        raise CheckpointError(f"checkpoint does not match the config: {_dtype_problem(wrong)}")
    return sd


def _kind(t: torch.Tensor) -> str:
    return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer/bool"


def dtype_mismatches(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> list[str]:
    """Keys of ``sd`` whose dtype is of another kind than the model's (e.g. int64 for a float weight): a cast
    would load them silently, and an ``assign=True`` load would fail only while sampling."""
    return [f"{k} {str(sd[k].dtype).removeprefix('torch.')} vs model {str(own[k].dtype).removeprefix('torch.')}"
            for k in own if k in sd and _kind(sd[k]) != _kind(own[k])]


def _dtype_problem(names: list[str]) -> str:
    return f"{len(names)} dtype mismatch(es): {name_list(names, 3)}"


def check_keys(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> None:
    """One CheckpointError naming the missing and unexpected keys, the shape and the dtype-kind mismatches."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {name_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {name_list(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {name_list(shapes, 3)}")
    dtypes = dtype_mismatches(own, sd)
    if dtypes:
        problems.append(_dtype_problem(dtypes))
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


class LoadsReleasedCheckpoints:
    """``load_state_dict`` that accepts either attention layout and ignores known training-only entries; with
    ``strict=False`` it warns about the keys it skipped (a missing text tower would otherwise stay random)."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        sd = prepare_state_dict(self, dict(state_dict), strict=strict)
        result = torch.nn.Module.load_state_dict(self, sd, strict=strict, assign=assign)
        skipped = [f"{len(names)} {what} key(s): {name_list(names, 4)}" for what, names in
                   (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if names]
        if skipped:
            warnings.warn(f"load_state_dict(strict=False) ignored {'; '.join(skipped)}", stacklevel=2)
        return result


class LatentDiffusion(LoadsReleasedCheckpoints, diffusion.LatentDiffusion):
    """``ldm.model.diffusion.LatentDiffusion`` with the original ``load_state_dict``."""


class LatentInpaintDiffusion(LoadsReleasedCheckpoints, diffusion.LatentInpaintDiffusion):
    """``ldm.model.diffusion.LatentInpaintDiffusion`` with the original ``load_state_dict``."""


class DiffusionEngine(LoadsReleasedCheckpoints, sdxl.DiffusionEngine):
    """``ldm.model.sdxl.DiffusionEngine`` (SDXL) with the original ``load_state_dict``; generative-models' yamls
    name it ``sgm.models.diffusion.DiffusionEngine``."""


def model_class(cfg: diffusion.DiffusionConfig | sdxl.SDXLConfig) -> type[torch.nn.Module]:
    """The class that runs ``cfg`` (SDXL, inpainting or not), with the original ``load_state_dict``."""
    if isinstance(cfg, sdxl.SDXLConfig):
        return DiffusionEngine
    return LatentInpaintDiffusion if diffusion.model_class(cfg) is diffusion.LatentInpaintDiffusion else LatentDiffusion


@dataclass
class LoadReport:
    """What ``load_model`` read: the file, its attention layout, and the training-only entries it left out."""
    path: str
    layout: str | None
    converted: bool
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check_family(cfg: diffusion.DiffusionConfig | sdxl.SDXLConfig, raw: Any) -> None:
    """One line when the checkpoint is SD 1.x/2.x and the config SDXL's, the reverse, or SDXL base vs refiner (a
    strict load would list thousands of keys). A checkpoint no family fits is left to the strict load."""
    from ldm.weights.families import identify
    try:
        family, _ = identify(unwrap_state_dict(raw))
    except CheckpointError:
        return
    kind = lambda xl, refiner: "an SDXL refiner" if refiner else "an SDXL base" if xl else "an SD 1.x/2.x"
    ckpt = kind(family.vector is not None, "refiner" in family.name)
    xl = isinstance(cfg, sdxl.SDXLConfig)
    config = kind(xl, xl and "aesthetic_score" in cfg.conditioner.input_keys)
    if ckpt != config:
        raise CheckpointError(f"the checkpoint is {family.name} but the config is {config} model's; drop --config "
                              f"to use the config detected from the checkpoint")


def load_model(config: Any, ckpt: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, ema: bool = False, attention: str | None = None,
               progress: Callable[[str], None] | None = None):
    """Build on the meta device, load ``ckpt`` (either layout) strictly with assign=True, move once.

    Returns (model, LoadReport): a LatentDiffusion for SD 1.x/2.x configs, a DiffusionEngine for SDXL ones.
    ``dtype`` (None keeps the stored dtype) applies to the UNet, VAE and text encoder(s); the schedule buffers
    (and SDXL's sigmas) stay float32. ``progress(stage)`` is called as each stage ends.
    """
    step = progress or (lambda stage: None)
    start = time.perf_counter()
    cfg = load_config(config)
    raw, _ = read_checkpoint(ckpt)
    step("read")
    layout = detect_layout(raw)
    check_family(cfg, raw)
    _, dropped = split_extras(raw)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    prepared = prepare_state_dict(model, raw, strict=True, ema=ema)  # once: the plain nn.Module load follows
    torch.nn.Module.load_state_dict(model, prepared, strict=True, assign=True)
    step("load")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"weights not loaded: {name_list(left)}")
    text = model.conditioner if isinstance(model, sdxl.DiffusionEngine) else model.cond_stage_model
    for part in (model.model, model.first_stage_model, text):
        part.to(device=device, dtype=dtype)
    for name in BUFFER_NAMES:  # the schedule tables (and SDXL's sigmas) stay float32
        setattr(model, name, getattr(model, name).to(device))
    if isinstance(model, sdxl.DiffusionEngine):
        model.denoiser.to(device)
    if attention is not None:
        set_attention_backend(model, attention)
    model.eval()
    step("move")
    report = LoadReport(os.fspath(ckpt), layout, layout == "original", dropped, time.perf_counter() - start)
    return model, report

"""Model-level CPU offload: text encoder, UNet and VAE wait on the CPU; each visits the device only while used.

``enable_model_offload(model, device)`` keeps a CPU copy of every weight (pinned when the device is
CUDA) and hooks the entry points of the three components: the text encoder's ``forward``/
``encode``/``encode_with_transformer`` (SD 1/2's ``cond_stage_model``; SDXL's ``conditioner``, whose
``forward`` both towers run under), the UNet wrapper's ``forward`` (``model.model``, reached by
``apply_model``) and the VAE's ``encode``/``decode``/``decode_checked``. Entering one component
drops the previous one's device weights (no copy back: weights never change at inference) and
copies its own in, so device memory holds about the largest component plus activations.

Two models on one device (SDXL's base and refiner): ``enable_model_offload(refiner, device,
share_with=base_handle)`` makes the components of both take turns, so one at most is on the device.

Compilation: compile the UNet (``model.model.diffusion_model``) or the VAE decoder before or after
enabling offload: the hooks sit outside the compiled modules, and a compiled graph takes the
weights as inputs, so moving them does not recompile. Not supported off the CPU: CUDA graphs
(``--compile_mode reduce-overhead`` / ``max-autotune``) and inductor freezing, which bake device
weights into the compiled module; entering such a component raises ValueError.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

# name -> (attribute of LatentDiffusion, methods wrapped besides the forward pre-hook)
COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "text": ("cond_stage_model", ("encode", "encode_with_transformer")),
    "unet": ("model", ()),
    "vae": ("first_stage_model", ("encode", "decode", "decode_checked")),
}
SDXL_TEXT = "conditioner"  # SDXL's DiffusionEngine holds its text part (both towers) here instead
_INCOMPATIBLE = ("--offload cannot be used with {what} ({where}): it keeps the weights on the device; use "
                 "--compile_mode default or max-autotune-no-cudagraphs, or drop --offload")


class _Slot:
    """One weight of a component: where it lives on the CPU and how to point the module at a copy."""

    def __init__(self, owner: nn.Module, name: str, is_param: bool, home: torch.Tensor):
        self.owner, self.name, self.is_param, self.home = owner, name, is_param, home

    def point_to(self, data: torch.Tensor) -> None:
        if not self.is_param:
            self.owner._buffers[self.name] = data
            return
        param = self.owner._parameters[self.name]
        try:
            param.data = data  # cpu <-> cuda: the same Parameter object, so references and compile guards hold
        except RuntimeError:  # types that cannot share one (cpu <-> meta, some subclasses): a new Parameter
            self.owner._parameters[self.name] = nn.Parameter(data, requires_grad=param.requires_grad)


def _home_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """``t`` on the CPU, in pinned memory (fast, asynchronous copies to CUDA) where its tensor type allows."""
    home = t.detach().to("cpu")
    if pin:
        try:
            return home.pin_memory()
        except (RuntimeError, NotImplementedError):  # e.g. a quantized tensor subclass without pin_memory
            pass
    return home


def _slots(module: nn.Module, pin: bool) -> list[_Slot]:
    """Every parameter and buffer of ``module``, pointed at its CPU home copy (pinned if ``pin``)."""
    slots, homes = [], {}
    for owner in module.modules():
        for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
            for name, t in table.items():
                if t is None or (is_param and id(t) in homes):  # a shared Parameter moves with its first slot
                    continue
                if id(t) not in homes:  # keyed by id, so t is kept alive here until the end
                    homes[id(t)] = (t, _home_copy(t, pin))
                slot = _Slot(owner, name, is_param, homes[id(t)][1])
                slot.point_to(slot.home)
                slots.append(slot)
    return slots


def compile_conflict(module: nn.Module) -> str | None:
    """Why compiled parts of ``module`` cannot have their weights moved (CUDA graphs, freezing), or None."""
    from torch._dynamo.eval_frame import OptimizedModule
    for name, m in module.named_modules():
        if isinstance(m, OptimizedModule):
            cfg = m.get_compiler_config() or getattr(m, "ldm_inductor_options", None) or {}  # compile_module's
            where = name or type(module).__name__
            if cfg.get("triton.cudagraphs"):
                return _INCOMPATIBLE.format(what="CUDA graphs (--compile_mode reduce-overhead/max-autotune)",
                                            where=where)
            if cfg.get("freezing"):
                return _INCOMPATIBLE.format(what="inductor freezing", where=where)
    return None


def component(model: nn.Module, name: str) -> nn.Module:
    """The module of component ``name`` ("text", "unet", "vae") of an SD 1/2 or SDXL model."""
    attr = SDXL_TEXT if name == "text" and hasattr(model, SDXL_TEXT) else COMPONENTS[name][0]
    return getattr(model, attr)


class ModelOffload:
    """The offload state of one model: ``active`` names the component on the device (or None).

    ``share_with``: the handle of another model offloaded to the same device; entering a component of either
    model first sends the other's active component back (``group``: the handles taking turns)."""

    def __init__(self, model: nn.Module, device: torch.device | str, share_with: "ModelOffload | None" = None):
        self.device = torch.device(device)
        if share_with is not None and share_with.device != self.device:
            raise ValueError(f"offload: cannot share the device with a model offloaded to {share_with.device} "
                             f"(this one goes to {self.device})")
        self.active: str | None = None
        self.loads = 0  # components copied to the device so far
        self.parts = {name: component(model, name) for name in COMPONENTS}
        self.group: list[ModelOffload] = share_with.group if share_with is not None else []
        self._model = model
        self._handles: list[Any] = []
        self._wrapped: list[tuple[nn.Module, str]] = []
        if self.device.type != "cpu":
            for part in self.parts.values():
                if (why := compile_conflict(part)) is not None:
                    raise ValueError(why)
        pin = self.device.type == "cuda"
        self._slots = {name: _slots(part, pin) for name, part in self.parts.items()}
        for name, (_, methods) in COMPONENTS.items():
            part = self.parts[name]
            self._handles.append(part.register_forward_pre_hook(lambda mod, args, name=name: self.activate(name)))
            for method in methods:
                if hasattr(part, method):
                    setattr(part, method, self._entering(name, getattr(part, method)))
                    self._wrapped.append((part, method))
        self.group.append(self)  # last: a model that failed above never joins

    def _entering(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.activate(name)
            return fn(*args, **kwargs)
        return call

    def activate(self, name: str) -> None:
        """Put component ``name`` on the device, sending the active one back to its CPU copy first."""
        if name == self.active:
            return
        for handle in self.group:  # this model's active component, and another model's on the same device
            handle.offload()
        if self.device.type != "cpu" and (why := compile_conflict(self.parts[name])) is not None:
            raise ValueError(why)  # compiled after offload was enabled
        try:
            with torch.inference_mode(False), torch.no_grad():
                for slot in self._slots[name]:
                    slot.point_to(slot.home.to(self.device, non_blocking=True))
        except BaseException:  # all or nothing: a half-moved component would fail confusingly later
            for slot in self._slots[name]:
                slot.point_to(slot.home)
            raise
        self.active = name
        self.loads += 1

    def offload(self) -> None:
        """Send the active component back to its CPU copy (the device copy is dropped, not copied back)."""
        if self.active is not None:
            for slot in self._slots[self.active]:
                slot.point_to(slot.home)
            self.active = None

    def remove(self) -> None:
        """Undo the hooks and wrappers; every component is left on the CPU."""
        self.offload()
        for handle in self._handles:
            handle.remove()
        for part, method in self._wrapped:
            delattr(part, method)
        self._handles, self._wrapped = [], []
        if self in self.group:
            self.group.remove(self)
        if getattr(self._model, "_ldm_offload", None) is self:
            del self._model._ldm_offload


def enable_model_offload(model: nn.Module, device: torch.device | str,
                         share_with: ModelOffload | None = None) -> ModelOffload:
    """Keep ``model``'s text encoder, UNet and VAE on the CPU, each moved to ``device`` only while it runs.

    Call it after the model has its final dtype (the CPU copies are taken now). ``model.device``
    then reports the UNet's current place, so give samplers the device explicitly. ``share_with``:
    another model's handle on the same device (SDXL's base, for its refiner): their components take turns.
    """
    if getattr(model, "_ldm_offload", None) is not None:
        raise ValueError("model offload is already enabled on this model")
    handle = ModelOffload(model, device, share_with)
    model._ldm_offload = handle
    return handle


__all__ = ["COMPONENTS", "SDXL_TEXT", "ModelOffload", "compile_conflict", "component", "enable_model_offload"]

"""Fewer UNet FLOPs per image, in the denoiser the samplers call: three published, training-free methods.

- DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): the deep UNet features
  change slowly between steps, so the whole UNet runs every ``interval``-th call and the calls between
  run only the shallow skip branch ``branch`` over the deep feature cached at the last full call
  (``UNetModel.forward(branch=, deep=)``). The package's defaults: interval 3, branch 0.
- T-GATE (Zhang et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion
  Models"): cross-attention converges in the first steps; at the last step before the gate each block's
  cross-attention output is kept (the mean of the unconditional and conditional halves) and reused from
  the gate on, where classifier-free guidance is dropped (both halves would be the same). The paper's
  gate: step 10 of 25, i.e. 40 % of the steps. Self-attention is not cached (that is TGATE-V2's addition).
- Guidance that stops early (Castillo et al. 2023, "Adaptive Guidance"): the unconditional half of the UNet
  batch is dropped after the first ``cfg_end`` of the steps.

Counting: T-GATE and ``cfg_end`` count sampler steps (PLMS's first step makes two UNet calls, as in
diffusers' PNDM, which the reference packages run on); DeepCache counts UNet calls (its package numbers a call
by its timestep's index in the scheduler, which PNDM repeats once: the same full calls for an interval of 3 or more).
Its interval restarts (a full call) whenever the UNet batch or the cross-attention source changes (guidance
stops, the gate), and the call that keeps the cross-attention outputs is a full one: the composition of
the T-GATE package with DeepCache. The per-call plan is Python data made before sampling, so the loop
makes no host syncs; each kind of call is one compiled graph (``graph_kinds``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from ldm.samplers.guidance import cat_cond

DEEPCACHE_INTERVAL, DEEPCACHE_BRANCH = 3, 0  # the deepcache package's documented setting (its README; diffusers' docs)
TGATE_FRACTION = 0.4  # the T-GATE paper's gate: step 10 of 25


def default_gate(steps: int) -> int:
    """The T-GATE paper's gate step scaled to ``steps`` (10 of 25): 40 % of the steps, at least 1."""
    return max(1, round(TGATE_FRACTION * steps))


@dataclass(frozen=True)
class Call:
    """What one UNet call does: guided (batch 2B) or not, full or shallow (DeepCache), and whether it keeps
    (``record``) or reuses (``reuse``) the cross-attention outputs (T-GATE)."""
    step: int
    guided: bool
    full: bool
    record: bool
    reuse: bool


@dataclass(frozen=True)
class Caching:
    """Which methods run: ``deepcache`` interval (None: off) and its ``branch``, the T-GATE ``tgate`` step
    (None: off; steps before it are guided), and the fraction of steps with guidance, ``cfg_end``."""
    deepcache: int | None = None
    branch: int = DEEPCACHE_BRANCH
    tgate: int | None = None
    cfg_end: float = 1.0

    def __post_init__(self):
        if self.deepcache is not None and self.deepcache < 1:
            raise ValueError(f"the DeepCache interval must be >= 1, got {self.deepcache}")
        if self.branch < 0:
            raise ValueError(f"the DeepCache branch must be >= 0, got {self.branch}")
        if self.tgate is not None and self.tgate < 1:
            raise ValueError(f"the T-GATE step must be >= 1, got {self.tgate}")
        if not 0.0 < self.cfg_end <= 1.0:
            raise ValueError(f"cfg_end must be in (0, 1], got {self.cfg_end}")

    def guided_steps(self, steps: int) -> int:
        """How many of ``steps`` steps are guided: the earlier of the gate and ``cfg_end``."""
        n = math.ceil(self.cfg_end * steps - 1e-9)
        return min(n, self.tgate) if self.tgate is not None else n

    def plan(self, call_steps: list[int], guided: bool) -> list[Call]:
        """One ``Call`` per UNet call; ``call_steps`` gives each call's step index (e.g. PLMS: 0, 0, 1, 2, ...)."""
        steps = call_steps[-1] + 1 if call_steps else 0
        guided_steps = self.guided_steps(steps) if guided else 0
        calls, phase, since = [], None, 0
        for k, s in enumerate(call_steps):
            last_of_step = k == len(call_steps) - 1 or call_steps[k + 1] != s
            record = self.tgate is not None and s == self.tgate - 1 and last_of_step
            reuse = self.tgate is not None and s >= self.tgate
            g = s < guided_steps
            if (g, reuse) != phase:  # a new UNet batch or cross-attention source: DeepCache starts over
                phase, since = (g, reuse), 0
            full = self.deepcache is None or since % self.deepcache == 0 or record
            since += 1
            calls.append(Call(s, g, full, record, reuse))
        return calls


def graph_kinds(calls: list[Call], deepcache: bool) -> set[tuple]:
    """The distinct UNet call signatures of a plan (each one compiled graph): (batch 2B?, DeepCache full or
    shallow or off, keeps, reuses)."""
    return {(c.guided, (c.full if deepcache else None), c.record, c.reuse) for c in calls}


def check_branch(unet: Any, branch: int) -> None:
    """A DeepCache branch ``unet`` has: its input blocks number the branches (0 ... len - 1)."""
    blocks = len(unet.input_blocks)
    if not 0 <= branch < blocks:
        raise ValueError(f"DeepCache branch {branch} does not exist: this UNet has branches 0 ... {blocks - 1}")


class CachingCFGDenoiser:
    """``CFGDenoiser``'s eps(x, t) following a ``Caching`` plan: DeepCache, T-GATE, guidance that stops early.

    ``counts`` tallies the calls by kind (full, shallow, record, reuse, guided, unguided) for tests and
    reports. With every method at its no-op setting the numbers are exactly ``CFGDenoiser``'s.
    """

    def __init__(self, model: Any, cond: Any, uncond: Any, scale: float, caching: Caching, call_steps: list[int]):
        self.apply_model = model.apply_model
        self.v = model.parameterization == "v"
        self.scale = float(scale)
        self.guided = uncond is not None
        self.cond = cond
        self.context = cat_cond(uncond, cond) if self.guided else cond
        self.calls = caching.plan(call_steps, self.guided)
        self.branch = caching.branch if caching.deepcache is not None else None
        if self.branch is not None:
            check_branch(model.model.diffusion_model, self.branch)
        self.deep: torch.Tensor | None = None
        self.cross: tuple[torch.Tensor, ...] | None = None
        self.index = 0
        self.counts: Counter = Counter()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        if self.index >= len(self.calls):
            raise RuntimeError(f"the sampler made more than the {len(self.calls)} UNet calls planned for it")
        call = self.calls[self.index]
        self.index += 1
        extras: dict[str, Any] = {}
        if self.branch is not None:
            extras["branch"] = self.branch
            if not call.full:
                extras["deep"] = self.deep
        if call.record:
            extras["record"] = True
        if call.reuse:
            extras["cross"] = self.cross
        x_in, context = (torch.cat([x, x]), self.context) if call.guided else (x, self.cond)
        result = self.apply_model(x_in, t.expand(x_in.shape[0]), context, **extras)
        out = result[0] if extras else result
        if self.branch is not None and call.full:
            self.deep = result[1]
        if call.record:  # the mean of the two halves, as T-GATE keeps it
            self.cross = tuple((a_u + a_c) / 2 for a_u, a_c in (a.chunk(2) for a in result[2])) if call.guided \
                else result[2]
        if call.guided:
            out_u, out_c = out.chunk(2)
            out = out_u + self.scale * (out_c - out_u)
        self.counts.update(["full" if call.full else "shallow", "guided" if call.guided else "unguided"]
                           + ["record"] * call.record + ["reuse"] * call.reuse)
        if self.index == len(self.calls):  # the run's last call: nothing kept outlives it
            self.deep = self.cross = None
        # the v -> eps map as CFGDenoiser's
        return alpha * out + sigma * x if self.v else out

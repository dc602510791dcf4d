"""The scripts' flags for fewer UNet FLOPs per image (``ldm.samplers.caching``): DeepCache, T-GATE, early guidance end.

All off by default: without the flags the sampler runs the plain denoiser and the numbers are exactly
the uncached ones. The same flags serve txt2img, img2img, inpaint and the benchmark.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ldm.apps.cli import UserError

if TYPE_CHECKING:
    from ldm.samplers.caching import Caching


def add_caching_args(p: argparse.ArgumentParser) -> None:
    """--deepcache [N[,BRANCH]], --tgate [STEP], --cfg_end FRACTION."""
    from ldm.samplers.caching import DEEPCACHE_BRANCH, DEEPCACHE_INTERVAL, TGATE_FRACTION
    p.add_argument("--deepcache", nargs="?", const=f"{DEEPCACHE_INTERVAL},{DEEPCACHE_BRANCH}", default=None,
                   metavar="N[,BRANCH]",
                   help="DeepCache (Ma et al. 2023): the full UNet every N-th call, in between only skip branch "
                        f"BRANCH (0 = shallowest) over cached deep features; the flag alone: "
                        f"{DEEPCACHE_INTERVAL},{DEEPCACHE_BRANCH}, the deepcache package's documented setting")
    p.add_argument("--tgate", nargs="?", const="paper", default=None, metavar="STEP",
                   help="T-GATE (Zhang et al. 2024): cache each cross-attention output at the step before STEP and "
                        "reuse it from STEP on, without classifier-free guidance there; the flag alone: the paper's "
                        f"gate, {TGATE_FRACTION * 100:.0f}%% of the steps (10 of 25)")
    p.add_argument("--cfg_end", type=float, default=None, metavar="FRACTION",
                   help="guidance only for the first FRACTION of the steps (Adaptive Guidance, Castillo et al. "
                        "2023), then the conditional half alone; guidance stops at the earlier of this and --tgate")


def caching_flags(opt: argparse.Namespace) -> list[str]:
    """The flags as given, for a child process (the benchmark's runs, ours and the peer's)."""
    flags = []
    if opt.deepcache is not None:
        flags += ["--deepcache", str(opt.deepcache)]
    if opt.tgate is not None:
        flags += ["--tgate"] + ([] if opt.tgate == "paper" else [str(opt.tgate)])
    if opt.cfg_end is not None:
        flags += ["--cfg_end", repr(opt.cfg_end)]
    return flags


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--{flag} takes whole numbers, got {text!r}") from None


def caching_from(opt: argparse.Namespace, steps: int) -> "Caching | None":
    """The ``Caching`` the flags ask for over a run of ``steps`` sampler steps, or None when no flag is given."""
    from ldm.samplers.caching import DEEPCACHE_BRANCH, Caching, default_gate
    if opt.deepcache is None and opt.tgate is None and opt.cfg_end is None:
        return None
    interval, branch = None, DEEPCACHE_BRANCH
    if opt.deepcache is not None:
        parts = str(opt.deepcache).split(",")
        if len(parts) > 2:
            raise UserError(f"--deepcache takes N or N,BRANCH, got {opt.deepcache!r}")
        interval = _int("deepcache", parts[0])
        branch = _int("deepcache", parts[1]) if len(parts) == 2 else DEEPCACHE_BRANCH
    gate = None
    if opt.tgate is not None:
        gate = default_gate(steps) if opt.tgate == "paper" else _int("tgate", opt.tgate)
    cfg_end = 1.0 if opt.cfg_end is None else opt.cfg_end
    for flag, bad, need in (("--deepcache", interval is not None and interval < 1, "an interval N of at least 1"),
                            ("--deepcache", branch < 0, "a BRANCH of 0 or more"),
                            ("--tgate", gate is not None and gate < 1, "a STEP of at least 1"),
                            ("--cfg_end", not 0.0 < cfg_end <= 1.0, "a FRACTION in (0, 1]")):
        if bad:
            raise UserError(f"{flag} takes {need}, got {getattr(opt, flag[2:])}")
    return Caching(interval, branch, gate, cfg_end)


def check_caching(opt: argparse.Namespace) -> None:
    """The flags' syntax and ranges, before any model work (the branch is checked against the model later)."""
    caching_from(opt, 50)


def check_branch(caching: "Caching | None", model: Any) -> None:
    """A DeepCache branch this UNet has, as a one-line error before sampling."""
    from ldm.samplers.caching import check_branch as check
    if caching is not None and caching.deepcache is not None:
        try:
            check(model.model.diffusion_model, caching.branch)
        except ValueError as e:
            raise UserError(f"--deepcache: {e}") from None


def caching_fields(caching: "Caching | None") -> dict[str, str]:
    """The PNG parameters' entries for ``caching`` (none when off)."""
    if caching is None:
        return {}
    fields = {}
    if caching.deepcache is not None:
        fields["DeepCache"] = f"{caching.deepcache},{caching.branch}"
    if caching.tgate is not None:
        fields["T-GATE"] = str(caching.tgate)
    if caching.cfg_end < 1.0:
        fields["CFG end"] = f"{caching.cfg_end:g}"
    return fields

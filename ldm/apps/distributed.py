"""Data-parallel generation under ``torchrun``: one full model per rank, the work items (batches) shared out.

    torchrun --standalone --nproc_per_node 8 scripts/txt2img.py --from-file prompts.txt --n_samples 4 ...

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) nothing here does anything: ``current()`` is a
one-rank job and ``agree`` re-raises the caller's own error, so a plain run behaves as before. Under torchrun,
``job`` joins the process group (gloo for CPU objects; NCCL as the CUDA backend when the ranks run on GPUs, rank
``r`` on ``cuda:LOCAL_RANK``). Every exchange between ranks is ``agree``: each rank says whether it failed, with
a small payload, and if any rank failed all ranks raise ``RankFailed``, whose message (printed once, by rank 0)
names the rank and the cause. A rank that fails outside the loop joins the next exchange of the others with its
error, so nobody waits at a barrier for it; a rank that dies (killed, segfault) is seen by torchrun, which
stops the others; a rank that hangs is given up on after ``--dist_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

DEFAULT_TIMEOUT = 1800.0  # seconds: long enough for rank 0 to compile a UNet (max-autotune) while the others wait
SEED_MOD = 2**64  # torch.Generator().manual_seed takes seeds modulo 2**64


class RankFailed(Exception):
    """Some rank failed; the message is the job's one line, printed by the rank whose ``report`` is True."""

    def __init__(self, message: str, report: bool):
        super().__init__(message)
        self.report = report


@dataclass
class Job:
    """This process's place in the job: rank, world size, local rank, and whether torchrun started it."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    device: str | None = None  # the device this rank uses (cuda:LOCAL_RANK on GPUs), None when not launched
    describe: Callable[[BaseException], str] = field(default=lambda e: str(e), repr=False)

    @property
    def main(self) -> bool:
        """Rank 0: it finds the first free file number, writes the grid, the time file and the summary."""
        return self.rank == 0

    @property
    def step_bars(self) -> bool:
        """Whether the samplers show their per-step bars: not with several ranks (rank 0 shows one job bar)."""
        return self.world_size == 1

    def agree(self, error: BaseException | None = None, payload: Any = None) -> list:
        """Every rank's ``payload``, in rank order, once all ranks got here; if any rank passes an ``error``,
        every rank raises ``RankFailed`` instead (one rank, not launched: ``error`` itself is raised)."""
        if not self.launched:
            if error is not None:
                raise error
            return [payload]
        import torch.distributed as dist
        mine = None if error is None else (error if isinstance(error, RankFailed) else self.describe(error))
        statuses: list = [None] * self.world_size
        try:
            dist.all_gather_object(statuses, (None if mine is None else str(mine), payload))
        except Exception as e:  # a peer died or hung past the timeout
            raise RankFailed(f"rank {self.rank} lost the other ranks ({' '.join(str(e).split())[:200]}); "
                             "see the other ranks' output", report=True) from error or e
        errors = [(r, m) for r, (m, _) in enumerate(statuses) if m is not None]
        if errors:
            raise RankFailed(failure_line(errors, self.world_size), report=self.main) from error
        return [p for _, p in statuses]

    def together(self, fn: Callable[..., Any], *args) -> Any:
        """``fn(*args)`` on every rank, then ``agree``: a failure on any rank fails all of them, in one line."""
        try:
            result = fn(*args)
        except RankFailed:
            raise  # already agreed on, inside fn
        except Exception as e:
            self.agree(e)
            raise  # not reached: agree raises
        self.agree()
        return result

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return self.agree(payload=value if self.main else None)[0]

    def gather(self, value: Any) -> list | None:
        """Every rank's ``value`` on rank 0 (None elsewhere); call it only right after an ``agree``."""
        if not self.launched:
            return [value]
        import torch.distributed as dist
        out = [None] * self.world_size if self.main else None
        dist.gather_object(value, out, dst=0)
        return out

    def shard(self, n: int) -> list[int]:
        """The work items of this rank among ``n``: every world_size-th, from its rank on."""
        return list(range(self.rank, n, self.world_size))


_CURRENT = Job()


def current() -> Job:
    """The job this process is part of (a one-rank job outside ``job``)."""
    return _CURRENT


def failure_line(errors: list[tuple[int, str]], world_size: int) -> str:
    """The job's one line from the failed ranks' (rank, message): the same failure everywhere is said once."""
    if len(errors) == world_size and len({m for _, m in errors}) == 1:
        return errors[0][1] if world_size == 1 else f"{errors[0][1]} (on every rank)"
    rank, message = errors[0]
    more = f"; {len(errors) - 1} more rank(s) failed too" if len(errors) > 1 else ""
    return f"rank {rank} of {world_size} failed: {message}{more}"


def launched_by_torchrun(env: dict | None = None) -> bool:
    """Whether torchrun (or any launcher setting its variables) started this process."""
    env = os.environ if env is None else env
    return all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def item_seed(seed: int, index: int) -> int:
    """The seed of work item ``index``'s start noise (--seed_per_item, torchrun): seed + index, as torch takes it."""
    return (seed + index) % SEED_MOD


def rank_device(asked: str | None, local_rank: int) -> str:
    """The device of a rank: --device as given, except that plain ``cuda`` (or the default on a GPU machine)
    becomes ``cuda:LOCAL_RANK``."""
    from ldm.speed.runtime import pick_device
    device = pick_device(asked)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{local_rank}"
    return str(device)


@contextlib.contextmanager
def job(device: str | None, timeout: float = DEFAULT_TIMEOUT,
        describe: Callable[[BaseException], str] = str) -> Iterator[Job]:
    """This process's job: under torchrun, join the process group for the block (and leave it after); else a
    one-rank job that does nothing."""
    global _CURRENT
    if not launched_by_torchrun():
        yield Job(describe=describe)
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not 0 < timeout < float("inf"):
        raise RankFailed(f"--dist_timeout {timeout} must be a number of seconds more than 0", report=rank == 0)
    try:
        name = rank_device(device, local_rank)
        if name.startswith("cuda"):
            torch.cuda.set_device(torch.device(name))
        backend = "cpu:gloo,cuda:nccl" if name.startswith("cuda") else "gloo"  # objects go over gloo either way
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except Exception as e:
        raise RankFailed(f"rank {rank} could not join the other ranks: {describe(e)}", report=True) from e
    _CURRENT = Job(rank, world_size, local_rank, True, name, describe)
    try:
        yield _CURRENT
    finally:
        _CURRENT = Job()
        dist.destroy_process_group()

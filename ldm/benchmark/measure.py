"""Measurement primitives of the benchmark harness: environment, timers, peak memory, and a memory estimate.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the peak resident set size of the process
(``resource.getrusage``) elsewhere. ``estimate_peak_bytes`` runs a module on fake tensors (shapes only, no
data, no compute) and adds up the bytes of the tensors alive at each moment: a tensor-size-based estimate of
eager activation memory for sizes too large or too slow to run on a CPU.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import weakref
from typing import Any, Callable

import torch

from ldm.fileio import atomic_write
from ldm.speed.runtime import synchronize

MB = 1024 ** 2


def device_name(device: torch.device) -> str:
    """A readable name of the accelerator, or of the CPU with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict[str, str]:
    """Versions and device of this process, for every CSV row."""
    env = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
           "python": platform.python_version()}
    if device.type == "cuda":
        env["cuda"] = str(torch.version.cuda)
    return env


def _proc_status_bytes(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is missing)."""
    return _proc_status_bytes("VmRSS") or 0


def process_peak_rss_bytes() -> int:
    """Peak resident set size over the whole process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's peak statistics, or on Linux the RSS high-water mark (/proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass  # no reset: peak_memory then reports the whole process's peak


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): peak since the last ``reset_peak`` (or since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    hwm = _proc_status_bytes("VmHWM")
    return (hwm, "peak_rss") if hwm is not None else (process_peak_rss_bytes(), "peak_rss")


def time_calls(fn: Callable[[], Any], iters: int, device: torch.device) -> list[float]:
    """Seconds of each of ``iters`` calls: CUDA events on a GPU, perf_counter after a synchronise elsewhere."""
    times = []
    if device.type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        return times
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def write_json(path: str, data: dict) -> None:
    """Write ``data`` atomically (a reader never sees half a file)."""
    text = json.dumps(data, indent=1).encode("utf-8")
    atomic_write(path, lambda f, _tmp: f.write(text))


def estimate_peak_bytes(build: Callable[[], torch.nn.Module], inputs: Callable[[], tuple], call=None) -> dict:
    """Peak bytes of live tensors while ``call(module, *inputs())`` runs on fake CPU tensors.

    ``build`` and ``inputs`` run under the fake mode too, so nothing real is allocated. Tensors are counted
    per storage (views are free) from the op that makes them until the last reference dies. The fused SDPA
    kernels are fake-run as what they are (their output and log-sum-exp only), while the math paths show
    their (B, heads, T, S) score matrices: the quadratic memory the budget search is about. Returns
    {"weights": bytes of parameters and buffers, "activations": peak of the rest, "total": their sum}.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveBytes(TorchDispatchMode):
        def __init__(self, external: set[int]):
            super().__init__()
            self.live, self.peak, self.refs, self.external = 0, 0, {}, external

        def _drop(self, key: int) -> None:
            n, count = self.refs[key]
            if count == 1:
                del self.refs[key]
                self.live -= n
            else:
                self.refs[key] = (n, count - 1)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage._cdata
                    if key in self.external:  # a view of a weight or an input
                        continue
                    n, count = self.refs.get(key, (storage.nbytes(), 0))
                    if count == 0:
                        self.live += n
                    self.refs[key] = (n, count + 1)
                    weakref.finalize(t, self._drop, key)
            self.peak = max(self.peak, self.live)
            return out

    call = call or (lambda m, *a: m(*a))
    with FakeTensorMode(), torch.no_grad():
        module = build()
        weights = sum(t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()])
        args = inputs()
        held = [*module.parameters(), *module.buffers(), *(a for a in args if isinstance(a, torch.Tensor))]
        with LiveBytes({t.untyped_storage()._cdata for t in held}) as tracker:
            out = call(module, *args)
            del out
    return {"weights": weights, "activations": tracker.peak, "total": weights + tracker.peak}

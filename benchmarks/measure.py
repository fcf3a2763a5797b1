"""Timing, peak memory and the machine's description for ``benchmarks/run.py``."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: Mapping[str, Callable[[], Any]], warmup: int, repeats: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every function, the candidates interleaved (``a b c a b c ...``) so that a slow
    phase of a shared machine hits all of them alike. The first ``warmup`` rounds are not kept."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Return freed heap pages to the system, so that the next peak starts from what is really in use (the
    young generation is collected only: a full collection costs 0.2 s here, and tensors are freed by reference
    counting anyway)."""
    gc.collect(0)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Linux >= 4.0: writing 5 to ``clear_refs`` resets the peak RSS (``VmHWM``) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> tuple[float | None, str]:
    """The memory one call of ``fn`` needs above what is resident before it, and how it was measured.

    GPU: ``torch.cuda.max_memory_allocated`` above the allocated memory before the call. CPU: the peak
    resident set size (``VmHWM``, reset before the call) above the resident set before it. ``tracemalloc``
    would not do: it sees Python's allocations, not the tensors' (torch allocates them in C++).
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda max_memory_allocated"
    _trim_heap()
    if not _reset_rss_peak():
        return None, "unavailable (no /proc/self/clear_refs)"
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None, "unavailable (no /proc/self/status)"
    return max(0, peak - before) / 1024, "peak RSS (VmHWM) above the RSS before the call"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, torch version, and the GPU when one is used."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_name(info: Mapping[str, Any]) -> str:
    """A file name for the machine: CPU model and cores, plus the GPU when one was used."""
    parts = [info["cpu"], f"{info['cores']}c"]
    if info.get("gpu"):
        parts.append(info["gpu"])
    return re.sub(r"[^a-z0-9]+", "-", " ".join(parts).lower()).strip("-")

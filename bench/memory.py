"""Peak extra memory of a callable, the same way on CPU and CUDA.

CUDA: the caching allocator's peak counter. CPU: the torch profiler's allocation records,
replayed in time order; this counts every tensor the callable allocates (and frees), which is
what "extra memory of the loss" means, independent of the process' RSS and glibc's caching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _peak_cpu(fn: Callable[[], T]) -> tuple[T, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    records = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return result, peak


def _peak_cuda(fn: Callable[[], T], device: torch.device) -> tuple[T, int]:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - start


def peak_extra_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Runs ``fn()`` and returns its result with the peak bytes it allocated above the start."""
    device = torch.device(device)
    if device.type == "cuda":
        return _peak_cuda(fn, device)
    return _peak_cpu(fn)

"""CUDA-event timing shared by the GPU benchmarks: warm up, then time each call on the device."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_times(fn: Callable[[], object], iters: int, warmup: int, before: Callable[[], object] | None = None
               ) -> list[float]:
    """Seconds per call of fn, measured with CUDA events; `before` runs untimed ahead of each
    call (a barrier, so every rank starts together)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times

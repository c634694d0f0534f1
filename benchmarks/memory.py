"""Peak memory of one step, measured the same way for every provider.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (absolute: model,
  inputs and everything the step allocates through the caching allocator).
- CPU: torch has no allocator statistics on the CPU, so we read the allocator's own events:
  ``torch.profiler.profile(profile_memory=True)`` records every CPU tensor allocation and free
  (``[memory]`` events, signed byte counts) made through c10's CPU allocator. The running sum of
  those events, in time order, is the torch-allocated memory added by the step; its maximum is the
  step's peak. We report ``static + peak`` where ``static`` is the bytes of the model's parameters,
  buffers and the step's input tensors (alive before the step, what CUDA's figure would include).
  The profiler sees the calling thread's allocations only: the runner adds the OrthoGrad
  prefetch's row buffers (``og.row_buffer_bytes``, kept from step to step); other worker-thread
  temporaries (a projection's side-by-side jobs: slabs, one held term's float32 rows per thread)
  are not counted. Not counted either: memory outside the torch allocator (Python objects,
  BLAS/oneDNN scratch from their own malloc). Frees of tensors created before the measured step
  are not credited (the profiler cannot size them), so the measurement is taken on a provider's
  first step, when nothing of its own existed yet: memory a provider keeps between steps is then
  counted.
"""

from __future__ import annotations

import gc
import warnings
from typing import Callable, Iterable, Tuple

import torch

__all__ = ["measure_peak", "static_bytes", "CPU_METHOD", "CUDA_METHOD"]

CPU_METHOD = "cpu: static (params+buffers+inputs) + peak of torch CPU allocator events (profiler)"
CUDA_METHOD = "cuda: torch.cuda.max_memory_allocated"


def static_bytes(model: torch.nn.Module, tensors: Iterable[torch.Tensor] = ()) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()) + [t for t in tensors if torch.is_tensor(t)]:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _cpu_peak_delta(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def measure_peak(fn: Callable[[], None], device: torch.device, model: torch.nn.Module, inputs=()) -> Tuple[int, str]:
    """Run ``fn`` once and return (peak bytes, method string)."""
    if device.type == "cuda":
        gc.collect()  # the CUDA figure is absolute: drop unreachable tensors of earlier cases first
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), CUDA_METHOD
    return static_bytes(model, inputs) + _cpu_peak_delta(fn), CPU_METHOD

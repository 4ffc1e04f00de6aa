"""GPU measurements: median time, bandwidth against the bytes floor, the same bytes copied
device-to-device in the same run, peak memory, TFLOP/s.

Written for CUDA and not exercised by CI (which has no GPU): keep it small and reviewed.
Conventions of triton.testing.do_bench: it runs ``fn`` once, estimates its time, warms up,
then times ``rep`` ms worth of calls with CUDA events, clearing L2 and the gradients in
``grad_to_none`` before each; ``return_mode="median"`` returns the median in ms.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, List

import torch

from .cases import Case, leaves, make_inputs
from .passes import Step, make_step
from .providers import LossFn

WARMUP_MS = 25
REPEAT_MS = 100


def l2_bytes() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size


def copies_for(nbytes: int) -> int:
    """How many input copies to rotate through: at least 2, and together more than twice L2,
    so no call finds its inputs in cache from the call before."""
    return max(2, math.ceil(2 * l2_bytes() / max(nbytes, 1)))


def median_ms(fn: Callable[[], object], grad_to_none: List[torch.Tensor] = ()) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=WARMUP_MS, rep=REPEAT_MS, grad_to_none=list(grad_to_none) or None,
                    return_mode="median")


def copy_ms(nbytes: int) -> float:
    """Median time of ``torch.empty_like(x).copy_(x)`` where reading x and writing the copy
    moves ``nbytes``: the bandwidth any kernel moving those bytes can hope for."""
    sources = itertools.cycle([torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
                               for _ in range(copies_for(nbytes // 2))])

    def copy():
        source = next(sources)
        torch.empty_like(source).copy_(source)
    return median_ms(copy)


def peak_bytes(run_once: Callable[[], None]) -> int:
    """Most memory allocated during ``run_once`` above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_once()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def do_bench_ms(step: Step) -> float:
    return median_ms(step.run, step.grad_leaves)


def measure_case(case: Case, loss_fn: LossFn, copy_time_ms: float,
                 time_step: Callable[[Step], float] = do_bench_ms) -> Dict[str, float]:
    """Time (median ms of ``time_step``) and memory of one provider on one case; the inputs
    live only inside this call."""
    copies = [make_inputs(case, "cuda", seed) for seed in range(copies_for(case.input_bytes))]
    step = make_step(case, loss_fn, copies)
    median = time_step(step)
    del step, copies[1:]  # free the other copies and their graphs before measuring memory
    for tensor in leaves(copies[0]):
        tensor.grad = None  # else backward accumulates into the old gradient, allocating nothing
    peak = peak_bytes(make_step(case, loss_fn, copies, reusable=False).run)
    return gpu_metrics(case, median, copy_time_ms, peak)


def gpu_metrics(case: Case, time_ms: float, copy_time_ms: float, peak: int) -> Dict[str, float]:
    seconds = time_ms * 1e-3
    return {
        "median_ms": time_ms,
        "gbps": case.floor_bytes / seconds / 1e9,
        "copy_ms": copy_time_ms,
        "vs_copy": time_ms / copy_time_ms,
        "peak_bytes": peak,
        "tflops": case.flops / seconds / 1e12 if case.flops else None,
    }


def device_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device())

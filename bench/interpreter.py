"""CPU measurements: bytes moved, peak memory and host syncs, counted by fastce.profiling while
the Triton kernels run on the interpreter. No timings: the interpreter's speed says nothing
about a GPU's."""
from __future__ import annotations

from typing import Dict

from fastce.profiling import measure

from .cases import Case, make_inputs
from .passes import make_step
from .providers import LossFn

MODE_NOTE = "CPU: Triton interpreter — bytes/peak/syncs only, no timings"


def measure_case(case: Case, loss_fn: LossFn) -> Dict[str, float]:
    """Run the pass once on fresh inputs and count what it moved (for the backward pass, the
    forward runs before the count starts)."""
    step = make_step(case, loss_fn, [make_inputs(case, "cpu")], reusable=False)
    with measure() as counted:
        step.run()
    return {
        "floor_x": case.floor_multiple,
        "bytes": counted.total_bytes,
        "distinct_bytes": counted.unique_bytes,
        "moved_x": counted.ratio(case.input_bytes),
        "distinct_x": counted.ratio(case.input_bytes, unique=True),
        "peak_bytes": counted.peak_bytes,
        "peak_x": counted.peak_bytes / case.input_bytes,
        "syncs": counted.syncs,
        "launches": counted.launches,
    }

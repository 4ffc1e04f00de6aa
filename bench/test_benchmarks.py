"""The suite's cases as pytest-benchmark tests. Each test keeps its result row in
``benchmark.extra_info``, so the saved JSON feeds the same report:

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python -m bench --from-pytest-benchmark bench.json

On a GPU the timing is pytest-benchmark's, each call synchronised. On the CPU the Triton
kernels run on the interpreter: the row holds bytes, peak memory and syncs, and the timing
pytest-benchmark prints is the interpreter's, which says nothing about a GPU.
"""
import pytest
import torch

from bench import interpreter, suite
from bench.conftest import ON_GPU
from bench.passes import Step
from bench.providers import NotRun


def test_loss(benchmark, case, provider):
    try:
        loss_fn = provider.loss_fn(case, ON_GPU)
        row = suite.new_row(case, provider, suite.environment(ON_GPU))
        row["max_rel_err"] = suite.value_check(case, provider, ON_GPU)
    except NotRun as note:
        pytest.skip(str(note))
    if ON_GPU:
        row.update(_gpu_row(benchmark, case, loss_fn))
    else:
        row.update(benchmark.pedantic(interpreter.measure_case, args=(case, loss_fn), rounds=1, iterations=1))
    benchmark.extra_info.update(row)


def _gpu_row(benchmark, case, loss_fn):
    from bench import gpu

    def time_with_pytest_benchmark(step: Step) -> float:
        def call():
            for tensor in step.grad_leaves:
                tensor.grad = None
            step.run()
            torch.cuda.synchronize()
        for _ in range(3):  # warm-up: compilation and autotuning stay out of the timing
            call()
        benchmark(call)
        return benchmark.stats.stats.median * 1e3

    return gpu.measure_case(case, loss_fn, gpu.copy_ms(case.floor_bytes), time_step=time_with_pytest_benchmark)

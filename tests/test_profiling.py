"""fastce.profiling counts exactly the bytes, peak memory and syncs of hand-made workloads."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastce.profiling import interpreter_active, measure

triton = pytest.importorskip("triton")
tl = triton.language

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")

FLOAT = 4  # bytes of a float32

@triton.jit
def copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=in_bounds), mask=in_bounds)


@triton.jit
def copy_even_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    # reads only even positions (odd ones become 0), writes every position
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    values = tl.load(src_ptr + offsets, mask=in_bounds & (offsets % 2 == 0), other=0.0)
    tl.store(dst_ptr + offsets, values, mask=in_bounds)


@triton.jit
def double_read_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    # reads its block twice (an L2 hit on a GPU), writes it once
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    first = tl.load(src_ptr + offsets, mask=in_bounds)
    second = tl.load(src_ptr + offsets, mask=in_bounds)
    tl.store(dst_ptr + offsets, first + second, mask=in_bounds)


@triton.jit
def sum_atomic_kernel(src_ptr, total_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    tl.atomic_add(total_ptr + offsets * 0, tl.load(src_ptr + offsets, mask=in_bounds), mask=in_bounds)


def launch(kernel, src, dst, block=16):
    kernel[(triton.cdiv(src.numel(), block),)](src, dst, src.numel(), BLOCK=block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_reading_and_writing_n_elements(dtype):
    n = 37  # not a multiple of the block: the last block is partly masked
    src = torch.randn(n).to(dtype)
    dst = torch.empty_like(src)
    with measure() as m:
        launch(copy_kernel, src, dst)
    nbytes = n * src.element_size()
    assert (m.triton_read, m.triton_write, m.triton_unique) == (nbytes, nbytes, 2 * nbytes)
    assert m.triton_launches == 1 and m.kernels["copy_kernel"].launches == 1
    # the interpreter's host copies of the arguments are no device traffic
    assert (m.torch_read, m.torch_write, m.peak_bytes, m.syncs) == (0, 0, 0, 0)
    assert torch.equal(dst, src)


def test_masked_load_counts_only_active_lanes():
    n = 37
    src, dst = torch.randn(n), torch.empty(n)
    with measure() as m:
        launch(copy_even_kernel, src, dst)
    assert m.triton_read == 19 * FLOAT  # positions 0, 2, ..., 36
    assert m.triton_write == n * FLOAT


def test_fully_masked_launch_moves_nothing():
    src, dst = torch.randn(16), torch.empty(16)
    with measure() as m:
        copy_kernel[(1,)](src, dst, 0, BLOCK=16)
    assert m.triton_launches == 1 and m.total_bytes == m.unique_bytes == 0


def test_reread_in_one_launch_is_requested_twice_but_distinct_once():
    n = 40
    src, dst = torch.randn(n), torch.empty(n)
    with measure() as m:
        launch(double_read_kernel, src, dst)
        launch(double_read_kernel, src, dst)
    stats = m.kernels["double_read_kernel"]
    assert stats.launches == 2
    assert (stats.read, stats.write) == (2 * 2 * n * FLOAT, 2 * n * FLOAT)
    # distinct bytes are per launch: a second launch reads from DRAM again
    assert (stats.unique_read, stats.unique_write) == (2 * n * FLOAT, 2 * n * FLOAT)
    assert m.total_bytes == 6 * n * FLOAT and m.unique_bytes == 4 * n * FLOAT


def test_atomics_read_and_write_their_active_lanes():
    n = 21
    src, total = torch.randn(n), torch.zeros(1)
    with measure() as m:
        launch(sum_atomic_kernel, src, total)
    stats = m.kernels["sum_atomic_kernel"]
    assert stats.read == n * FLOAT + n * FLOAT  # the source, and the accumulator once per lane
    assert stats.write == n * FLOAT
    assert stats.unique_read == n * FLOAT + FLOAT and stats.unique_write == FLOAT
    torch.testing.assert_close(total, src.sum().reshape(1))


def test_torch_operator_reads_inputs_and_writes_outputs():
    n = 100
    a, b = torch.randn(n), torch.randn(n)
    with measure() as m:
        a + b
    assert (m.torch_read, m.torch_write) == (2 * n * FLOAT, n * FLOAT)
    assert m.ops["add"].calls == 1 and m.torch_calls == 1


def test_views_and_allocations_are_free():
    x = torch.randn(8, 16)
    with measure() as m:
        x.view(16, 8), x.t(), x[:, 1], x.reshape(-1), x.detach(), x.unsqueeze(0)
        torch.empty(1000), torch.empty_like(x)
    assert m.total_bytes == 0 and m.torch_calls == 0


def test_write_only_operators_do_not_read_their_destination():
    src, dst = torch.randn(50), torch.empty(50)
    with measure() as m:
        dst.copy_(src)
        dst.zero_()
        torch.add(src, src, out=dst)
    assert m.ops["copy_"].read == 50 * FLOAT and m.ops["copy_"].write == 50 * FLOAT
    assert m.ops["zero_"].read == 0 and m.ops["zero_"].write == 50 * FLOAT
    assert m.ops["add"].read == 2 * 50 * FLOAT and m.ops["add"].write == 50 * FLOAT


def test_picking_operators_read_only_what_they_pick():
    n, c = 16, 1000
    log_probs, target = torch.randn(n, c).log_softmax(1), torch.randint(0, c, (n,))
    with measure() as m:
        torch.ops.aten.nll_loss_forward(log_probs, target, None, 1, -100)
        torch.gather(log_probs, 1, target[:, None])
    assert m.ops["nll_loss_forward"].read == n * FLOAT + n * 8  # one log-probability a row, the target
    assert m.ops["gather"].read == n * FLOAT + n * 8


def test_torch_cross_entropy_moves_six_times_the_logits():
    # log_softmax (read, write), nll_loss (n picks), its backward (writes the whole gradient, reads
    # only the shape of the logits), log_softmax's backward (reads two, writes one): 6x
    logits = torch.randn(16, 1000, requires_grad=True)
    target = torch.randint(0, 1000, (16,))
    with measure() as m:
        torch.nn.functional.cross_entropy(logits, target).backward()
    assert 6.0 <= m.ratio(logits.numel() * FLOAT) <= 6.05, m.report()


def test_copy_of_a_view_onto_itself_moves_nothing():
    a, b = torch.randn(100), torch.randn(20)
    with measure() as m:
        a[10:30] += b  # an in-place add on the view, then copy_(view, view), which ATen skips
    assert m.total_bytes == 3 * 20 * FLOAT, m.report()


def test_factories_like_a_tensor_do_not_read_it():
    x = torch.randn(30)
    with measure() as m:
        torch.zeros_like(x), torch.ones_like(x), x.new_zeros(30), torch.full_like(x, 2.0)
    assert (m.torch_read, m.torch_write) == (0, 4 * 30 * FLOAT)


def test_host_sync_operators_are_counted():
    y = torch.tensor([1, 0, 3, 2])
    x = torch.randn(4)
    with measure() as m:
        x + 1, x.sum(), torch.repeat_interleave(y, y, output_size=6)  # no sync
    assert m.syncs == 0
    with measure() as m:
        x.sum().item()
        y.nonzero()
        x[y > 1]  # boolean-mask indexing goes through nonzero
        torch.repeat_interleave(y, y)
        torch.unique(y)
        bool(y[0] > 0)
    assert m.syncs == 6
    assert m.ops["_local_scalar_dense"].syncs == 2


def test_peak_counts_storages_alive_at_once_above_the_start():
    before = torch.randn(10_000)  # alive before: not counted
    with measure() as m:
        a = torch.zeros(1000)
        b = torch.ones(500)
        a.view(10, 100).t()  # a view shares a's storage
        del a
        c = torch.zeros(250)
    assert m.peak_bytes == (1000 + 500) * FLOAT
    del before, b, c


def test_peak_forgets_kernel_arguments_once_the_caller_drops_them():
    # the interpreter's copies of kernel arguments sit in a reference cycle: without a collection
    # after each launch, every buffer a kernel saw would stay in the peak until the next gc run
    src = torch.randn(1000)
    with measure() as m:
        for _ in range(3):
            dst = torch.empty(1000)
            launch(copy_kernel, src, dst)
            del dst
    assert m.peak_bytes == 1000 * FLOAT


def test_report_names_kernels_and_operators():
    src, dst = torch.randn(20), torch.empty(20)
    with measure() as m:
        launch(copy_kernel, src, dst)
        (dst * 2).sum().item()
    text = m.report()
    for word in ("copy_kernel", "mul", "_local_scalar_dense", "peak", "syncs 1"):
        assert word in text
    assert m.ratio(20 * FLOAT) == m.total_bytes / (20 * FLOAT)
    assert m.as_dict()["launches"] == m.launches == 4


@torch.library.custom_op("fastce_test::double_copy", mutates_args=())
def double_copy(src: torch.Tensor) -> torch.Tensor:
    dst = torch.empty_like(src)
    launch(copy_kernel, src, dst)
    return dst * 2


@double_copy.register_fake
def _(src):
    return torch.empty_like(src)


def test_compiled_graphs_and_python_custom_ops_are_counted_once():
    # a custom op is charged what its body runs (its kernel and torch operators), not its
    # inputs and outputs on top; a compiled function runs under the counter, not around it
    n = 64
    src = torch.randn(n)
    compiled = torch.compile(lambda t: double_copy(t + 1), fullgraph=True, backend="aot_eager")
    compiled(src)  # compile outside the measurement
    for fn in (double_copy, compiled):
        with measure() as m:
            fn(src)
        assert m.triton_read == m.triton_write == n * FLOAT, m.report()
        assert m.ops["mul"].read == m.ops["mul"].write == n * FLOAT, m.report()
        assert "double_copy" not in m.ops, m.report()
    assert m.ops["add"].calls == 1, m.report()


def test_imports_and_counts_torch_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from fastce.profiling import measure\n"
        "with measure() as m:\n"
        "    torch.ones(3) + 1\n"
        "assert m.torch_write == 2 * 3 * 4, m.report()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


SHARED_TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools"


@pytest.mark.skipif(not (SHARED_TOOLS / "traffic.py").exists(),
                    reason=f"cross-check needs the reference counter {SHARED_TOOLS / 'traffic.py'}")
def test_agrees_with_the_shared_traffic_tool():
    sys.path.insert(0, str(SHARED_TOOLS))
    try:
        import traffic
    finally:
        sys.path.remove(str(SHARED_TOOLS))

    def workload():
        # eager cross-entropy (on a one-hot target) forward + backward with a given grad_output,
        # Triton kernels (masked, re-reading, atomic) and a sync; no operator where the two models
        # differ (write-only operators and zeros_like-style factories, which traffic.py charges a
        # read; picking operators such as nll_loss, which it charges the whole tensor)
        logits = torch.randn(8, 45, requires_grad=True)
        one_hot, grad_output = torch.eye(45)[torch.randint(0, 45, (8,))], torch.randn(8)
        dst, total = torch.empty(45), torch.zeros(1)
        yield
        loss = -(torch.log_softmax(logits, 1) * one_hot).sum(1)
        torch.autograd.grad(loss, logits, grad_output)
        launch(copy_even_kernel, logits[0].detach(), dst)
        launch(double_read_kernel, logits[1].detach(), dst)
        launch(sum_atomic_kernel, logits[2].detach(), total)
        loss.sum().item()

    def run(measure_fn):
        steps = workload()
        next(steps)  # inputs are made outside the measurement
        with measure_fn() as result:
            next(steps, None)
        return result

    ours, theirs = run(measure), run(traffic.measure)
    expected = theirs.totals()
    assert ours.triton_read == expected["triton_read"]
    assert ours.triton_write == expected["triton_write"]
    # one launch per kernel here, so distinct-per-launch equals traffic.py's distinct-per-kernel
    assert ours.triton_unique == expected["triton_read_unique"] + expected["triton_write_unique"]
    assert ours.torch_read == expected["torch_read"]
    assert ours.torch_write == expected["torch_write"]
    assert ours.total_bytes == expected["total"]
    assert ours.peak_bytes == expected["peak_bytes"]
    assert ours.syncs == traffic.sync_calls(theirs) == 1

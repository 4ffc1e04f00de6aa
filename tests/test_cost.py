"""Cost budgets (DESIGN §6), counted on the CPU with fastce.profiling under the interpreter.

Bytes are requested loads/stores of the Triton kernels plus torch operators' reads and writes,
as multiples of the logits' bytes: forward + backward cannot move less than 2× (read the
logits, write their gradient), a no-grad forward less than 1×.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce import _launch
from fastce.profiling import measure

pytestmark = pytest.mark.skipif(
    not fastce.uses_triton(torch.empty(0)), reason="byte counts need the Triton interpreter (TRITON_INTERPRET=1)")

N_TOKENS = 32


def _bf16_logits(n_rows, n_classes, requires_grad=True):
    x = (torch.randn(n_rows, n_classes) * 2).to(torch.bfloat16)
    return x.requires_grad_(requires_grad)


def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("n_classes", [4096, 32768, 50257])
def test_forward_backward_reads_logits_once_and_writes_gradient_once(n_classes):
    x = _bf16_logits(N_TOKENS, n_classes)
    target = torch.randint(0, n_classes, (N_TOKENS,))
    with measure() as m:
        fastce.cross_entropy(x, target, validate=False).backward()
    # a row longer than one tile is read twice by the program that holds it: the re-read is
    # served by L2 on a GPU, so the distinct bytes per launch (the DRAM estimate) stay at the floor
    requested = 2.15 if n_classes <= _launch.SINGLE_PASS_MAX_CLASSES else 3.05
    assert m.total_bytes <= requested * _nbytes(x), m.report()
    assert m.unique_bytes <= 2.05 * _nbytes(x), m.report()
    assert m.syncs == 0, m.report()
    expected = F.cross_entropy(x.detach().double(), target)
    x_ref = x.detach().double().requires_grad_()
    F.cross_entropy(x_ref, target).backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=2e-3 / N_TOKENS, rtol=1e-2)
    torch.testing.assert_close(fastce.cross_entropy(x.detach(), target).double(), expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("mode", ["no_grad", "input_without_grad"])
def test_forward_without_gradient_reads_logits_once_and_allocates_no_gradient(mode):
    x = _bf16_logits(N_TOKENS, 32768, requires_grad=mode == "no_grad")
    target = torch.randint(0, 32768, (N_TOKENS,))
    with measure() as m, torch.set_grad_enabled(mode != "no_grad"):
        loss = fastce.cross_entropy(x, target, validate=False)
    assert loss.grad_fn is None
    assert m.total_bytes <= 1.1 * _nbytes(x), m.report()
    assert m.peak_bytes <= 0.01 * _nbytes(x), m.report()
    assert m.syncs == 0


@pytest.mark.parametrize("inplace_backward, budget", [(False, 1.1), (True, 0.1)])
def test_training_step_peak_memory_on_non_leaf_logits(inplace_backward, budget):
    leaf = _bf16_logits(N_TOKENS, 32768)
    target = torch.randint(0, 32768, (N_TOKENS,))
    logits = leaf.clone()  # a non-leaf whose backward passes the gradient through unchanged
    with measure() as m:
        fastce.cross_entropy(logits, target, validate=False, inplace_backward=inplace_backward).backward()
    assert m.peak_bytes <= budget * _nbytes(logits), m.report()
    x_ref = leaf.detach().double().requires_grad_()
    F.cross_entropy(x_ref, target).backward()
    torch.testing.assert_close(leaf.grad.double(), x_ref.grad, atol=2e-3 / N_TOKENS, rtol=1e-2)


@pytest.mark.parametrize("validate, max_syncs", [(False, 0), (True, 1), ("device", 0)],
                         ids=["no_check", "cpu_default", "cuda_default"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_host_syncs(monkeypatch, validate, max_syncs, reduction):
    if validate == "device":  # what validate=True does with CUDA tensors: an assertion on the device
        monkeypatch.setattr(fastce.functional, "validation_mode", lambda validate, device: "device")
    x = _bf16_logits(8, 1000)
    target = torch.randint(0, 1000, (8,))
    target[3] = -100
    with measure() as m:
        loss = fastce.cross_entropy(x, target, reduction=reduction, validate=validate, label_smoothing=0.1)
        loss.backward(torch.rand_like(loss))
    assert m.syncs <= max_syncs, m.report()


def _measured_step(step, logits, *args):
    """Measure step(logits, *args).backward() on a fresh leaf, after one unmeasured call (which
    compiles a compiled step); returns the measurement and the gradient."""
    for measured in (False, True):
        leaf = logits.detach().clone().requires_grad_()
        with measure() if measured else contextlib.nullcontext() as m:
            step(leaf, *args).backward()
    return m, leaf.grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_costs_what_an_eager_one_costs(backend):
    # The compiled graph runs the eager kernels: the forward writes the gradient, backward hands
    # it out (or rewrites it from the logits for another upstream gradient). aot_eager runs every
    # operator of the graphs through the counter; inductor's own kernels are not counted (here
    # it generates none that touch the logits).
    torch._dynamo.reset()
    x = _bf16_logits(8, 4096, requires_grad=False)
    target = torch.randint(0, 4096, (8,))
    target[3] = -100

    def step(logits, t, scale):
        return fastce.cross_entropy(logits, t, validate=False) * scale

    compiled_step = torch.compile(step, fullgraph=True, backend=backend)
    for upstream, floor in ((1.0, 2.05), (0.25, 4.05)):  # loss.backward(), and a scaled loss
        scale = torch.tensor(upstream)
        eager, eager_grad = _measured_step(step, x, target, scale)
        compiled, compiled_grad = _measured_step(compiled_step, x, target, scale)
        report = f"compiled:\n{compiled.report()}\neager:\n{eager.report()}"
        assert compiled.total_bytes <= 1.05 * eager.total_bytes, report
        assert compiled.total_bytes <= floor * _nbytes(x), report
        assert compiled.peak_bytes <= 1.05 * eager.peak_bytes, report
        assert compiled.syncs == 0, report
        assert torch.equal(compiled_grad, eager_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("validate", [True, False, "device"])
def test_class_indices_are_read_again_only_when_needed(monkeypatch, reduction, validate):
    # the mean's divisors and the device-side range check are one pass over the class indices,
    # which nothing else needs: 'sum' and 'none' skip it unless the check runs on the device
    if validate == "device":
        monkeypatch.setattr(fastce.functional, "validation_mode", lambda validate, device: "device")
    x = _bf16_logits(8, 100, requires_grad=False)
    target = torch.randint(0, 100, (8,))
    with measure() as m:
        fastce.cross_entropy(x, target, reduction=reduction, validate=validate)
    launches = m.kernels["target_stats_kernel"].launches if "target_stats_kernel" in m.kernels else 0
    assert launches == (reduction == "mean" or validate == "device"), m.report()


def test_mean_divisor_is_summed_in_parallel_in_a_fixed_order(monkeypatch):
    # segmentation-sized batches spread over many programs (two fixed-order levels, no atomics)
    assert _launch.target_stats_plan(16 * 512 * 512) == (4096, 1024)
    assert _launch.target_stats_plan(100) == (4096, 1)
    # the same plan on a size the interpreter runs fast (and launches prepared for it only)
    monkeypatch.setattr(_launch, "TARGET_STATS_BLOCK", 16)
    monkeypatch.setattr(_launch, "TARGET_STATS_SINGLE", 16)
    monkeypatch.setattr(_launch, "TARGET_STATS_PROGRAMS", 8)
    _launch._target_stats_launches.cache_clear()
    n_rows, n_classes = 1000, 7
    x = (torch.randn(n_rows, n_classes) * 2).to(torch.float64)
    target = torch.randint(0, n_classes, (n_rows,))
    target[::5] = -100
    weight = torch.rand(n_classes, dtype=torch.float64) + 0.1
    losses = []
    for _ in range(2):
        with measure() as m:
            losses.append(fastce.cross_entropy(x, target, weight, label_smoothing=0.1, validate=False))
        assert m.kernels["target_stats_kernel"].launches == m.kernels["sum_stats_kernel"].launches == 1
    assert m.kernels["target_stats_kernel"].unique_read >= n_rows * 8  # every class index, once
    assert torch.equal(losses[0], losses[1])
    _launch._target_stats_launches.cache_clear()
    expected = F.cross_entropy(x, target, weight, label_smoothing=0.1)
    torch.testing.assert_close(losses[0], expected, rtol=1e-12, atol=0)


def _training_step_on_long_rows(n_classes):
    x = _bf16_logits(2, n_classes)
    target = torch.randint(0, n_classes, (2,))
    with measure() as m:
        fastce.cross_entropy(x, target, validate=False).backward()
    x_ref = x.detach().double().requires_grad_()
    F.cross_entropy(x_ref, target).backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-4, rtol=1e-2)
    return m, _nbytes(x)


def test_streamed_rows_are_read_twice_with_the_reread_inside_one_kernel():
    m, logits_bytes = _training_step_on_long_rows(131072)
    # one extra read of each row, requested by the same program that read it first: on a GPU it
    # hits L2, so distinct bytes per launch (the DRAM estimate) stay at the floor
    assert m.total_bytes <= 3.05 * logits_bytes, m.report()
    assert m.unique_bytes <= 2.05 * logits_bytes, m.report()


def test_backward_with_unit_upstream_gradient_does_not_touch_the_gradient_again():
    x = _bf16_logits(8, 4096)
    target = torch.randint(0, 4096, (8,))
    loss = fastce.cross_entropy(x, target, validate=False)
    with measure() as m:
        loss.backward()
    assert m.triton_read + m.triton_write <= 64, m.report()  # reads the scalar upstream gradient only


def test_row_offsets_beyond_int32():
    n_classes, row_stride = 1000, 2**31 + 64
    storage = torch.empty(row_stride + n_classes, dtype=torch.bfloat16)  # pages stay untouched
    x = storage.as_strided((2, n_classes), (row_stride, 1))
    x.copy_(torch.randn(2, n_classes).to(torch.bfloat16))
    target = torch.tensor([3, n_classes - 1])
    loss = fastce.cross_entropy(x, target, reduction="none")
    torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), target, reduction="none"),
                               atol=0.05, rtol=0)


def test_class_offsets_beyond_int32():
    # (N, C, d) input whose class stride is 2^30 + 5: class 2 sits past 2^31 elements
    class_stride = 2**30 + 5
    storage = torch.empty(2 * class_stride + 2, dtype=torch.bfloat16)
    x = storage.as_strided((1, 3, 2), (0, class_stride, 1))
    x.copy_(torch.randn(1, 3, 2).to(torch.bfloat16))
    target = torch.tensor([[2, 0]])
    loss = fastce.cross_entropy(x, target, reduction="none")
    torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), target, reduction="none"),
                               atol=0.05, rtol=0)


@pytest.mark.parametrize("n_classes", [3, 100, 1024])
def test_small_vocabularies_share_programs(n_classes):
    config = _launch.row_launch_config(4096, n_classes)
    assert config.rows > 1
    assert config.rows * config.block_size <= _launch.SMALL_ROW_TILE
    x = _bf16_logits(37, n_classes)
    target = torch.randint(0, n_classes, (37,))
    with measure() as m:
        loss = fastce.cross_entropy(x, target, validate=False)
    assert m.kernels["cross_entropy_fwd_kernel"].launches == 1
    loss.backward()
    x_ref = x.detach().double().requires_grad_()
    F.cross_entropy(x_ref, target).backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-3, rtol=1e-2)


def test_launch_rule_bounds_warps_and_tiles():
    for n_classes in (1, 7, 256, 4096, 4097, 8192, 8193, 32768, 65536, 65537, 262144, 262145):
        config = _launch.row_launch_config(8192, n_classes)
        assert 4 <= config.num_warps <= 32
        if n_classes <= _launch.SINGLE_PASS_MAX_CLASSES:
            assert config.block_size >= n_classes  # one tile holds the row: read once
        else:
            assert config.block_size == _launch.STREAM_BLOCK and config.num_warps == 4  # H200 sweep's best


# ---- binary (sigmoid) losses, DESIGN §7.1: floor = read input and target, write the gradient(s) ----

BINARY_LOSSES = {"bce": fastce.binary_cross_entropy_with_logits, "soft_margin": fastce.soft_margin_loss,
                 "focal": fastce.sigmoid_focal_loss}


def _binary_pair(loss, shape=(32, 4099)):
    x = _bf16_logits(*shape)
    t = (torch.rand(shape) < 0.1).to(torch.bfloat16)
    return x, (t * 2 - 1 if loss == "soft_margin" else t)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(BINARY_LOSSES))
def test_binary_training_step_reads_input_and_target_once_writes_gradient_once(loss, reduction):
    x, t = _binary_pair(loss)
    with measure() as m:
        BINARY_LOSSES[loss](x, t, reduction=reduction).backward()
    assert m.total_bytes <= 1.05 * 3 * _nbytes(x), m.report()  # x, t read; ∂x written
    assert m.syncs == 0, m.report()


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_binary_gradient_into_the_target_is_written_in_the_same_pass(loss):
    x, t = _binary_pair(loss)
    t = torch.rand(t.shape).to(torch.bfloat16).requires_grad_()  # soft labels that learn
    with measure() as m:
        BINARY_LOSSES[loss](x, t, reduction="mean").backward()
    assert m.kernels["binary_loss_fwd_kernel"].launches == 1
    assert m.total_bytes <= 1.05 * 4 * _nbytes(x), m.report()  # x, t read; ∂x, ∂t written


def test_binary_broadcast_weights_cost_only_their_own_bytes():
    # a (C,) pos_weight and an (N, 1) weight repeat through the tile: requested per element, but
    # one launch reads each of their bytes once from DRAM (the distinct count)
    x, t = _binary_pair("bce")
    weight, pos_weight = torch.rand(x.shape[0], 1), torch.rand(x.shape[1])
    with measure() as m:
        fastce.binary_cross_entropy_with_logits(x, t, weight, pos_weight=pos_weight).backward()
    assert m.unique_bytes <= 1.05 * 3 * _nbytes(x) + _nbytes(weight) + _nbytes(pos_weight), m.report()


@pytest.mark.parametrize("loss", list(BINARY_LOSSES))
def test_binary_forward_without_gradient_reads_once_and_allocates_nothing(loss):
    x, t = _binary_pair(loss)
    with measure() as m, torch.no_grad():
        BINARY_LOSSES[loss](x, t, reduction="mean")
    assert m.total_bytes <= 1.05 * 2 * _nbytes(x), m.report()
    assert m.peak_bytes <= 0.01 * _nbytes(x), m.report()


def test_binary_none_reduction_forward_and_backward():
    # forward: read x, t, write the loss; backward: read x, t and the upstream gradient, write ∂x
    x, t = _binary_pair("focal")
    loss = fastce.sigmoid_focal_loss(x, t)
    upstream = torch.rand_like(loss)
    with measure() as m:
        fastce.sigmoid_focal_loss(x, t).backward(upstream)
    assert m.total_bytes <= 1.05 * 7 * _nbytes(x), m.report()
    assert m.syncs == 0, m.report()


def test_binary_backward_with_unit_upstream_gradient_does_not_touch_the_gradient_again():
    x, t = _binary_pair("bce")
    loss = fastce.binary_cross_entropy_with_logits(x, t)
    with measure() as m:
        loss.backward()
    # each program reads the scalar upstream gradient, and nothing else
    assert m.triton_write == 0 and m.triton_unique <= 8, m.report()
    assert m.total_bytes <= 0.001 * _nbytes(x), m.report()

"""Launches per training step (issue 18's budgets), counted on the CPU with fastce.profiling.

A launch is a Triton kernel or a torch operator that moves bytes (what a GPU would launch). The
class indices are checked the way they are on a GPU (validate=True means the device-side assert
there), so the count is the GPU's. Also: the binary losses move under torch.compile what they
move eagerly (their gradient handoff works compiled too).
"""
import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce import HeadOptions, _validation, functional
from fastce.profiling import measure

pytestmark = pytest.mark.skipif(
    not fastce.uses_triton(torch.empty(0)), reason="launch counts need the Triton interpreter (TRITON_INTERPRET=1)")

GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm")


@pytest.fixture(autouse=True)
def validate_on_the_device(monkeypatch):
    """validate=True as on CUDA: the device-side range check, no host sync."""
    def as_on_cuda(validate, device):
        return _validation.VALIDATE_DEVICE if validate is True else _validation.validation_mode(validate, device)
    monkeypatch.setattr(functional, "validation_mode", as_on_cuda)


def _step(loss_fn, *shape, upstream=None):
    x = torch.randn(*shape, requires_grad=True)
    with measure() as m:
        loss = loss_fn(x)
        loss.backward(upstream)
    assert x.grad is not None and m.syncs == 0, m.report()
    return m


def _non_gemm_launches(m):
    return m.launches - sum(op.calls for name, op in m.ops.items() if name in GEMMS)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [{}, {"weight": torch.rand(37)}, {"label_smoothing": 0.1}])
def test_cross_entropy_step_is_at_most_five_launches(reduction, options):
    target = torch.randint(0, 37, (29,))
    fastce_step = _step(lambda x: fastce.cross_entropy(x, target, reduction=reduction, **options), 29, 37)
    torch_step = _step(lambda x: F.cross_entropy(x, target, reduction=reduction, **options), 29, 37)
    # autograd's ones_like and the device-side assert included; torch's own step makes 5-6 here
    assert fastce_step.launches <= 5, fastce_step.report()
    assert fastce_step.launches <= torch_step.launches, (fastce_step.report(), torch_step.report())


def test_cross_entropy_backward_of_a_unit_upstream_gradient_moves_no_logits():
    target = torch.randint(0, 1000, (16,))
    x = torch.randn(16, 1000, requires_grad=True)
    loss = fastce.cross_entropy(x, target)
    with measure() as m:
        loss.backward()
    assert m.total_bytes < 0.01 * x.numel() * x.element_size(), m.report()
    assert torch.equal(x.grad, torch.autograd.grad(fastce.cross_entropy(x, target), x)[0])


@pytest.mark.parametrize("upstream", ["sum", "random"])
def test_token_logprobs_step_is_three_kernels(upstream):
    target = torch.randint(0, 37, (29,))
    if upstream == "sum":
        m = _step(lambda x: fastce.token_logprobs(x, target).sum(), 29, 37)
    else:
        m = _step(lambda x: fastce.token_logprobs(x, target), 29, 37, upstream=torch.randn(29))
    # the class indices' check (one kernel and the device-side assert), the forward, the backward
    assert m.triton_launches <= 3, m.report()
    assert m.ops["_assert_async"].calls == 1, m.report()


@pytest.mark.parametrize("chunk_rows", [16, 8])
def test_linear_cross_entropy_makes_at_most_two_launches_per_chunk_beyond_gemms(chunk_rows):
    n_rows, n_classes, in_features = 37, 53, 24
    target = torch.randint(0, n_classes, (n_rows,))
    weight = torch.randn(n_classes, in_features, requires_grad=True)
    options = HeadOptions(walk="tokens", chunk_rows=chunk_rows)
    m = _step(lambda x: fastce.linear_cross_entropy(x, weight, target, options=options), n_rows, in_features)
    n_chunks = -(-n_rows // chunk_rows)
    # per call, beyond the chunks: the class indices' check and its assert, the ∂W accumulator, the
    # rescales of the kept gradients by the upstream gradient, the loss's sum, autograd's ones_like
    per_call = 8
    assert _non_gemm_launches(m) <= 2 * n_chunks + per_call, m.report()
    assert weight.grad is not None


@pytest.mark.parametrize("loss", ["binary_cross_entropy_with_logits", "soft_margin_loss", "sigmoid_focal_loss"])
def test_binary_losses_move_under_compile_what_they_move_eagerly(loss):
    fn = getattr(fastce, loss)
    target = torch.randint(0, 2, (8, 19)).float() if loss != "soft_margin_loss" else torch.randint(0, 2, (8, 19)) * 2. - 1
    kwargs = {"reduction": "mean"} if loss == "sigmoid_focal_loss" else {}
    compiled = torch.compile(lambda x: fn(x, target, **kwargs), backend="aot_eager", fullgraph=True)
    _step(compiled, 8, 19)  # compiles; what the next call moves is the compiled step's
    eager = _step(lambda x: fn(x, target, **kwargs), 8, 19)
    traced = _step(compiled, 8, 19)
    assert traced.total_bytes <= eager.total_bytes, (eager.report(), traced.report())
    assert traced.launches <= eager.launches, (eager.report(), traced.report())

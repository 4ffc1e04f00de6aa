"""fastce.token_logprobs / linear_token_logprobs: per-token log-probabilities and entropy (DESIGN §7.2),
against fastce.reference on float64 copies of the same inputs (values and gradients under random
weights on both outputs), torch.distributions.Categorical, torch.autograd.gradcheck, the cost model
(bytes, peak memory, host syncs counted with fastce.profiling) and torch.compile(fullgraph=True).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastce
from fastce import reference, token_stats
from fastce.profiling import count_allocations, measure

from bench.linear_memory import kernels_as_no_ops

from _support import assert_close_dtype, assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(
    not fastce.uses_triton(torch.empty(0)), reason="runs the kernels (TRITON_INTERPRET=1 on CPU)")

LOGITS_SHAPES = {
    "rows": (13, 203),             # several rows per program, a padded tile
    "batch_time": (2, 5, 97),      # (B, T, V)
    "above_one_block": (2, 16411),  # V odd, streamed: several tiles a row
    "one_token": (37,),            # (V) logits, a 0-dim target
}
# which outputs the loss uses, each with random per-token weights
OUTPUTS_IN_LOSS = ["logprob", "entropy", "both"]


def _logits(shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def _targets(row_shape, n_classes, ignore_frac=0.25):
    target = torch.randint(0, n_classes, row_shape)
    if target.numel() > 1:
        ignored = torch.rand(row_shape) < ignore_frac
        ignored.view(-1)[0] = True
        target = target.masked_fill(ignored, -100)
    return target


def _loss_weights(row_shape, outputs_in_loss):
    """Random per-token weights of (logprob, entropy) in the loss; None for an output left out."""
    weights = [torch.randn(row_shape, dtype=torch.float64) for _ in range(2)]
    return tuple(w if outputs_in_loss in (name, "both") else None for w, name in zip(weights, ("logprob", "entropy")))


def _outputs_and_grads(fn, leaves, target, weights, **kwargs):
    """fn(*leaves, target, return_entropy=True, **kwargs) on fresh leaf copies; backward of
    Σ w_logprob·logprob + w_entropy·entropy; returns (logprob, entropy, [leaf grads])."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    logprob, entropy = fn(*leaves, target, return_entropy=True, **kwargs)
    loss = sum((w.to(out.dtype) * out).sum() for w, out in zip(weights, (logprob, entropy)) if w is not None)
    loss.backward()
    return logprob.detach(), entropy.detach(), [None if t is None else t.grad for t in leaves]


def _check_logits_form(x, target, weights, *, temperature=1.0, output_tol=None):
    """fastce.token_logprobs against the reference on float64 copies. Outputs are float32, computed in
    fp32 from the (already rounded) inputs: they carry fp32's error whatever the input dtype; the
    gradient comes back in the input's dtype, with its rounding."""
    logprob, entropy, (grad,) = _outputs_and_grads(fastce.token_logprobs, [x], target, weights,
                                                   temperature=temperature)
    want_logprob, want_entropy, (want_grad,) = _outputs_and_grads(reference.token_logprobs, [x.double()], target,
                                                                  weights, temperature=temperature)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, actual, expected in (("logprob", logprob, want_logprob), ("entropy", entropy, want_entropy)):
        assert actual.dtype == out_dtype and actual.shape == target.shape, name
        assert_close_dtype(actual, expected, output_tol or out_dtype, name)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close_dtype(grad, want_grad, x.dtype, "grad")
    if x.dtype in (torch.bfloat16, torch.float16):
        _assert_rounded_once(grad, want_grad)
    ignored = target == -100
    assert torch.equal(logprob[ignored], torch.zeros_like(logprob[ignored]))
    assert torch.equal(entropy[ignored], torch.zeros_like(entropy[ignored]))
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    return logprob, entropy, grad


def _assert_rounded_once(actual, exact):
    """A low-precision gradient computed in fp32 and rounded once to nearest lies within one ulp of
    the exact value rounded (a truncating cast would not)."""
    rounded = exact.to(actual.dtype).double()
    finfo = torch.finfo(actual.dtype)
    ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(rounded.abs().clamp_min(finfo.tiny))))
    assert ((actual.double() - rounded).abs() <= ulp).all()
    assert ((actual.double() - exact).abs() / ulp).mean() <= 0.3  # round to nearest: ulp/4 on average


@pytest.mark.parametrize("outputs_in_loss", OUTPUTS_IN_LOSS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", list(LOGITS_SHAPES.values()), ids=list(LOGITS_SHAPES))
def test_token_logprobs_match_float64_reference(shape, temperature, outputs_in_loss):
    target = _targets(shape[:-1], shape[-1])
    _check_logits_form(_logits(shape), target, _loss_weights(target.shape, outputs_in_loss), temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [LOGITS_SHAPES["batch_time"], LOGITS_SHAPES["above_one_block"]],
                         ids=["batch_time", "above_one_block"])
def test_low_precision_inputs_give_float32_outputs_exact_to_their_rounding(shape, dtype):
    target = _targets(shape[:-1], shape[-1])
    _check_logits_form(_logits(shape, dtype), target, _loss_weights(target.shape, "both"), temperature=1.7)


def test_float64_gradcheck_through_both_outputs():
    x = _logits((4, 9), torch.float64).requires_grad_()
    target = torch.tensor([3, -100, 8, 0])

    def both(logits):
        return fastce.token_logprobs(logits, target, temperature=0.8, return_entropy=True)

    assert torch.autograd.gradcheck(both, (x,))


def test_matches_torch_distributions_categorical():
    # an oracle nobody here wrote: Categorical(logits=x / T).log_prob(y) and .entropy()
    x = _logits((6, 50), torch.float64)
    target = torch.randint(0, 50, (6,))
    logprob, entropy = fastce.token_logprobs(x, target, temperature=1.3, return_entropy=True)
    categorical = torch.distributions.Categorical(logits=x / 1.3)
    torch.testing.assert_close(logprob, categorical.log_prob(target))
    torch.testing.assert_close(entropy, categorical.entropy())


def test_masked_vocabulary_and_a_confident_row():
    # −inf logits (a masked vocabulary) add nothing to the entropy and get a zero gradient; in a row
    # with p_y ≈ 1 − 1e-6 the target's gradient 1 − p_y keeps its digits (fp32's 1 − exp(log p_y)
    # would be ~5% off)
    x = _logits((4, 300), torch.float32)
    x[:, 150:] = float("-inf")
    x[1, 7] = 23.0
    target = torch.tensor([3, 7, 149, -100])
    logprob, entropy, grad = _check_logits_form(x, target, _loss_weights((4,), "both"))
    assert torch.isfinite(logprob).all() and torch.isfinite(entropy).all()
    assert torch.equal(grad[:, 150:], torch.zeros_like(grad[:, 150:]))
    x_fast, x_exact = x.clone().requires_grad_(), x.double().requires_grad_()
    fastce.token_logprobs(x_fast, target).sum().backward()
    reference.token_logprobs(x_exact, target).sum().backward()
    assert 1e-7 < x_exact.grad[1, 7] < 1e-5
    torch.testing.assert_close(x_fast.grad[1, 7].double(), x_exact.grad[1, 7], rtol=1e-4, atol=0)


def test_out_of_range_target_gives_nan_for_its_row_only():
    x = _logits((5, 40)).requires_grad_()
    target = torch.tensor([1, 40, -100, 2, -3])
    logprob, entropy = fastce.token_logprobs(x, target, return_entropy=True, validate=False)
    for out in (logprob, entropy):
        assert torch.isnan(out[[1, 4]]).all() and torch.isfinite(out[[0, 2, 3]]).all()
    (logprob + entropy).nan_to_num().sum().backward()
    assert torch.isnan(x.grad[[1, 4]]).all() and torch.isfinite(x.grad[[0, 2, 3]]).all()
    expected = reference.token_logprobs(x.detach(), target)
    torch.testing.assert_close(logprob, expected, equal_nan=True)


def test_strided_logits_and_targets_are_read_in_place():
    wide = _logits((40, 13))
    x = wide.t()  # (13, 40): class stride 13
    target = torch.randint(0, 40, (26,))[::2]
    snaps = snapshot(x, target)
    _check_logits_form(x, target, _loss_weights((13,), "both"))
    _check_policy_loss(x, target, torch.randn(13), grad_output=torch.rand(()), entropy_coef=0.2)
    assert_unchanged((x, target), snaps, "token_logprobs")


def _nbytes(t):
    return t.numel() * t.element_size()


def test_cost_forward_reads_once_and_backward_is_one_pass():
    # bf16 (16, 32768): the forward reads the logits once; the backward reads them once and writes
    # their gradient once. 3× in all is the floor for per-token upstream gradients known only after
    # the forward (the gradient needs every p_j); 2× would need the gradient in the forward.
    x = _logits((16, 32768), torch.bfloat16, scale=2.0).requires_grad_()
    target = torch.randint(0, 32768, (16,))
    with measure() as forward:
        logprob, entropy = fastce.token_logprobs(x, target, temperature=0.9, return_entropy=True, validate=False)
    loss = (torch.randn(16) * logprob + 0.1 * entropy).sum()
    with measure() as backward:
        loss.backward()
    logits_bytes = _nbytes(x)
    assert forward.total_bytes <= 1.01 * logits_bytes, forward.report()
    assert backward.total_bytes <= 2.02 * logits_bytes, backward.report()
    assert backward.kernels["token_stats_bwd_kernel"].launches == 1
    assert forward.syncs == backward.syncs == 0
    assert backward.peak_bytes <= 1.01 * logits_bytes  # the gradient and per-row vectors


@pytest.mark.parametrize("mode", ["no_grad", "logits_without_grad"])
def test_forward_without_gradient_keeps_no_statistics(mode):
    x = _logits((16, 4096), torch.bfloat16).requires_grad_(mode == "no_grad")
    target = torch.randint(0, 4096, (16,))
    with measure() as m, torch.set_grad_enabled(mode != "no_grad"):
        logprob, entropy = fastce.token_logprobs(x, target, return_entropy=True)
    assert logprob.grad_fn is None and entropy.grad_fn is None
    assert m.triton_write == 2 * 4 * 16, m.report()  # the two outputs, no statistics
    assert m.total_bytes <= 1.01 * _nbytes(x)


# ---- policy_gradient_loss: the loss of known per-token weights, its gradient written in the forward ----

def _advantages(row_shape):
    # one per sequence where there are sequences ((B, 1) broadcast over T), else one per token
    return torch.randn(row_shape[:1] + (1,) * (len(row_shape) - 1) if len(row_shape) > 1 else row_shape)


def _policy_loss_and_grad(fn, x, target, advantages, grad_output=None, **kwargs):
    """fn(x, target, advantages, return_stats=True, **kwargs) on a fresh leaf copy, backward with
    grad_output (None: 1); returns (loss, logprob, entropy, grad)."""
    leaf = x.detach().clone().requires_grad_()
    loss, logprob, entropy = fn(leaf, target, advantages, return_stats=True, **kwargs)
    loss.backward(None if grad_output is None else grad_output.to(loss.dtype))
    return loss.detach(), logprob, entropy, leaf.grad


def _check_policy_loss(x, target, advantages, *, grad_output=None, roundings=1, **kwargs):
    """fastce.policy_gradient_loss against the same expression of reference.token_logprobs on float64
    copies: the loss and the statistics in the compute dtype, the gradient rounded `roundings` times."""
    loss, logprob, entropy, grad = _policy_loss_and_grad(fastce.policy_gradient_loss, x, target, advantages,
                                                         grad_output, **kwargs)
    want = _policy_loss_and_grad(reference.policy_gradient_loss, x.double(), target, advantages.double(),
                                 grad_output, **kwargs)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, actual, expected in zip(("loss", "logprob", "entropy"), (loss, logprob, entropy), want):
        assert actual.dtype == out_dtype and not actual.requires_grad, name
        assert_close_dtype(actual, expected, out_dtype, name)
    assert logprob.shape == entropy.shape == target.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close_dtype(grad, want[3], x.dtype, "grad", roundings=roundings)
    ignored = target == -100
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    return loss, grad, want[3]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", list(LOGITS_SHAPES.values()), ids=list(LOGITS_SHAPES))
def test_policy_gradient_loss_matches_float64_reference(shape, reduction):
    target = _targets(shape[:-1], shape[-1])
    x, advantages = _logits(shape), _advantages(target.shape)
    snaps = snapshot(x, target, advantages)
    loss, _, _ = _check_policy_loss(x, target, advantages, grad_output=torch.randn(target.shape if reduction == "none"
                                                                                   else ()),
                                    entropy_coef=0.05, temperature=0.7, reduction=reduction)
    assert loss.shape == (target.shape if reduction == "none" else ())
    assert_unchanged((x, target, advantages), snaps, "policy_gradient_loss")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [LOGITS_SHAPES["batch_time"], LOGITS_SHAPES["above_one_block"]],
                         ids=["batch_time", "above_one_block"])
def test_policy_gradient_loss_in_every_dtype_rounds_the_gradient_once(shape, dtype):
    # loss.backward(): the gradient the forward wrote, rounded once to the input's dtype
    target = _targets(shape[:-1], shape[-1])
    x = _logits(shape, dtype)
    _, grad, exact = _check_policy_loss(x, target, _advantages(target.shape), entropy_coef=-0.02, temperature=1.3)
    if dtype != torch.float64:
        _assert_rounded_once(grad, exact)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_policy_gradient_loss_gradcheck(reduction):
    # float64 finite differences; 'mean' and 'sum' take the forward's gradient at the first backward
    # and recompute it from the logits at the next ones (gradcheck backpropagates through one graph
    # several times)
    x = _logits((4, 9), torch.float64).requires_grad_()
    target = torch.tensor([3, -100, 8, 0])
    advantages = torch.randn(4, dtype=torch.float64)

    def loss(logits):
        return fastce.policy_gradient_loss(logits, target, advantages, entropy_coef=0.3, temperature=0.8,
                                           reduction=reduction)

    assert torch.autograd.gradcheck(loss, (x,))


@pytest.mark.parametrize("reduction, want", [("mean", float("nan")), ("sum", 0.0), ("none", None)])
@pytest.mark.parametrize("n_rows", [0, 3])
def test_policy_gradient_loss_with_every_token_ignored_or_none(n_rows, reduction, want):
    # a mean over no token is 0/0 (NaN), as cross-entropy's, with an all-zero gradient
    x = _logits((n_rows, 17)).requires_grad_()
    target = torch.full((n_rows,), -100)
    loss = fastce.policy_gradient_loss(x, target, torch.randn(n_rows), entropy_coef=0.1, reduction=reduction)
    if want is None:
        assert torch.equal(loss, torch.zeros(n_rows))
    else:
        torch.testing.assert_close(loss, torch.tensor(want), equal_nan=True)
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("n_classes", [4096, 16411], ids=["one_tile", "streamed"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_policy_gradient_loss_cost(reduction, n_classes):
    # bf16: for 'mean' and 'sum' the forward reads the logits once and writes their gradient once
    # (2×; a streamed row is read twice by one program, 3× requested and 2× distinct, as for
    # cross-entropy), the backward's rescale reads one scalar; 'none' is token_logprobs' 3×
    x = _logits((16, n_classes), torch.bfloat16, scale=2.0).requires_grad_()
    target = _targets((16,), n_classes)
    with measure() as m:
        loss = fastce.policy_gradient_loss(x, target, torch.randn(16), entropy_coef=0.01, reduction=reduction,
                                           validate=False)
        loss.backward(torch.randn(16) if reduction == "none" else None)
    logits_bytes = _nbytes(x)
    streamed = n_classes > 4096
    floor = 3 if reduction == "none" else 2
    assert m.unique_bytes <= (floor + 0.02) * logits_bytes, m.report()
    assert m.total_bytes <= (floor + streamed + 0.02) * logits_bytes, m.report()
    assert m.syncs == 0, m.report()
    assert ("token_stats_bwd_kernel" in m.kernels) == (reduction == "none"), m.report()
    assert m.peak_bytes <= 1.01 * logits_bytes, m.report()  # the gradient and per-row vectors


def test_policy_gradient_loss_upstream_gradients_and_a_retained_graph():
    # an upstream gradient ≠ 1 rescales the forward's gradient on the device (a bf16 gradient then
    # rounded twice); a second backward through the retained graph computes it from the logits
    x = _logits((6, 300), torch.bfloat16)
    target = _targets((6,), 300)
    advantages = torch.randn(6)
    for scale in (0.3, -2.0):
        _check_policy_loss(x, target, advantages, grad_output=torch.tensor(scale), roundings=2, entropy_coef=0.1)
    leaf = x.clone().requires_grad_()
    loss = fastce.policy_gradient_loss(leaf, target, advantages, entropy_coef=0.1)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    with measure() as m:
        loss.backward(torch.tensor(0.5))
    assert m.kernels["token_stats_bwd_kernel"].launches == 1
    assert_close_dtype(leaf.grad.double(), 1.5 * first.double(), torch.bfloat16, "second backward", roundings=2)


def test_policy_gradient_loss_without_gradient_reads_the_logits_once():
    x = _logits((16, 4096), torch.bfloat16)
    target = _targets((16,), 4096)
    advantages = torch.randn(16)
    with measure() as m:
        loss = fastce.policy_gradient_loss(x, target, advantages, entropy_coef=0.01, validate=False)
    assert loss.grad_fn is None and m.syncs == 0
    assert m.total_bytes <= 1.01 * _nbytes(x), m.report()
    torch.testing.assert_close(loss, reference.policy_gradient_loss(x.double(), target, advantages.double(),
                                                                    entropy_coef=0.01).float())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_policy_gradient_loss_compiled_step_costs_what_an_eager_one_costs(backend):
    torch._dynamo.reset()
    x = _logits((8, 1000), torch.bfloat16)
    target = _targets((8,), 1000)
    advantages = torch.randn(8)

    def step(logits, scale, reduction):
        loss = fastce.policy_gradient_loss(logits, target, advantages, entropy_coef=0.01, temperature=0.9,
                                           reduction=reduction, validate=False)
        return (loss * scale).sum()

    compiled_step = torch.compile(step, fullgraph=True, backend=backend)
    for reduction, upstream in (("mean", 1.0), ("mean", 0.25), ("none", 1.0)):
        results = []
        for fn in (step, step, compiled_step, compiled_step):  # the first of each is not measured
            leaf = x.clone().requires_grad_()
            with measure() as m:
                fn(leaf, torch.tensor(upstream), reduction).backward()
            results.append((m, leaf.grad))
        (eager, eager_grad), (compiled, compiled_grad) = results[1], results[3]
        report = f"compiled:\n{compiled.report()}\neager:\n{eager.report()}"
        assert compiled.total_bytes <= 1.01 * eager.total_bytes, report
        assert compiled.peak_bytes <= 1.01 * eager.peak_bytes, report
        assert compiled.syncs == 0, report
        assert torch.equal(compiled_grad, eager_grad), reduction


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda x, t, a: (x, t, a.requires_grad_()), RuntimeError, "advantages.detach"),
    (lambda x, t, a: (x, t, a[:-1]), ValueError, "broadcast"),
    (lambda x, t, a: (x, t, a.long()), TypeError, "floating"),
    (lambda x, t, a: (x, t, a.tolist()), TypeError, "Tensor"),
])
def test_policy_gradient_loss_bad_advantages(make_bad, error, match):
    x, target, advantages = _logits((5, 11)), torch.randint(0, 11, (5,)), torch.randn(5)
    with measure() as m, pytest.raises(error, match=match):
        fastce.policy_gradient_loss(*make_bad(x, target, advantages))
    assert m.triton_launches == 0
    for kwargs, match in ((dict(reduction="avg"), "reduction"), (dict(entropy_coef=float("inf")), "entropy_coef"),
                          (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=match):
            fastce.policy_gradient_loss(x, target, advantages, **kwargs)


# ---- linear form --------------------------------------------------------------------------------

N_ROWS, HIDDEN, N_CLASSES, CHUNK = 29, 12, 203, 8  # forward: 3 chunks of 8 rows, one of 5; backward:
# slices of 8·203 // 29 = 56 classes (3 of 56, one of 35)


def _head(lead=(N_ROWS,), hidden=HIDDEN, n_classes=N_CLASSES, dtype=torch.float32, bias=True):
    return [_logits((*lead, hidden), dtype, scale=1.0), _logits((n_classes, hidden), dtype, scale=hidden ** -0.5 * 3),
            _logits((n_classes,), dtype, scale=1.0) if bias else None]


def _relative_errors(results, expected):
    """Largest error of each output and gradient, relative to the largest |expected| of that tensor."""
    def error(actual, wanted):
        return ((actual.double() - wanted).abs().max() / wanted.abs().max().clamp_min(1e-12)).item()
    pairs = zip((*results[:2], *results[2]), (*expected[:2], *expected[2]))
    return [None if wanted is None else error(actual, wanted) for actual, wanted in pairs]


def _check_linear_form(params, target, weights, **kwargs):
    """fastce.linear_token_logprobs against the reference on float64 copies. In fp32 every output and
    gradient is within 2e-6 of the largest expected value. In bf16/fp16 the logits are a GEMM output
    rounded to the input dtype and every gradient passes one more such GEMM, as when the logits are
    materialised in that dtype: fastce may err at most twice as much as that computation (entropy
    gradients sum to zero over the vocabulary, so their GEMMs cancel and the error is several ulps)."""
    dtype = params[0].dtype
    linear = lambda h, w, b, t, **kw: fastce.linear_token_logprobs(h, w, t, linear_bias=b, **kw)  # noqa: E731
    exact = lambda h, w, b, t, **kw: reference.linear_token_logprobs(h, w, t, linear_bias=b, **kw)  # noqa: E731
    results = _outputs_and_grads(linear, params, target, weights, **kwargs)
    kwargs.pop("chunk_size", None)
    expected = _outputs_and_grads(exact, [None if p is None else p.double() for p in params], target, weights,
                                  **kwargs)
    errors = _relative_errors(results, expected)
    if dtype == torch.float32:
        bounds = [2e-6] * len(errors)
    else:
        materialised = _outputs_and_grads(exact, params, target, weights, **kwargs)
        bounds = [None if e is None else 2 * e for e in _relative_errors(materialised, expected)]
    names = ("logprob", "entropy", "grad hidden", "grad weight", "grad bias")
    for name, actual, error, bound in zip(names, (*results[:2], *results[2]), errors, bounds):
        if error is None:
            continue
        assert actual.dtype == (dtype if name.startswith("grad") else torch.float32), name
        assert error <= bound, f"{name}: {error:.2e} of max |expected| (bound {bound:.2e}, {dtype})"
    return results


@pytest.mark.parametrize("outputs_in_loss", OUTPUTS_IN_LOSS)
@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True),
                                         (torch.float16, False)])
def test_linear_form_matches_float64_reference_over_several_chunks(dtype, bias, outputs_in_loss):
    target = _targets((N_ROWS,), N_CLASSES)
    logprob, entropy, grads = _check_linear_form(_head(dtype=dtype, bias=bias), target,
                                                 _loss_weights((N_ROWS,), outputs_in_loss), temperature=0.7,
                                                 chunk_size=CHUNK)
    ignored = target == -100
    assert torch.equal(grads[0][ignored], torch.zeros_like(grads[0][ignored]))


def test_linear_form_with_leading_dims_and_default_chunks():
    # 69 rows of 203 classes in fp32: 5% of the logits is less than the engine's floors (16 rows, 16
    # classes), which then give the pieces
    lead = (3, 23)
    walks = token_stats.plan(69, N_CLASSES, HIDDEN, torch.float32)
    assert (walks.chunk_rows, walks.slice_classes) == (16, 16)
    target = _targets(lead, N_CLASSES)
    _check_linear_form(_head(lead), target, _loss_weights(lead, "both"), temperature=1.3)


def test_linear_form_gradients_only_for_tensors_that_require_them():
    hidden, weight, bias = _head()
    target = _targets((N_ROWS,), N_CLASSES)
    weight.requires_grad_()
    with measure() as m:
        logprob = fastce.linear_token_logprobs(hidden, weight, target, linear_bias=bias,
                                               options=fastce.HeadOptions(chunk_rows=CHUNK))
        logprob.sum().backward()
    # the forward's logits per chunk, then per piece of the walk that makes ∂W the logits again and ∂W:
    # no ∂hidden GEMM
    walks = token_stats.plan(N_ROWS, N_CLASSES, HIDDEN, weight.dtype, chunk_rows=CHUNK)
    pieces = (-(-N_CLASSES // walks.slice_classes) if walks.weight_walk == "vocab"
              else -(-N_ROWS // walks.chunk_rows))
    gemm_calls = sum(m.ops[name].calls for name in ("mm", "addmm", "addmm_") if name in m.ops)
    assert gemm_calls == -(-N_ROWS // CHUNK) + 2 * pieces, m.report()
    weight64 = weight.detach().double().requires_grad_()
    reference.linear_token_logprobs(hidden.double(), weight64, target, linear_bias=bias.double()).sum().backward()
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-5, atol=1e-7)


def test_linear_form_chunk_rule():
    from fastce import _head
    bf16, fp32 = torch.bfloat16, torch.float32
    for n_rows, n_classes, hidden, dtype in ((1024, 8192, 64, fp32), (1024, 8192, 64, bf16), (2048, 8192, 256, bf16),
                                            (8192, 128256, 4096, bf16)):
        # within the engine's 5% of the logits' bytes beside the per-row tensors (the bar shape, the head
        # at Llama-3-8B's 2H/V ≈ 6% and the Llama head itself)
        walks = token_stats.plan(n_rows, n_classes, hidden, dtype)
        held = token_stats.working_memory_bytes(n_rows, n_classes, hidden, dtype, walks)
        assert held <= _head.HEAD_BUDGET * n_rows * n_classes * dtype.itemsize, (n_rows, n_classes, hidden, walks)
    # bf16 at 2H/V ≈ 6%: ∂hidden's fp32 accumulator alone would be 6.25% of the logits, so ∂hidden comes
    # from a walk over the rows and ∂W from one over the vocabulary (one more GEMM, no accumulator)
    assert token_stats.plan(2048, 8192, 256, bf16)[:2] == ("vocab", "tokens")
    # where the accumulator fits, one vocabulary walk makes both (fewer GEMMs)
    assert token_stats.plan(1024, 8192, 64, bf16)[:2] == ("vocab", "vocab")
    huge = token_stats.plan(2**20, 262144, 4096, bf16)
    assert huge.chunk_rows * 262144 * 2 <= _head.MAX_BUFFER_BYTES >= huge.slice_classes * 2**20 * 2
    assert token_stats.plan(1024, 8192, 64, bf16, chunk_rows=32)[2:] == (32, 256)  # an explicit chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_form_stays_in_the_budget_on_a_wide_head(dtype):
    # N = 2048, H = 256, V = 8192: a head whose chunks once had a 256-row floor (8.9% of the logits in
    # bf16). Peak counted by the allocator with the kernels launched as no-ops (they allocate nothing;
    # what they compute is tested above), beyond the inputs and their gradients.
    n_rows, hidden_size, n_classes = 2048, 256, 8192
    hidden, weight, _ = _head((n_rows,), hidden_size, n_classes, dtype=dtype, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    target = _targets((n_rows,), n_classes)
    with kernels_as_no_ops(), count_allocations() as counted:
        logprob, entropy = fastce.linear_token_logprobs(hidden, weight, target, return_entropy=True, validate=False)
        (logprob.sum() + entropy.sum()).backward()
    beyond = counted.peak_bytes - _nbytes(hidden) - _nbytes(weight)
    assert beyond <= 0.05 * n_rows * n_classes * hidden.element_size()
    assert counted.syncs == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_form_memory_budget_and_no_syncs_at_n1024_h64_v8192(dtype):
    # Peak of storages created by forward + backward, beyond the gradients of hidden and weight: at
    # most 5% of the (1024, 8192) logits in the input's dtype (the engine's budget).
    n_rows, hidden_size, n_classes = 1024, 64, 8192
    hidden, weight, _ = _head((n_rows,), hidden_size, n_classes, dtype=dtype, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    target = _targets((n_rows,), n_classes)
    advantage = torch.randn(n_rows)
    with measure() as m:
        logprob, entropy = fastce.linear_token_logprobs(hidden, weight, target, return_entropy=True, validate=False)
        (advantage * logprob + 0.01 * entropy).sum().backward()
    beyond = m.peak_bytes - _nbytes(hidden.grad) - _nbytes(weight.grad)
    assert beyond <= 0.05 * n_rows * n_classes * hidden.element_size(), m.report()
    assert m.syncs == 0, m.report()
    walks = token_stats.plan(n_rows, n_classes, hidden_size, dtype)
    chunks, slices = -(-n_rows // walks.chunk_rows), -(-n_classes // walks.slice_classes)
    assert m.kernels["token_stats_fwd_kernel"].launches == chunks
    backward_walks = {walks.weight_walk, walks.input_walk}
    assert m.kernels["token_stats_bwd_kernel"].launches == (slices if "vocab" in backward_walks else 0) + \
        (chunks if "tokens" in backward_walks else 0)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want_logprob, want_entropy = reference.linear_token_logprobs(h64, w64, target, return_entropy=True)
    (advantage.double() * want_logprob + 0.01 * want_entropy).sum().backward()
    # fp32: the GEMMs' rounding; bf16: logits rounded to bf16 (a few ulps of the largest gradient)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logprob.double(), want_logprob.detach(), rtol=tolerance, atol=tolerance)
    assert (weight.grad.double() - w64.grad).abs().max() <= tolerance * w64.grad.abs().max()


@pytest.mark.parametrize("mode", ["no_grad", "nothing_requires_grad"])
def test_linear_form_without_gradients_does_no_gradient_work(mode):
    hidden, weight, bias = _head()
    weight.requires_grad_(mode == "no_grad")
    target = _targets((N_ROWS,), N_CLASSES)
    with measure() as m, torch.set_grad_enabled(mode != "no_grad"):
        logprob = fastce.linear_token_logprobs(hidden, weight, target, linear_bias=bias, chunk_size=CHUNK)
    assert logprob.grad_fn is None
    assert m.ops["addmm"].calls == 4 and "mm" not in m.ops and "token_stats_bwd_kernel" not in m.kernels
    assert m.triton_write == 4 * N_ROWS, m.report()  # the log-probabilities, no statistics
    torch.testing.assert_close(logprob, reference.linear_token_logprobs(hidden, weight.detach(), target,
                                                                        linear_bias=bias))


def test_second_backward_through_a_retained_graph():
    params = _head()
    params = [p.requires_grad_() for p in params]
    target = _targets((N_ROWS,), N_CLASSES)
    logprob, entropy = fastce.linear_token_logprobs(params[0], params[1], target, linear_bias=params[2],
                                                    return_entropy=True, chunk_size=CHUNK)
    loss = (logprob - entropy).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    loss.backward()
    for p, grad in zip(params, first):
        torch.testing.assert_close(p.grad, 2 * grad)


# ---- torch.compile, the CPU fallback, bad arguments, the README example -----------------------------

def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = _logits((2, 3, 40))
    target = _targets((2, 3), 40)
    hidden, weight, bias = _head()
    linear_target = _targets((N_ROWS,), N_CLASSES)

    def losses(x, hidden, weight, bias):
        logprob, entropy = fastce.token_logprobs(x, target, temperature=0.8, return_entropy=True)
        entropy_only = fastce.token_logprobs(x * 2, target, return_entropy=True)[1]
        linear_logprob, linear_entropy = fastce.linear_token_logprobs(
            hidden, weight, linear_target, linear_bias=bias, temperature=1.2, return_entropy=True, chunk_size=CHUNK)
        return (logprob * 0.3 - entropy).sum() + entropy_only.sum() + (linear_logprob * 0.7 + linear_entropy).sum()

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (losses, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, hidden, weight, bias)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    x = _logits((6, 30))
    target = _targets((6,), 30)
    hidden, weight, bias = _head()
    linear_target = _targets((N_ROWS,), N_CLASSES)
    advantages = torch.randn(6)

    def every_function():
        return (fastce.token_logprobs(x, target, return_entropy=True),
                fastce.linear_token_logprobs(hidden, weight, linear_target, linear_bias=bias, return_entropy=True),
                fastce.policy_gradient_loss(x, target, advantages, entropy_coef=0.1, reduction="none",
                                            return_stats=True))

    kernels = every_function()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with measure() as m:
        fallback = every_function()
    assert m.triton_launches == 0
    torch.testing.assert_close(fallback, kernels)


@pytest.mark.parametrize("make_bad, error", [
    (lambda x, t: (x, t.float()), TypeError),                        # probabilities / float indices
    (lambda x, t: (x, t.int()), TypeError),                          # int32 class indices
    (lambda x, t: (x, t[:-1]), ValueError),                          # target shape
    (lambda x, t: (x.long(), t), TypeError),                         # integer logits
    (lambda x, t: (x[0, 0], t[0]), ValueError),                      # 0-dim logits
    (lambda x, t: (x[:, :0], t), ValueError),                        # no classes
])
def test_bad_arguments_raise_clear_errors_before_any_kernel(make_bad, error):
    x, target = _logits((5, 11)), torch.randint(0, 11, (5,))
    args = make_bad(x, target)
    with measure() as m, pytest.raises(error):
        fastce.token_logprobs(*args)
    assert m.triton_launches == 0


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=float("nan")),
                                    dict(chunk_size=0)])
def test_bad_options_raise_clear_errors(kwargs):
    hidden, weight, _ = _head()
    target = _targets((N_ROWS,), N_CLASSES)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        fastce.linear_token_logprobs(hidden, weight, target, **kwargs)
    if "temperature" in kwargs:
        with pytest.raises(ValueError, match="temperature"):
            fastce.token_logprobs(_logits((3, 4)), torch.zeros(3, dtype=torch.long), **kwargs)
    with pytest.raises(TypeError):
        fastce.linear_token_logprobs(hidden, weight, torch.rand(N_ROWS, N_CLASSES))  # probabilities


def _run_readme_example(containing):
    """Runs the README's token-statistics example whose code contains `containing`; its namespace."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Token statistics for RL", 1)[1].split("\n## ", 1)[0]
    code = next(block for block in re.findall(r"```python\n(.*?)```", section, re.S) if containing in block)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_grpo_example_runs_and_trains_the_head():
    namespace = _run_readme_example("lm_head = ")
    loss, lm_head, hidden = namespace["loss"], namespace["lm_head"], namespace["hidden"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert lm_head.weight.grad is not None and torch.isfinite(lm_head.weight.grad).all()
    assert hidden.grad is not None and torch.equal(hidden.grad[:, -3:], torch.zeros_like(hidden.grad[:, -3:]))


def test_readme_policy_gradient_example_gives_the_reference_loss():
    namespace = _run_readme_example("fastce.policy_gradient_loss(")
    logits, tokens, advantages = namespace["logits"], namespace["tokens"], namespace["advantages"]
    exact = reference.policy_gradient_loss(logits.detach().double(), tokens, advantages.double(), entropy_coef=1e-3,
                                           temperature=0.9)
    torch.testing.assert_close(namespace["loss"].double(), exact)
    assert not namespace["logprobs"].requires_grad and namespace["entropy"].shape == tokens.shape
    assert torch.equal(logits.grad[:, -3:], torch.zeros_like(logits.grad[:, -3:])) and logits.grad.abs().sum() > 0


def test_kernels_compile_for_hopper_without_spills():
    # the real compiler (no GPU needed) rejects what the interpreter tolerates; the launch rule's
    # warps keep every tile in registers (tools/sm90_compile.py prints the table)
    script = ("import sys; sys.path.insert(0, 'tools'); import sm90_compile as tool\n"
              "for name, config, registers, stack in tool.compile_token_stats(tool.token_stats_variants()):\n"
              "    print(f'{name}|{registers}|{stack}')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines()]
    assert len(rows) == 9, result.stdout
    for name, registers, stack in rows:
        assert 0 < int(registers) <= 255 and int(stack) == 0, f"{name}: {registers} registers, {stack} B of stack"

"""fastce.linear_cross_entropy / LinearCrossEntropyLoss: cross_entropy(input @ W.T + b) computed in
chunks of rows, compared with fastce.reference.linear_cross_entropy on float64 copies (loss and
the gradients of input, weight and bias), plus its memory budget, host syncs, torch.compile and
drop-in compatibility with PyTorch 2.13's F.linear_cross_entropy / nn.LinearCrossEntropyLoss.
"""
import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce import linear, reference
from fastce.profiling import measure

pytestmark = pytest.mark.skipif(
    not fastce.uses_triton(torch.empty(0)), reason="runs the kernels (TRITON_INTERPRET=1 on CPU)")

TORCH_HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy")

# Low-precision tolerance, relative to the largest |expected| of each tensor. The logits are a
# GEMM output rounded to the input dtype, as in cross_entropy(F.linear(...)) in that dtype, and
# every gradient passes through one more GEMM rounded the same way; measured, fastce's error is
# that of torch's own materialised path in the same dtype (bf16 about 5e-3, fp16 about 7e-4).
MAX_RELATIVE_ERROR = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}

N_ROWS, HIDDEN, N_CLASSES, CHUNK = 29, 12, 203, 8  # 29 rows = 3 chunks of 8 and one of 5; 203 classes: padded tile


def _head(n_rows=N_ROWS, hidden=HIDDEN, n_classes=N_CLASSES, dtype=torch.float32, bias=True, lead=None):
    lead = (n_rows,) if lead is None else lead
    x = torch.randn(*lead, hidden).to(dtype).requires_grad_()
    w = (torch.randn(n_classes, hidden) / hidden ** 0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(n_classes).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _targets(lead, n_classes=N_CLASSES, ignore_frac=0.2):
    target = torch.randint(0, n_classes, lead)
    target[torch.rand(lead) < ignore_frac] = -100
    return target


def _upstream(loss):
    return torch.rand_like(loss) + 0.5 if loss.dim() else torch.tensor(1.7, dtype=loss.dtype)


def _loss_and_grads(fn, params, target, grad_output=None, **kwargs):
    params = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    x, w, b = params
    loss = fn(x, w, target, linear_bias=b, **kwargs)
    grad_output = _upstream(loss) if grad_output is None else grad_output
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), [None if p is None else p.grad for p in params], grad_output


def _as64(kwargs):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}


def _check_against_reference(params, target, dtype=torch.float32, **kwargs):
    loss, grads, grad_output = _loss_and_grads(fastce.linear_cross_entropy, params, target, **kwargs)
    kwargs.pop("chunk_size", None)
    params64 = [None if p is None else p.detach().double() for p in params]
    target64 = target.double() if target.is_floating_point() else target
    expected, expected_grads, _ = _loss_and_grads(reference.linear_cross_entropy, params64, target64,
                                                  grad_output.double(), **_as64(kwargs))
    assert loss.dtype == dtype and loss.shape == expected.shape
    for name, actual, wanted in zip(("loss", "grad input", "grad weight", "grad bias"), (loss, *grads),
                                    (expected, *expected_grads)):
        if wanted is None:
            continue
        assert actual.dtype == dtype, name
        scale = wanted.abs().max().clamp_min(1e-12)
        error = ((actual.double() - wanted).abs().max() / scale).item()
        assert error <= MAX_RELATIVE_ERROR[dtype], f"{name}: error {error:.2e} of max |expected| ({dtype})"


OPTIONS = {
    "plain": {},
    "class_weights": {"weight": "random"},
    "label_smoothing": {"label_smoothing": 0.15},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.0},
    "everything": {"weight": "random", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0},
}


def _options(name):
    kwargs = dict(OPTIONS[name])
    if kwargs.get("weight") == "random":
        kwargs["weight"] = torch.rand(N_CLASSES) + 0.25
    return kwargs


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_loss_and_three_gradients_match_float64_reference(option, reduction):
    params = _head()
    _check_against_reference(params, _targets((N_ROWS,)), reduction=reduction, chunk_size=CHUNK,
                             **_options(option))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_bias_with_default_chunk_rule(reduction):
    params = _head(n_rows=70, bias=False)  # the rule's 16-row floor: 5 chunks, the last of 6 rows
    assert linear.default_chunk_rows(70, N_CLASSES, HIDDEN, 4) == 16
    _check_against_reference(params, _targets((70,)), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_inputs(dtype, reduction):
    params = _head(dtype=dtype)
    _check_against_reference(params, _targets((N_ROWS,)), dtype=dtype, reduction=reduction, chunk_size=CHUNK,
                             z_loss=1e-3, softcap=4.0, label_smoothing=0.05)


def test_weight_and_bias_gradients_accumulate_in_fp32_across_chunks():
    # 9 chunks of 2 rows, W = 0 (every p = 1/4), x = 1. The first chunk's rows carry an upstream
    # gradient of 256, so that chunk adds -384 (target class) and 128 (other classes) to every entry
    # of dW and db; each later chunk adds -1.5 and 0.5. Summed in bf16 the later additions round
    # wrongly (128 + 0.5 is a tie that stays 128; -384 - 1.5 becomes -386), giving -400 and 128;
    # summed in fp32 the totals are exact and representable in bf16: -396 and 132.
    n_rows, n_classes = 18, 4
    x = torch.ones(n_rows, 2, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(n_classes, 2, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.bfloat16, requires_grad=True)
    target = torch.zeros(n_rows, dtype=torch.long)
    loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none", chunk_size=2)
    grad_output = torch.ones(n_rows, dtype=torch.bfloat16)
    grad_output[:2] = 256
    loss.backward(grad_output)
    expected = torch.tensor([-396.0, 132.0, 132.0, 132.0], dtype=torch.bfloat16)
    assert torch.equal(b.grad, expected)
    assert torch.equal(w.grad, expected[:, None].expand(n_classes, 2))
    assert torch.equal(x.grad, torch.zeros_like(x))
    torch.testing.assert_close(loss, torch.full_like(loss, torch.log(torch.tensor(4.0)).item()))


def _grad_bytes(*tensors):
    return sum(t.grad.numel() * t.grad.element_size() for t in tensors)


def _peak_beyond_gradients(fn, x, w, target):
    """(peak bytes of the storages a training step creates, beyond the gradients; the measurement; the loss)"""
    with measure() as m:
        loss = fn(x, w, target)
        loss.backward()
    return m.peak_bytes - _grad_bytes(x, w), m, loss.detach()


def test_memory_budget_at_n1024_h64_v8192_fp32():
    # Peak of storages created by the call (forward + backward) beyond the input and weight
    # gradients: at most 5% of the full logits' bytes. The chunk rule gives 32-row chunks (3.1%).
    n_rows, hidden, n_classes = 1024, 64, 8192
    logits_bytes = n_rows * n_classes * 4
    x, w, _ = _head(n_rows, hidden, n_classes, bias=False)
    target = torch.randint(0, n_classes, (n_rows,))
    extra, m, loss = _peak_beyond_gradients(lambda *a: fastce.linear_cross_entropy(*a, validate=False), x, w, target)
    assert extra <= 0.05 * logits_bytes, m.report()
    assert m.syncs == 0, m.report()
    assert m.kernels["cross_entropy_fwd_kernel"].launches == 32, m.report()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = F.cross_entropy(F.linear(x64, w64), target)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-9)
    if TORCH_HAS_LINEAR_CE:  # PyTorch 2.13's chunked path, counted the same way (7.0% there)
        x.grad = w.grad = None
        torch_extra, m_torch, _ = _peak_beyond_gradients(
            lambda *a: F.linear_cross_entropy(*a, options=torch.nn.LinearCrossEntropyOptions()), x, w, target)
        assert extra < torch_extra, (m.report(), m_torch.report())


def test_memory_does_not_grow_with_rows_beyond_the_chunk():
    # With the chunk fixed, 4x the rows adds only the per-row fp32 loss/lse buffers.
    n_classes, hidden = 2048, 16
    peaks = {}
    for n_rows in (64, 256):
        x, w, _ = _head(n_rows, hidden, n_classes, bias=False)
        target = torch.randint(0, n_classes, (n_rows,))
        peaks[n_rows], _, _ = _peak_beyond_gradients(
            lambda *a: fastce.linear_cross_entropy(*a, chunk_size=16, validate=False), x, w, target)
    assert peaks[64] >= 16 * n_classes * 4  # the chunk's logits buffer
    assert peaks[256] - peaks[64] <= 16 * (256 - 64), peaks


def test_chunk_rule_amortises_weight_traffic_on_language_model_heads():
    # N = 8192 tokens, H = 4096, V = 128k bf16: 2048-row chunks (N/32 would be 256), a 512 MiB
    # buffer against the 2 GiB fp32 ∂W accumulator; the 1 GiB ceiling still holds at V = 256k.
    assert linear.default_chunk_rows(8192, 131072, 4096, 2) == 2048
    assert linear.default_chunk_rows(8192, 262144, 4096, 2) * 262144 * 2 <= linear.MAX_CHUNK_BYTES
    # a wider head gets longer chunks, whose traffic the byte counter sees: W is read and ∂W
    # accumulated once per chunk, so 4 chunks move far less than the 32 of the N/32 rule
    n_rows, hidden, n_classes = 2048, 256, 512
    assert linear.default_chunk_rows(n_rows, n_classes, hidden, 2) == 256
    moved = {}
    for chunk_size in (None, n_rows // linear.LOGITS_FRACTION):
        x, w, _ = _head(n_rows, hidden, n_classes, dtype=torch.bfloat16, bias=False)
        target = torch.randint(0, n_classes, (n_rows,))
        with measure() as m:
            fastce.linear_cross_entropy(x, w, target, chunk_size=chunk_size, validate=False).backward()
        moved[chunk_size] = m.total_bytes
    assert moved[None] < 0.6 * moved[n_rows // linear.LOGITS_FRACTION], moved


@pytest.mark.parametrize("mode", ["no_grad", "nothing_requires_grad"])
def test_forward_without_gradients_does_no_gradient_work(mode):
    n_rows, n_classes = 40, 512
    x, w, b = _head(n_rows, HIDDEN, n_classes)
    if mode == "nothing_requires_grad":
        x, w, b = x.detach(), w.detach(), b.detach()
    target = torch.randint(0, n_classes, (n_rows,))
    with measure() as m, torch.set_grad_enabled(mode != "no_grad"):
        loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=16, validate=False)
    assert loss.grad_fn is None
    assert m.ops["addmm"].calls == 3 and "mm" not in m.ops, m.report()  # logits GEMMs only
    assert m.triton_write <= 2 * 8 * n_rows + 64, m.report()  # per-row loss and lse, no gradient
    assert m.peak_bytes <= 16 * n_classes * 4 + 64 * n_rows, m.report()
    torch.testing.assert_close(loss, reference.linear_cross_entropy(x.detach(), w.detach(), target,
                                                                    linear_bias=b.detach()))


def test_gradients_only_for_tensors_that_require_them():
    x, w, b = _head()
    x.requires_grad_(False)
    b.requires_grad_(False)
    target = _targets((N_ROWS,))
    fastce.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=CHUNK).backward()
    assert x.grad is None and b.grad is None
    w64 = w.detach().double().requires_grad_()
    reference.linear_cross_entropy(x.double(), w64, target, linear_bias=b.double()).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("validate, max_syncs", [(False, 0), (True, 1)])
def test_host_syncs(reduction, validate, max_syncs):
    x, w, b = _head()
    target = _targets((N_ROWS,))
    with measure() as m:
        loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=CHUNK,
                                           label_smoothing=0.1, validate=validate)
        loss.backward(_upstream(loss))
    assert m.syncs == max_syncs, m.report()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_matches_eager(reduction):
    torch._dynamo.reset()
    x, w, b = _head(n_rows=13, hidden=8, n_classes=40)
    target = _targets((13,), n_classes=40)
    weight = torch.rand(40)

    def loss_fn(x, w, b):
        return fastce.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, reduction=reduction,
                                           label_smoothing=0.1, z_loss=1e-3, softcap=10.0, chunk_size=4)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    grad_output = torch.rand(13) if reduction == "none" else torch.tensor(0.7)
    results = [_loss_and_grads(lambda x, w, t, linear_bias: fn(x, w, linear_bias), (x, w, b), target,
                               grad_output)[:2] for fn in (loss_fn, compiled)]
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_leading_dims_and_single_token():
    params = _head(lead=(3, 5))
    _check_against_reference(params, _targets((3, 5)), reduction="none", chunk_size=4)  # loss shaped (3, 5)
    _check_against_reference(_head(lead=()), torch.tensor(7), reduction="none")  # (H,) input, () target
    _check_against_reference(_head(n_rows=1), torch.tensor([7]), reduction="mean", z_loss=1e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_and_empty_batch(reduction):
    for n_rows in (10, 0):
        x, w, b = _head(n_rows)
        target = torch.full((n_rows,), -100)
        loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=4)
        loss.backward()
        expected = reference.linear_cross_entropy(x.detach(), w.detach(), target, linear_bias=b.detach(),
                                                  reduction=reduction)
        torch.testing.assert_close(loss, expected, equal_nan=True)  # 'mean': NaN (0/0), as torch
        for grad in (x.grad, w.grad, b.grad):
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_return_lse_is_the_rows_fp32_logsumexp_after_the_cap(dtype):
    x, w, b = _head(dtype=dtype)
    target = _targets((N_ROWS,))
    loss, lse = fastce.linear_cross_entropy(x, w, target, linear_bias=b, softcap=3.0, z_loss=1e-3,
                                            return_lse=True, chunk_size=CHUNK)
    assert lse.dtype == torch.float32 and lse.shape == (N_ROWS,)
    logits = F.linear(*(t.detach().double() for t in (x, w, b)))
    expected = torch.logsumexp(3.0 * torch.tanh(logits / 3.0), dim=-1).masked_fill(target == -100, 0.0)
    torch.testing.assert_close(lse.double(), expected, rtol=MAX_RELATIVE_ERROR[dtype], atol=MAX_RELATIVE_ERROR[dtype])


def test_probability_targets():
    params = _head()
    probs = torch.rand(N_ROWS, N_CLASSES).softmax(-1)
    _check_against_reference(params, probs, reduction="mean", chunk_size=CHUNK, label_smoothing=0.1)
    _check_against_reference(params, probs, reduction="none", chunk_size=CHUNK)


def test_second_backward_through_retained_graph_recomputes():
    x, w, b = _head()
    target = _targets((N_ROWS,))
    loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in (x, w, b)]
    loss.backward(torch.tensor(0.5))
    for p, grad in zip((x, w, b), first):
        torch.testing.assert_close(p.grad, 1.5 * grad)


def test_out_of_range_class_without_validation_gives_nan_for_its_row():
    x, w, b = _head()
    target = _targets((N_ROWS,), ignore_frac=0.0)
    target[4] = N_CLASSES + 3
    with torch.no_grad():
        loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none", validate=False,
                                           chunk_size=CHUNK)
    assert torch.isnan(loss[4]) and torch.isfinite(torch.cat([loss[:4], loss[5:]])).all()
    with pytest.raises(IndexError, match=str(N_CLASSES + 3)):
        fastce.linear_cross_entropy(x, w, target, linear_bias=b)


@pytest.mark.parametrize("make_bad, error", [
    (lambda x, w, b, t: (x[:, :-1], w, b, t), RuntimeError),                        # in_features differ
    (lambda x, w, b, t: (x, w, b[:-1], t), RuntimeError),                           # bias shape
    (lambda x, w, b, t: (x, w.double(), b, t), RuntimeError),                       # dtypes differ
    (lambda x, w, b, t: (x, w[None], b, t), RuntimeError),                          # K-dim weight
    (lambda x, w, b, t: (x, w, b, t[:-1]), RuntimeError),                           # target shape
    (lambda x, w, b, t: (x, w, b, t.float()), RuntimeError),                        # float class indices
    (lambda x, w, b, t: (x, w, b, t.int()), TypeError),                             # int32 class indices
    (lambda x, w, b, t: (x[0, 0], w, b, t), RuntimeError),                          # 0-dim input
])
def test_bad_arguments_raise_clear_errors_before_any_kernel(make_bad, error):
    x, w, b = _head()
    args = make_bad(x.detach(), w.detach(), b.detach(), torch.randint(0, N_CLASSES, (N_ROWS,)))
    with measure() as m, pytest.raises(error):
        fastce.linear_cross_entropy(*args[:2], args[3], linear_bias=args[2])
    assert m.triton_launches == 0


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    x, w, b = _head()
    target = _targets((N_ROWS,))
    kernels = fastce.linear_cross_entropy(x.detach(), w.detach(), target, linear_bias=b.detach(), z_loss=1e-3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fastce.uses_triton(x)
    with measure() as m:
        fallback = fastce.linear_cross_entropy(x.detach(), w.detach(), target, linear_bias=b.detach(), z_loss=1e-3)
    assert m.triton_launches == 0
    torch.testing.assert_close(fallback, kernels)


@pytest.mark.skipif(not TORCH_HAS_LINEAR_CE, reason="PyTorch < 2.13 has no F.linear_cross_entropy")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_drop_in_for_torch_linear_cross_entropy(reduction):
    x, w, b = _head()
    target = _targets((N_ROWS,))
    weight = torch.rand(N_CLASSES)
    kwargs = dict(weight=weight, reduction=reduction, ignore_index=None)
    ours, ours_grads, grad_output = _loss_and_grads(fastce.linear_cross_entropy, (x, w, b), target, **kwargs)
    for options in (None, torch.nn.LinearCrossEntropyOptions()):
        theirs, their_grads, _ = _loss_and_grads(F.linear_cross_entropy, (x, w, b), target, grad_output,
                                                 options=options, **kwargs)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for mine, their in zip(ours_grads, their_grads):
            torch.testing.assert_close(mine, their, rtol=1e-4, atol=1e-6)
    single = fastce.linear_cross_entropy(x[0], w, target[0].clamp_min(0), reduction=reduction)
    assert single.shape == F.linear_cross_entropy(x[0], w, target[0].clamp_min(0), reduction=reduction).shape


def test_module_owns_linear_and_matches_the_functional():
    criterion = fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, bias=True, weight=torch.rand(N_CLASSES),
                                              label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    assert set(criterion.state_dict()) == {"weight", "linear.weight", "linear.bias"}
    assert "weight" in dict(criterion.named_buffers())
    x = torch.randn(N_ROWS, HIDDEN)
    target = _targets((N_ROWS,))
    expected = reference.linear_cross_entropy(
        x, criterion.linear.weight.detach(), target, linear_bias=criterion.linear.bias.detach(),
        weight=criterion.weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    torch.testing.assert_close(criterion(x, target), expected)
    bare = fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, dtype=torch.float64)
    assert set(bare.state_dict()) == {"linear.weight"} and bare.linear.weight.dtype == torch.float64
    with pytest.raises(RuntimeError):
        fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, weight=torch.rand(3))


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="needs PyTorch 2.13")
@pytest.mark.parametrize("bias, weighted", [(False, False), (True, True)])
def test_module_state_dict_loads_into_torch_module_and_back(bias, weighted):
    weight = torch.rand(N_CLASSES) if weighted else None
    ours = fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, bias=bias, weight=weight)
    theirs = torch.nn.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, bias=bias, weight=torch.zeros(N_CLASSES) if weighted else None)
    theirs.load_state_dict(ours.state_dict())
    x, target = torch.randn(N_ROWS, HIDDEN), _targets((N_ROWS,))
    torch.testing.assert_close(ours(x, target), theirs(x, target))
    fresh = fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, bias=bias, weight=torch.ones(N_CLASSES) if weighted else None)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh(x, target), theirs(x, target))

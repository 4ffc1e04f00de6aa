"""fastce.distillation_loss / linear_distillation_loss / DistillationLoss (DESIGN §7.5): against a float64
implementation of TRL's generalized_jsd_loss written here, for β ∈ {0, 0.1, 0.5, 1}, temperatures, ignored
tokens, each reduction, (…, V) shapes, strided inputs, num_classes, logit scale and softcap; bf16/fp16 within
torch's own error in that dtype (the same formula in fp32 from the same inputs); bytes, peak memory, GEMM
flops and syncs counted; torch.compile(fullgraph=True) equal to eager; bad input refused before any kernel.
The `path` fixture runs the public functions on the kernels and on the pure-PyTorch path.
"""
import contextlib
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastce
import fastce.profiling
from fastce import distillation, reference
from fastce.profiling import count_allocations, measure
from _support import assert_unchanged, clone_keep_strides, snapshot

BETAS = [0.0, 0.1, 0.5, 1.0]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
# the error allowed beyond twice torch's own in the same dtype, relative to the largest exact value
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
kernels_only = pytest.mark.skipif(not fastce.uses_triton(torch.empty(0)), reason="runs the kernels")


def trl_jsd(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0, reduction="batchmean",
            ignore_index=-100, num_classes=None, student_scale=1.0, teacher_scale=1.0, student_softcap=None,
            teacher_softcap=None):
    """TRL's GKDTrainer.generalized_jsd_loss in float64 (F.kl_div with log targets, the mixture as a logsumexp
    of the log-probabilities plus log β and log(1 − β)), with DESIGN §7.5's reductions: a mask of the kept
    tokens, 'batchmean' over them (over all tokens without labels), 'mean' over them × classes, 'none' per
    token; logits softcap(scale·x) before T, the first num_classes classes."""
    def prepare(x, scale, cap):
        x = x.double()[..., :num_classes] * scale
        return (x if cap is None else cap * torch.tanh(x / cap)) / temperature

    S = F.log_softmax(prepare(student_logits, student_scale, student_softcap), dim=-1)
    Q = F.log_softmax(prepare(teacher_logits.detach(), teacher_scale, teacher_softcap), dim=-1)
    if beta == 0:
        elements = F.kl_div(S, Q, reduction="none", log_target=True)
    elif beta == 1:
        elements = F.kl_div(Q, S, reduction="none", log_target=True)
    else:
        M = torch.logsumexp(torch.stack([S + math.log(1 - beta), Q + math.log(beta)]), dim=0)
        elements = beta * F.kl_div(M, Q, reduction="none", log_target=True) + \
            (1 - beta) * F.kl_div(M, S, reduction="none", log_target=True)
    per_token = elements.sum(-1)
    kept = torch.ones_like(per_token, dtype=torch.bool) if labels is None else labels != ignore_index
    per_token = per_token * kept
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (kept.sum() * (S.shape[-1] if reduction == "mean" else 1))


def _relative_error(actual, exact):
    return float((actual.detach().double() - exact).abs().max() / exact.abs().max().clamp_min(1e-300))


def _run(fn, inputs, wrt, grad_output):
    leaves = [clone_keep_strides(t).requires_grad_(i in wrt) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t for i, t in enumerate(inputs)]
    loss = fn(*leaves)
    loss.backward(grad_output if grad_output is None else grad_output.to(loss.dtype))
    return loss, [leaves[i].grad for i in wrt]


def check(fast_fn, exact_fn, torch_fn, inputs, *, wrt=(0,), upstream=True):
    """fast_fn(*inputs) and its gradients in `wrt` against exact_fn (float64) and within twice torch_fn's
    error on the same inputs (plus FLOOR), under a random upstream gradient (or 1)."""
    dtype = inputs[wrt[0]].dtype
    shape = fast_fn(*inputs).shape
    grad_output = None if not shape else torch.ones(shape, dtype=torch.float64)
    if upstream:
        grad_output = torch.rand(shape, dtype=torch.float64) + 0.5 if len(shape) else torch.tensor(1.7)
    loss, grads = _run(fast_fn, inputs, wrt, grad_output)
    exact, exact_grads = _run(exact_fn, [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                         for t in inputs], wrt, grad_output)
    same, same_grads = _run(torch_fn, inputs, wrt, grad_output)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == exact.shape
    floor = FLOOR[dtype]
    assert _relative_error(loss, exact) <= 2 * _relative_error(same, exact) + min(floor, 2e-6), "loss"
    for i, g, g_exact, g_same in zip(wrt, grads, exact_grads, same_grads):
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape
        assert _relative_error(g, g_exact) <= 2 * _relative_error(g_same, g_exact) + floor, f"gradient {i}"
    return loss, grads


def _logits(*shape, dtype=torch.float32, scale=3.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).to(dtype)


def _labels(shape, n_classes, ignored=0.25):
    labels = torch.randint(0, n_classes, shape)
    labels[torch.rand(shape) < ignored] = -100
    labels.view(-1)[0] = -100
    return labels


# ---- the logits form ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", BETAS)
def test_logits_against_trl_formula(beta, reduction, path):
    # (B, T, V) with ignored tokens, temperatures; V = 37 rows of one tile
    s, t, y = _logits(2, 5, 37), _logits(2, 5, 37), _labels((2, 5), 37)
    for temperature in (1.0, 0.7, 2.5):
        kw = dict(beta=beta, temperature=temperature, reduction=reduction)
        check(lambda s, t: fastce.distillation_loss(s, t, y, **kw), lambda s, t: trl_jsd(s, t, y, **kw),
              lambda s, t: reference.distillation_loss(s, t, y, **kw), [s, t], upstream=temperature != 1.0)


@kernels_only
@pytest.mark.parametrize("beta", BETAS)
def test_streamed_rows_and_no_target(beta):
    # 4100 classes: past one tile, streamed in 2048-class tiles (3 reads of each row for the JSD)
    s, t = _logits(3, 4100), _logits(3, 4100)
    for reduction in ("batchmean", "none"):
        kw = dict(beta=beta, temperature=0.8, reduction=reduction)
        check(lambda s, t: fastce.distillation_loss(s, t, **kw), lambda s, t: trl_jsd(s, t, **kw),
              lambda s, t: reference.distillation_loss(s, t, **kw), [s, t])


@pytest.mark.parametrize("shape", [(11,), (7, 1), (7, 129), (2, 3, 4, 20)])
def test_shapes(shape, path):
    # a single token (V), one class (every divergence 0), odd rows, a 4-D (…, V)
    s, t = _logits(*shape), _logits(*shape)
    y = _labels(shape[:-1], shape[-1]) if len(shape) > 1 else None
    for beta in (0.0, 0.5):
        kw = dict(beta=beta, reduction="none" if len(shape) > 2 else "batchmean")
        check(lambda s, t: fastce.distillation_loss(s, t, y, **kw), lambda s, t: trl_jsd(s, t, y, **kw),
              lambda s, t: reference.distillation_loss(s, t, y, **kw), [s, t])


@pytest.mark.parametrize("beta", BETAS)
def test_strided_inputs_and_caller_tensors_unchanged(beta, path):
    # a class stride of 2, a transposed teacher, a sliced (B, T, V) view; the teacher requires grad
    s = _logits(6, 81)[:, 1::2]
    t = _logits(40, 6).t().requires_grad_()
    y = _labels((6,), 40)
    before = snapshot(s, t, y)
    kw = dict(beta=beta, temperature=1.3)
    check(lambda s, t: fastce.distillation_loss(s, t, y, **kw), lambda s, t: trl_jsd(s, t, y, **kw),
          lambda s, t: reference.distillation_loss(s, t, y, **kw), [s, t])
    x = s.clone().requires_grad_()
    fastce.distillation_loss(x, t, y, **kw).backward()
    assert t.grad is None
    assert_unchanged((s, t, y), before, "distillation_loss")
    s3, t3 = _logits(3, 4, 50)[:, :, 5:37], _logits(3, 4, 32)
    check(lambda s, t: fastce.distillation_loss(s, t, reduction="none", beta=beta),
          lambda s, t: trl_jsd(s, t, reduction="none", beta=beta),
          lambda s, t: reference.distillation_loss(s, t, reduction="none", beta=beta), [s3, t3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("beta", BETAS)
def test_dtypes_within_torchs_own_error(beta, dtype, path):
    s, t, y = _logits(9, 100, dtype=dtype), _logits(9, 100, dtype=dtype), _labels((9,), 100)
    kw = dict(beta=beta, temperature=0.9)
    check(lambda s, t: fastce.distillation_loss(s, t, y, **kw), lambda s, t: trl_jsd(s, t, y, **kw),
          lambda s, t: reference.distillation_loss(s, t, y, **kw), [s, t])


@pytest.mark.parametrize("beta", BETAS)
def test_num_classes_and_a_wider_teacher(beta, path):
    # a padded embedding: the first 37 classes are shared; an fp32 teacher for a bf16 student
    s, t, y = _logits(6, 40, dtype=torch.bfloat16), _logits(6, 45), _labels((6,), 37)
    kw = dict(beta=beta, num_classes=37)
    _, (grad,) = check(lambda s, t: fastce.distillation_loss(s, t, y, **kw), lambda s, t: trl_jsd(s, t, y, **kw),
                       lambda s, t: reference.distillation_loss(s, t, y, **kw), [s, t])
    assert torch.equal(grad[:, 37:], torch.zeros_like(grad[:, 37:]))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_nothing_kept_is_nan_with_zero_gradient(beta, reduction, path):
    x = _logits(4, 20).requires_grad_()
    loss = fastce.distillation_loss(x, _logits(4, 20), torch.full((4,), -100), beta=beta, reduction=reduction)
    loss.backward()
    assert loss.isnan() and torch.equal(x.grad, torch.zeros_like(x.grad))


@kernels_only
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_agreeing_distributions_keep_their_relative_precision(beta):
    # the late phase of distillation: the student within 1e-3 of the teacher, shifted by a constant; the
    # direct fp32 formula's error there is ~1000% of the loss, fastce's < 0.1%
    t = 4 * torch.randn(8, 257)
    s = t + 1e-3 * torch.randn_like(t) + 5.0
    loss = fastce.distillation_loss(s, t, beta=beta, reduction="none")
    exact = trl_jsd(s, t, beta=beta, reduction="none")
    assert ((loss.double() - exact).abs() / exact).max() < 1e-3


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction, path):
    # no tokens: NaN for the means (0/0), 0 for the sum, an empty 'none'; zero-size gradients, a zero ∂W
    x, h, w = torch.randn(0, 10, requires_grad=True), torch.randn(0, 4, requires_grad=True), torch.randn(10, 4)
    w.requires_grad_()
    for loss in (fastce.distillation_loss(x, torch.randn(0, 10), reduction=reduction),
                 fastce.linear_distillation_loss(h, w, torch.randn(0, 3), torch.randn(10, 3), reduction=reduction)):
        assert loss.shape == ((0,) if reduction == "none" else ())
        if reduction != "none":
            assert loss.isnan() if reduction in ("batchmean", "mean") else loss == 0
        loss.sum().backward()
    assert x.grad.shape == x.shape and h.grad.shape == h.shape and torch.equal(w.grad, torch.zeros_like(w))


@kernels_only
def test_second_backward_and_no_grad_forward():
    s, t = _logits(5, 30), _logits(5, 30)
    with torch.no_grad():
        torch.testing.assert_close(fastce.distillation_loss(s, t).double(), trl_jsd(s, t), rtol=2e-6, atol=0)
    x = s.clone().requires_grad_()
    loss = 2 * fastce.distillation_loss(x, t)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # the handoff went to the first backward: recomputed from both rows
    torch.testing.assert_close(x.grad, 2 * first)


@kernels_only
def test_training_step_moves_3x_the_logits_once_and_no_sync():
    n_rows, n_classes = 64, 1000
    s, t = _logits(n_rows, n_classes, dtype=torch.bfloat16), _logits(n_rows, n_classes, dtype=torch.bfloat16)
    y = _labels((n_rows,), n_classes, ignored=0.0)
    logits_bytes = n_rows * n_classes * 2
    for beta in (0.0, 0.5, 1.0):
        x = s.clone().requires_grad_()
        with measure() as m:
            fastce.distillation_loss(x, t, y, beta=beta).backward()
        assert m.total_bytes <= 3.05 * logits_bytes, m.report()
        assert m.syncs == 0 and m.peak_bytes <= 1.01 * logits_bytes, m.report()  # the gradient, and scalars


@kernels_only
def test_compiled_equals_eager():
    s, t, y = _logits(2, 6, 40), _logits(2, 6, 40), _labels((2, 6), 40)

    def loss_fn(s, reduction):
        return fastce.distillation_loss(s, t, y, beta=0.3, temperature=0.9, reduction=reduction)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for reduction in ("batchmean", "none"):
        results = []
        for fn in (loss_fn, compiled):
            x = s.clone().requires_grad_()
            loss = fn(x, reduction)
            loss.backward(torch.ones_like(loss) * 1.5)
            results.append((loss.detach(), x.grad))
        (eager, eager_grad), (graph, graph_grad) = results
        assert torch.equal(eager, graph) and torch.equal(eager_grad, graph_grad)


def test_module(path):
    criterion = fastce.DistillationLoss(beta=0.2, temperature=2.0, reduction="sum")
    assert "beta=0.2" in repr(criterion)
    s, t, y = _logits(4, 3, 10), _logits(4, 3, 10), _labels((4, 3), 10)
    torch.testing.assert_close(criterion(s, t, y).double(), trl_jsd(s, t, y, beta=0.2, temperature=2.0,
                                                                     reduction="sum"), rtol=2e-6, atol=1e-7)


# ---- the fused two-head form --------------------------------------------------------------------------

N_ROWS, S_FEATURES, T_FEATURES, N_CLASSES = 29, 12, 10, 203


def _heads(dtype=torch.float32, n_rows=N_ROWS, n_classes=N_CLASSES, teacher_classes=None, bias=True):
    def head(features, classes):
        return (torch.randn(n_rows, features, dtype=torch.float64).to(dtype),
                (torch.randn(classes, features, dtype=torch.float64) * 3 / features ** 0.5).to(dtype),
                torch.randn(classes, dtype=torch.float64).to(dtype) if bias else None)
    return head(S_FEATURES, n_classes), head(T_FEATURES, teacher_classes or n_classes)


def _linear_fns(y, **kw):
    def fast(h, w, b, ht, wt, bt):
        return fastce.linear_distillation_loss(h, w, ht, wt, y, student_bias=b, teacher_bias=bt, chunk_size=8, **kw)

    def via_logits(fn):
        def loss(h, w, b, ht, wt, bt):
            options = {k: kw[k] for k in kw if "scale" not in k and "softcap" not in k}
            transform = dict(student_logit_scale=kw.get("student_logit_scale", 1.0),
                             teacher_logit_scale=kw.get("teacher_logit_scale", 1.0),
                             student_softcap=kw.get("student_softcap"), teacher_softcap=kw.get("teacher_softcap"))
            if fn is trl_jsd:
                transform = {k.replace("_logit", ""): v for k, v in transform.items()}
            return fn(F.linear(h, w, b), F.linear(ht, wt, bt), y, **options, **transform)
        return loss
    return fast, via_logits(trl_jsd), via_logits(reference.distillation_loss)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", BETAS)
def test_linear_against_trl_formula(beta, reduction, path):
    # 29 rows in chunks of 8; the row walk covers the first classes of ∂W, a vocabulary walk the rest
    (student, teacher), y = _heads(), _labels((N_ROWS,), N_CLASSES)
    fast, exact, same = _linear_fns(y, beta=beta, reduction=reduction, temperature=0.8)
    check(fast, exact, same, [*student, *teacher], wrt=(0, 1, 2), upstream=beta in (0.1, 1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_linear_dtypes_scale_softcap_num_classes(dtype, path):
    # Gemma-style soft-capping and a logit scale per model; a teacher with 7 more (padding) classes; the
    # student's low-precision head within torch's own error (F.linear in that dtype, the formula in fp32)
    (student, teacher), y = _heads(dtype, teacher_classes=N_CLASSES + 7), _labels((N_ROWS,), N_CLASSES)
    for beta in (0.0, 0.5):
        fast, exact, same = _linear_fns(y, beta=beta, num_classes=N_CLASSES, student_softcap=6.0,
                                        teacher_softcap=9.0, student_logit_scale=0.8, teacher_logit_scale=1.3)
        check(fast, exact, same, [*student, *teacher], wrt=(0, 1, 2))


@kernels_only
def test_linear_walk_split_and_caller_tensors_unchanged():
    # every split of ∂W between the row walk and the vocabulary walk gives the same gradients
    (student, teacher), y = _heads(torch.bfloat16, bias=False), _labels((N_ROWS,), N_CLASSES)
    h, w, _ = student
    ht, wt, _ = (t.requires_grad_() if t is not None else t for t in teacher)
    before = snapshot(h, w, ht, wt, y)
    spec = fastce._core.DistillationSpec(beta=0.5)
    results = []
    for weight_classes in (0, 57, N_CLASSES):
        plan = distillation.HeadPlan(8, weight_classes, 50)
        x, v = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = distillation.LinearDistillationFunction.apply(x, v, None, ht, wt, None, y, spec, plan, N_CLASSES)
        loss.backward()
        results.append((loss, x.grad, v.grad))
    for loss, grad_h, grad_w in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad_h, results[0][1])
        torch.testing.assert_close(grad_w, results[0][2], rtol=2 ** -8, atol=1e-3 * grad_w.abs().max().item())
    assert ht.grad is None and wt.grad is None
    assert_unchanged((h, w, ht, wt, y), before, "linear_distillation_loss")


@kernels_only
def test_linear_compiled_equals_eager():
    (student, teacher), y = _heads(torch.bfloat16), _labels((N_ROWS,), N_CLASSES)

    def loss_fn(h, w, b, reduction):
        return fastce.linear_distillation_loss(h, w, teacher[0], teacher[1], y, student_bias=b, teacher_bias=teacher[2],
                                               beta=0.4, reduction=reduction, chunk_size=8, student_softcap=7.0)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for reduction in ("batchmean", "none"):
        results = []
        for fn in (loss_fn, compiled):
            params = [t.clone().requires_grad_() for t in student]
            loss = fn(*params, reduction)
            loss.backward(torch.full_like(loss, 0.7))
            results.append([loss.detach()] + [p.grad for p in params])
        for eager, graph in zip(*results):
            assert torch.equal(eager, graph)


def kernels_write_nothing(monkeypatch):
    from triton.runtime.interpreter import GridExecutor
    monkeypatch.setattr(GridExecutor, "__call__", lambda self, *args, **kwargs: None)


HELD_OUT = dict(n_rows=2048, hidden=256, n_classes=8192)  # 2H/V = 6.25%, as Llama-3-8B's


@kernels_only
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_linear_memory_flops_and_syncs(compiled, monkeypatch):
    # N=2048, H=256, V=8192 bf16: beyond inputs and gradients ≤ 12.5% of the student's logits' bytes, GEMMs
    # ≤ 4/3 of the minimum (two forward logits GEMMs, ∂hidden, ∂W), no host sync; compiled = eager.
    # (The kernels write nothing here, as in test_linear_cross_entropy: what they compute is tested above.)
    kernels_write_nothing(monkeypatch)
    n_rows, hidden, n_classes = HELD_OUT.values()
    h = torch.randn(n_rows, hidden).bfloat16().requires_grad_()
    w = (torch.randn(n_classes, hidden) / 16).bfloat16().requires_grad_()
    ht, wt = torch.randn(n_rows, hidden).bfloat16(), (torch.randn(n_classes, hidden) / 16).bfloat16()
    y = _labels((n_rows,), n_classes)

    def loss_fn(h, w):
        return fastce.linear_distillation_loss(h, w, ht, wt, y)

    if compiled:
        torch._dynamo.reset()
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    loss_fn(h, w).backward()  # the first call's setup is not a step's memory
    h.grad = w.grad = None
    # the kernels write nothing, so the interpreter leaves no garbage to collect after each launch
    monkeypatch.setattr(fastce.profiling, "_collect_after_launches", contextlib.nullcontext)
    with count_allocations() as counted:
        loss_fn(h, w).backward()
    logits_bytes = n_rows * n_classes * 2
    extra = counted.peak_bytes - 2 * (h.numel() + w.numel())
    plan = distillation.make_plan(n_rows, n_classes, (torch.bfloat16, hidden), (torch.bfloat16, hidden), "cpu")
    assert extra <= distillation.working_memory_bytes(n_rows, n_classes, (torch.bfloat16, hidden),
                                                      (torch.bfloat16, hidden), "cpu", plan) + 4096
    assert extra <= 0.125 * logits_bytes
    minimum = 4 * 2 * n_rows * hidden * n_classes
    assert counted.gemm_flops == distillation.gemm_flops(n_rows, n_classes, hidden, hidden, plan) <= 4 / 3 * minimum
    assert counted.syncs == 0


def test_readme_example_runs_and_trains_the_student(path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Distillation", 1)[1].split("\n## ", 1)[0]
    namespace = {}
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "README.md", "exec"), namespace)
    hidden, head, labels = namespace["student_hidden"], namespace["student_head"], namespace["labels"]
    assert torch.isfinite(namespace["loss"]) and torch.isfinite(head.weight.grad).all()
    assert torch.equal(hidden.grad[:, :5], torch.zeros_like(hidden.grad[:, :5]))  # the masked prompt


# ---- bad input -------------------------------------------------------------------------------------------

BAD_LOGITS = [
    (dict(teacher=_logits(4, 9)), "must agree"),
    (dict(teacher=_logits(4, 3, 11)), "num_classes"),
    (dict(student=torch.randint(0, 5, (4, 3, 10))), "floating point"),
    (dict(target=torch.zeros(4, 2, dtype=torch.long)), "target of shape"),
    (dict(target=torch.zeros(4, 3)), "class indices"),
    (dict(beta=1.5), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(reduction="average"), "reduction"),
    (dict(num_classes=11), "exceeds"),
    (dict(teacher=_logits(4, 3, 10).to("meta")), "on meta"),
]


@pytest.mark.parametrize("bad, match", BAD_LOGITS)
def test_bad_input_is_a_clear_error_before_any_kernel(bad, match):
    args = dict(student=_logits(4, 3, 10), teacher=_logits(4, 3, 10), target=None)
    args.update(bad)
    student, teacher, target = args.pop("student"), args.pop("teacher"), args.pop("target")
    with measure() as m, pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fastce.distillation_loss(student, teacher, target, **args)
    assert m.triton_launches == 0


@pytest.mark.parametrize("bad, match", [
    (dict(teacher_weight=torch.randn(N_CLASSES, T_FEATURES + 1)), "teacher_weight"),
    (dict(student_weight=torch.randn(N_CLASSES, S_FEATURES).double()), "one dtype"),
    (dict(teacher_hidden=torch.randn(N_ROWS + 1, T_FEATURES)), "must agree"),
    (dict(student_softcap=0.0), "softcap"),
    (dict(beta=2.0), "beta"),
])
def test_linear_bad_input(bad, match):
    student, teacher = _heads(bias=False)
    args = dict(student_hidden=student[0], student_weight=student[1], teacher_hidden=teacher[0],
                teacher_weight=teacher[1])
    args.update(bad)
    with measure() as m, pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fastce.linear_distillation_loss(**args)
    assert m.triton_launches == 0

"""fastce.linear_cross_entropy / LinearCrossEntropyLoss: cross_entropy(input @ W.T + b) by the token
walk and the vocabulary walk (fastce/linear.py), compared with fastce.reference on float64 copies
(loss and the gradients of input, weight and bias); the walk and size rules; peak memory, GEMM
flops and host syncs counted eagerly and under torch.compile; torch.compile; and drop-in
compatibility with PyTorch 2.13's F.linear_cross_entropy / nn.LinearCrossEntropyLoss, down to
torch's own OpInfo and ModuleInfo samples.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce import _head as engine, linear, reference
from fastce.profiling import count_allocations, measure

pytestmark = pytest.mark.skipif(
    not fastce.uses_triton(torch.empty(0)), reason="runs the kernels (TRITON_INTERPRET=1 on CPU)")

TORCH_HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy")
needs_torch_linear_ce = pytest.mark.skipif(not TORCH_HAS_LINEAR_CE, reason="needs PyTorch 2.13")

# Low-precision tolerance, relative to the largest |expected| of each tensor. The logits are a
# GEMM output rounded to the input dtype, as in cross_entropy(F.linear(...)) in that dtype, and
# every gradient passes through one more GEMM rounded the same way; measured, fastce's error is
# that of torch's own materialised path in the same dtype (bf16 about 5e-3, fp16 about 7e-4).
# float64 computes in float64, its scalar options included.
MAX_RELATIVE_ERROR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}

N_ROWS, HIDDEN, N_CLASSES = 29, 12, 203
# Several pieces of each walk, the last one partial: 29 rows = 3 chunks of 8 and one of 5;
# 203 classes = 4 slices of 50 and one of 3 (a padded tile).
WALKS = {
    "vocab": dict(walk="vocab", chunk_size=8, vocab_chunk_size=50),
    "tokens": dict(walk="tokens", chunk_size=8),
}


def _head(n_rows=N_ROWS, hidden=HIDDEN, n_classes=N_CLASSES, dtype=torch.float32, bias=True, lead=None,
          out_features=()):
    lead = (n_rows,) if lead is None else lead
    x = torch.randn(*lead, hidden).to(dtype).requires_grad_()
    w = (torch.randn(n_classes, *out_features, hidden) / hidden ** 0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(n_classes, *out_features).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _targets(shape, n_classes=N_CLASSES, ignore_frac=0.2):
    target = torch.randint(0, n_classes, shape)
    target[torch.rand(shape) < ignore_frac] = -100
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


def _as64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def _check_against_reference(params, target, dtype=torch.float32, **kwargs):
    loss, grads, grad_output = _loss_and_grads(fastce.linear_cross_entropy, params, target, **kwargs)
    for name in ("walk", "chunk_size", "vocab_chunk_size"):
        kwargs.pop(name, None)
    params64 = [None if p is None else p.detach().double() for p in params]
    expected, expected_grads, _ = _loss_and_grads(reference.linear_cross_entropy, params64, _as64(target),
                                                  grad_output.double(), **{k: _as64(v) for k, v in kwargs.items()})
    assert loss.dtype == dtype and loss.shape == expected.shape
    for name, actual, wanted in zip(("loss", "grad input", "grad weight", "grad bias"), (loss, *grads),
                                    (expected, *expected_grads)):
        if wanted is not None:
            assert actual.dtype == dtype, name
            error = _relative_error(actual, wanted)
            assert error <= MAX_RELATIVE_ERROR[dtype], f"{name}: error {error:.2e} of max |expected| ({dtype})"


OPTIONS = {
    "plain": {},
    "class_weights": {"weight": "random"},
    "label_smoothing": {"label_smoothing": 0.15},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.0},
    "everything": {"weight": "random", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0},
}


def _options(name, n_classes=N_CLASSES):
    kwargs = dict(OPTIONS[name])
    if kwargs.get("weight") == "random":
        kwargs["weight"] = torch.rand(n_classes) + 0.25
    return kwargs


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_loss_and_three_gradients_match_float64_reference(option, reduction, walk):
    _check_against_reference(_head(), _targets((N_ROWS,)), reduction=reduction, **WALKS[walk], **_options(option))


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets(walk, reduction):
    probs = torch.rand(N_ROWS, N_CLASSES).softmax(-1)
    _check_against_reference(_head(), probs, reduction=reduction, label_smoothing=0.1,
                             weight=torch.rand(N_CLASSES) + 0.25, **WALKS[walk])


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_other_dtypes(dtype, reduction, walk):
    _check_against_reference(_head(dtype=dtype), _targets((N_ROWS,)), dtype=dtype, reduction=reduction,
                             z_loss=1e-3, softcap=4.0, label_smoothing=0.05, **WALKS[walk])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_rule_without_bias(dtype):
    # 70 rows, 203 classes: the floors give 16-row chunks (5, the last of 6 rows) and 16-class slices
    plan = linear.make_plan(70, N_CLASSES, HIDDEN, dtype)
    assert plan == linear.Plan("tokens" if dtype == torch.float32 else "vocab", 16, 16)
    params = _head(n_rows=70, bias=False, dtype=dtype)
    _check_against_reference(params, _targets((70,)), dtype=dtype, reduction="mean")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
def test_k_dimensional_head_is_torch_k_dimensional_loss(target_kind, reduction):
    # linear_weight (C, d1, d2, H): logits (N, C, d1, d2), cross-entropy over C at each position
    out_features = (3, 2)
    params = _head(n_rows=9, n_classes=7, out_features=out_features)
    if target_kind == "indices":
        target = _targets((9, *out_features), n_classes=7)
    else:
        target = torch.rand(9, 7, *out_features).softmax(1)
    kwargs = dict(reduction=reduction, weight=torch.rand(7) + 0.25, label_smoothing=0.1, chunk_size=4)
    _check_against_reference(params, target, **kwargs)
    if TORCH_HAS_LINEAR_CE:
        ours, ours_grads, grad_output = _loss_and_grads(fastce.linear_cross_entropy, params, target, **kwargs)
        kwargs.pop("chunk_size")
        theirs, their_grads, _ = _loss_and_grads(F.linear_cross_entropy, params, target, grad_output, **kwargs)
        assert ours.shape == theirs.shape
        for mine, their in zip((ours, *ours_grads), (theirs, *their_grads)):
            torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("walk", list(WALKS))
def test_weight_and_bias_gradients_are_summed_in_fp32(walk):
    # 9 chunks of 2 rows, W = 0 (every p = 1/4), x = 1. The first chunk's rows carry an upstream
    # gradient of 256, so that chunk adds -384 (target class) and 128 (other classes) to every entry
    # of dW and db; each later chunk adds -1.5 and 0.5. Summed in bf16 the later additions round
    # wrongly (128 + 0.5 is a tie that stays 128; -384 - 1.5 becomes -386), giving -400 and 128;
    # summed in fp32 (across the token walk's chunks, or inside the vocabulary walk's one GEMM per
    # slice) the totals are exact and representable in bf16: -396 and 132.
    n_rows, n_classes = 18, 4
    x = torch.ones(n_rows, 2, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(n_classes, 2, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.bfloat16, requires_grad=True)
    target = torch.zeros(n_rows, dtype=torch.long)
    loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none", walk=walk, chunk_size=2,
                                       vocab_chunk_size=2)
    grad_output = torch.ones(n_rows, dtype=torch.bfloat16)
    grad_output[:2] = 256
    loss.backward(grad_output)
    expected = torch.tensor([-396.0, 132.0, 132.0, 132.0], dtype=torch.bfloat16)
    assert torch.equal(b.grad, expected)
    assert torch.equal(w.grad, expected[:, None].expand(n_classes, 2))
    assert torch.equal(x.grad, torch.zeros_like(x))
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(4.0)))


@pytest.mark.parametrize("walk", list(WALKS))
def test_loss_is_summed_in_fp32(walk):
    # 4096 rows of loss log(4) = 1.386 in bf16: a bf16 running sum stalls once an addend falls below
    # half an ulp of the total (torch 2.13's chunked path returns 4.0 for 10.89 at N=1024, V=32000)
    n_rows = 4096
    x = torch.ones(n_rows, 2, dtype=torch.bfloat16)
    w = torch.zeros(4, 2, dtype=torch.bfloat16)
    loss = fastce.linear_cross_entropy(x, w, torch.zeros(n_rows, dtype=torch.long), reduction="sum", walk=walk,
                                       chunk_size=512)
    assert loss.item() == torch.tensor(n_rows * math.log(4.0), dtype=torch.bfloat16).item()


# ---------------------------------------------------------------------------------------------
# The rules, and what they cost


def test_walk_rule():
    bf16, fp32 = torch.bfloat16, torch.float32
    # language-model heads in bf16: the fp32 accumulator would be 2H/N of the logits, more than the
    # engine's 5% budget (fastce/_head.py)
    assert linear.choose_walk(8192, 128256, 4096, bf16) == "vocab"  # Llama-3-8B: 100%
    assert linear.choose_walk(2048, 8192, 256, bf16) == "vocab"  # 25%
    # where the accumulator fits the budget beside a chunk and its scratch, the token walk (3 GEMMs, not 4)
    assert linear.choose_walk(64 * 256, 8192, 256, bf16) == "tokens"
    assert linear.choose_walk(40 * 256, 8192, 256, bf16) == "vocab"
    # fp32 and fp64 accumulate in ∂W itself; K-dimensional heads always walk tokens
    assert linear.choose_walk(16, 128256, 4096, fp32) == "tokens"
    assert linear.choose_walk(8, 7 * 6, 12, bf16, positions=6) == "tokens"
    with pytest.raises(ValueError, match="K-dimensional"):
        linear.make_plan(8, 7, 12, bf16, positions=6, walk="vocab")


def test_size_rule():
    # each walk's buffer takes the engine's 5% of the logits beside the per-row loss and lse
    assert linear.make_plan(8192, 128256, 4096, torch.bfloat16) == linear.Plan("vocab", 409, 6408)
    assert linear.make_plan(2048, 8192, 256, torch.bfloat16) == linear.Plan("vocab", 101, 405)
    assert linear.make_plan(2048, 8192, 256, torch.float32) == linear.Plan("tokens", 101, 407)
    # the token walk with an fp32 accumulator: the chunk and its scratch share what the accumulator leaves
    assert linear.make_plan(64 * 256, 8192, 256, torch.bfloat16).chunk_rows == 149
    # floors (one tensor-core tile) and the 1 GiB ceiling per buffer
    assert linear.make_plan(100, 100, 8, torch.bfloat16)[1:3] == (16, 16)
    huge = linear.make_plan(2**20, 262144, 4096, torch.bfloat16)
    assert huge.chunk_rows * 262144 * 2 <= engine.MAX_BUFFER_BYTES
    assert huge.slice_classes * 2**20 * 2 <= engine.MAX_BUFFER_BYTES


@pytest.fixture
def kernels_write_nothing(monkeypatch):
    """Triton launches become no-ops. The kernels allocate nothing (their launchers do, in torch),
    so a step's allocations and GEMMs stay what they are, at shapes where the interpreter would
    take minutes; what the kernels compute is tested at small shapes."""
    from triton.runtime.interpreter import GridExecutor
    monkeypatch.setattr(GridExecutor, "__call__", lambda self, *args, **kwargs: None)


def _training_step(n_rows, hidden, n_classes, dtype, compiled, **kwargs):
    """(peak bytes beyond inputs and gradients, the AllocationCount, logits' bytes) of one
    forward + backward, eager or compiled by Inductor, after a first call (first-call setup is
    not a step's memory)."""
    x = torch.randn(n_rows, hidden).to(dtype).requires_grad_()
    w = (torch.randn(n_classes, hidden) / hidden ** 0.5).to(dtype).requires_grad_()
    b = torch.zeros(n_classes, dtype=dtype, requires_grad=True) if kwargs.pop("bias", False) else None
    target = kwargs.pop("target", None)
    target = _targets((n_rows,), n_classes) if target is None else target
    reduction = kwargs.pop("reduction", "mean")

    def loss_fn(x, w, b):
        return fastce.linear_cross_entropy(x, w, target, linear_bias=b, validate=False, reduction=reduction,
                                           **kwargs)

    if compiled:
        torch._dynamo.reset()
        loss_fn = torch.compile(loss_fn, fullgraph=True)

    def step(x, w, b):
        loss = loss_fn(x, w, b)
        loss.backward(torch.ones_like(loss) if loss.dim() else None)

    step(x, w, b)
    for p in (x, w, b):
        if p is not None:
            p.grad = None
    with count_allocations() as counted:
        step(x, w, b)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in (x, w, b) if p is not None)
    return counted.peak_bytes - grads, counted, n_rows * n_classes * dtype.itemsize


SCALARS = 256  # bytes of 0-d tensors and 2-element divisors, which the formula leaves out
LLAMA_3_8B = dict(n_rows=8192, hidden=4096, n_classes=128256)  # 8k tokens, lm_head of Llama-3-8B
HELD_OUT = dict(n_rows=2048, hidden=256, n_classes=8192)       # the same 2H/V ≈ 6%


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_memory_flops_and_syncs_at_the_llama_ratio(dtype, compiled, kernels_write_nothing):
    # N=2048, H=256, V=8192 (2H/V = 6.25%, as Llama-3-8B's 2·4096/128256): beyond the inputs and
    # gradients a training step holds at most 10% of the logits' bytes (the engine's budget: 5%), runs
    # GEMMs of at most 4/3 of 6NHV flops and no host sync (validate=False). Compiled = eager.
    n_rows, hidden, n_classes = HELD_OUT.values()
    extra, counted, logits_bytes = _training_step(n_rows, hidden, n_classes, dtype, compiled)
    plan = linear.make_plan(n_rows, n_classes, hidden, dtype)
    assert extra <= linear.working_memory_bytes(n_rows, n_classes, hidden, dtype, plan) + SCALARS
    assert linear.working_memory_bytes(n_rows, n_classes, hidden, dtype, plan) <= 0.10 * logits_bytes
    assert extra >= 0.049 * logits_bytes  # the rule's buffer is what was counted
    assert counted.gemm_flops == (8 if plan.walk == "vocab" else 6) * n_rows * hidden * n_classes
    assert counted.syncs == 0


def test_memory_formula_extrapolates_to_llama_3_8b():
    # the counted buffers (test above) by the formula at the real head: 5% of the 2.1 GB logits
    for dtype in (torch.bfloat16, torch.float32):
        plan = linear.make_plan(*LLAMA_3_8B.values(), dtype)
        logits_bytes = math.prod(LLAMA_3_8B[k] for k in ("n_rows", "n_classes")) * dtype.itemsize
        assert linear.working_memory_bytes(*LLAMA_3_8B.values(), dtype, plan) <= 0.0626 * logits_bytes


SMALL_LM = dict(n_rows=128, hidden=16, n_classes=512)  # 2H/V = 6.25% again, small enough to compute


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("reduction, option", [("mean", "plain"), ("sum", "everything"), ("none", "everything"),
                                               ("mean", "probabilities")])
def test_counted_memory_matches_the_formula_for_every_option(walk, reduction, option):
    n_rows, hidden, n_classes = SMALL_LM.values()
    kwargs = {} if option == "probabilities" else _options(option, n_classes)
    if option == "probabilities":
        kwargs["target"] = torch.rand(n_rows, n_classes).softmax(-1)
    extra, counted, logits_bytes = _training_step(n_rows, hidden, n_classes, torch.bfloat16, False, walk=walk,
                                                  reduction=reduction, bias=True, **kwargs)
    plan = linear.make_plan(n_rows, n_classes, hidden, torch.bfloat16, walk=walk)
    formula = linear.working_memory_bytes(n_rows, n_classes, hidden, torch.bfloat16, plan, bias=True,
                                          prob_target=option == "probabilities")
    # the formula is the peak of either pass; the backward's (∂W allocated) holds its walk's buffer
    buffer = n_rows * plan.slice_classes if walk == "vocab" else plan.chunk_rows * n_classes
    assert 2 * buffer <= extra <= formula + SCALARS
    # 4/3 of 6NHV at most, and the bias's column sums (GEMMs with a row of ones: 2NV)
    assert counted.gemm_flops <= 8 * n_rows * hidden * n_classes + 2 * n_rows * n_classes and counted.syncs == 0


@pytest.mark.parametrize("walk, reduction", [("vocab", "none"), ("tokens", "mean")])
def test_compiled_step_costs_what_eager_costs(walk, reduction):
    # Inductor: the same GEMMs, and the same peak (the forward's unit gradients, one scale per row
    # or one for all, are scaled over their own donated buffers)
    costs = [_training_step(*SMALL_LM.values(), torch.bfloat16, compiled, walk=walk, reduction=reduction)[:2]
             for compiled in (False, True)]
    (eager_extra, eager), (compiled_extra, compiled) = costs
    assert compiled_extra == eager_extra
    assert (compiled.gemm_flops, compiled.gemm_calls, compiled.syncs) == (eager.gemm_flops, eager.gemm_calls, 0)


def test_bytes_outside_the_gemms_are_small_at_wide_heads():
    # H = 1024 bf16: what the kernels and other non-GEMM operators move is small next to what
    # the GEMMs move (the chunk's and slice's kernels: 2 bytes per logit each way)
    n_rows, hidden, n_classes = 64, 1024, 2048
    x = torch.randn(n_rows, hidden).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(n_classes, hidden) / 32).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, n_classes, (n_rows,))
    with measure() as m:
        fastce.linear_cross_entropy(x, w, target, validate=False, walk="vocab", chunk_size=16,
                                    vocab_chunk_size=512).backward()
    gemm_bytes = sum(m.ops[name].read + m.ops[name].write for name in ("mm", "addmm") if name in m.ops)
    assert m.total_bytes - gemm_bytes <= 0.25 * gemm_bytes, m.report()


# ---------------------------------------------------------------------------------------------
# Behaviour


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


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("needed", ["weight", "input"])
def test_gradients_only_for_tensors_that_require_them(walk, needed):
    x, w, b = _head()
    for name, t in (("input", x), ("weight", w), ("bias", b)):
        t.requires_grad_(name == needed)
    target = _targets((N_ROWS,))
    with count_allocations() as counted:
        fastce.linear_cross_entropy(x, w, target, linear_bias=b, **WALKS[walk]).backward()
    assert (x.grad is None) == (needed != "input") and (w.grad is None) == (needed != "weight") and b.grad is None
    # two GEMMs of 2NHV each: logits once and the one gradient
    assert counted.gemm_flops == (4 + 2 * (walk == "vocab" and needed == "weight")) * N_ROWS * HIDDEN * N_CLASSES
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    reference.linear_cross_entropy(x64, w64, target, linear_bias=b.double()).backward()
    grad, expected = (x.grad, x64.grad) if needed == "input" else (w.grad, w64.grad)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("validate, max_syncs", [(False, 0), (True, 1)])
def test_host_syncs(reduction, validate, max_syncs, walk):
    x, w, b = _head()
    target = _targets((N_ROWS,))
    with measure() as m:
        loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                           validate=validate, **WALKS[walk])
        loss.backward(_upstream(loss))
    assert m.syncs == max_syncs, m.report()


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_matches_eager(reduction, walk):
    torch._dynamo.reset()
    x, w, b = _head(n_rows=13, hidden=8, n_classes=40)
    target = _targets((13,), n_classes=40)
    weight = torch.rand(40)

    def loss_fn(x, w, b):
        return fastce.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, reduction=reduction,
                                           label_smoothing=0.1, z_loss=1e-3, softcap=10.0, walk=walk, chunk_size=4,
                                           vocab_chunk_size=16)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    grad_output = torch.rand(13) if reduction == "none" else torch.tensor(0.7)
    results = [_loss_and_grads(lambda x, w, t, linear_bias: fn(x, w, linear_bias), (x, w, b), target,
                               grad_output)[:2] for fn in (loss_fn, compiled)]
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dimensional_head_compiles(reduction):
    torch._dynamo.reset()
    params = _head(n_rows=6, hidden=8, n_classes=5, out_features=(3,))
    target = _targets((6, 3), n_classes=5)

    def loss_fn(x, w, t, linear_bias):
        return fastce.linear_cross_entropy(x, w, t, linear_bias=linear_bias, reduction=reduction, chunk_size=4)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads, grad_output = _loss_and_grads(loss_fn, params, target)
    compiled_loss, compiled_grads, _ = _loss_and_grads(compiled, params, target, grad_output)
    for compiled_value, eager_value in zip((compiled_loss, *compiled_grads), (eager_loss, *eager_grads)):
        torch.testing.assert_close(compiled_value, eager_value)


@pytest.mark.parametrize("walk", list(WALKS))
def test_leading_dims_and_single_token(walk):
    _check_against_reference(_head(lead=(3, 5)), _targets((3, 5)), reduction="none", **WALKS[walk])  # loss (3, 5)
    _check_against_reference(_head(lead=()), torch.tensor(7), reduction="none", walk=walk)  # (H,) input, () target
    _check_against_reference(_head(n_rows=1), torch.tensor([7]), reduction="mean", z_loss=1e-2, walk=walk)


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_and_empty_batch(reduction, walk):
    for n_rows in (10, 0):
        x, w, b = _head(n_rows)
        target = torch.full((n_rows,), -100)
        loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, **WALKS[walk])
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
                                            return_lse=True, chunk_size=8)
    assert lse.dtype == torch.float32 and lse.shape == (N_ROWS,)
    logits = F.linear(*(t.detach().double() for t in (x, w, b)))
    expected = torch.logsumexp(3.0 * torch.tanh(logits / 3.0), dim=-1).masked_fill(target == -100, 0.0)
    torch.testing.assert_close(lse.double(), expected, rtol=MAX_RELATIVE_ERROR[dtype], atol=MAX_RELATIVE_ERROR[dtype])


@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_through_retained_graph_recomputes(walk, reduction):
    x, w, b = _head()
    target = _targets((N_ROWS,))
    loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, **WALKS[walk])
    grad_output = _upstream(loss)
    loss.backward(grad_output, retain_graph=True)
    first = [p.grad.clone() for p in (x, w, b)]
    loss.backward(grad_output * 0.5)
    for p, grad in zip((x, w, b), first):
        torch.testing.assert_close(p.grad, 1.5 * grad)


@pytest.mark.parametrize("walk", list(WALKS))
def test_out_of_range_class_without_validation_gives_nan_for_its_row(walk):
    x, w, b = _head()
    target = _targets((N_ROWS,), ignore_frac=0.0)
    target[4] = N_CLASSES + 3
    loss = fastce.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none", validate=False, **WALKS[walk])
    assert torch.isnan(loss[4]) and torch.isfinite(torch.cat([loss[:4], loss[5:]])).all()
    loss.backward(torch.ones_like(loss))
    assert torch.isnan(x.grad[4]).all() and torch.isfinite(torch.cat([x.grad[:4], x.grad[5:]])).all()
    with pytest.raises(IndexError, match=str(N_CLASSES + 3)):
        fastce.linear_cross_entropy(x, w, target, linear_bias=b)


@pytest.mark.parametrize("make_bad, error", [
    (lambda x, w, b, t: (x[:, :-1], w, b, t), "in_features"),                      # in_features differ
    (lambda x, w, b, t: (x, w, b[:-1], t), r"linear_bias shape \(203,\), got \(202,\)"),
    (lambda x, w, b, t: (x, w.double(), b, t), "one dtype"),                       # dtypes differ
    (lambda x, w, b, t: (x, w[0], b, t), "dimensionality at least 2"),             # 1-D weight
    (lambda x, w, b, t: (x[None], w[:, None], b[:, None], t[None]), "dimensionality 1 or 2, got 3"),  # K-dim, 3-D input
    (lambda x, w, b, t: (x[0], w[:, None], b[:, None], t[:1]), "requires batched input"),
    (lambda x, w, b, t: (x, w, b, t[:-1]), "target of shape"),                     # target shape
    (lambda x, w, b, t: (x, w, b, t.float()), "target"),                           # float class indices
    (lambda x, w, b, t: (x, w, b, t.int()), "Long or Byte"),                       # int32 class indices
    (lambda x, w, b, t: (x[0, 0], w, b, t), "dimensionality 1 or 2, got 0"),       # 0-dim input
])
def test_bad_arguments_raise_clear_errors_before_any_kernel(make_bad, error):
    x, w, b = _head()
    args = make_bad(x.detach(), w.detach(), b.detach(), torch.randint(0, N_CLASSES, (N_ROWS,)))
    with measure() as m, pytest.raises(RuntimeError, match=error):
        fastce.linear_cross_entropy(*args[:2], args[3], linear_bias=args[2])
    assert m.triton_launches == 0


def test_probabilities_refuse_an_ignore_index_and_k_dimensional_heads_the_vocabulary_walk():
    x, w, _ = _head()
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):  # torch's rule, even for -100
        fastce.linear_cross_entropy(x, w, torch.rand(N_ROWS, N_CLASSES), ignore_index=-100)
    with pytest.raises(ValueError, match="walk"):
        fastce.linear_cross_entropy(x, w[:, None], _targets((N_ROWS, 1)), walk="vocab")


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


# ---------------------------------------------------------------------------------------------
# Drop-in for PyTorch 2.13


@needs_torch_linear_ce
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_drop_in_for_torch_linear_cross_entropy(reduction):
    x, w, b = _head()
    target = _targets((N_ROWS,))
    kwargs = dict(weight=torch.rand(N_CLASSES), reduction=reduction, ignore_index=None)
    ours, ours_grads, grad_output = _loss_and_grads(fastce.linear_cross_entropy, (x, w, b), target, **kwargs)
    for options in (None, torch.nn.LinearCrossEntropyOptions()):
        theirs, their_grads, _ = _loss_and_grads(F.linear_cross_entropy, (x, w, b), target, grad_output,
                                                 options=options, **kwargs)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for mine, their in zip(ours_grads, their_grads):
            torch.testing.assert_close(mine, their, rtol=1e-4, atol=1e-6)
    single = fastce.linear_cross_entropy(x[0], w, target[0].clamp_min(0), reduction=reduction)
    assert single.shape == F.linear_cross_entropy(x[0], w, target[0].clamp_min(0), reduction=reduction).shape


def _torch_answer(fn, args, kwargs, wrt):
    """Loss and gradients of `wrt` (positions in args, "linear_bias") by fn on float64 copies."""
    args64 = [_as64(a).detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs64 = {k: _as64(v).detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}
    return _run_sample(fn, args64, kwargs64, wrt)


def _run_sample(fn, args, kwargs, wrt, grad_output=None, extra=()):
    loss = fn(*args, **kwargs)
    leaves = [args[i] if isinstance(i, int) else kwargs[i] for i in wrt] + list(extra)
    grad_output = torch.rand_like(loss) + 0.5 if grad_output is None else grad_output.to(loss.dtype)
    grads = torch.autograd.grad(loss, leaves, grad_output, allow_unused=True)
    return loss.detach(), grads, grad_output


def _assert_matches(actual, expected, dtype, what, torch_in_dtype):
    """fastce's answer `actual` against torch's float64 one `expected`: within the tolerance table,
    or at most twice as far as torch's own answer in the same dtype (`torch_in_dtype`; the
    samples' logits reach 20, where one bf16 rounding of a logit moves a loss by 0.06)."""
    (loss, grads, _), (wanted, wanted_grads, _), (theirs, their_grads, _) = actual, expected, torch_in_dtype
    assert loss.shape == wanted.shape and loss.dtype == dtype, what
    for name, value, reference_value, torch_value in zip(("loss", *range(len(grads))), (loss, *grads),
                                                         (wanted, *wanted_grads), (theirs, *their_grads)):
        if reference_value is None or reference_value.numel() == 0:
            continue
        bound = max(MAX_RELATIVE_ERROR[dtype], 2 * _relative_error(torch_value, reference_value))
        error = _relative_error(value, reference_value)
        assert error <= bound, f"{what}: {name} off by {error:.2e} of max ({dtype}; bound {bound:.1e})"


def _torch_opinfo():
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    from torch.testing._internal.common_methods_invocations import op_db
    return next(op for op in op_db if op.name == "nn.functional.linear_cross_entropy" and not op.variant_test_name)


@needs_torch_linear_ce
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_torch_opinfo_samples(device, path, dtype):
    # every sample torch's own test suite runs for F.linear_cross_entropy (2-D and K-dimensional
    # heads, class indices and probabilities, weights, bias, ignore_index, each reduction), on the
    # kernels and on the pure-PyTorch path, with torch's answer in float64 as the oracle
    samples = list(_torch_opinfo().sample_inputs(device, dtype, requires_grad=True))
    assert len(samples) > 100
    # the pure-PyTorch path computes what torch computes: every other sample there suffices
    for i, sample in enumerate(samples[:: 2 if path == "reference" else 1]):
        args = (sample.input, *sample.args)
        wrt = [0, 1] + (["linear_bias"] if "linear_bias" in sample.kwargs else [])
        wrt += [2] if args[2].requires_grad else []
        expected = _torch_answer(F.linear_cross_entropy, args, sample.kwargs, wrt)
        actual = _run_sample(fastce.linear_cross_entropy, args, sample.kwargs, wrt, expected[2])
        theirs = _run_sample(F.linear_cross_entropy, args, sample.kwargs, wrt, expected[2])
        _assert_matches(actual, expected, dtype, f"sample {i}: {sample}", theirs)


@needs_torch_linear_ce
def test_torch_opinfo_error_inputs():
    for error_input in _torch_opinfo().error_inputs("cpu"):
        sample = error_input.sample_input
        if sample.input.dim() > 2 and sample.args[0].dim() == 2:
            # fastce's one extension: a 2-D linear_weight takes input (…, H), as hidden states (B, T, H)
            # come; this sample's target does not fit its input either, which fastce refuses
            with pytest.raises(RuntimeError, match="target"):
                fastce.linear_cross_entropy(sample.input, *sample.args, **sample.kwargs)
            continue
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            fastce.linear_cross_entropy(sample.input, *sample.args, **sample.kwargs)


@needs_torch_linear_ce
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_moduleinfo_samples(device, path, dtype):
    # torch's ModuleInfo samples for nn.LinearCrossEntropyLoss: fastce's module built with the same
    # arguments (out_features, ignore_index None or out of range, smoothing, weights, bias, options)
    # and loaded with the torch module's state_dict gives torch's float64 answer
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_modules import module_db
    module_info = next(m for m in module_db if m.module_cls is torch.nn.LinearCrossEntropyLoss)
    samples = module_info.module_inputs_func(module_info, device=device, dtype=dtype, requires_grad=True,
                                             training=True)
    assert len(samples) > 500
    # a spread twelfth of them (a 24th on the reference path), another one per dtype
    stride = 24 if path == "reference" else 12
    for i, sample in enumerate(samples[(dtype == torch.bfloat16) * stride // 2::stride]):
        kwargs = dict(sample.constructor_input.kwargs)
        ours = fastce.LinearCrossEntropyLoss(*sample.constructor_input.args, **kwargs)
        theirs = torch.nn.LinearCrossEntropyLoss(*sample.constructor_input.args, **dict(
            kwargs, options=None, dtype=torch.float64, weight=_as64(kwargs.get("weight"))))
        theirs_in_dtype = torch.nn.LinearCrossEntropyLoss(*sample.constructor_input.args, **kwargs)
        theirs_in_dtype.load_state_dict(ours.state_dict())
        theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
        input, target = sample.forward_input.args
        expected = _module_answer(theirs, input.double(), _as64(target))
        actual = _module_answer(ours, input, target, expected[2])
        _assert_matches(actual, expected, dtype, f"sample {i}: {sample.constructor_input}",
                        _module_answer(theirs_in_dtype, input, target, expected[2]))


def _module_answer(module, input, target, grad_output=None):
    """Loss and gradients of input and parameters of `module` at a fresh leaf copy of input."""
    input = input.detach().requires_grad_()
    return _run_sample(module, (input, target), {}, [0], grad_output, extra=list(module.parameters()))


def test_module_owns_linear_and_matches_the_functional():
    criterion = fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, bias=True, weight=torch.rand(N_CLASSES),
                                              label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    assert set(criterion.state_dict()) == {"weight", "linear.weight", "linear.bias"}
    assert "weight" in dict(criterion.named_buffers())
    assert (criterion.num_classes, criterion.out_features, criterion.ignore_index) == (N_CLASSES, (), None)
    x = torch.randn(N_ROWS, HIDDEN)
    target = _targets((N_ROWS,))
    expected = reference.linear_cross_entropy(
        x, criterion.linear.weight.detach(), target, linear_bias=criterion.linear.bias.detach(),
        weight=criterion.weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    torch.testing.assert_close(criterion(x, target), expected)
    bare = fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, dtype=torch.float64)
    assert set(bare.state_dict()) == {"linear.weight"} and bare.linear.weight.dtype == torch.float64
    with pytest.raises(RuntimeError, match=r"expected weight shape to be \(203,\)"):
        fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, weight=torch.rand(3))
    with pytest.raises(RuntimeError, match=r"label_smoothing to be in range \[0, 1\]"):
        fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, label_smoothing=1.5)


@needs_torch_linear_ce
@pytest.mark.parametrize("bias, weighted, out_features", [(False, False, ()), (True, True, ()), (True, True, (3, 2))])
def test_module_state_dict_loads_into_torch_module_and_back(bias, weighted, out_features):
    weight = torch.rand(N_CLASSES) if weighted else None
    kwargs = dict(bias=bias, out_features=out_features)
    ours = fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, weight=weight, **kwargs)
    theirs = torch.nn.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, weight=torch.zeros(N_CLASSES) if weighted else None,
                                             **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x, target = torch.randn(N_ROWS, HIDDEN), _targets((N_ROWS, *out_features))
    torch.testing.assert_close(ours(x, target), theirs(x, target))
    fresh = fastce.LinearCrossEntropyLoss(HIDDEN, N_CLASSES, weight=torch.ones(N_CLASSES) if weighted else None,
                                          **kwargs)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh(x, target), theirs(x, target))

"""Regressions of issue 23 (found by fuzzing the newer surfaces against torch), written against the public
API only (fastce.*, fastce.distributed.*, fastce.reference.*), so that they survive a refactor of the
internals. Each runs on the Triton kernels (the interpreter on the CPU) and on the pure-PyTorch path (the
`path` fixture) where both exist, with torch in float64 (or a float64 formula written here) as the oracle.

* test_item1 … test_item8: one test per item of the issue, in its order;
* test_upstream_gradient_layouts: every differentiable public function's backward fed a stride-0
  (expanded), a transposed and a sliced upstream gradient, output by output;
* test_class_index_layouts: every class-index argument sliced, transposed and expanded.
Item 3 (a rank without classes on the pure-PyTorch path) and a rank failing after the argument exchange
are cases of tests/_distributed.py.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce import reference

from _support import (
    as64,
    assert_close_dtype,
    assert_unchanged,
    clone_keep_strides,
    count_kernel_launches,
    make_weight,
    snapshot,
)

# Small shapes: rows (B, T), classes C (odd, not a power of two), hidden size H.
B, T, C, H = 3, 4, 7, 5
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Layouts


def upstream_gradient(shape, layout: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """A random upstream gradient of `shape` in a layout autograd or a caller may hand to backward:

    dense      : contiguous
    expanded   : one value expanded, every stride 0 (what `out.sum().backward()` hands out)
    transposed : a buffer of the reversed shape, its dims reversed (≥ 2 dims)
    sliced     : every other element of the last dim of a buffer twice as wide, from offset 1: strides
                 (…, 2T, 2), which merge, so that reshape(-1) keeps it a view (of stride 2)
    """
    shape = tuple(shape)
    kw = dict(device=device, dtype=dtype)  # made in place: a conversion would make a copy, dense
    if layout == "dense":
        g = torch.randn(shape, **kw)
    elif layout == "expanded":
        g = (torch.rand((), **kw) + 0.5).expand(shape)
    elif layout == "transposed":
        assert len(shape) >= 2
        g = torch.randn(shape[::-1], **kw).permute(*reversed(range(len(shape))))
    elif layout == "sliced":
        g = torch.randn(*shape[:-1], 2 * shape[-1], **kw)[..., 1::2]
    else:
        raise ValueError(layout)
    assert g.shape == shape and g.is_contiguous() == (layout == "dense"), (layout, g.stride())
    return g


def class_indices(shape, n_classes: int, layout: str, device="cpu") -> torch.Tensor:
    """Random int64 class indices of `shape` (one of them ignore_index, but for 'expanded') in a layout:

    contiguous : ordinary
    sliced     : every other element of the last dim of a buffer twice as wide, from offset 1 (strides
                 that merge: reshape(-1) keeps it a view); the elements skipped hold other valid
                 classes, so reading them gives wrong numbers, not a crash
    transposed : a buffer of the reversed shape, its dims reversed (≥ 2 dims)
    expanded   : one class expanded, every stride 0
    """
    shape = tuple(shape)
    if layout == "expanded":
        t = torch.randint(0, n_classes, (), device=device).expand(shape)
        assert all(s == 0 for s in t.stride())
        return t
    values = torch.randint(0, n_classes, shape, device=device)
    values.view(-1)[1] = IGNORE
    if layout == "contiguous":
        return values
    if layout == "sliced":
        buf = torch.randint(0, n_classes, (*shape[:-1], 2 * shape[-1]), device=device)
        t = buf[..., 1::2]
        t.copy_(values)
    elif layout == "transposed":
        assert len(shape) >= 2
        dims = tuple(reversed(range(len(shape))))
        t = values.permute(*dims).contiguous().permute(*dims)
    else:
        raise ValueError(layout)
    assert torch.equal(t, values) and not t.is_contiguous()
    return t


# ---------------------------------------------------------------------------------------------
# The differentiable public functions, as cases: leaves (the inputs gradients flow into), the call,
# and a float64 oracle (torch where torch has the op, else the formula written out)


class Case(NamedTuple):
    leaves: Sequence[torch.Tensor]   # inputs that get a gradient
    fast: Callable                   # (*leaves) -> tuple of outputs (the differentiable ones first)
    oracle: Callable                 # (*float64 leaves) -> the same outputs, float64
    outputs: int                     # how many of the outputs are differentiable
    constants: Sequence = ()         # other tensors of the call (checked unmodified)


def _masked(values, target):
    return torch.where(target != IGNORE, values, torch.zeros_like(values))


def _rows_lse(logits, target, dim):
    return _masked(torch.logsumexp(logits, dim), target)


def _token_stats64(logits, target, temperature):
    """(logprob, entropy) of softmax(logits / T), class dim last, 0 where ignored."""
    logp = torch.log_softmax(logits / temperature, -1)
    safe = torch.where(target != IGNORE, target, torch.zeros_like(target))
    logprob = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return _masked(logprob, target), _masked(entropy, target)


def _reduce64(per_row, target, reduction):
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (target != IGNORE).sum()


def _logits(shape, device, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).float().to(device)


def case_cross_entropy(target_layout="contiguous", reduction="none", device="cpu"):
    # (B, C, T) logits: the K-dimensional loss, target (B, T), class dim strided
    x = _logits((B, C, T), device)
    t = class_indices((B, T), C, target_layout, device)
    w = make_weight(C, device)

    def fast(x):
        return fastce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, return_lse=True)

    def oracle(x):
        loss = F.cross_entropy(x, t.contiguous(), w.double(), reduction=reduction, label_smoothing=0.1)
        return loss, _rows_lse(x, t, 1)

    return Case([x], fast, oracle, 2, (t, w))


def case_focal_loss(target_layout="contiguous", reduction="none", device="cpu"):
    x = _logits((B, C, T), device)
    t = class_indices((B, T), C, target_layout, device)
    alpha = make_weight(C, device)
    gamma = 2.0

    def fast(x):
        return (fastce.focal_loss(x, t, gamma=gamma, alpha=alpha, reduction=reduction),)

    def oracle(x):
        logp = torch.log_softmax(x, 1)
        safe = torch.where(t != IGNORE, t, torch.zeros_like(t))
        logp_y = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        per_row = _masked(-alpha.double()[safe] * (-torch.expm1(logp_y)).pow(gamma) * logp_y, t)
        return (_reduce64(per_row, t, reduction),)

    return Case([x], fast, oracle, 1, (t, alpha))


def _linear_case(walk, target_layout, reduction, device):
    if walk == "kdim":  # input (B, H), linear_weight (C, T, H): torch's K-dimensional loss, target (B, T)
        h, W, b = _logits((B, H), device, 1.0), _logits((C, T, H), device, 1.0), _logits((C, T), device, 1.0)
        walk_arg = None
    else:               # input (B, T, H), linear_weight (C, H)
        h, W, b = _logits((B, T, H), device, 1.0), _logits((C, H), device, 1.0), _logits((C,), device, 1.0)
        walk_arg = walk
    t = class_indices((B, T), C, target_layout, device)

    def fast(h, W, b):
        return fastce.linear_cross_entropy(h, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                           return_lse=True, walk=walk_arg)

    def oracle(h, W, b):
        if walk == "kdim":
            loss = F.linear_cross_entropy(h, W, t.contiguous(), linear_bias=b, reduction=reduction,
                                          label_smoothing=0.1)
            logits = (h @ W.reshape(-1, H).t() + b.reshape(-1)).reshape(B, C, T)
            return loss, _rows_lse(logits, t, 1)
        # torch's F.linear_cross_entropy takes 1- or 2-dimensional input: the rows flattened
        loss = F.linear_cross_entropy(h.reshape(-1, H), W, t.reshape(-1), linear_bias=b, reduction=reduction,
                                      label_smoothing=0.1)
        return (loss.reshape(B, T) if reduction == "none" else loss), _rows_lse(F.linear(h, W, b), t, -1)

    return Case([h, W, b], fast, oracle, 2, (t,))


def case_linear_cross_entropy_tokens(target_layout="contiguous", reduction="none", device="cpu"):
    return _linear_case("tokens", target_layout, reduction, device)


def case_linear_cross_entropy_vocab(target_layout="contiguous", reduction="none", device="cpu"):
    return _linear_case("vocab", target_layout, reduction, device)


def case_linear_cross_entropy_kdim(target_layout="contiguous", reduction="none", device="cpu"):
    return _linear_case("kdim", target_layout, reduction, device)


def case_binary_cross_entropy_with_logits(device="cpu"):
    x = _logits((B, T), device)
    y = torch.rand(B, T, dtype=torch.float64).float().to(device)  # soft labels, with a gradient into them
    w, pw = make_weight(T, device), make_weight(T, device)

    def fast(x, y):
        return (fastce.binary_cross_entropy_with_logits(x, y, weight=w, reduction="none", pos_weight=pw),)

    def oracle(x, y):
        return (F.binary_cross_entropy_with_logits(x, y, weight=w.double(), reduction="none",
                                                   pos_weight=pw.double()),)

    return Case([x, y], fast, oracle, 1, (w, pw))


def case_soft_margin_loss(device="cpu"):
    x = _logits((B, T), device)
    y = (torch.randint(0, 2, (B, T)) * 2 - 1).float().to(device)

    def fast(x):
        return (fastce.soft_margin_loss(x, y, reduction="none"),)

    def oracle(x):
        return (F.soft_margin_loss(x, y.double(), reduction="none"),)

    return Case([x], fast, oracle, 1, (y,))


def case_sigmoid_focal_loss(device="cpu"):
    x = _logits((B, T), device)
    y = torch.rand(B, T, dtype=torch.float64).float().to(device)
    alpha, gamma = 0.25, 2.0

    def fast(x, y):
        return (fastce.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction="none"),)

    def oracle(x, y):  # torchvision.ops.sigmoid_focal_loss, written out
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        return ((alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma,)

    return Case([x, y], fast, oracle, 1)


TEMPERATURE = 0.7


def case_token_logprobs(target_layout="contiguous", reduction=None, device="cpu"):
    x = _logits((B, T, C), device)
    t = class_indices((B, T), C, target_layout, device)

    def fast(x):
        return fastce.token_logprobs(x, t, temperature=TEMPERATURE, return_entropy=True)

    def oracle(x):
        return _token_stats64(x, t, TEMPERATURE)

    return Case([x], fast, oracle, 2, (t,))


def case_linear_token_logprobs(target_layout="contiguous", reduction=None, device="cpu"):
    h, W, b = _logits((B, T, H), device, 1.0), _logits((C, H), device, 1.0), _logits((C,), device, 1.0)
    t = class_indices((B, T), C, target_layout, device)

    def fast(h, W, b):
        return fastce.linear_token_logprobs(h, W, t, linear_bias=b, temperature=TEMPERATURE, return_entropy=True)

    def oracle(h, W, b):
        return _token_stats64(F.linear(h, W, b), t, TEMPERATURE)

    return Case([h, W, b], fast, oracle, 2, (t,))


def case_policy_gradient_loss(target_layout="contiguous", reduction="none", device="cpu"):
    x = _logits((B, T, C), device)
    t = class_indices((B, T), C, target_layout, device)
    advantages = torch.randn(B, 1, dtype=torch.float64).float().to(device)  # one per sequence
    coef = 0.05

    def fast(x):
        loss, logprob, entropy = fastce.policy_gradient_loss(
            x, t, advantages, entropy_coef=coef, temperature=TEMPERATURE, reduction=reduction, return_stats=True)
        return loss, logprob, entropy  # the statistics are detached: only the loss is differentiable

    def oracle(x):
        logprob, entropy = _token_stats64(x, t, TEMPERATURE)
        per_token = _masked(-(advantages.double() * logprob + coef * entropy), t)
        return _reduce64(per_token, t, reduction), logprob, entropy

    return Case([x], fast, oracle, 1, (t, advantages))


# functions with a class-index argument (and a reduction where they have one)
CLASS_INDEX_CASES = {
    "cross_entropy": (case_cross_entropy, ("none", "mean")),
    "focal_loss": (case_focal_loss, ("none", "mean")),
    "linear_cross_entropy[tokens]": (case_linear_cross_entropy_tokens, ("none", "mean")),
    "linear_cross_entropy[vocab]": (case_linear_cross_entropy_vocab, ("none", "mean")),
    "linear_cross_entropy[kdim]": (case_linear_cross_entropy_kdim, ("none", "mean")),
    "token_logprobs": (case_token_logprobs, (None,)),
    "linear_token_logprobs": (case_linear_token_logprobs, (None,)),
    "policy_gradient_loss": (case_policy_gradient_loss, ("none", "mean")),
}
BINARY_CASES = {
    "binary_cross_entropy_with_logits": case_binary_cross_entropy_with_logits,
    "soft_margin_loss": case_soft_margin_loss,
    "sigmoid_focal_loss": case_sigmoid_focal_loss,
}


def _build(name, device):
    if name in BINARY_CASES:
        return BINARY_CASES[name](device=device)
    return CLASS_INDEX_CASES[name][0](device=device)


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def check_case(case: Case, pick: Sequence[int], grad_outputs: Sequence[torch.Tensor], what: str):
    """Runs case.fast on fresh leaf copies (their layout kept), backpropagates grad_outputs through the
    outputs `pick`, and compares every output and every leaf's gradient with case.oracle on float64 copies
    under the same upstream gradients; nothing of the caller's (inputs, constants, upstream gradients) may
    change."""
    leaves = [clone_keep_strides(t).requires_grad_() for t in case.leaves]
    before = snapshot(*leaves, *case.constants, *grad_outputs)
    outs = _outputs(case.fast(*leaves))
    for i in pick:
        assert outs[i].requires_grad, f"{what}: output {i} is not differentiable (no gradient flows back from it)"
    torch.autograd.backward([outs[i] for i in pick], list(grad_outputs))
    leaves64 = [as64(t).requires_grad_() for t in case.leaves]
    outs64 = _outputs(case.oracle(*leaves64))
    torch.autograd.backward([outs64[i] for i in pick], [g.double() for g in grad_outputs])
    assert len(outs) == len(outs64), what
    for i, (out, out64) in enumerate(zip(outs, outs64)):
        assert_close_dtype(out, out64, torch.float32, f"{what}: output {i}")
    for i, (leaf, leaf64) in enumerate(zip(leaves, leaves64)):
        assert leaf.grad is not None, f"{what}: no gradient for input {i}"
        assert_close_dtype(leaf.grad, leaf64.grad, leaf.dtype, f"{what}: gradient of input {i}")
    assert_unchanged([*leaves, *case.constants, *grad_outputs], before, what)


# ---------------------------------------------------------------------------------------------
# The broad property tests


DIFFERENTIABLE_OUTPUTS = [  # (function, outputs fed an upstream gradient): each alone, and all together
    ("cross_entropy", (0,)), ("cross_entropy", (1,)), ("cross_entropy", (0, 1)),
    ("focal_loss", (0,)),
    ("linear_cross_entropy[tokens]", (0,)), ("linear_cross_entropy[tokens]", (1,)),
    ("linear_cross_entropy[tokens]", (0, 1)),
    ("linear_cross_entropy[vocab]", (0,)), ("linear_cross_entropy[vocab]", (0, 1)),
    ("linear_cross_entropy[kdim]", (0,)), ("linear_cross_entropy[kdim]", (0, 1)),
    ("binary_cross_entropy_with_logits", (0,)),
    ("soft_margin_loss", (0,)),
    ("sigmoid_focal_loss", (0,)),
    ("token_logprobs", (0,)), ("token_logprobs", (1,)), ("token_logprobs", (0, 1)),
    ("linear_token_logprobs", (0,)), ("linear_token_logprobs", (1,)), ("linear_token_logprobs", (0, 1)),
    ("policy_gradient_loss", (0,)),
]
UPSTREAM_LAYOUTS = ["expanded", "transposed", "sliced"]


@pytest.mark.parametrize("layout", UPSTREAM_LAYOUTS)
@pytest.mark.parametrize("function, pick", DIFFERENTIABLE_OUTPUTS,
                         ids=[f"{f}-{'+'.join(map(str, p))}" for f, p in DIFFERENTIABLE_OUTPUTS])
def test_upstream_gradient_layouts(function, pick, layout, path, device):
    """Every per-element output ('none' losses, return_lse, return_entropy) backpropagates an upstream
    gradient in any layout autograd hands out: read with its strides, never as dense memory."""
    case = _build(function, device)
    shapes = [o.shape for o in _outputs(case.fast(*case.leaves))]
    grad_outputs = [upstream_gradient(shapes[i], layout, device) for i in pick]
    check_case(case, pick, grad_outputs, f"{function} outputs {pick}, {layout} upstream gradient")


TARGET_LAYOUTS = ["sliced", "transposed", "expanded"]
CLASS_INDEX_PARAMS = [(name, reduction) for name, (_, reductions) in CLASS_INDEX_CASES.items()
                      for reduction in reductions]


@pytest.mark.parametrize("layout", TARGET_LAYOUTS)
@pytest.mark.parametrize("function, reduction", CLASS_INDEX_PARAMS,
                         ids=[f"{f}-{r}" if r else f for f, r in CLASS_INDEX_PARAMS])
def test_class_index_layouts(function, reduction, layout, path, device):
    """Every class-index argument read with its strides: a sliced, a transposed and an expanded target give
    what the same indices give, with gradients under a random upstream gradient on every output."""
    build = CLASS_INDEX_CASES[function][0]
    case = build(target_layout=layout, reduction=reduction, device=device)
    outs = _outputs(case.fast(*[t.detach().requires_grad_() for t in case.leaves]))
    # the outputs that are differentiable here (whether each should be is test_upstream_gradient_layouts's)
    pick = tuple(i for i in range(case.outputs) if outs[i].requires_grad)
    assert 0 in pick, f"{function}: the loss is not differentiable"
    grad_outputs = [upstream_gradient(outs[i].shape, "dense", device) if outs[i].dim()
                    else torch.tensor(1.7, device=device) for i in pick]
    check_case(case, pick, grad_outputs, f"{function}, {layout} target")


# ---------------------------------------------------------------------------------------------
# Item 1: linear_cross_entropy(reduction="none").sum().backward(): the stride-0 upstream gradient


@pytest.mark.parametrize("head", ["fp32", "fp64", "kdim"])
def test_item1_linear_none_sum_backward_reads_the_expanded_gradient(head, path):
    """linear_cross_entropy(reduction="none").sum().backward(): autograd hands the 'none' loss a stride-0
    gradient, which must be read with its strides (fp32, fp64 and K-dimensional heads: the token walk)."""
    dtype = torch.float64 if head == "fp64" else torch.float32
    h = torch.randn(6, 4, dtype=torch.float64).to(dtype)
    W = torch.randn(*((5, 3, 4) if head == "kdim" else (5, 4)), dtype=torch.float64).to(dtype)
    t = torch.randint(0, 5, (6, 3) if head == "kdim" else (6,))
    ours = [h.clone().requires_grad_(), W.clone().requires_grad_()]
    fastce.linear_cross_entropy(*ours, t, reduction="none").sum().backward()
    theirs = [h.double().requires_grad_(), W.double().requires_grad_()]
    F.linear_cross_entropy(*theirs, t, reduction="none").sum().backward()
    assert_close_dtype(ours[0].grad, theirs[0].grad, dtype, "∂input")
    assert_close_dtype(ours[1].grad, theirs[1].grad, dtype, "∂linear_weight")


# ---------------------------------------------------------------------------------------------
# Item 2: the vocabulary walk and a strided class-index target


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype, walk", [(torch.float32, "vocab"), (torch.bfloat16, None)],
                         ids=["fp32-vocab", "bf16-default"])
def test_item2_vocab_walk_reads_a_strided_target(dtype, walk, reduction, path):
    """∂W and ∂b of the vocabulary walk (walk="vocab", and the bf16 default) with a target of stride 2."""
    h = torch.randn(6, 4, dtype=torch.float64).to(dtype)
    W = torch.randn(5, 4, dtype=torch.float64).to(dtype)
    b = torch.randn(5, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 5, (6, 2))[:, 0]
    assert t.stride() == (2,)
    ours = [x.clone().requires_grad_() for x in (h, W, b)]
    loss = fastce.linear_cross_entropy(ours[0], ours[1], t, linear_bias=ours[2], reduction=reduction, walk=walk)
    grad_output = torch.randn(loss.shape, dtype=torch.float64).to(dtype) if loss.dim() else None
    loss.backward(grad_output)
    theirs = [x.double().requires_grad_() for x in (h, W, b)]
    expected = F.linear_cross_entropy(theirs[0], theirs[1], t, linear_bias=theirs[2], reduction=reduction)
    expected.backward(None if grad_output is None else grad_output.double())
    for what, actual, wanted in zip(("loss", "∂input", "∂W", "∂b"), (loss, *(x.grad for x in ours)),
                                    (expected, *(x.grad for x in theirs))):
        # bf16: the logits are a GEMM's output rounded to bf16 (on both paths, as in torch's own bf16 path),
        # so up to 2% of the largest value (tests/test_linear_cross_entropy.py's measured bound) on top
        slack = 2e-2 * wanted.detach().abs().max() if dtype == torch.bfloat16 else None
        assert_close_dtype(actual, wanted, dtype, what, slack=slack)


# ---------------------------------------------------------------------------------------------
# Item 4: out-of-range class indices in the token statistics are an error by default


def _token_call(function, target, **kwargs):
    logits = torch.randn(3, C)
    if function == "token_logprobs":
        return fastce.token_logprobs(logits, target, **kwargs)
    if function == "linear_token_logprobs":
        return fastce.linear_token_logprobs(torch.randn(3, H), torch.randn(C, H), target, **kwargs)
    return fastce.policy_gradient_loss(logits, target, torch.randn(3), reduction="none", **kwargs)


TOKEN_FUNCTIONS = ["token_logprobs", "linear_token_logprobs", "policy_gradient_loss"]


@pytest.mark.parametrize("bad", [C, C + 5, -3])
@pytest.mark.parametrize("function", TOKEN_FUNCTIONS)
def test_item4_out_of_range_class_index_is_an_index_error(function, bad, path):
    """token_logprobs, linear_token_logprobs, policy_gradient_loss take validate= as fastce.cross_entropy:
    by default (and True) an IndexError naming the value on the CPU, before any kernel; False: NaN."""
    target = torch.tensor([0, bad, IGNORE])
    for kwargs in (dict(), dict(validate=True)):
        with count_kernel_launches() as launched:
            with pytest.raises(IndexError, match=rf"^Target {bad} is out of bounds\.$"):
                _token_call(function, target, **kwargs)
        assert launched == [], f"kernels ran before the class indices were checked: {launched}"
    out = _token_call(function, target, validate=False)  # as today: NaN for that row, nothing else
    assert out[1].isnan() and out[0].isfinite() and out[2] == 0, out


# ---------------------------------------------------------------------------------------------
# Item 5: one ignore_index rule (cross_entropy's) for every function


def _ignore_index_inputs():
    """Fixed float64 logits (4, C), hidden (4, H), head (C, H) and a target holding class 2 twice."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, C, generator=g, dtype=torch.float64)
    h, W = torch.randn(4, H, generator=g, dtype=torch.float64), torch.randn(C, H, generator=g, dtype=torch.float64)
    return x, h, W, torch.tensor([2, 0, 2, 5])


def _ignore_index_call(function, ignore_index):
    """The function's per-row result on fp32 copies of _ignore_index_inputs, ignore_index passed as given."""
    x, h, W, target = (t.float() if t.is_floating_point() else t for t in _ignore_index_inputs())
    kw = dict(ignore_index=ignore_index)
    if function == "cross_entropy":
        return fastce.cross_entropy(x, target, reduction="none", **kw)
    if function == "focal_loss":  # γ = 0, α = None: cross-entropy
        return fastce.focal_loss(x, target, gamma=0.0, reduction="none", **kw)
    if function == "linear_cross_entropy":
        return fastce.linear_cross_entropy(h, W, target, reduction="none", **kw)
    if function == "token_logprobs":
        return fastce.token_logprobs(x, target, **kw)
    if function == "linear_token_logprobs":
        return fastce.linear_token_logprobs(h, W, target, **kw)
    return fastce.policy_gradient_loss(x, target, torch.ones(4), reduction="none", **kw)


def _ignore_index_expected(function):
    """What _ignore_index_call gives for ignore_index=2, in float64 (torch's cross_entropy, or log-probs)."""
    x, h, W, target = _ignore_index_inputs()
    logits = h @ W.t() if function.startswith("linear") else x
    if function in ("cross_entropy", "focal_loss", "linear_cross_entropy"):
        return F.cross_entropy(logits, target, reduction="none", ignore_index=2)
    logprob = _token_stats64(logits, torch.where(target == 2, IGNORE, target), 1.0)[0]
    return -logprob if function == "policy_gradient_loss" else logprob


IGNORE_INDEX_FUNCTIONS = ["cross_entropy", "focal_loss", "linear_cross_entropy", "token_logprobs",
                          "linear_token_logprobs", "policy_gradient_loss"]
INTEGERS = {"int": 2, "numpy.int64": np.int64(2), "numpy.int32": np.int32(2), "tensor(2)": torch.tensor(2)}
NOT_INTEGERS = {"float": 1.5, "whole float": 2.0, "bool": True, "str": "2", "tensor(2.)": torch.tensor(2.0)}


@pytest.mark.parametrize("value", list(INTEGERS))
@pytest.mark.parametrize("function", IGNORE_INDEX_FUNCTIONS)
def test_item5_ignore_index_takes_any_integer(function, value, path):
    """cross_entropy's rule everywhere: a Python, numpy or 0-d tensor integer is that integer."""
    out = _ignore_index_call(function, INTEGERS[value])
    assert_close_dtype(out, _ignore_index_expected(function), torch.float32, f"{function}(ignore_index={value})")


@pytest.mark.parametrize("value", list(NOT_INTEGERS))
@pytest.mark.parametrize("function", IGNORE_INDEX_FUNCTIONS)
def test_item5_ignore_index_refuses_what_is_not_an_integer(function, value, path):
    """cross_entropy's rule everywhere: bool, float (also a whole one), str and a float tensor are a
    TypeError naming the type, before any kernel runs."""
    bad = NOT_INTEGERS[value]
    with count_kernel_launches() as launched:
        with pytest.raises(TypeError, match=rf"argument 'ignore_index' must be int, not {type(bad).__name__}$"):
            _ignore_index_call(function, bad)
    assert launched == [], f"kernels ran before ignore_index was checked: {launched}"


# ---------------------------------------------------------------------------------------------
# Item 6: complex weight / pos_weight of binary_cross_entropy_with_logits


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("argument", ["weight", "pos_weight"])
def test_item6_complex_class_factor_is_a_type_error_before_any_kernel(argument, dtype, path):
    """A complex weight or pos_weight of binary_cross_entropy_with_logits: a TypeError naming the argument,
    before any kernel runs, nothing of the caller's modified."""
    x, y = torch.randn(3, 4), torch.rand(3, 4)
    factor = torch.ones(4, dtype=dtype)
    before = snapshot(x, y, factor)
    with count_kernel_launches() as launched:
        with pytest.raises(TypeError, match=argument):
            fastce.binary_cross_entropy_with_logits(x, y, **{argument: factor})
    assert launched == [], f"kernels ran before {argument}'s dtype was checked: {launched}"
    assert_unchanged([x, y, factor], before, argument)


# ---------------------------------------------------------------------------------------------
# Item 7: linear_cross_entropy with a zero-sized out_features or in_features gives torch's result


HEADS_WITH_NOTHING = {  # (input shape, linear_weight shape, target)
    "out_features=(0,)": ((3, 4), (5, 0, 4), lambda: torch.zeros(3, 0, dtype=torch.long)),
    "in_features=0": ((3, 0), (5, 0), lambda: torch.tensor([0, 1, IGNORE])),
}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("head", list(HEADS_WITH_NOTHING))
def test_item7_empty_head_dimensions_give_torchs_result(head, reduction, bias, path):
    """linear_cross_entropy with out_features containing 0, or in_features = 0: torch's loss (NaN mean, 0
    sum and an empty 'none' without positions; log V per row, or the bias's loss, without features) and
    torch's gradients."""
    input_shape, weight_shape, target = HEADS_WITH_NOTHING[head]
    target = target()
    tensors = [torch.randn(input_shape, dtype=torch.float64), torch.randn(weight_shape, dtype=torch.float64),
               torch.randn(weight_shape[:-1], dtype=torch.float64) if bias else None]
    ours = [None if t is None else t.float().requires_grad_() for t in tensors]
    theirs = [None if t is None else t.clone().requires_grad_() for t in tensors]
    loss = fastce.linear_cross_entropy(ours[0], ours[1], target, linear_bias=ours[2], reduction=reduction)
    expected = F.linear_cross_entropy(theirs[0], theirs[1], target, linear_bias=theirs[2], reduction=reduction)
    assert_close_dtype(loss, expected, torch.float32, "loss")  # NaN where torch gives NaN
    if head == "in_features=0" and reduction == "mean" and not bias:
        assert loss.item() == pytest.approx(math.log(5), rel=1e-6)  # logits of 0: log V per row
    grad_output = torch.randn(loss.shape, dtype=torch.float64) if loss.dim() else None
    loss.backward(None if grad_output is None else grad_output.float())
    expected.backward(grad_output)
    for i, (a, e) in enumerate(zip(ours, theirs)):
        if a is not None:
            assert_close_dtype(a.grad, e.grad, torch.float32, f"gradient of input {i}")


# ---------------------------------------------------------------------------------------------
# Item 8: uint8 class indices in fastce.reference: 156 is a class, not ignore_index -100


UINT8_CALLS = [("cross_entropy", "none"), ("cross_entropy", "mean"), ("focal_loss", "mean"), ("token_logprobs", None),
               ("linear_token_logprobs", None), ("policy_gradient_loss", "none"), ("policy_gradient_loss", "mean")]
UINT8_IDS = [f"{f}-{r}" if r else f for f, r in UINT8_CALLS]
N_UINT8_CLASSES = 200


def _uint8_inputs():
    """float64 logits (3, 200), hidden (3, H), head (200, H) and the uint8 targets [156, 5, 199]: 156 is
    -100 modulo 256, the value a comparison with ignore_index in uint8 would take for it."""
    x = torch.randn(3, N_UINT8_CLASSES, dtype=torch.float64)
    h, W = torch.randn(3, H, dtype=torch.float64), torch.randn(N_UINT8_CLASSES, H, dtype=torch.float64)
    return x, h, W, torch.tensor([156, 5, 199], dtype=torch.uint8)


def _uint8_call(module, function, x, h, W, target, reduction):
    if function == "cross_entropy":
        return module.cross_entropy(x, target, reduction=reduction)
    if function == "focal_loss":
        return module.focal_loss(x, target, gamma=2.0, reduction=reduction)
    if function == "token_logprobs":
        return module.token_logprobs(x, target)
    if function == "linear_token_logprobs":
        return module.linear_token_logprobs(h, W, target)
    return module.policy_gradient_loss(x, target, torch.ones(3), reduction=reduction)


def _uint8_expected(function, x, h, W, target, reduction):
    """The float64 oracle, with the same class indices as int64 (no row ignored)."""
    target = target.long()
    if function == "cross_entropy":
        return F.cross_entropy(x, target, reduction=reduction)
    if function == "focal_loss":
        logp_y = torch.log_softmax(x, 1).gather(1, target[:, None])[:, 0]
        return (-(-torch.expm1(logp_y)) ** 2 * logp_y).mean()
    logprob = _token_stats64(F.linear(h, W) if function == "linear_token_logprobs" else x, target, 1.0)[0]
    if function == "policy_gradient_loss":
        return _reduce64(-logprob, target, reduction)
    return logprob


@pytest.mark.parametrize("function, reduction", UINT8_CALLS, ids=UINT8_IDS)
def test_item8_reference_takes_uint8_class_156_as_a_class(function, reduction):
    """fastce.reference, the oracle of every test: uint8 targets [156, 5, 199] of 200 classes are three
    classes, as the kernels read them (class indices compared with ignore_index as integers, not in uint8)."""
    x, h, W, target = _uint8_inputs()
    expected = _uint8_expected(function, x, h, W, target, reduction)
    assert_close_dtype(_uint8_call(reference, function, x, h, W, target, reduction), expected, torch.float64,
                       f"fastce.reference.{function}, float64")
    out = _uint8_call(reference, function, x.float(), h.float(), W.float(), target, reduction)
    assert_close_dtype(out, expected, torch.float32, f"fastce.reference.{function}, float32")


@pytest.mark.parametrize("function, reduction", UINT8_CALLS, ids=UINT8_IDS)
def test_item8_uint8_class_156_is_a_class_on_every_path(function, reduction, path):
    x, h, W, target = _uint8_inputs()
    expected = _uint8_expected(function, x, h, W, target, reduction)
    out = _uint8_call(fastce, function, x.float(), h.float(), W.float(), target, reduction)
    assert_close_dtype(out, expected, torch.float32, f"fastce.{function}")

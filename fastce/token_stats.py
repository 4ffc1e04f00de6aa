"""Per-token log-probabilities and entropy (DESIGN §7.2) on fastce/kernels/token_stats.py: the launches,
custom ops and autograd Functions behind fastce.token_logprobs, fastce.policy_gradient_loss and
fastce.linear_token_logprobs (on the chunked-head engine, fastce/_head.py).

token_logprobs' forward reads the logits once and keeps three statistics per row (ref, log s, 1 − p_y);
its backward reads them once more and writes their gradient (the upstream gradients exist only then: 3×
the logits' bytes for a training step). policy_gradient_loss knows its per-token weights in the forward
and writes the gradient there (2×), kept for the backward (fastce._launch's handoff), which rescales it
in place where the upstream gradient is not 1. Costs and the linear form's walks: docs/token_stats.md.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _head, _launch
from ._core import PolicyGradientSpec, TokenStatsSpec, compute_dtype, once_differentiable, per_row, reduce_rows
from ._head import Head, Needs, WalkPlan
from ._launch import Launch, cdiv, keep_gradients, kernel_op, take_gradients, triton_dtype
from ._validation import VALIDATE_NONE
from .kernels.token_stats import N_STATS, token_stats_bwd_kernel, token_stats_fwd_kernel

# Launch rule: the row kernels' (fastce._launch.row_launch_config), with warps for 16 elements per thread
# everywhere: neither token kernel keeps a row on chip (the forward is one online pass, the backward needs
# no reduction over the row), so a streamed row is still read once; and their tiles keep several values
# live per element (z, e = exp(z − ref), z − ref and their products; log p, p and the gradient in the
# backward), so the 32 elements per thread of the cross-entropy rule spill a one-tile row on sm_90.
ELEMENTS_PER_WARP = 512

# Per-row values a step keeps beside the logits: forward log-probability, entropy and N_STATS
# statistics; backward the same and the two upstream gradients autograd hands in.
PER_ROW_VALUES = N_STATS + 4


def launch_config(n_rows: int, n_classes: int) -> _launch.RowLaunchConfig:
    """Rows per program, classes per tile and warps, by the rule above."""
    return _launch.row_launch_config(n_rows, n_classes, ELEMENTS_PER_WARP)


class PolicyLoss(NamedTuple):
    """What the forward kernel needs to write the policy-gradient loss per row (and its gradient)."""
    advantages: Tensor          # (N), the compute dtype: one advantage per row
    entropy_coef: float
    divisor: Optional[Tensor]   # "mean": a device scalar, the number of non-ignored rows; else None
    loss_rows: Tensor           # (N) out: the loss per row (already divided by the divisor)
    grad: Optional[Tensor]      # (N, V) out: its gradient for an upstream gradient of 1, or None


_FORWARD_TENSORS = ("logits_ptr", "target_ptr", "logprob_ptr", "entropy_ptr", "stats_ptr", "advantages_ptr",
                    "divisor_ptr", "loss_ptr", "grad_ptr")


@functools.lru_cache(maxsize=1024)
def _forward_launch(n_rows: int, n_classes: int, logits_strides: tuple, target_stride: int, stats_stride: int,
                    grad_strides: Optional[tuple], advantages_stride: int, spec: TokenStatsSpec, store_stats: bool,
                    policy: bool, mean: bool, entropy_coef: float, dtype: torch.dtype) -> Launch:
    config = launch_config(n_rows, n_classes)
    g_row, g_class = grad_strides or (0, 0)
    return Launch(
        token_stats_fwd_kernel, (cdiv(n_rows, config.rows),), _FORWARD_TENSORS, num_warps=config.num_warps,
        logits_stride_row=logits_strides[0], logits_stride_class=logits_strides[1], stats_stride=stats_stride,
        grad_stride_row=g_row, grad_stride_class=g_class, target_stride=target_stride,
        advantages_stride=advantages_stride, n_rows=n_rows, n_classes=n_classes, ignore_index=spec.ignore_index,
        inv_temperature=1.0 / spec.temperature, entropy_coef=entropy_coef, ROWS=config.rows,
        BLOCK_SIZE=config.block_size, SINGLE_PASS=n_classes <= config.block_size, HAS_ENTROPY=spec.return_entropy,
        STORE_STATS=store_stats, POLICY_LOSS=policy, MEAN=mean, STORE_GRAD=grad_strides is not None,
        WIDE_OFFSETS=n_classes * max(abs(logits_strides[1]), abs(g_class)) >= 2**31,
        COMPUTE_DTYPE=triton_dtype(dtype))


def _stride(t: Tensor) -> int:
    return t.stride(0) if t.numel() > 1 else 1


def launch_forward(logits: Tensor, target: Tensor, spec: TokenStatsSpec, *, store_stats: bool,
                   out: Optional[tuple] = None, policy: Optional[PolicyLoss] = None
                   ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(log-probability, entropy or None, (N_STATS, N) statistics or None) of (N, V) logits and (N) class
    indices (read with their stride), into `out`'s three tensors if given (None where not computed); with
    `policy`, also its loss rows (and gradient) into the tensors it holds."""
    n_rows, n_classes = logits.shape
    acc_dtype = compute_dtype(logits.dtype)
    if out is None:
        out = (logits.new_empty(n_rows, dtype=acc_dtype),
               logits.new_empty(n_rows, dtype=acc_dtype) if spec.return_entropy else None,
               logits.new_empty(N_STATS, n_rows, dtype=acc_dtype) if store_stats else None)
    logprob, entropy, stats = out
    if n_rows == 0:
        return logprob, entropy, stats
    grad = None if policy is None else policy.grad
    launch = _forward_launch(n_rows, n_classes, logits.stride(), _stride(target),
                             stats.stride(0) if stats is not None else 0, None if grad is None else grad.stride(),
                             0 if policy is None else _stride(policy.advantages), spec, stats is not None,
                             policy is not None, policy is not None and policy.divisor is not None,
                             0.0 if policy is None else policy.entropy_coef, logits.dtype)
    placeholder = logprob
    launch(logits, target, logprob, _or(entropy, placeholder), _or(stats, placeholder),
           placeholder if policy is None else policy.advantages,
           placeholder if policy is None else _or(policy.divisor, placeholder),
           placeholder if policy is None else policy.loss_rows, _or(grad, placeholder))
    return logprob, entropy, stats


def _or(t: Optional[Tensor], placeholder: Tensor) -> Tensor:
    # a pointer the kernel never dereferences (its flag is off)
    return placeholder if t is None else t


@functools.lru_cache(maxsize=1024)
def _backward_launch(n_rows: int, n_classes: int, logits_strides: tuple, grad_strides: tuple, stats_stride: int,
                     target_stride: int, grad_logprob_stride: Optional[int], grad_entropy_stride: Optional[int],
                     class_offset: int, n_classes_total: int, spec: TokenStatsSpec, dtype: torch.dtype) -> Launch:
    config = launch_config(n_rows, n_classes)
    return Launch(
        token_stats_bwd_kernel, (cdiv(n_rows, config.rows),),
        ("logits_ptr", "target_ptr", "stats_ptr", "entropy_ptr", "grad_logprob_ptr", "grad_entropy_ptr", "grad_ptr"),
        num_warps=config.num_warps, logits_stride_row=logits_strides[0], logits_stride_class=logits_strides[1],
        grad_stride_row=grad_strides[0], grad_stride_class=grad_strides[1], stats_stride=stats_stride,
        target_stride=target_stride, grad_logprob_stride=grad_logprob_stride or 0,
        grad_entropy_stride=grad_entropy_stride or 0, n_rows=n_rows, n_classes=n_classes,
        class_offset=class_offset, ignore_index=spec.ignore_index, n_classes_total=n_classes_total,
        inv_temperature=1.0 / spec.temperature, ROWS=config.rows, BLOCK_SIZE=config.block_size,
        HAS_GRAD_LOGPROB=grad_logprob_stride is not None, HAS_GRAD_ENTROPY=grad_entropy_stride is not None,
        WIDE_OFFSETS=n_classes * max(abs(logits_strides[1]), abs(grad_strides[1])) >= 2**31,
        COMPUTE_DTYPE=triton_dtype(dtype))


def launch_backward(logits: Tensor, target: Tensor, stats: Tensor, entropy: Tensor, grad_logprob: Optional[Tensor],
                    grad_entropy: Optional[Tensor], spec: TokenStatsSpec, *, grad: Tensor, class_offset: int = 0,
                    n_classes_total: Optional[int] = None) -> Tensor:
    """Writes into `grad` (N, V_slice) the gradient of Σ_i (grad_logprob_i·logprob_i + grad_entropy_i·H_i)
    with respect to `logits` (N, V_slice), which hold classes [class_offset, class_offset + V_slice) of rows
    of n_classes_total classes (default: all of them). `grad` may be `logits` itself; the upstream
    gradients are 1-D, read with their strides."""
    n_rows, n_classes = logits.shape
    if n_rows == 0 or n_classes == 0:
        return grad
    launch = _backward_launch(n_rows, n_classes, logits.stride(), grad.stride(), stats.stride(0), _stride(target),
                              None if grad_logprob is None else _stride(grad_logprob),
                              None if grad_entropy is None else _stride(grad_entropy), class_offset,
                              n_classes if n_classes_total is None else n_classes_total, spec, logits.dtype)
    launch(logits, target, stats, entropy, _or(grad_logprob, stats), _or(grad_entropy, stats), grad)
    return grad


def _per_row(grad_output: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad_output is None else per_row(grad_output)


def _check_class_indices(target: Tensor, n_classes: int, ignore_index: int, validate: str) -> None:
    if validate != VALIDATE_NONE:
        _launch.class_index_statistics(target, None, n_classes, ignore_index, validate=validate, need_divisors=False,
                                       out=target.new_empty(_launch.N_TARGET_STATS, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# token_logprobs on (N, V) logits


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # a custom op returns tensors only: an empty one stands for "not computed"
    return like.new_empty(0, dtype=compute_dtype(like.dtype)) if t is None else t


def _forward_fake(logits, target, spec, store_stats, validate="none"):
    acc = compute_dtype(logits.dtype)
    n_rows = logits.shape[0]
    return (logits.new_empty(n_rows, dtype=acc), logits.new_empty(n_rows if spec.return_entropy else 0, dtype=acc),
            logits.new_empty((N_STATS, n_rows) if store_stats else (0,), dtype=acc))


@kernel_op("token_logprobs_forward", _forward_fake)
def forward(logits: Tensor, target: Tensor, spec: TokenStatsSpec, store_stats: bool,
            validate: str) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probability, entropy or empty, statistics or empty) of (N, V) logits, one read of them; the
    class indices are checked first as `validate` says."""
    _check_class_indices(target, logits.shape[1], spec.ignore_index, validate)
    logprob, entropy, stats = launch_forward(logits, target, spec, store_stats=store_stats)
    return logprob, _or_empty(entropy, logits), _or_empty(stats, logits)


def _backward_fake(logits, target, stats, entropy, grad_logprob, grad_entropy, spec):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@kernel_op("token_logprobs_backward", _backward_fake)
def backward(logits: Tensor, target: Tensor, stats: Tensor, entropy: Tensor, grad_logprob: Optional[Tensor],
             grad_entropy: Optional[Tensor], spec: TokenStatsSpec) -> Tensor:
    """∂L/∂logits in the logits' dtype, one pass over the logits."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return launch_backward(logits, target, stats, entropy, _per_row(grad_logprob), _per_row(grad_entropy), spec,
                           grad=grad)


# ---------------------------------------------------------------------------------------------
# policy_gradient_loss: −(A·logprob + c·H) with known per-token weights, its gradient written in the forward


def _policy_forward_fake(logits, target, advantages, spec, needs_grad, validate):
    n_rows, acc = logits.shape[0], compute_dtype(logits.dtype)
    logprob, entropy, stats = _forward_fake(logits, target, spec.token_stats, needs_grad)
    return (logits.new_empty(n_rows, dtype=acc), logprob, entropy, stats,
            logits.new_empty(_launch.N_TARGET_STATS if spec.reduction == "mean" else 0, dtype=acc))


@kernel_op("policy_gradient_forward", _policy_forward_fake)
def policy_forward(logits: Tensor, target: Tensor, advantages: Tensor, spec: PolicyGradientSpec,
                   needs_grad: bool, validate: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss rows, logprob, entropy or empty, statistics or empty, divisors or empty) of (N, V) logits, (N)
    class indices and (N) advantages in the compute dtype. The loss rows are already divided by the mean's
    divisor (the number of non-ignored rows), so every reduction is a sum. With needs_grad the statistics
    are kept for a backward and, for 'mean' and 'sum', the gradient for an upstream gradient of 1 is
    written too and kept with them. The class indices are checked as `validate` says."""
    acc_dtype = compute_dtype(logits.dtype)
    mean = spec.reduction == "mean"
    divisors = logits.new_empty(_launch.N_TARGET_STATS if mean else 0, dtype=acc_dtype)
    if mean:  # on the device: no host sync
        _launch.class_index_statistics(target, None, logits.shape[1], spec.ignore_index, validate=validate,
                                       need_divisors=True, out=divisors)
    else:
        _check_class_indices(target, logits.shape[1], spec.ignore_index, validate)
    keep_gradient = needs_grad and spec.reduction != "none"
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if keep_gradient else None
    policy = PolicyLoss(advantages, spec.entropy_coef, divisors[1:2] if mean else None,
                        logits.new_empty(logits.shape[0], dtype=acc_dtype), grad)
    logprob, entropy, stats = launch_forward(logits, target, spec.token_stats, store_stats=needs_grad, policy=policy)
    stats = _or_empty(stats, logits)
    if keep_gradient:
        keep_gradients(stats, grad)
    return policy.loss_rows, logprob, _or_empty(entropy, logits), stats, divisors


def _policy_backward_fake(logits, target, advantages, stats, entropy, divisors, grad_loss, spec):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@kernel_op("policy_gradient_backward", _policy_backward_fake)
def policy_backward(logits: Tensor, target: Tensor, advantages: Tensor, stats: Tensor, entropy: Tensor,
                    divisors: Tensor, grad_loss: Tensor, spec: PolicyGradientSpec) -> Tensor:
    """∂loss/∂logits for the loss's upstream gradient (a scalar; one per row for 'none'): the forward's
    gradient rescaled in place when it kept one, else one pass over the logits."""
    kept = take_gradients(stats)
    if kept is not None:
        return _launch.scale_(kept[0], grad_loss)
    # the chain rule through loss_i = −w (A_i·logprob_i + c·H_i), w = 1/divisor for 'mean':
    # ∂/∂logprob_i = −g_i·w·A_i, ∂/∂H_i = −g_i·w·c
    upstream = grad_loss.reshape(-1).to(advantages.dtype)
    if spec.reduction == "mean":
        upstream = upstream / divisors[1]
    grad_entropy = (-spec.entropy_coef * upstream).expand(advantages.shape) if spec.entropy_coef != 0 else None
    return backward(logits, target, stats, entropy, -upstream * advantages, grad_entropy, spec.token_stats)


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs: the statistics of hidden @ W.T + b by the chunked-head engine


def plan(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, *,
         chunk_rows: Optional[int] = None, per_row_values: int = PER_ROW_VALUES) -> WalkPlan:
    """The engine's rule for this head (fastce/_head.py): both gradients are made in the backward, whose
    upstream gradients exist only then. An explicit chunk_rows sets the chunk, and slices of the same
    number of logits. per_row_values: the per-row values a step keeps (the vocabulary-parallel form's
    are more)."""
    slice_classes = None if chunk_rows is None else max(1, chunk_rows * n_classes // max(n_rows, 1))
    return _head.plan_walks(n_rows, n_classes, in_features, dtype, input_grad_in_forward=False,
                            per_row_bytes=per_row_values * compute_dtype(dtype).itemsize, chunk_rows=chunk_rows,
                            slice_classes=slice_classes)


def working_memory_bytes(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, walks: WalkPlan) -> int:
    """Peak bytes beyond inputs and gradients of a training step by `walks` (the engine's byte model)."""
    return _head.working_memory_bytes(n_rows, n_classes, in_features, dtype, walks, input_grad_in_forward=False,
                                      per_row_bytes=PER_ROW_VALUES * compute_dtype(dtype).itemsize)


def _linear_forward_fake(hidden, linear_weight, linear_bias, target, spec, store_stats, chunk_rows, validate):
    return _forward_fake(hidden.new_empty(()).expand(hidden.shape[0], 1), target, spec, store_stats)


@kernel_op("linear_token_logprobs_forward", _linear_forward_fake)
def linear_forward(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                   spec: TokenStatsSpec, store_stats: bool, chunk_rows: int,
                   validate: str) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probability, entropy or empty, statistics or empty) of hidden (N, H) through the head, by the
    engine's row walk; the class indices are checked first (before any GEMM) as `validate` says."""
    _check_class_indices(target, linear_weight.shape[0], spec.ignore_index, validate)
    n_rows = hidden.shape[0]
    acc_dtype = compute_dtype(hidden.dtype)
    logprob = hidden.new_empty(n_rows, dtype=acc_dtype)
    entropy = hidden.new_empty(n_rows, dtype=acc_dtype) if spec.return_entropy else None
    stats = hidden.new_empty(N_STATS, n_rows, dtype=acc_dtype) if store_stats else None

    def visit(logits: Tensor, rows: slice) -> bool:
        launch_forward(logits, target[rows], spec, store_stats=store_stats,
                       out=(logprob[rows], None if entropy is None else entropy[rows],
                            None if stats is None else stats[:, rows]))
        return False

    _head.row_walk(Head(hidden, linear_weight, linear_bias), chunk_rows, visit)
    return logprob, _or_empty(entropy, hidden), _or_empty(stats, hidden)


def _linear_backward_fake(hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy, spec,
                          walks, needs):
    shapes = (hidden.shape, linear_weight.shape, linear_weight.shape[:1])
    return [hidden.new_empty(shape if needed else (0,)) for shape, needed in zip(shapes, needs)]


@kernel_op("linear_token_logprobs_backward", _linear_backward_fake)
def linear_backward(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                    stats: Tensor, entropy: Tensor, grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor],
                    spec: TokenStatsSpec, walks: WalkPlan, needs: Needs) -> list[Tensor]:
    """(∂hidden, ∂W, ∂b) among `needs` (an empty tensor elsewhere), by the walks of `walks`: each walk
    recomputes its pieces' logits and writes their gradient over them (the backward kernel needs only the
    forward's row statistics, so a vocabulary slice is processed on its own)."""
    n_classes = linear_weight.shape[0]
    grad_logprob, grad_entropy = _per_row(grad_logprob), _per_row(grad_entropy)

    def visit_rows(logits: Tensor, rows: slice) -> bool:
        launch_backward(logits, target[rows], stats[:, rows], entropy[rows] if entropy.numel() else entropy,
                        None if grad_logprob is None else grad_logprob[rows],
                        None if grad_entropy is None else grad_entropy[rows], spec, grad=logits)
        return True

    def visit_slice(logits: Tensor, classes: slice) -> bool:
        launch_backward(logits, target, stats, entropy, grad_logprob, grad_entropy, spec, grad=logits,
                        class_offset=classes.start, n_classes_total=n_classes)
        return True

    grads = _head.walk_gradients(Head(hidden, linear_weight, linear_bias), walks, needs, visit_rows, visit_slice)
    return [hidden.new_empty(0) if g is None else g for g in grads]


# ---------------------------------------------------------------------------------------------
# autograd, for both forms


class TokenStatsFunction(torch.autograd.Function):
    """apply(spec, walks, validate, target (N), *inputs) -> (log-probability (N), entropy (N) or empty), with gradients
    for the inputs: logits (N, V) when walks is None, else hidden (N, H), linear_weight (V, H) and
    linear_bias (V) or None (the linear form, walked as `walks`, a WalkPlan, says).

    The forward keeps the row statistics; the backward makes one pass over the logits (recomputed by the
    walks in the linear form) with the upstream gradients of both outputs."""

    @staticmethod
    def forward(ctx, spec: TokenStatsSpec, walks: Optional[WalkPlan], validate: str, target: Tensor,
                *inputs: Optional[Tensor]):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.walks = spec, walks
        ctx.needs = Needs(*ctx.needs_input_grad[4:]) if walks is not None else None
        if walks is None:
            logprob, entropy, stats = forward(*inputs, target, spec, True, validate)
        else:
            logprob, entropy, stats = linear_forward(*inputs, target, spec, True, walks.chunk_rows, validate)
        ctx.save_for_backward(target, stats, entropy, *inputs)
        if not spec.return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        target, stats, entropy, *inputs = ctx.saved_tensors
        no_grads = (None, None, None, None)  # spec, walks, validate, target
        if not ctx.spec.return_entropy:
            grad_entropy = None
        if grad_logprob is None and grad_entropy is None:
            return (*no_grads, *(None for _ in inputs))
        if ctx.walks is None:
            logits, = inputs
            return *no_grads, backward(logits, target, stats, entropy, grad_logprob, grad_entropy, ctx.spec)
        grads = linear_backward(*inputs, target, stats, entropy, grad_logprob, grad_entropy, ctx.spec, ctx.walks,
                                ctx.needs)
        return (*no_grads, *(g if need else None for g, need in zip(grads, ctx.needs)))


class PolicyGradientFunction(torch.autograd.Function):
    """apply(spec, target (N), advantages (N), logits (N, V), row_shape, validate) -> (loss, logprob (N),
    entropy (N) or empty), differentiable in the logits through the loss only (the statistics are for
    logging)."""

    @staticmethod
    def forward(ctx, spec: PolicyGradientSpec, target: Tensor, advantages: Tensor, logits: Tensor,
                row_shape: torch.Size, validate: str):
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        loss_rows, logprob, entropy, stats, divisors = policy_forward(logits, target, advantages, spec, True,
                                                                      validate)
        ctx.save_for_backward(logits, target, advantages, stats, entropy, divisors)
        ctx.mark_non_differentiable(logprob, entropy)
        return reduce_rows(loss_rows, spec.reduction, row_shape, loss_rows.dtype), logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_logprob, grad_entropy):
        if grad_loss is None:
            return None, None, None, None, None, None
        logits, target, advantages, stats, entropy, divisors = ctx.saved_tensors
        return None, None, None, policy_backward(logits, target, advantages, stats, entropy, divisors, grad_loss,
                                                 ctx.spec), None, None


# ---------------------------------------------------------------------------------------------
# entry points (fastce.functional)


def run(logits: Tensor, target: Tensor, spec: TokenStatsSpec, *, validate: str):
    """(log-probability, entropy or None) shaped like `target`, for checked (…, V) logits; the class
    indices are checked as `validate` says."""
    n_classes = logits.shape[-1]
    rows = logits.reshape(-1, n_classes)  # a view where the leading dims merge, else one copy
    flat_target = target.reshape(-1)  # read with its stride
    if torch.is_grad_enabled() and logits.requires_grad:
        logprob, entropy = TokenStatsFunction.apply(spec, None, validate, flat_target, rows)
    else:  # one read of the logits, no statistics kept
        logprob, entropy, _ = forward(rows, flat_target, spec, False, validate)
    return _shaped(logprob, entropy, target.shape, spec)


def run_linear(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
               spec: TokenStatsSpec, *, chunk_rows: Optional[int], validate: str):
    """(log-probability, entropy or None) shaped like `target`, for checked hidden (…, H)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_target = target.reshape(-1)  # read with its stride
    walks = plan(rows.shape[0], linear_weight.shape[0], rows.shape[1], rows.dtype, chunk_rows=chunk_rows)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, linear_weight, linear_bias)):
        logprob, entropy = TokenStatsFunction.apply(spec, walks, validate, flat_target, rows, linear_weight,
                                                    linear_bias)
    else:  # no statistics kept, no gradient work
        logprob, entropy, _ = linear_forward(rows, linear_weight, linear_bias, flat_target, spec, False,
                                             walks.chunk_rows, validate)
    return _shaped(logprob, entropy, target.shape, spec)


def run_policy_gradient(logits: Tensor, target: Tensor, advantages: Tensor, spec: PolicyGradientSpec, *,
                        validate: str):
    """(loss, logprob, entropy or None) for checked (…, V) logits, class indices (…) and advantages
    broadcastable to them; the statistics shaped like `target`, never differentiable."""
    n_classes = logits.shape[-1]
    rows = logits.reshape(-1, n_classes)  # a view where the leading dims merge, else one copy
    flat_target = target.reshape(-1)  # read with its stride
    acc_dtype = compute_dtype(logits.dtype)
    per_row_advantages = advantages.detach().to(acc_dtype).expand(target.shape).reshape(-1)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, logprob, entropy = PolicyGradientFunction.apply(spec, flat_target, per_row_advantages, rows,
                                                              target.shape, validate)
    else:  # one read of the logits, no statistics or gradient kept
        loss_rows, logprob, entropy, _, _ = policy_forward(rows, flat_target, per_row_advantages, spec, False,
                                                           validate)
        loss = reduce_rows(loss_rows, spec.reduction, target.shape, acc_dtype)
    return (loss, *_shaped(logprob, entropy, target.shape, spec.token_stats))


def _shaped(logprob: Tensor, entropy: Tensor, shape: torch.Size, spec: TokenStatsSpec):
    return logprob.reshape(shape), entropy.reshape(shape) if spec.return_entropy else None

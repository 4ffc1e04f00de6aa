"""Fused linear + cross-entropy, cross_entropy(input @ W.T + b) without the (N, V) logits, on the
chunked-head engine (fastce/_head.py).

The forward walks rows: per chunk the fused cross-entropy kernel reads the chunk's logits, writes the
per-row loss and lse, and writes their gradient over them, from which the engine makes ∂input complete
(the mean's divisors come from the whole target first, so each chunk's gradient is final). ∂W and ∂b
are made by the plan's weight walk: accumulated over the same chunks (ROWS), or by a vocabulary walk in
the backward (VOCAB), which recomputes each slice's logits, turns them into their gradient from the
forward's lse (kernels/linear_cross_entropy.py) with the upstream gradient folded in, and makes that
slice of ∂W and ∂b complete. What the forward makes is for an upstream gradient of 1 and the backward
rescales it in place (fastce._launch.scale_; nothing moves when it is 1). Under 'none' the ROWS walk's ∂W
needs each row's upstream gradient before summing rows, so its backward walks the rows again with it
folded in (∂input included). Design notes: docs/linear.md.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _head, _launch, softmax_losses
from ._core import LossSpec, compute_dtype, per_row, reduce_rows
from ._head import NOTHING, ROWS, VOCAB, Head, Needs, WalkPlan
from ._launch import Launch, cdiv, keep_gradients, kernel_op, next_power_of_2, take_gradients, triton_dtype
from .kernels.linear_cross_entropy import linear_target_mass_kernel, linear_vocab_slice_grad_kernel

TOKENS = ROWS  # the walk names fastce.linear_cross_entropy takes: "tokens" and "vocab"
PER_ROW_VALUES = 2  # the per-row loss and lse the forward keeps

# The slice kernel is elementwise: tiles of SLICE_TILE elements, up to SLICE_BLOCK classes wide (more
# rows when slices are narrower), 16 values per thread at SLICE_WARPS warps.
SLICE_TILE = 4096
SLICE_BLOCK = 1024
SLICE_WARPS = 8
MASS_BLOCK = 4096


class Plan(NamedTuple):
    walk: str           # how ∂W and ∂b are made: TOKENS (row walk) or VOCAB (vocabulary walk)
    chunk_rows: int     # rows per chunk of the row walk
    slice_classes: int  # classes per slice of the vocabulary walk
    positions: int = 1  # K-dimensional heads: d1·…·dk positions per input row


def make_plan(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, positions: int = 1, *,
              walk: Optional[str] = None, chunk_rows: Optional[int] = None,
              slice_classes: Optional[int] = None) -> Plan:
    """The engine's rule (fastce/_head.py) for this head, each choice overridable: walk, rows per chunk,
    classes per slice. A K-dimensional head (positions > 1) walks rows: the vocabulary walk slices a
    contiguous class dimension."""
    if walk == VOCAB and positions > 1:
        raise ValueError("the vocabulary walk slices a contiguous class dimension: K-dimensional heads "
                         "use walk='tokens'")
    walks = (walk,) if walk is not None else ((ROWS,) if positions > 1 else (ROWS, VOCAB))
    plan = _head.plan_walks(n_rows, n_classes * positions, in_features, dtype, input_grad_in_forward=True,
                            per_row_bytes=PER_ROW_VALUES * positions * compute_dtype(dtype).itemsize,
                            weight_walks=walks, chunk_rows=chunk_rows, slice_classes=slice_classes)
    slice_classes = max(1, min(plan.slice_classes, n_classes))
    return Plan(plan.weight_walk, plan.chunk_rows, slice_classes, positions)


def choose_walk(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, positions: int = 1) -> str:
    """The walk of make_plan; n_classes counts every class of the head (V·d1·…·dk)."""
    return make_plan(n_rows, n_classes // positions, in_features, dtype, positions).walk


def _walk_plan(plan: Plan) -> WalkPlan:
    return WalkPlan(plan.walk, ROWS, plan.chunk_rows, plan.slice_classes)


def working_memory_bytes(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, plan: Plan, *,
                         bias: bool = False, prob_target: bool = False) -> int:
    """Peak bytes beyond inputs and gradients of a training step by `plan` (the engine's byte model);
    n_rows counts input rows, n_classes the class dimension (without K-dim positions). Beside the
    engine's terms: the target mass of probability targets, a bias's row of ones and fp32 column sums."""
    acc = compute_dtype(dtype).itemsize
    total = _head.working_memory_bytes(n_rows, n_classes * plan.positions, in_features, dtype, _walk_plan(plan),
                                       input_grad_in_forward=True, per_row_bytes=PER_ROW_VALUES * plan.positions * acc)
    if prob_target and plan.walk == VOCAB:
        total += n_rows * acc
    if bias:
        total += (max(plan.chunk_rows, n_rows) + n_classes * plan.positions) * dtype.itemsize + \
            4 * n_classes * plan.positions
    return total


class _Call(NamedTuple):
    """The call's tensors, flattened: input (N, H), weight (V·D, H), bias (V·D) or None, target (N·D)
    class indices or (N, V) / (N, V, D) probabilities, class weights (V) or None."""
    input: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    target: Tensor
    class_weight: Optional[Tensor]

    @property
    def head(self) -> Head:
        return Head(self.input, self.weight, self.bias)


def _chunk_view(logits: Tensor, plan: Plan) -> Tensor:
    # (R, V·D) → (R, V, D) for K-dimensional heads: the kernel reads the class dim with stride D
    return logits if plan.positions == 1 else logits.unflatten(1, (-1, plan.positions))


def _chunk_target(target: Tensor, rows: slice, positions: int) -> Tensor:
    if target.is_floating_point():
        return target[rows]
    return target[rows.start * positions:rows.stop * positions]


def _loss_rows(rows: slice, positions: int) -> slice:
    return slice(rows.start * positions, rows.stop * positions)


def row_walk(call: _Call, spec: LossSpec, stats: Tensor, plan: Plan, needs: Needs, *,
             grad_output: Optional[Tensor] = None, lse_grad: Optional[Tensor] = None,
             out: Optional[tuple[Tensor, Tensor]] = None):
    """The forward's walk, per-row loss and lse into `out`, or the backward's, with the upstream gradients
    `grad_output` of the loss and `lse_grad` of the lse (one per loss row, or None) folded in; and the
    gradients `needs` asks for."""
    positions = plan.positions
    per_row_upstream = grad_output is not None and spec.reduction == "none"

    def visit(logits: Tensor, rows: slice) -> bool:
        view, target = _chunk_view(logits, plan), _chunk_target(call.target, rows, positions)
        of_rows = _loss_rows(rows, positions)
        grad = view if any(needs) else None
        if grad_output is None:
            loss_rows, lse = out
            softmax_losses.launch_forward(view, target, call.class_weight, spec, stats, loss=loss_rows[of_rows],
                                          lse=lse[of_rows], grad=grad, reduce=False)
        else:
            softmax_losses.launch_backward(view, target, call.class_weight, spec, stats, grad,
                                           grad_output[of_rows] if per_row_upstream else grad_output,
                                           None if lse_grad is None else lse_grad[of_rows], keep_unit_rows=False)
        return grad is not None

    return _head.row_walk(call.head, plan.chunk_rows, visit, needs)


def _probability_target_mass(call: _Call, spec: LossSpec) -> Tensor:
    """A_i = Σ_c w_c q_ic of (N, V) probability targets, on the device."""
    target = call.target
    n_rows, n_classes = target.shape
    mass = target.new_empty(n_rows, dtype=compute_dtype(call.input.dtype))
    rows = max(1, min(SLICE_TILE // MASS_BLOCK, next_power_of_2(max(n_rows, 1))))
    block = min(MASS_BLOCK, next_power_of_2(n_classes))
    Launch(linear_target_mass_kernel, (cdiv(n_rows, rows),), ("target_ptr", "weight_ptr", "mass_ptr"), num_warps=4,
           target_stride_row=target.stride(0), target_stride_class=target.stride(1), n_rows=n_rows,
           n_classes=n_classes, label_smoothing=spec.label_smoothing, ROWS=rows, BLOCK_SIZE=block,
           WIDE_OFFSETS=n_classes * abs(target.stride(1)) >= 2**31, HAS_WEIGHT=call.class_weight is not None,
           COMPUTE_DTYPE=triton_dtype(call.input.dtype))(target, mass if call.class_weight is None else call.class_weight,
                                                          mass)
    return mass


@functools.lru_cache(maxsize=1024)
def _slice_launch(n_rows: int, width: int, start: int, n_classes: int, logits_stride: int, target_strides: tuple,
                  grad_output_stride: int, lse_grad_stride: Optional[int], prob_target: bool, has_weight: bool,
                  spec: LossSpec, dtype: torch.dtype) -> Launch:
    block = min(SLICE_BLOCK, next_power_of_2(width))
    rows_per_program = max(1, min(SLICE_TILE // block, next_power_of_2(n_rows)))
    return Launch(
        linear_vocab_slice_grad_kernel, (cdiv(n_rows, rows_per_program), cdiv(width, block)),
        ("logits_ptr", "target_ptr", "weight_ptr", "lse_ptr", "mass_ptr", "weight_sum_ptr", "stats_ptr",
         "grad_output_ptr", "lse_grad_ptr"), num_warps=SLICE_WARPS,
        logits_stride_row=logits_stride, target_stride_row=target_strides[0], target_stride_class=target_strides[1],
        grad_output_stride=grad_output_stride, lse_grad_stride=lse_grad_stride or 0, n_rows=n_rows, n_slice_classes=width, class_start=start,
        n_classes=n_classes, ignore_index=spec.ignore_index, label_smoothing=spec.label_smoothing,
        z_loss=spec.z_loss, softcap=spec.softcap if spec.softcap is not None else 1.0, ROWS=rows_per_program,
        BLOCK_SIZE=block, WIDE_OFFSETS=n_classes * abs(target_strides[1]) >= 2**31, PROB_TARGET=prob_target,
        HAS_WEIGHT=has_weight, HAS_SMOOTHING=spec.label_smoothing > 0, HAS_Z_LOSS=spec.z_loss != 0,
        HAS_SOFTCAP=spec.softcap is not None, MEAN=spec.reduction == "mean",
        GRAD_OUTPUT=2 if spec.reduction == "none" else 1, HAS_LSE_GRAD=lse_grad_stride is not None,
        COMPUTE_DTYPE=triton_dtype(dtype))


def vocab_walk(call: _Call, spec: LossSpec, stats: Tensor, lse: Tensor, plan: Plan, grad_output: Tensor,
               needs: Needs, lse_grad: Optional[Tensor] = None) -> tuple:
    """∂W and ∂b slice by slice of the vocabulary, for the upstream gradients `grad_output` (a scalar, or
    one value per row for 'none') and `lse_grad` (one per row, or None), from the forward's per-row lse."""
    n_rows, n_classes = call.input.shape[0], call.weight.shape[0]
    prob_target = call.target.is_floating_point()
    grad_output = per_row(grad_output) if spec.reduction == "none" else grad_output.reshape(())
    mass = _probability_target_mass(call, spec) if prob_target and n_rows else lse
    weight_sum = stats  # a placeholder pointer unless hard targets are smoothed with class weights
    if not prob_target and call.class_weight is not None and spec.label_smoothing > 0:
        weight_sum = call.class_weight.sum(0, keepdim=True)
    target_strides = call.target.stride() if prob_target else (call.target.stride(0) if n_rows > 1 else 1, 0)
    class_weight = stats if call.class_weight is None else call.class_weight

    def visit(logits: Tensor, classes: slice) -> bool:
        launch = _slice_launch(n_rows, logits.shape[1], classes.start, n_classes, logits.stride(0), target_strides,
                               grad_output.stride(0) if grad_output.dim() else 0,
                               None if lse_grad is None else lse_grad.stride(0), prob_target,
                               call.class_weight is not None, spec, call.input.dtype)
        launch(logits, call.target, class_weight, lse, mass, weight_sum, stats, grad_output,
               stats if lse_grad is None else lse_grad)
        return True

    return _head.vocab_walk(call.head, plan.slice_classes, visit, needs)


# ---------------------------------------------------------------------------------------------
# Forward and backward bodies (eager, and the custom ops torch.compile traces)


def made_in_forward(plan: Plan, reduction: str, needs: Needs) -> Needs:
    """Which of the needed gradients the forward makes (for an upstream gradient of 1)."""
    if plan.walk == VOCAB:
        return Needs(needs.input, False, False)
    if reduction == "none":
        # ∂W sums rows, so it needs each row's upstream gradient: the backward walks the rows again
        # with it folded in, and ∂input comes out of that walk too (rounded once, at no extra GEMM)
        return NOTHING
    return needs


def _forward_fake(input, linear_weight, linear_bias, target, weight, spec, plan, needs, validate):
    acc = compute_dtype(input.dtype)
    n_loss_rows = input.shape[0] * plan.positions
    return (input.new_empty(n_loss_rows, dtype=acc), input.new_empty(n_loss_rows, dtype=acc),
            input.new_empty(_launch.N_TARGET_STATS, dtype=acc))


@kernel_op("linear_cross_entropy_forward", _forward_fake)
def forward(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
            weight: Optional[Tensor], spec: LossSpec, plan: Plan, needs: Needs,
            validate: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss and lse and the mean's divisors; the gradients `needs` asks for, for an upstream
    gradient of 1, are kept with the divisors for the backward. Class indices are validated here, before
    any GEMM, as `validate` says."""
    call = _Call(input, linear_weight, linear_bias, target, weight)
    n_classes = linear_weight.shape[0] // plan.positions
    placeholder = input.new_empty(()).expand(input.shape[0], n_classes, plan.positions)
    stats = softmax_losses.statistics(placeholder, target, weight, spec, validate)
    acc = compute_dtype(input.dtype)
    out = tuple(input.new_empty(input.shape[0] * plan.positions, dtype=acc) for _ in range(2))
    made = row_walk(call, spec, stats, plan, needs, out=out)
    if any(needs):
        keep_gradients(stats, *made)
    return out[0], out[1], stats


def _backward_fake(input, linear_weight, linear_bias, target, weight, stats, lse, grad_output, lse_grad, spec, plan,
                   needs):
    shapes = (input.shape, linear_weight.shape, linear_weight.shape[:1])
    return [input.new_empty(shape if needed else (0,)) for shape, needed in zip(shapes, needs)]


@kernel_op("linear_cross_entropy_backward", _backward_fake)
def backward(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
             weight: Optional[Tensor], stats: Tensor, lse: Tensor, grad_output: Tensor, lse_grad: Optional[Tensor],
             spec: LossSpec, plan: Plan, needs: Needs) -> list[Tensor]:
    """(∂input, ∂W, ∂b) among `needs` (an empty tensor elsewhere) for the upstream gradients of the loss
    and of the lse (one per loss row, or None): the forward's, scaled in place, where it made them and the
    lse has none; the rest computed afresh, ∂input by the row walk, ∂W and ∂b by the plan's walk."""
    call = _Call(input, linear_weight, linear_bias, target, weight)
    kept = take_gradients(stats)
    if lse_grad is not None:
        kept = None  # made for the loss alone: every gradient is recomputed with both upstreams folded in
        lse_grad = per_row(lse_grad)
    results = list(kept) if kept is not None else [None, None, None]
    made = made_in_forward(plan, spec.reduction, needs) if kept is not None else NOTHING
    for i, was_made in enumerate(made):
        if was_made:
            _launch.scale_(results[i], grad_output)
    missing = Needs(*(need and not was_made for need, was_made in zip(needs, made)))
    if missing.input or (plan.walk == ROWS and (missing.weight or missing.bias)):
        walked = Needs(missing.input, missing.weight and plan.walk == ROWS, missing.bias and plan.walk == ROWS)
        upstream = per_row(grad_output) if spec.reduction == "none" else grad_output.reshape(())
        for i, grad in enumerate(row_walk(call, spec, stats, plan, walked, grad_output=upstream, lse_grad=lse_grad)):
            if walked[i]:
                results[i] = grad
    if plan.walk == VOCAB and (missing.weight or missing.bias):
        _, grad_weight, grad_bias = vocab_walk(call, spec, stats, lse, plan, grad_output,
                                               Needs(False, missing.weight, missing.bias), lse_grad)
        results[1:] = [grad_weight if missing.weight else results[1], grad_bias if missing.bias else results[2]]
    return [g if g is not None else input.new_empty(0) for g in results]


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(input (N, H), weight (V·D, H), bias (V·D) or None, target, class weights, spec, plan,
    validate, out_dtype, return_lse) -> (loss, lse per loss row); gradients for input, weight and bias
    (the lse differentiable where the caller asked for it)."""

    @staticmethod
    def forward(ctx, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                weight: Optional[Tensor], spec: LossSpec, plan: Plan, validate: str, out_dtype: torch.dtype,
                return_lse: bool):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.plan = spec, plan
        ctx.needs = Needs(*ctx.needs_input_grad[:3])
        loss_rows, lse, stats = forward(input, linear_weight, linear_bias, target, weight, spec, plan,
                                        made_in_forward(plan, spec.reduction, ctx.needs), validate)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, stats, lse)
        ctx.return_lse = return_lse
        if not return_lse:
            ctx.mark_non_differentiable(lse)
        return reduce_rows(loss_rows, spec.reduction, loss_rows.shape, out_dtype), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        no_grads = (None,) * 7  # target, weight, spec, plan, validate, out_dtype, return_lse
        if not ctx.return_lse:
            grad_lse = None  # (a compiled graph passes zeros for it)
        if grad_loss is None and grad_lse is None:
            return (None, None, None, *no_grads)
        if grad_loss is None:  # only the lse is used
            lse = ctx.saved_tensors[6]
            grad_loss = lse.new_zeros(()) if ctx.spec.reduction != "none" else lse.new_zeros(()).expand(lse.shape)
        grads = backward(*ctx.saved_tensors, grad_loss, grad_lse, ctx.spec, ctx.plan, ctx.needs)
        return (*(g if need else None for g, need in zip(grads, ctx.needs)), *no_grads)


def run(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
        weight: Optional[Tensor], spec: LossSpec, *, walk: Optional[str], chunk_rows: Optional[int],
        slice_classes: Optional[int], validate: str, out_dtype: torch.dtype, return_lse: bool = False):
    """(loss, lse) for checked arguments (`validate`: the class-index check's mode): input (…, H) with
    linear_weight (V, H), or input (N, H) with linear_weight (V, d1, …, dk, H), the K-dimensional loss over
    positions (d1, …, dk)."""
    in_features = input.shape[-1]
    out_features = linear_weight.shape[1:-1]
    positions = math.prod(out_features)
    n_classes = linear_weight.shape[0]
    loss_shape = input.shape[:-1] + out_features
    n_rows = input.shape[:-1].numel()
    input = input.reshape(n_rows, in_features)  # explicit sizes: a head may have no features
    if target.is_floating_point():  # (N, V, d…) probabilities: rows stay whole, positions trail
        target = target.reshape(n_rows, n_classes, positions) if positions > 1 else target.reshape(n_rows, n_classes)
    else:
        target = target.reshape(-1)
    if weight is not None:
        weight = weight.to(compute_dtype(input.dtype)).contiguous()
    plan = make_plan(n_rows, n_classes, in_features, input.dtype, positions, walk=walk, chunk_rows=chunk_rows,
                     slice_classes=slice_classes)
    head = (input, linear_weight.reshape(n_classes * positions, in_features),
            None if linear_bias is None else linear_bias.reshape(-1))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in head):
        loss, lse = LinearCrossEntropyFunction.apply(*head, target, weight, spec, plan, validate, out_dtype,
                                                     return_lse)
    else:  # no gradient work at all: the kernel writes no gradient, no gradient GEMMs run
        loss_rows, lse, _ = forward(*head, target, weight, spec, plan, NOTHING, validate)
        loss = reduce_rows(loss_rows, spec.reduction, loss_rows.shape, out_dtype)
    if spec.reduction == "none":
        loss = loss.reshape(loss_shape)
    return loss, lse.reshape(loss_shape)

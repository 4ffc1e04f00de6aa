"""autograd Functions of fastce.distributed: the per-rank steps with the two all-reduces between them.

Forward of the loss (every rank, its own slice):
    statistics (one read of the slice) → all-reduce MAX (N values) → rescale → all-reduce SUM
    (N·K + 1 values, K = 2…4) → finish (per-row loss, log-sum-exp, what the backward needs).
Backward: the gradient of the slice, from the slice and the saved per-row values; no communication.

Why the gradient is not written in the forward, as the single-device kernel does: here it needs
the global log-sum-exp, known only after the second all-reduce, so the forward would have to read
the slice a second time anyway. Writing it in the backward costs the same bytes (read in the
forward; read + write in the backward), takes the upstream gradient in the same pass (rounded
once), keeps no gradient buffer alive between forward and backward, and leaves a no-grad forward
at one read.

The linear form (a column-parallel head) runs that forward per chunk of rows on chunk-sized logits
(the full logits never exist, nor the rank's whole slice of them), writes each chunk's gradient
over its logits and turns it into ∂input (partial: this rank's classes only), ∂W and ∂b of the
slice; the backward sums ∂input over the group, the one collective a column-parallel layer needs
there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .collectives import Partition, all_reduce_max, all_reduce_sum
from .spec import VocabParallelSpec


def per_rank_steps(t: Tensor):
    """The module running this rank's steps: Triton kernels, or the pure-PyTorch reference."""
    from ..functional import uses_triton
    if uses_triton(t):
        from . import ops
        return ops
    from . import reference
    return reference


def reduce_rows(loss_rows: Tensor, reduction: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """The loss from per-row values already divided by the mean's divisors (so every reduction is a sum).
    (fastce.autograd.reduce_rows, with the loss dtype chosen: that module needs Triton, this one not.)"""
    if reduction == "none":
        return loss_rows.reshape(shape).to(dtype)
    if reduction == "mean" and loss_rows.numel() == 0:
        return loss_rows.new_full((), float("nan"), dtype=dtype)  # 0/0, as torch
    return loss_rows.sum().to(dtype)


def forward_statistics(steps, logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: VocabParallelSpec,
                       part: Partition, divisors: Tensor):
    """(per-row loss, maxima, row state, V as a 1-element tensor): the forward's two all-reduces."""
    maxima, stats = steps.statistics(logits, target, weight, spec, part.vocab_start)
    all_reduce_max(maxima[0], part.group)  # 1: the row max (N values)
    steps.rescale(stats, maxima, weight, spec, target.is_floating_point(), part.vocab_start, part.n_classes)
    all_reduce_sum(stats, part.group)  # 2: every row statistic, and V, in one message
    loss_rows, _, row_state = steps.finish(stats, maxima, target, weight, divisors, spec)
    return loss_rows, maxima, row_state, stats[-1:]


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """apply(logits slice (…, V_r), target (…) or (…, V_r), weight (V,) or None, spec, partition,
    divisors, loss dtype) -> loss; the gradient of the slice."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: VocabParallelSpec,
                part: Partition, divisors: Tensor, loss_dtype: torch.dtype):
        ctx.set_materialize_grads(False)
        ctx.steps, ctx.spec, ctx.part = per_rank_steps(logits), spec, part
        loss_rows, maxima, row_state, vocab_size = forward_statistics(ctx.steps, logits, target, weight, spec, part,
                                                                      divisors)
        ctx.save_for_backward(logits, target, weight, divisors, maxima, row_state, vocab_size)
        return reduce_rows(loss_rows, spec.reduction, logits.shape[:-1], loss_dtype)

    @staticmethod
    @once_differentiable  # the gradient is not itself differentiable: a clear error on double backward
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * 7
        logits, target, weight, divisors, maxima, row_state, vocab_size = ctx.saved_tensors
        grad = ctx.steps.gradient(logits, target, weight, ctx.spec, ctx.part.vocab_start, maxima, row_state,
                                  vocab_size, divisors, grad_output=grad_loss)
        return grad, None, None, None, None, None, None


def _chunked_pass(steps, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                  weight: Optional[Tensor], spec: VocabParallelSpec, part: Partition, divisors: Tensor,
                  chunk_rows: int, grads_needed: tuple[bool, bool, bool], saved=None,
                  grad_output: Optional[Tensor] = None):
    """Over chunks of rows of input (N, H): the chunk's logits (R, V_r) in one reused buffer; with
    `saved` None the forward statistics (two all-reduces per chunk), else the saved per-row values;
    with any of grads_needed, the chunk's gradient written over its logits and turned into ∂input
    (not yet summed over the group), ∂W, ∂b."""
    from ..linear import _HeadGradients

    n_rows = input.shape[0]
    chunk_rows = max(1, min(chunk_rows, n_rows))
    need_input, need_weight, need_bias = grads_needed
    per_row_upstream = grad_output is not None and spec.reduction == "none"
    buffer = input.new_empty(chunk_rows if n_rows else 0, part.n_classes)
    grad_input = torch.empty_like(input) if need_input else None
    head_grads = _HeadGradients(linear_weight, need_weight, need_bias, -(-n_rows // chunk_rows), chunk_rows)
    loss_parts, max_parts, state_parts = [], [], []
    vocab_size = None if saved is None else saved[2]
    for start in range(0, max(n_rows, 1), chunk_rows):  # an empty batch is one empty chunk: same collectives
        rows = slice(start, min(start + chunk_rows, n_rows))
        input_chunk = input[rows]
        logits = buffer[: input_chunk.shape[0]]
        if linear_bias is None:
            torch.mm(input_chunk, linear_weight.t(), out=logits)
        else:
            torch.addmm(linear_bias, input_chunk, linear_weight.t(), out=logits)
        if saved is None:
            loss_rows, maxima, row_state, vocab_size = forward_statistics(steps, logits, target[rows], weight, spec,
                                                                          part, divisors)
            loss_parts.append(loss_rows)
            max_parts.append(maxima)
            state_parts.append(row_state)
        else:
            maxima, row_state = saved[0][:, rows], saved[1][rows]
        if any(grads_needed):
            steps.gradient(logits, target[rows], weight, spec, part.vocab_start, maxima, row_state, vocab_size,
                           divisors, grad_output=grad_output[rows] if per_row_upstream else grad_output, out=logits)
            if need_input:
                torch.mm(logits, linear_weight, out=grad_input[rows])  # ∂input = ∂logits · W_r
            head_grads.add(logits, input_chunk)  # ∂W_r = ∂logitsᵀ · input, ∂b_r = Σ_rows ∂logits
    grads = (grad_input, *head_grads.results())
    if saved is not None:
        return grads
    return torch.cat(loss_parts), torch.cat(max_parts, 1), torch.cat(state_parts), vocab_size, grads


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """apply(input (N, H), linear_weight (V_r, H), linear_bias (V_r) or None, target, weight, spec,
    partition, divisors, chunk_rows, loss dtype) -> loss; gradients for input (summed over the
    group), linear_weight and linear_bias. Triton path."""

    @staticmethod
    def forward(ctx, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                weight: Optional[Tensor], spec: VocabParallelSpec, part: Partition, divisors: Tensor,
                chunk_rows: int, loss_dtype: torch.dtype):
        ctx.set_materialize_grads(False)
        ctx.steps, ctx.spec, ctx.part, ctx.chunk_rows = per_rank_steps(input), spec, part, chunk_rows
        ctx.grads_needed = tuple(ctx.needs_input_grad[:3])
        # 'none' needs the per-row upstream gradient before rows are summed into ∂W: backward recomputes
        ctx.grad_in_forward = spec.reduction != "none"
        ctx.grads_handed_out = False
        loss_rows, maxima, row_state, vocab_size, grads = _chunked_pass(
            ctx.steps, input, linear_weight, linear_bias, target, weight, spec, part, divisors, chunk_rows,
            ctx.grads_needed if ctx.grad_in_forward else (False, False, False))
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, divisors, maxima, row_state,
                              vocab_size, *grads)
        return reduce_rows(loss_rows, spec.reduction, input.shape[:1], loss_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        no_grads = (None,) * 7
        if grad_loss is None:
            return (None, None, None, *no_grads)
        input, linear_weight, linear_bias, target, weight, divisors, maxima, row_state, vocab_size, *grads = \
            ctx.saved_tensors
        if ctx.grad_in_forward and not ctx.grads_handed_out:
            # first backward: scale the forward's gradients (nothing moves where grad_loss is 1)
            ctx.grads_handed_out = True
            for grad in grads:
                if grad is not None:
                    ctx.steps.scale_gradient(grad, grad_loss)
        else:  # 'none', or a second backward through a retained graph
            grads = _chunked_pass(ctx.steps, input, linear_weight, linear_bias, target, weight, ctx.spec, ctx.part,
                                  divisors, ctx.chunk_rows, ctx.grads_needed, saved=(maxima, row_state, vocab_size),
                                  grad_output=grad_loss)
        if grads[0] is not None:
            all_reduce_sum(grads[0], ctx.part.group)  # the input feeds every rank's slice of the head
        return (*grads, *no_grads)


class SumGradientOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (what a column-parallel layer's
    input needs: each rank's slice of the head contributes a part of it)."""

    @staticmethod
    def forward(ctx, input: Tensor, group):
        ctx.group = group
        return input.view_as(input)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce_sum(grad, ctx.group)
        return grad, None

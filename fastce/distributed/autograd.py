"""autograd Functions of fastce.distributed: the per-rank steps with the two all-reduces between them.

Forward of the loss (every rank, its own slice):
    statistics (one read of the slice) → all-reduce MAX (N values) → rescale → all-reduce SUM
    (N·K + 1 values, K = 2…4) → finish (per-row loss, log-sum-exp, what the backward needs).
Backward: the gradient of the slice, from the slice and the saved per-row values; no communication.
The token statistics (log-probability, entropy) are the same steps (fastce/distributed/spec.py), their
backward the gradient of both outputs for their upstream gradients, also without communication.

Why the gradient is not written in the forward, as the single-device kernel does: here it needs
the global log-sum-exp, known only after the second all-reduce, so the forward would have to read
the slice a second time anyway. Writing it in the backward costs the same bytes (read in the
forward; read + write in the backward), takes the upstream gradient in the same pass (rounded
once), keeps no gradient buffer alive between forward and backward, and leaves a no-grad forward
at one read.

The linear form (a column-parallel head, fastce/distributed/linear.py on the Triton path) runs that
forward per chunk of rows; the backward sums ∂input over the group.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._core import LossSpec, TokenStatsSpec, once_differentiable, reduce_rows, uses_triton
from .collectives import MAX, SUM, Partition, Schedule
from .spec import token_loss_spec


def per_rank_steps(t: Tensor):
    """The module running this rank's steps: Triton kernels, or the pure-PyTorch reference (imported
    here: the kernels' module needs Triton, which the CPU path must not)."""
    if uses_triton(t):
        from . import ops
        return ops
    from . import reference
    return reference


def forward_messages(n_rows: int, n_stat: int) -> list[tuple[str, int]]:
    """The forward's all-reduces (a Schedule's messages) for n_rows rows of n_stat statistics each."""
    return [(MAX, n_rows), (SUM, n_rows * n_stat + 1)]


def forward_statistics(steps, logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec,
                       part: Partition, divisors: Optional[Tensor], schedule: Schedule,
                       token: Optional[TokenStatsSpec] = None):
    """(finish's values: per-row loss, lse, row state, or with `token` log-probability, entropy or None,
    row state; then maxima and V as a 1-element tensor): the forward's two all-reduces."""
    maxima, stats = steps.statistics(logits, target, weight, spec, part.vocab_start, token)
    return reduce_statistics(steps, maxima, stats, target, weight, spec, part, divisors, schedule, token)


def reduce_statistics(steps, maxima: Tensor, stats: Tensor, target: Tensor, weight: Optional[Tensor],
                      spec: LossSpec, part: Partition, divisors: Optional[Tensor], schedule: Schedule,
                      token: Optional[TokenStatsSpec] = None):
    """forward_statistics from this rank's statistics of every row (statistics' two results)."""
    schedule.all_reduce(MAX, maxima[0])  # 1: the row max (N values)
    steps.rescale(stats, maxima, weight, spec, target.is_floating_point(), part.vocab_start, part.n_classes, token)
    schedule.all_reduce(SUM, stats)  # 2: every row statistic, and V, in one message
    first, second, row_state = steps.finish(stats, maxima, target, weight, divisors, spec, token)
    return first, second, row_state, maxima, stats[-1:]


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """apply(logits slice (…, V_r), target (…) or (…, V_r), weight (V,) or None, spec, partition,
    divisors, loss dtype) -> loss; the gradient of the slice."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec,
                part: Partition, divisors: Tensor, loss_dtype: torch.dtype, schedule: Schedule):
        ctx.set_materialize_grads(False)
        ctx.steps, ctx.spec, ctx.part = per_rank_steps(logits), spec, part
        loss_rows, _, row_state, maxima, vocab_size = forward_statistics(ctx.steps, logits, target, weight, spec,
                                                                         part, divisors, schedule)
        ctx.save_for_backward(logits, target, weight, divisors, maxima, row_state, vocab_size)
        return reduce_rows(loss_rows, spec.reduction, logits.shape[:-1], loss_dtype)

    @staticmethod
    @once_differentiable  # the gradient is not itself differentiable: a clear error on double backward
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * 8
        logits, target, weight, divisors, maxima, row_state, vocab_size = ctx.saved_tensors
        grad = ctx.steps.gradient(logits, target, weight, ctx.spec, ctx.part.vocab_start, maxima, row_state,
                                  vocab_size, divisors, grad_output=grad_loss)
        return grad, None, None, None, None, None, None, None


class VocabParallelTokenStatsFunction(torch.autograd.Function):
    """apply(logits slice (…, V_r), target (…), token spec, partition, schedule) -> (log-probability (N),
    entropy (N) or empty), N the rows; the gradient of the slice for the upstream gradients of both."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, token: TokenStatsSpec, part: Partition, schedule: Schedule):
        ctx.set_materialize_grads(False)
        ctx.steps, ctx.token, ctx.part = per_rank_steps(logits), token, part
        logprob, entropy, row_state, maxima, vocab_size = forward_statistics(
            ctx.steps, logits, target, None, token_loss_spec(token), part, None, schedule, token)
        if entropy is None:  # a custom Function returns tensors: an empty one stands for "not computed"
            entropy = logprob.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, target, maxima, row_state, vocab_size, entropy)
        return logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        if not ctx.token.return_entropy:
            grad_entropy = None
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 5
        logits, target, maxima, row_state, vocab_size, entropy = ctx.saved_tensors
        grad = ctx.steps.gradient(logits, target, None, token_loss_spec(ctx.token), ctx.part.vocab_start, maxima,
                                  row_state, vocab_size, None, grad_output=grad_logprob, token=ctx.token,
                                  entropy=entropy, grad_entropy=grad_entropy)
        return grad, None, None, None, None


class SumGradientOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (what a column-parallel layer's
    input needs: each rank's slice of the head contributes a part of it)."""

    @staticmethod
    def forward(ctx, input: Tensor, group):
        ctx.group = group
        return input.view_as(input)

    @staticmethod
    def backward(ctx, grad):
        schedule = Schedule(ctx.group, [(SUM, grad.numel())], grad.dtype, grad.device)
        with schedule.keeping_step():
            grad = grad.contiguous().clone()
            schedule.all_reduce(SUM, grad)
        return grad, None

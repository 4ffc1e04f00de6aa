"""The column-parallel head on the Triton path: fastce.distributed.linear_cross_entropy's chunks of rows by
the chunked-head engine's row walk (fastce/_head.py), the forward's two all-reduces per chunk between the
per-rank steps (fastce/distributed/autograd.py's forward_statistics), and the backward's one all-reduce of
∂input over the group."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _head
from .._core import LossSpec, once_differentiable, reduce_rows
from .._head import Head, Needs
from .autograd import forward_messages, forward_statistics, per_rank_steps
from .collectives import SUM, Partition, Schedule
from .spec import n_stats

def chunk_rows(n_rows: int, vocab_size: Optional[int], world_size: int, in_features: int, dtype: torch.dtype) -> int:
    """Rows per chunk: every rank must cut the rows alike (each chunk is two all-reduces), so only numbers
    all ranks share decide: the engine's rule for the widest slice of V when V is known, else one class."""
    widest = -(-vocab_size // world_size) if vocab_size else 1
    return _head.plan_walks(n_rows, widest, in_features, dtype, input_grad_in_forward=True,
                            weight_walks=(_head.ROWS,)).chunk_rows


def cross_entropy_messages(n_rows: int, chunk_rows: int, spec: LossSpec, prob_target: bool) -> list:
    """linear_cross_entropy's forward schedule: the two all-reduces of each chunk."""
    n_stat = n_stats(spec, prob_target)
    return [m for rows in _head.chunks(n_rows, chunk_rows) for m in forward_messages(rows.stop - rows.start, n_stat)]


def _backward_schedule(part: Partition, input: Tensor, needs: Needs) -> Schedule:
    return Schedule(part.group, [(SUM, input.numel())] if needs.input else [], input.dtype, input.device)


def _chunked_pass(steps, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                  weight: Optional[Tensor], spec: LossSpec, part: Partition, divisors: Tensor,
                  chunk_rows: int, needs: Needs, schedule: Optional[Schedule] = None, saved=None,
                  grad_output: Optional[Tensor] = None):
    """The engine's row walk over input (N, H) (fastce/_head.py): per chunk, with `saved` None the forward
    statistics (two all-reduces per chunk, by `schedule`), else the saved per-row values; with any of
    `needs`, the chunk's gradient written over its logits, from which the engine makes ∂input (not yet
    summed over the group), ∂W and ∂b of this rank's slice."""
    per_row_upstream = grad_output is not None and spec.reduction == "none"
    loss_parts, max_parts, state_parts = [], [], []
    vocab_size = [None if saved is None else saved[2]]

    def visit(logits: Tensor, rows: slice) -> bool:
        if saved is None:
            loss_rows, _, row_state, maxima, vocab_size[0] = forward_statistics(steps, logits, target[rows], weight,
                                                                                spec, part, divisors, schedule)
            loss_parts.append(loss_rows)
            max_parts.append(maxima)
            state_parts.append(row_state)
        else:
            maxima, row_state = saved[0][:, rows], saved[1][rows]
        if any(needs):
            steps.gradient(logits, target[rows], weight, spec, part.vocab_start, maxima, row_state, vocab_size[0],
                           divisors, grad_output=grad_output[rows] if per_row_upstream else grad_output, out=logits)
        return any(needs)

    grads = _head.row_walk(Head(input, linear_weight, linear_bias), chunk_rows, visit, needs)
    if saved is not None:
        return grads
    return torch.cat(loss_parts), torch.cat(max_parts, 1), torch.cat(state_parts), vocab_size[0], grads


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """apply(input (N, H), linear_weight (V_r, H), linear_bias (V_r) or None, target, weight, spec,
    partition, divisors, chunk_rows, loss dtype, schedule) -> loss; gradients for input (summed over
    the group), linear_weight and linear_bias. Triton path."""

    @staticmethod
    def forward(ctx, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                weight: Optional[Tensor], spec: LossSpec, part: Partition, divisors: Tensor,
                chunk_rows: int, loss_dtype: torch.dtype, schedule: Schedule):
        ctx.set_materialize_grads(False)
        ctx.steps, ctx.spec, ctx.part, ctx.chunk_rows = per_rank_steps(input), spec, part, chunk_rows
        ctx.needs = Needs(*ctx.needs_input_grad[:3])
        # 'none' needs the per-row upstream gradient before rows are summed into ∂W: backward recomputes
        ctx.grad_in_forward = spec.reduction != "none"
        ctx.grads_handed_out = False
        loss_rows, maxima, row_state, vocab_size, grads = _chunked_pass(
            ctx.steps, input, linear_weight, linear_bias, target, weight, spec, part, divisors, chunk_rows,
            ctx.needs if ctx.grad_in_forward else Needs(), schedule)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, divisors, maxima, row_state,
                              vocab_size, *grads)
        return reduce_rows(loss_rows, spec.reduction, input.shape[:1], loss_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        no_grads = (None,) * 8
        if grad_loss is None:
            return (None, None, None, *no_grads)
        input, linear_weight, linear_bias, target, weight, divisors, maxima, row_state, vocab_size, *grads = \
            ctx.saved_tensors
        schedule = _backward_schedule(ctx.part, input, ctx.needs)
        with schedule.keeping_step():
            if ctx.grad_in_forward and not ctx.grads_handed_out:
                # first backward: scale the forward's gradients (nothing moves where grad_loss is 1)
                ctx.grads_handed_out = True
                for grad in grads:
                    if grad is not None:
                        ctx.steps.scale_gradient(grad, grad_loss)
            else:  # 'none', or a second backward through a retained graph
                grads = _chunked_pass(ctx.steps, input, linear_weight, linear_bias, target, weight, ctx.spec,
                                      ctx.part, divisors, ctx.chunk_rows, ctx.needs,
                                      saved=(maxima, row_state, vocab_size), grad_output=grad_loss)
            if grads[0] is not None:
                schedule.all_reduce(SUM, grads[0])  # the input feeds every rank's slice of the head
        return (*grads, *no_grads)


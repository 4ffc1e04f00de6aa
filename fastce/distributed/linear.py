"""The column-parallel head on the Triton path, by the chunked-head engine (fastce/_head.py).

fastce.distributed.linear_cross_entropy walks chunks of rows, the forward's two all-reduces per chunk
between the per-rank steps (fastce/distributed/autograd.py's forward_statistics): the gradient is known
in the forward and written there, chunk by chunk, so every chunk needs the global statistics of its rows.
fastce.distributed.linear_token_logprobs' gradient needs the upstream gradients of the backward, so its
forward walks the rows for this rank's statistics alone and all-reduces once for all of them (two
all-reduces per call, whatever the chunks), and its backward walks again (by rows or by vocabulary
slices, the single-device rule for this rank's slice). Both backwards end with one all-reduce of
∂input over the group."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _head, token_stats
from .._core import LossSpec, TokenStatsSpec, once_differentiable, reduce_rows
from .._head import Head, Needs, WalkPlan
from .autograd import forward_messages, forward_statistics, per_rank_steps, reduce_statistics
from .collectives import SUM, Partition, Schedule
from .spec import n_stats, token_loss_spec

# per-row values of a token-statistics step: maxima (2), statistics (3), row state (3), the two outputs
# and their two upstream gradients
TOKEN_PER_ROW_VALUES = 12


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


def token_walks(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype,
                chunk_rows: Optional[int]) -> WalkPlan:
    """linear_token_logprobs' walks over this rank's slice: token_stats' rule (no collective depends on them)."""
    return token_stats.plan(n_rows, n_classes, in_features, dtype, chunk_rows=chunk_rows,
                            per_row_values=TOKEN_PER_ROW_VALUES)


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


class VocabParallelLinearTokenStatsFunction(torch.autograd.Function):
    """apply(hidden (N, H), linear_weight (V_r, H), linear_bias (V_r) or None, target (N), token spec,
    partition, schedule, walks) -> (log-probability (N), entropy (N) or empty); gradients for hidden
    (summed over the group), linear_weight and linear_bias. Triton path."""

    @staticmethod
    def forward(ctx, hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                token: TokenStatsSpec, part: Partition, schedule: Schedule, walks: WalkPlan):
        ctx.set_materialize_grads(False)
        ctx.steps, ctx.token, ctx.part, ctx.walks = per_rank_steps(hidden), token, part, walks
        ctx.needs = Needs(*ctx.needs_input_grad[:3])
        spec = token_loss_spec(token)
        max_parts, stat_parts = [], []

        def visit(logits: Tensor, rows: slice) -> bool:  # this rank's statistics of the chunk's rows
            maxima, stats = ctx.steps.statistics(logits, target[rows], None, spec, part.vocab_start, token)
            max_parts.append(maxima)
            stat_parts.append(stats[:-1])
            return False

        _head.row_walk(Head(hidden, linear_weight, linear_bias), walks.chunk_rows, visit)
        maxima = torch.cat(max_parts, 1)
        stats = torch.cat([*stat_parts, stat_parts[0].new_empty(1)])  # and the spare value for V
        logprob, entropy, row_state, maxima, vocab_size = reduce_statistics(ctx.steps, maxima, stats, target, None,
                                                                           spec, part, None, schedule, token)
        if entropy is None:
            entropy = logprob.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, linear_weight, linear_bias, target, maxima, row_state, vocab_size, entropy)
        return logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        no_grads = (None,) * 5
        if not ctx.token.return_entropy:
            grad_entropy = None
        if grad_logprob is None and grad_entropy is None:
            return (None, None, None, *no_grads)
        hidden, linear_weight, linear_bias, target, maxima, row_state, vocab_size, entropy = ctx.saved_tensors
        steps, token, vocab_start = ctx.steps, ctx.token, ctx.part.vocab_start
        spec = token_loss_spec(token)

        def visit_rows(logits: Tensor, rows: slice) -> bool:
            steps.gradient(logits, target[rows], None, spec, vocab_start, maxima[:, rows], row_state[rows],
                           vocab_size, None, grad_output=None if grad_logprob is None else grad_logprob[rows],
                           out=logits, token=token, entropy=entropy[rows] if entropy.numel() else None,
                           grad_entropy=None if grad_entropy is None else grad_entropy[rows])
            return True

        def visit_slice(logits: Tensor, classes: slice) -> bool:
            steps.gradient(logits, target, None, spec, vocab_start + classes.start, maxima, row_state, vocab_size,
                           None, grad_output=grad_logprob, out=logits, token=token,
                           entropy=entropy if entropy.numel() else None, grad_entropy=grad_entropy)
            return True

        schedule = _backward_schedule(ctx.part, hidden, ctx.needs)
        with schedule.keeping_step():
            grads = _head.walk_gradients(Head(hidden, linear_weight, linear_bias), ctx.walks, ctx.needs, visit_rows,
                                         visit_slice)
            if grads[0] is not None:
                schedule.all_reduce(SUM, grads[0])  # the hidden states feed every rank's slice of the head
        return (*grads, *no_grads)

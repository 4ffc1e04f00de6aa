"""The chunked-head engine: a loss over the logits of a linear head, input @ W.T + b, that never holds
the (N, V) logits. Every fused head (fastce.linear_cross_entropy, fastce.linear_token_logprobs,
fastce.distributed.linear_cross_entropy) walks the head here; a family supplies the per-piece kernel.

Two walks, each over one reused buffer of logits:
- row walk: chunks of R rows, logits (R, V) = input[rows] @ W.T + b. A chunk has whole rows, so a family
  can compute row statistics there; where it writes the chunk's gradient over its logits, the engine makes
  ∂input[rows] complete (one GEMM sums over the whole vocabulary) and adds the chunk's ∂W and ∂b into
  accumulators summed in fp32 across chunks.
- vocabulary walk: slices of S classes, logits (N, S) = input @ W[cls].T + b[cls]. A slice's gradient
  needs only per-row values known beforehand; from it the engine makes ∂W[cls] and ∂b[cls] complete and
  adds the slice's ∂input term into an accumulator summed in fp32 across slices.
No gradient is ever summed across pieces in bf16: a sum over pieces accumulates in fp32 (fp64 for fp64
inputs) and is rounded once, and a sum inside one GEMM accumulates in fp32 already.

One planner (plan_walks) chooses the walks and sizes R and S from one byte model against one budget:
HEAD_BUDGET of the logits' bytes for everything a step holds beyond its inputs and gradients
(working_memory_bytes). Among the walks a family can use, it takes the fewest GEMMs that fit the budget
(an fp32 accumulator takes 4·V·H bytes for ∂W, 4·N·H for ∂input, where the input is bf16/fp16), else the
walks that hold the least; the buffers then take what the budget leaves beside the accumulators (half
of it where no walk fits), between floors of one tensor-core tile (MIN_ROWS rows, MIN_CLASSES classes)
and a ceiling of MAX_BUFFER_BYTES.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ._core import compute_dtype
from ._launch import Launch, cdiv, triton_dtype
from .kernels.common import accumulate_kernel

ROWS, VOCAB = "tokens", "vocab"   # the walks (the names fastce.linear_cross_entropy's `walk` takes)

HEAD_BUDGET = 0.05
MIN_ROWS = 16
MIN_CLASSES = 16
MAX_BUFFER_BYTES = 1 << 30
ACCUMULATE_BLOCK = 4096


class Head(NamedTuple):
    """A head's tensors, flattened: input (N, H), weight (V, H), bias (V) or None."""
    input: Tensor
    weight: Tensor
    bias: Optional[Tensor]


class Needs(NamedTuple):
    """Which gradients a walk makes."""
    input: bool = False
    weight: bool = False
    bias: bool = False


NOTHING = Needs()


class WalkPlan(NamedTuple):
    weight_walk: str    # the walk that makes ∂W and ∂b: ROWS (accumulated over chunks) or VOCAB (per slice)
    input_walk: str     # the walk that makes ∂input: ROWS (per chunk) or VOCAB (accumulated over slices)
    chunk_rows: int     # rows per chunk of the row walk
    slice_classes: int  # classes per slice of the vocabulary walk


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype not in (torch.float32, torch.float64)


def _accumulators(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, plan: WalkPlan,
                  chunk_bytes: int, slice_bytes: int) -> tuple[int, int]:
    """Bytes of the fp32 accumulators and their scratch beyond the gradients themselves, of ∂W (over row
    chunks) and of ∂input (over vocabulary slices): none for fp32/fp64 inputs, which accumulate in the
    gradient, nor for a walk of one piece."""
    if not _low_precision(dtype):
        return 0, 0
    element = dtype.itemsize
    weight = input = 0
    if plan.weight_walk == ROWS and plan.chunk_rows < n_rows:
        weight = 4 * n_classes * in_features + min(chunk_bytes, n_classes * in_features * element)
    if plan.input_walk == VOCAB and plan.slice_classes < n_classes:
        input = 4 * n_rows * in_features + min(slice_bytes, n_rows * in_features * element)
    return weight, input


def working_memory_bytes(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, plan: WalkPlan, *,
                         input_grad_in_forward: bool, per_row_bytes: int = 0) -> int:
    """Peak bytes a training step by `plan` holds beyond its inputs and gradients: the larger of its
    forward's and its backward's (a walk's buffer, with the accumulators alive beside it), and
    `per_row_bytes` of per-row tensors per row (the family's). input_grad_in_forward as plan_walks'."""
    element = dtype.itemsize
    chunk = plan.chunk_rows * n_classes * element
    slice_ = n_rows * plan.slice_classes * element
    weight_sum, input_sum = _accumulators(n_rows, n_classes, in_features, dtype, plan, chunk, slice_)
    if input_grad_in_forward:
        # the forward's row walk makes ∂input, and ∂W where it walks rows (a 'none' backward walks the rows
        # again, holding the same); a vocabulary walk makes ∂W in the backward
        forward, backward = chunk + weight_sum, slice_ if plan.weight_walk == VOCAB else 0
    else:
        walks = {plan.weight_walk, plan.input_walk}
        forward = chunk
        backward = max(chunk + weight_sum if ROWS in walks else 0, slice_ + input_sum if VOCAB in walks else 0)
    return max(forward, backward) + per_row_bytes * n_rows


def gemm_count(plan: WalkPlan, *, input_grad_in_forward: bool) -> int:
    """GEMMs of 2·N·H·V flops in a training step by `plan`: the forward's logits, and per walk that makes
    a gradient its gradient GEMMs, plus a recompute of the logits for each backward walk."""
    if input_grad_in_forward:  # the forward's row walk makes ∂input (and ∂W where it walks rows)
        return 3 if plan.weight_walk == ROWS else 4
    backward_walks = {plan.weight_walk, plan.input_walk}
    return 1 + 2 + len(backward_walks)


def plan_walks(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, *, input_grad_in_forward: bool,
               per_row_bytes: int = 0, weight_walks: tuple = (ROWS, VOCAB), chunk_rows: Optional[int] = None,
               slice_classes: Optional[int] = None) -> WalkPlan:
    """The walks and sizes of a head of N rows, V classes (every class of a K-dimensional head) and H
    features, by the module's rule. input_grad_in_forward: the family's gradient is known in the forward,
    whose row walk then makes ∂input (cross-entropy); else both gradients are made in the backward (token
    statistics). weight_walks: the walks the family allows for ∂W (a K-dimensional head only ROWS).
    chunk_rows / slice_classes override the sizes."""
    input_walks = (ROWS,) if input_grad_in_forward else (ROWS, VOCAB)
    budget = int(HEAD_BUDGET * n_rows * n_classes * dtype.itemsize) - per_row_bytes * n_rows
    candidates = []
    for weight_walk in weight_walks:
        for input_walk in input_walks:
            smallest = _sized(WalkPlan(weight_walk, input_walk, MIN_ROWS, MIN_CLASSES), n_rows, n_classes)
            held = working_memory_bytes(n_rows, n_classes, in_features, dtype, smallest,
                                        input_grad_in_forward=input_grad_in_forward)
            gemms = gemm_count(smallest, input_grad_in_forward=input_grad_in_forward)
            candidates.append(((0, gemms, held) if held <= budget else (1, held, gemms), weight_walk, input_walk))
    (over_budget, *_), weight_walk, input_walk = min(candidates)
    element = dtype.itemsize
    low = _low_precision(dtype)
    if chunk_rows is None:
        # the chunk, and with ∂W summed over chunks its fp32 accumulator and a scratch as large as the chunk
        accumulates = low and weight_walk == ROWS
        free = _left(budget, 4 * n_classes * in_features if accumulates else 0, over_budget)
        chunk_rows = free // (2 if accumulates else 1) // max(1, n_classes * element)
        chunk_rows = max(MIN_ROWS, min(chunk_rows, MAX_BUFFER_BYTES // max(1, n_classes * element)))
    if slice_classes is None:
        # the slice, and with ∂input summed over slices its fp32 accumulator and a scratch as large
        accumulates = low and input_walk == VOCAB
        free = _left(budget, 4 * n_rows * in_features if accumulates else 0, over_budget)
        slice_classes = free // (2 if accumulates else 1) // max(1, n_rows * element)
        slice_classes = max(MIN_CLASSES, min(slice_classes, MAX_BUFFER_BYTES // max(1, n_rows * element)))
    return _sized(WalkPlan(weight_walk, input_walk, chunk_rows, slice_classes), n_rows, n_classes)


def _left(budget: int, accumulator: int, over_budget: bool) -> int:
    # what the budget leaves a walk's buffers beside an accumulator; where no walk fits the budget (an
    # accumulator the family cannot avoid takes more), half of it
    return budget // 2 if over_budget else budget - accumulator


def _sized(plan: WalkPlan, n_rows: int, n_classes: int) -> WalkPlan:
    return plan._replace(chunk_rows=max(1, min(plan.chunk_rows, n_rows)),
                         slice_classes=max(1, min(plan.slice_classes, n_classes)))


# ---------------------------------------------------------------------------------------------
# Pieces of the logits


def chunk_logits(head: Head, rows: slice, out: Tensor) -> Tensor:
    """input[rows] @ W.T + b into `out` (R, V), contiguous, so that the GEMM writes it in place."""
    if head.bias is None:
        return torch.mm(head.input[rows], head.weight.t(), out=out)
    return torch.addmm(head.bias, head.input[rows], head.weight.t(), out=out)


def slice_logits(head: Head, classes: slice, out: Tensor) -> Tensor:
    """input @ W[classes].T + b[classes] into `out` (N, S)."""
    if head.bias is None:
        return torch.mm(head.input, head.weight[classes].t(), out=out)
    return torch.addmm(head.bias[classes], head.input, head.weight[classes].t(), out=out)


def column_sums(grad: Tensor, ones: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Σ_rows grad as a GEMM with a row of ones: fp32 accumulation inside, one rounding, and no fp32
    copy of grad (which a CPU sum(dtype=float32) makes)."""
    sums = torch.mm(ones[:, : grad.shape[0]], grad, out=None if out is None else out.unsqueeze(0))
    return sums.squeeze(0)


@functools.lru_cache(maxsize=256)
def _accumulate_launch(n_elements: int, dtype: torch.dtype) -> Launch:
    return Launch(accumulate_kernel, (cdiv(n_elements, ACCUMULATE_BLOCK),), ("total_ptr", "part_ptr"), num_warps=4,
                  n_elements=n_elements, BLOCK_SIZE=ACCUMULATE_BLOCK)


def accumulate_(total: Tensor, part: Tensor) -> None:
    """total += part, in total's (fp32) precision, without a converted copy of part (both contiguous)."""
    if part.numel():
        _accumulate_launch(part.numel(), part.dtype)(total, part)


class _Sum:
    """Σ_pieces a·b (the GEMM of each piece's gradient with the other operand) in the compute dtype: in the
    result itself for fp32/fp64, else in an fp32 total; each product lands in a scratch of the input
    dtype (GEMMs write their inputs' dtype), `scratch_rows` rows of the result at a time, and is added in
    fp32. A single piece is one GEMM straight into the result (rounded once)."""

    def __init__(self, like: Tensor, shape: tuple, single_piece: bool, scratch_rows: int):
        self.dtype = like.dtype
        self.single = single_piece
        self.total = self.scratch = None
        if single_piece:
            return
        acc = compute_dtype(like.dtype)
        self.total = like.new_zeros(shape, dtype=acc)
        if acc != like.dtype:
            self.scratch = like.new_empty(max(1, min(scratch_rows, shape[0])), *shape[1:])

    def add_mm(self, a: Tensor, b: Tensor, rows: slice = slice(None)) -> None:
        """total[rows] += a @ b."""
        if self.single:
            self.total = torch.mm(a, b)
            return
        total = self.total[rows]
        if self.scratch is None:
            total.addmm_(a, b)
            return
        step = self.scratch.shape[0]
        for start in range(0, a.shape[0], step):
            part = self.scratch[: min(step, a.shape[0] - start)]
            torch.mm(a[start:start + step], b, out=part)
            accumulate_(total[start:start + step], part)

    def add(self, part: Tensor) -> None:
        """total += part (a vector of the input dtype, e.g. a chunk's column sums)."""
        if self.single:
            self.total = part
        elif self.scratch is None and part.dtype == self.total.dtype:
            self.total += part
        else:
            accumulate_(self.total, part)

    def result(self) -> Tensor:
        return self.total.to(self.dtype)


Visit = Callable[[Tensor, slice], bool]


def chunks(n_rows: int, chunk_rows: int) -> list[slice]:
    """The row walk's chunks of n_rows rows: an empty batch is one empty chunk."""
    chunk_rows = max(1, min(chunk_rows, n_rows))
    return [slice(start, min(start + chunk_rows, n_rows)) for start in range(0, max(n_rows, 1), chunk_rows)]


def row_walk(head: Head, chunk_rows: int, visit: Visit, needs: Needs = NOTHING) -> tuple:
    """Over chunks of rows: the chunk's logits into one reused buffer, then visit(logits, rows), which may
    overwrite them with their gradient (and says so); returns (∂input, ∂W, ∂b) as `needs` asks, None
    elsewhere. An empty batch is one empty chunk (visit still runs: collectives stay in step)."""
    n_rows, n_classes = head.input.shape[0], head.weight.shape[0]
    chunk_rows = max(1, min(chunk_rows, n_rows))
    pieces = chunks(n_rows, chunk_rows)
    n_chunks = len(pieces)
    buffer = head.input.new_empty(chunk_rows if n_rows else 0, n_classes)
    grad_input = torch.empty_like(head.input) if needs.input else None
    grad_weight = _Sum(head.weight, tuple(head.weight.shape), n_chunks == 1,
                       chunk_rows * n_classes // max(head.weight.shape[1], 1)) if needs.weight else None
    grad_bias = _Sum(head.weight, (n_classes,), n_chunks == 1, n_classes) if needs.bias else None
    ones = head.input.new_ones(1, chunk_rows) if needs.bias else None
    for rows in pieces:
        logits = chunk_logits(head, rows, buffer[: rows.stop - rows.start])
        if not visit(logits, rows) or not any(needs):
            continue
        if needs.input:
            torch.mm(logits, head.weight, out=grad_input[rows])  # ∂input = ∂logits · W, complete
        if needs.weight:
            grad_weight.add_mm(logits.t(), head.input[rows])    # ∂W += ∂logitsᵀ · input
        if needs.bias:
            grad_bias.add(column_sums(logits, ones))            # ∂b += Σ_rows ∂logits
    if n_rows == 0:
        return _zero_gradients(head, needs)
    return grad_input, _result(grad_weight), _result(grad_bias)


def vocab_walk(head: Head, slice_classes: int, visit: Visit, needs: Needs) -> tuple:
    """Over slices of classes: the slice's logits (all rows) into one reused buffer, then
    visit(logits, classes), which overwrites them with their gradient; returns (∂input, ∂W, ∂b) as
    `needs` asks (∂W and ∂b complete per slice, ∂input summed over slices in fp32)."""
    n_rows, in_features = head.input.shape
    n_classes = head.weight.shape[0]
    if n_rows == 0 or n_classes == 0:  # (a head without classes: a vocabulary-parallel rank's empty slice)
        return _zero_gradients(head, needs)
    width = max(1, min(slice_classes, n_classes))
    storage = head.input.new_empty(n_rows * width)
    grad_input = _Sum(head.input, (n_rows, in_features), width >= n_classes, n_rows * width // max(in_features, 1)) \
        if needs.input else None
    grad_weight = torch.empty_like(head.weight) if needs.weight else None
    grad_bias = torch.empty_like(head.bias) if needs.bias else None
    ones = head.input.new_ones(1, n_rows) if needs.bias else None
    for start in range(0, n_classes, width):
        classes = slice(start, min(start + width, n_classes))
        logits = slice_logits(head, classes, storage[: n_rows * (classes.stop - start)].view(n_rows, -1))
        visit(logits, classes)
        if needs.weight:
            torch.mm(logits.t(), head.input, out=grad_weight[classes])  # the slice of ∂W, complete
        if needs.bias:
            column_sums(logits, ones, out=grad_bias[classes])          # the slice of ∂b, complete
        if needs.input:
            grad_input.add_mm(logits, head.weight[classes])             # ∂input += ∂logits · W_slice
    return _result(grad_input), grad_weight, grad_bias


def walk_gradients(head: Head, plan: WalkPlan, needs: Needs, visit_rows: Visit, visit_slice: Visit) -> tuple:
    """(∂input, ∂W, ∂b) as `needs` asks (None elsewhere), each by the walk `plan` gives it: the row walk
    with visit_rows, the vocabulary walk with visit_slice, each visit writing its piece's gradient over
    the piece's logits (a family whose gradient needs only per-row values, known from its forward)."""
    results = [None, None, None]
    for walk, run, size, visit in ((ROWS, row_walk, plan.chunk_rows, visit_rows),
                                   (VOCAB, vocab_walk, plan.slice_classes, visit_slice)):
        walked = Needs(needs.input and plan.input_walk == walk, *(need and plan.weight_walk == walk
                                                                  for need in needs[1:]))
        if any(walked):
            grads = run(head, size, visit, walked)
            results = [g if made else r for g, r, made in zip(grads, results, walked)]
    return tuple(results)


def _result(total: Optional[_Sum]) -> Optional[Tensor]:
    return None if total is None else total.result()


def _zero_gradients(head: Head, needs: Needs) -> tuple:
    return tuple(torch.zeros_like(t) if need else None for t, need in zip(head, needs))

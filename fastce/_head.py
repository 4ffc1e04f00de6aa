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

Two-head walks (fastce.linear_distillation_loss) ask for more: logits in fp32 from the GEMM (`logits_dtype`;
`mm_into` uses torch.mm's out_dtype where the device has it, else products of fp32 copies of blocks of the
operands: the same fp32 products and sums), a visit that computes the other head's piece itself
(chunk_logits / slice_logits into its own buffer) and returns its gradient (a view in the input dtype of its
fp32 buffer), ∂W of the row walk for only the first `weight_classes` classes (a vocabulary walk of the rest
writes into the same `out`), and sums given an `out` exact: each piece's product in fp32, summed in an fp32
total whose upper 16 bits live in the bf16/fp16 result itself (_ExactSum): one rounding, in half an fp32
accumulator's memory.

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
from .kernels.common import accumulate_kernel, split_accumulate_kernel, split_round_kernel

ROWS, VOCAB = "tokens", "vocab"   # the walks (the names fastce.linear_cross_entropy's `walk` takes)

HEAD_BUDGET = 0.05
MIN_ROWS = 16
MIN_CLASSES = 16
MAX_BUFFER_BYTES = 1 << 30
ACCUMULATE_BLOCK = 4096
SPLIT_WARPS = 8
# mm_into's fallback multiplies fp32 copies of a block of a's rows (at most half of them) and of b's columns,
# FP32_COPY_ELEMENTS elements in all (256 KiB)
FP32_COPY_ELEMENTS = 1 << 16


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


@functools.lru_cache(maxsize=None)
def wide_mm_available(device_type: str) -> bool:
    """Whether torch.mm(..., out_dtype=torch.float32) runs on this device type (CUDA in recent torch)."""
    key = {"cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype_out", key)


def mm_into(a: Tensor, b: Tensor, out: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """out = a @ b (+ bias), the products summed in fp32 (fp64) and rounded once to out's dtype, which may
    be wider than the operands' (fp32 logits of a bf16 head: no bf16 rounding before the softmax). Where
    the device has no GEMM with an fp32 output (the CPU), the product is taken over fp32 copies of blocks
    of a's rows and b's columns (FP32_COPY_ELEMENTS in all): the same products and fp32 sums, copies of a
    block at a time."""
    if out.dtype == a.dtype:
        return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    if wide_mm_available(a.device.type):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        inner = max(1, a.shape[1])
        a_rows = max(1, min(a.shape[0], FP32_COPY_ELEMENTS // 2 // inner))
        b_columns = max(1, min(b.shape[1], (FP32_COPY_ELEMENTS - a_rows * inner) // inner))
        a_copy = a.new_empty(a_rows, a.shape[1], dtype=out.dtype)
        b_copy = b.new_empty(b.shape[0], b_columns, dtype=out.dtype)
        for r in range(0, a.shape[0], a_rows):
            a_block = a_copy[: min(a_rows, a.shape[0] - r)].copy_(a[r:r + a_rows])
            for c in range(0, b.shape[1], b_columns):
                b_block = b_copy[:, : min(b_columns, b.shape[1] - c)].copy_(b[:, c:c + b_columns])
                torch.mm(a_block, b_block, out=out[r:r + a_rows, c:c + b_columns])
    if bias is not None:
        out.add_(bias)
    return out


def chunk_logits(head: Head, rows: slice, out: Tensor) -> Tensor:
    """input[rows] @ W.T + b into `out` (R, V), contiguous, so that the GEMM writes it in place (in fp32
    where `out` is fp32: mm_into)."""
    return mm_into(head.input[rows], head.weight.t(), out, head.bias)


def slice_logits(head: Head, classes: slice, out: Tensor) -> Tensor:
    """input @ W[classes].T + b[classes] into `out` (N, S)."""
    return mm_into(head.input, head.weight[classes].t(), out, None if head.bias is None else head.bias[classes])


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


@functools.lru_cache(maxsize=256)
def _split_launches(n_elements: int) -> tuple[Launch, Launch]:
    grid = (cdiv(n_elements, ACCUMULATE_BLOCK),)
    # 16 elements a thread: the three 32-bit views of each stay in registers (sm_90: no spills)
    return (Launch(split_accumulate_kernel, grid, ("high_ptr", "low_ptr", "part_ptr"), num_warps=SPLIT_WARPS,
                   n_elements=n_elements, BLOCK_SIZE=ACCUMULATE_BLOCK),
            Launch(split_round_kernel, grid, ("high_ptr", "low_ptr", "out_ptr"), num_warps=SPLIT_WARPS,
                   n_elements=n_elements, BLOCK_SIZE=ACCUMULATE_BLOCK))


class _ExactSum:
    """Σ_pieces a·b into `out` with one rounding: each product in the compute dtype (mm_into), summed in
    `out` itself for fp32/fp64, else in an fp32 total split in two halves of 16 bits, the upper in `out`'s
    own memory (rounded in place at the end), the lower in a buffer of 2 bytes per element: half the
    memory of an fp32 accumulator, bit for bit its sums. Products land in an fp32 scratch of
    `scratch_rows` rows of the result at a time."""

    def __init__(self, out: Tensor, scratch_rows: int):
        self.out = out
        self.split = out.dtype.itemsize == 2
        if not self.split:
            out.zero_()
            return
        self.high = out.view(torch.int16).view(out.shape[0], -1)
        self.high.zero_()
        self.low = torch.zeros_like(self.high)
        self.scratch = out.new_empty(max(1, min(scratch_rows, out.shape[0])), self.high.shape[1], dtype=torch.float32)

    def add_mm(self, a: Tensor, b: Tensor) -> None:
        """out += a @ b (out's rows are a's)."""
        if not self.split:  # fp32/fp64: the GEMM adds its product into the result itself
            self.out.view(a.shape[0], -1).addmm_(a, b)
            return
        step = self.scratch.shape[0]
        for start in range(0, a.shape[0], step):
            part = mm_into(a[start:start + step], b, self.scratch[: min(step, a.shape[0] - start)])
            accumulate, _ = _split_launches(part.numel())
            accumulate(self.high[start:start + step], self.low[start:start + step], part)

    def result(self) -> Tensor:
        if self.split and self.out.numel():
            _, round_ = _split_launches(self.out.numel())
            round_(self.high, self.low, self.out)
        return self.out


# visit(logits, piece): falsy (no gradient), True (the logits were overwritten with their gradient) or the
# gradient itself (a tensor of the input dtype, e.g. a view of the logits' fp32 buffer)
Visit = Callable[[Tensor, slice], object]


def _gradient_of(logits: Tensor, visited) -> Optional[Tensor]:
    if isinstance(visited, Tensor):
        return visited
    return logits if visited else None


def chunks(n_rows: int, chunk_rows: int) -> list[slice]:
    """The row walk's chunks of n_rows rows: an empty batch is one empty chunk."""
    chunk_rows = max(1, min(chunk_rows, n_rows))
    return [slice(start, min(start + chunk_rows, n_rows)) for start in range(0, max(n_rows, 1), chunk_rows)]


def row_walk(head: Head, chunk_rows: int, visit: Visit, needs: Needs = NOTHING, *,
             logits_dtype: Optional[torch.dtype] = None, weight_classes: Optional[int] = None,
             out: Optional[tuple] = None) -> tuple:
    """Over chunks of rows: the chunk's logits into one reused buffer (of `logits_dtype`, default the
    input's), then visit(logits, rows), which returns the chunk's gradient (Visit); returns (∂input, ∂W,
    ∂b) as `needs` asks, None elsewhere. ∂W and ∂b cover the first `weight_classes` classes (default all).
    `out` = (∂input, ∂W, ∂b) destinations (None each: allocated here): given ones are written in place,
    ∂W and ∂b summed exactly (_ExactSum). An empty batch is one empty chunk (visit still runs:
    collectives stay in step)."""
    n_rows, n_classes = head.input.shape[0], head.weight.shape[0]
    in_features = head.weight.shape[1]
    weight_classes = n_classes if weight_classes is None else weight_classes
    out = out or (None, None, None)
    chunk_rows = max(1, min(chunk_rows, n_rows))
    pieces = chunks(n_rows, chunk_rows)
    n_chunks = len(pieces)
    buffer = head.input.new_empty(chunk_rows if n_rows else 0, n_classes, dtype=logits_dtype or head.input.dtype)
    grad_input = (torch.empty_like(head.input) if out[0] is None else out[0]) if needs.input else None
    scratch_rows = chunk_rows * n_classes // max(in_features, 1)
    grad_weight = grad_bias = None
    if needs.weight:
        grad_weight = _Sum(head.weight, (weight_classes, in_features), n_chunks == 1, scratch_rows) \
            if out[1] is None else _ExactSum(out[1][:weight_classes], scratch_rows // 4)
    if needs.bias:
        grad_bias = _Sum(head.weight, (weight_classes,), n_chunks == 1, weight_classes) \
            if out[2] is None else _ExactSum(out[2][:weight_classes].unsqueeze(0), 1)
    ones = head.input.new_ones(1, chunk_rows) if needs.bias else None
    for rows in pieces:
        logits = chunk_logits(head, rows, buffer[: rows.stop - rows.start])
        grad = _gradient_of(logits, visit(logits, rows))
        if grad is None or not any(needs):
            continue
        if needs.input:
            torch.mm(grad, head.weight, out=grad_input[rows])  # ∂input = ∂logits · W, complete
        grad = grad[:, :weight_classes]
        if needs.weight:
            grad_weight.add_mm(grad.t(), head.input[rows])    # ∂W += ∂logitsᵀ · input
        if needs.bias:
            if isinstance(grad_bias, _ExactSum):
                grad_bias.add_mm(ones[:, : grad.shape[0]], grad)  # ∂b += Σ_rows ∂logits, as a (1, V) product
            else:
                grad_bias.add(column_sums(grad, ones))
    if n_rows == 0:
        return _zero_gradients(head, needs, out)
    return grad_input, _result(grad_weight), None if grad_bias is None else _result(grad_bias).reshape(-1)


def vocab_walk(head: Head, slice_classes: int, visit: Visit, needs: Needs, *, logits_dtype: Optional[torch.dtype] = None,
               first_class: int = 0, out: Optional[tuple] = None) -> tuple:
    """Over slices of the classes from `first_class` on: the slice's logits (all rows) into one reused
    buffer (of `logits_dtype`, default the input's), then visit(logits, classes), which returns their
    gradient (Visit); returns (∂input, ∂W, ∂b) as `needs` asks (∂W and ∂b complete per slice, their
    classes before first_class untouched; ∂input summed over slices in fp32). `out` as row_walk's for ∂W
    and ∂b."""
    n_rows, in_features = head.input.shape
    n_classes = head.weight.shape[0]
    out = out or (None, None, None)
    grad_weight = (torch.empty_like(head.weight) if out[1] is None else out[1]) if needs.weight else None
    grad_bias = (torch.empty_like(head.bias) if out[2] is None else out[2]) if needs.bias else None
    if n_rows == 0 or n_classes == 0:  # (a head without classes: a vocabulary-parallel rank's empty slice)
        return _zero_gradients(head, needs, (None, grad_weight, grad_bias))
    width = max(1, min(slice_classes, n_classes - first_class))
    storage = head.input.new_empty(n_rows * width, dtype=logits_dtype or head.input.dtype)
    grad_input = _Sum(head.input, (n_rows, in_features), first_class == 0 and width >= n_classes,
                      n_rows * width // max(in_features, 1)) if needs.input else None
    ones = head.input.new_ones(1, n_rows) if needs.bias else None
    for start in range(first_class, n_classes, width):
        classes = slice(start, min(start + width, n_classes))
        logits = slice_logits(head, classes, storage[: n_rows * (classes.stop - start)].view(n_rows, -1))
        grad = _gradient_of(logits, visit(logits, classes))
        if needs.weight:
            torch.mm(grad.t(), head.input, out=grad_weight[classes])  # the slice of ∂W, complete
        if needs.bias:
            column_sums(grad, ones, out=grad_bias[classes])          # the slice of ∂b, complete
        if needs.input:
            grad_input.add_mm(grad, head.weight[classes])             # ∂input += ∂logits · W_slice
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


def _zero_gradients(head: Head, needs: Needs, out: tuple) -> tuple:
    # an empty batch's gradients: zeros, in the given destinations where there are some
    return tuple(None if not need else (torch.zeros_like(t) if given is None else given.zero_())
                 for t, need, given in zip(head, needs, out))

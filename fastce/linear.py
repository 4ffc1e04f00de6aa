"""Fused linear + cross-entropy: cross_entropy(input @ W.T + b) without the (N, V) logits.

Two walks over the logits, each producing every gradient complete by cuBLAS GEMMs around fastce's
fused kernels (no gradient ever summed across pieces in bf16):

* Token walk (forward, always). Per chunk of R rows, one GEMM writes the chunk's logits (R × V)
  into a buffer reused by every chunk; the fused cross-entropy kernel (ops.launch_forward) reads
  them, writes the per-row loss and log-sum-exp, and writes their gradient over them in place;
  one more GEMM turns that gradient into the chunk's rows of ∂input, complete (the GEMM sums over
  the whole vocabulary in fp32 inside). The mean's divisors are computed once on the whole
  target, on the device, so every chunk's gradient is already final.
* ∂W and ∂b need a sum over all N rows, which the token walk only sees a chunk at a time. The
  plan's walk decides how they are made:
  - VOCAB (the language-model case): the backward walks the vocabulary in slices of S classes.
    Per slice one GEMM recomputes the slice's logits for all N rows (N × S), a kernel
    (kernels/linear_cross_entropy.py) turns them into their gradient from the forward's per-row
    log-sum-exp, with the upstream gradient folded in, and one GEMM writes that slice of ∂W,
    complete, straight into ∂W (fp32 accumulation inside the GEMM, one rounding); ∂b is the
    slice's column sum, a GEMM with a row of ones (fp32 inside, one rounding). No V × H
    accumulator exists; the price is one logits recompute.
  - TOKENS (where the token walk's own accumulator is cheap, and for K-dimensional heads): the
    forward's chunks also add ∂W += gradᵀ·input and ∂b += Σ rows into accumulators summed in fp32
    across chunks (fp32/fp64 inputs accumulate in ∂W itself; bf16/fp16 ones in a V × H fp32
    buffer: each chunk's product lands in a bf16 scratch slice of W's rows, which a kernel adds
    in fp32, kernels/linear_cross_entropy.py).

Walk rule (choose_walk). The token walk's only memory beyond its chunk is its ∂W accumulator:
none for fp32/fp64 inputs, 4·V·H bytes for bf16/fp16, i.e. 2H/N of the bf16 logits (100% for a
Llama-3-8B head at 8k tokens). So: TOKENS when the accumulator takes at most 1/ACCUMULATOR_FRACTION
of the logits' bytes (bf16: N ≥ 64·H tokens; fp32: always), or when the head is K-dimensional
(the vocabulary walk slices a contiguous class dimension); VOCAB otherwise. The token walk costs
three GEMMs of 2·N·H·V flops; the vocabulary walk four (the recompute): 8·N·H·V = 4/3 of the
6·N·H·V minimum.

Size rule: each walk's buffer takes 1/WORKING_MEMORY_FRACTION (6.25%) of the full logits' bytes
(R = N/16 rows, S = V/16 classes; the two buffers never coexist); in the token walk with an
accumulator (≤ 1/32), its chunk and its scratch take 1/64 each. Floors of MIN_CHUNK_ROWS rows
and MIN_SLICE_CLASSES classes (one tensor-core tile; below it a GEMM is a GEMV), a ceiling of
MAX_CHUNK_BYTES per buffer (past 16 GiB of logits there are more pieces, not larger ones).

Memory (working_memory_bytes, what tests/test_linear_cross_entropy.py counts). Beyond the inputs
and the gradients, with b the input's element size and a = 4 (8 for fp64):
    VOCAB:  max(R·V·b, N·S·b) + 2·N·a   (+ N·a of target mass for probability targets, N·b for a bias)
    TOKENS: R·V·b + [bf16/fp16: 4·V·H + scratch ≤ R·V·b] + 2·N·a   (+ (R + V)·b, and 4·V in bf16/fp16, for a bias)
(2·N·a: the per-row loss and log-sum-exp; a bias's column sums are GEMMs with a row of ones).
At the Llama-3-8B head (N = 8192, H = 4096, V = 128256, bf16, VOCAB): R = 512, S = 8016,
max(131.3, 131.3) MB + 65.5 kB = 6.25% of the 2.10 GB logits; at N = 2048, H = 256, V = 8192
the same 6.25% (2 MiB of 32 MiB). Under torch.compile the same with Inductor; aot_eager, which
does not reuse donated buffers, holds a copy of the forward's unit gradients while it scales them
(N·H·b of ∂input, and V·H·b of ∂W in the token walk), after the walks' buffers are freed.

Bytes per piece (b-byte elements), beside the GEMMs' operands (W or input read, logits written,
gradient read back):
    token chunk:  the fused kernel reads and writes the R × V chunk: 2·R·V·b
                  (TOKENS, bf16: + 12·V·H for the fp32 accumulator's read-modify-write and the scratch)
    vocab slice:  the slice kernel reads and writes N × S: 2·N·S·b, and ∂b's column sum reads it
                  (N·S·b); per-row vectors (lse, targets): ≤ 24·N
So the bytes outside the GEMMs are 2·b bytes per logit against the GEMMs' 2·H flops per logit per
GEMM: at H = 1024 in bf16 a chunk's kernel moves 1/1024 byte per flop of its two GEMMs, R/(H + R)
of their operands' bytes (33% at R = 512, H = 1024; 11% at H = 4096), and a slice's the same with
S for R. (The token-only design before added a 16·V·H-byte fp32 read-modify-write of ∂W per
chunk: 4× the weight's own GEMM traffic in bf16.)

Gradient strategy (as fastce/autograd.py): what the forward computes is for an upstream
gradient of 1 and backward scales it (on the device, in place, nothing moved when it is 1; under
torch.compile as `unit * grad`, which Inductor writes over the saved buffer: AOTAutograd donates
it). The vocabulary walk folds the upstream gradient into each slice's gradient; with it, the
forward makes ∂input for every reduction (for 'none' its rows scale by their own upstream
gradient: one rounding more in bf16 than folding it in, which would take a second recompute).
The token walk under 'none' makes nothing in the forward: its ∂W sums rows, so the backward
recomputes the chunks with the upstream gradient folded in, ∂input included, at the same four
GEMMs. A second backward through a retained graph recomputes what the first one handed out.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from . import ops
from .autograd import reduce_rows
from .kernels.linear_cross_entropy import (
    linear_accumulate_kernel,
    linear_target_mass_kernel,
    linear_vocab_slice_grad_kernel,
)
from .ops import LossSpec

TOKENS, VOCAB = "tokens", "vocab"

WORKING_MEMORY_FRACTION = 16
ACCUMULATOR_FRACTION = 32
MIN_CHUNK_ROWS = 16
MIN_SLICE_CLASSES = 16
MAX_CHUNK_BYTES = 1 << 30

# The slice kernel is elementwise: tiles of SLICE_TILE elements, up to SLICE_BLOCK classes wide
# (more rows when slices are narrower), 16 values per thread at SLICE_WARPS warps.
SLICE_TILE = 4096
SLICE_BLOCK = 1024
SLICE_WARPS = 8
MASS_BLOCK = 4096
ACCUMULATE_BLOCK = 4096

_GradsNeeded = tuple[bool, bool, bool]  # ∂input, ∂linear_weight, ∂linear_bias
_NO_GRADS: _GradsNeeded = (False, False, False)


class Plan(NamedTuple):
    walk: str           # how ∂W and ∂b are made: TOKENS or VOCAB (module docstring)
    chunk_rows: int     # rows per chunk of the token walk
    slice_classes: int  # classes per slice of the vocabulary walk
    positions: int = 1  # K-dimensional heads: d1·…·dk positions per input row


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype not in (torch.float32, torch.float64)


def accumulator_bytes(n_classes: int, in_features: int, dtype: torch.dtype) -> int:
    """The token walk's ∂W accumulator beyond ∂W itself: fp32 V × H for bf16/fp16 inputs, none
    for fp32/fp64 ones (they accumulate in ∂W)."""
    return 4 * n_classes * in_features if _low_precision(dtype) else 0


def choose_walk(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, positions: int = 1) -> str:
    """The walk rule (module docstring); n_classes counts every class of the head (V·d1·…·dk)."""
    if positions > 1:
        return TOKENS
    logits_bytes = n_rows * n_classes * dtype.itemsize
    return TOKENS if accumulator_bytes(n_classes, in_features, dtype) * ACCUMULATOR_FRACTION <= logits_bytes else VOCAB


def default_chunk_rows(n_rows: int, n_classes: int, element_size: int, share: int = WORKING_MEMORY_FRACTION) -> int:
    """Rows per chunk: 1/share of the rows, at least MIN_CHUNK_ROWS, at most MAX_CHUNK_BYTES of logits."""
    ceiling = max(1, MAX_CHUNK_BYTES // max(1, n_classes * element_size))
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, min(n_rows // share, ceiling))))


def default_slice_classes(n_rows: int, n_classes: int, element_size: int) -> int:
    """Classes per slice: 1/WORKING_MEMORY_FRACTION of the vocabulary, at least MIN_SLICE_CLASSES,
    at most MAX_CHUNK_BYTES of logits."""
    ceiling = max(1, MAX_CHUNK_BYTES // max(1, n_rows * element_size))
    return max(1, min(n_classes, max(MIN_SLICE_CLASSES, min(n_classes // WORKING_MEMORY_FRACTION, ceiling))))


def make_plan(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, positions: int = 1, *,
              walk: Optional[str] = None, chunk_rows: Optional[int] = None,
              slice_classes: Optional[int] = None) -> Plan:
    """The rules above, each overridable (walk, rows per chunk, classes per slice)."""
    total_classes = n_classes * positions
    walk = choose_walk(n_rows, total_classes, in_features, dtype, positions) if walk is None else walk
    if walk == VOCAB and positions > 1:
        raise ValueError("the vocabulary walk slices a contiguous class dimension: K-dimensional heads "
                         "use walk='tokens'")
    share = WORKING_MEMORY_FRACTION
    if walk == TOKENS and accumulator_bytes(total_classes, in_features, dtype):
        share *= 4  # the accumulator takes up to 1/32; chunk and scratch 1/64 each
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(n_rows, total_classes, dtype.itemsize, share)
    if slice_classes is None:
        slice_classes = default_slice_classes(n_rows, n_classes, dtype.itemsize)
    return Plan(walk, max(1, min(chunk_rows, max(n_rows, 1))), max(1, min(slice_classes, n_classes)), positions)


def working_memory_bytes(n_rows: int, n_classes: int, in_features: int, dtype: torch.dtype, plan: Plan, *,
                         bias: bool = False, prob_target: bool = False) -> int:
    """Peak bytes beyond inputs and gradients of a training step by `plan` (module docstring);
    n_rows counts input rows, n_classes the class dimension (without K-dim positions)."""
    element, acc = dtype.itemsize, ops.compute_dtype(dtype).itemsize
    total_classes = n_classes * plan.positions
    per_row = 2 * n_rows * plan.positions * acc
    chunk = plan.chunk_rows * total_classes * element
    if plan.walk == VOCAB:
        walk = n_rows * plan.slice_classes * element + (n_rows * acc if prob_target else 0)
        return max(chunk, walk + (n_rows * element if bias else 0)) + per_row
    accumulator = accumulator_bytes(total_classes, in_features, dtype)
    if accumulator:
        accumulator += _scratch_rows(plan.chunk_rows, total_classes, in_features) * in_features * element
    if bias:  # a row of ones, a chunk's column sums, and their fp32 accumulator for bf16/fp16
        accumulator += (plan.chunk_rows + total_classes) * element + (4 * total_classes if _low_precision(dtype) else 0)
    return chunk + accumulator + per_row


def _scratch_rows(chunk_rows: int, n_classes: int, in_features: int) -> int:
    # rows of W whose ∂W product a scratch no larger than the chunk's logits buffer holds
    return max(1, min(n_classes, chunk_rows * n_classes // max(in_features, 1)))


# ---------------------------------------------------------------------------------------------
# The walks


class _Head(NamedTuple):
    """The call's tensors, flattened: input (N, H), weight (V·D, H), bias (V·D) or None, target
    (N·D) class indices or (N, V) / (N, V, D) probabilities, class weights (V) or None."""
    input: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    target: Tensor
    class_weight: Optional[Tensor]

    @property
    def n_rows(self) -> int:
        return self.input.shape[0]


def _chunk_logits_view(buffer: Tensor, plan: Plan) -> Tensor:
    # (R, V·D) → (R, V, D) for K-dimensional heads: the kernel reads the class dim with stride D
    return buffer if plan.positions == 1 else buffer.unflatten(1, (-1, plan.positions))


def _target_rows(target: Tensor, rows: slice, positions: int) -> Tensor:
    if target.is_floating_point():
        return target[rows]
    return target[rows.start * positions:rows.stop * positions]


def _accumulate(total: Tensor, part: Tensor) -> None:
    """total += part, in total's (fp32) precision, without a converted copy of part."""
    n_elements = part.numel()
    linear_accumulate_kernel[(triton.cdiv(n_elements, ACCUMULATE_BLOCK),)](
        total, part, n_elements, BLOCK_SIZE=ACCUMULATE_BLOCK)


def _ones_row(like: Tensor, n_rows: int) -> Tensor:
    return like.new_ones(1, n_rows)


def _column_sums(grad: Tensor, ones: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Σ_rows grad as a GEMM with a row of ones: fp32 accumulation inside, one rounding, and no
    fp32 copy of grad (which a CPU sum(dtype=float32) makes)."""
    sums = torch.mm(ones[:, : grad.shape[0]], grad, out=None if out is None else out.unsqueeze(0))
    return sums.squeeze(0)


class _HeadGradients:
    """∂W = Σ_chunks gradᵀ·input and ∂b = Σ_chunks Σ_rows grad of a token walk, summed in fp32 across
    chunks (fp64 for fp64 inputs). A single chunk is one GEMM straight into ∂W (rounded once).
    (fastce.distributed's column-parallel head sums its chunks with it too.)"""

    def __init__(self, weight: Tensor, need_weight: bool, need_bias: bool, n_chunks: int, chunk_rows: int):
        self.dtype = weight.dtype
        self.acc_dtype = ops.compute_dtype(self.dtype)
        self.single_chunk = n_chunks <= 1
        self.need_weight, self.need_bias = need_weight, need_bias
        self.weight = self.bias = self.weight_scratch = None
        self.ones = _ones_row(weight, chunk_rows) if need_bias else None
        if self.single_chunk:
            return
        if need_weight:
            self.weight = weight.new_zeros(weight.shape, dtype=self.acc_dtype)
            if self.acc_dtype != self.dtype:
                # GEMMs write the input dtype: each chunk's product lands in this scratch, a few
                # rows of W at a time, then is added in fp32
                self.weight_scratch = weight.new_empty(
                    _scratch_rows(chunk_rows, weight.shape[0], weight.shape[1]), weight.shape[1])
        if need_bias:
            self.bias = weight.new_zeros(weight.shape[0], dtype=self.acc_dtype)

    def add(self, grad_chunk: Tensor, input_chunk: Tensor) -> None:
        if self.single_chunk:
            if self.need_weight:
                self.weight = torch.mm(grad_chunk.t(), input_chunk)
            if self.need_bias:
                self.bias = _column_sums(grad_chunk, self.ones)
            return
        if self.need_weight:
            if self.weight_scratch is None:
                self.weight.addmm_(grad_chunk.t(), input_chunk)
            else:
                step = self.weight_scratch.shape[0]
                for start in range(0, grad_chunk.shape[1], step):
                    part = self.weight_scratch[: min(step, grad_chunk.shape[1] - start)]
                    torch.mm(grad_chunk[:, start:start + step].t(), input_chunk, out=part)
                    _accumulate(self.weight[start:start + step], part)
        if self.need_bias:
            _accumulate(self.bias, _column_sums(grad_chunk, self.ones))

    def results(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return tuple(None if g is None else g.to(self.dtype) for g in (self.weight, self.bias))


def token_walk(head: _Head, spec: LossSpec, divisors: Tensor, plan: Plan, *, grads: _GradsNeeded = _NO_GRADS,
               grad_output: Optional[Tensor] = None, out: Optional[tuple[Tensor, Tensor]] = None):
    """Per-row (per-position) loss and lse, fp32, into `out` if given; and the requested gradients
    for the upstream gradient `grad_output` (None: 1; a scalar, or one value per loss row)."""
    n_rows, positions = head.n_rows, plan.positions
    need_input, need_weight, need_bias = grads
    per_row_upstream = grad_output is not None and spec.reduction == "none"
    acc = ops.compute_dtype(head.input.dtype)
    if out is None:
        out = tuple(head.input.new_empty(n_rows * positions, dtype=acc) for _ in range(2))
    loss_rows, lse = out
    buffer = head.input.new_empty(min(plan.chunk_rows, n_rows), head.weight.shape[0])
    grad_input = torch.empty_like(head.input) if need_input else None
    head_grads = _HeadGradients(head.weight, need_weight, need_bias, -(-n_rows // plan.chunk_rows), plan.chunk_rows)
    for start in range(0, max(n_rows, 1), plan.chunk_rows):  # an empty batch is one empty chunk
        rows = slice(start, min(start + plan.chunk_rows, n_rows))
        loss_rows_of = slice(rows.start * positions, rows.stop * positions)
        input_chunk = head.input[rows]
        logits = buffer[: input_chunk.shape[0]]
        if head.bias is None:
            torch.mm(input_chunk, head.weight.t(), out=logits)
        else:
            torch.addmm(head.bias, input_chunk, head.weight.t(), out=logits)
        # the kernel writes ∂loss/∂logits over the logits it has read (same buffer)
        ops.launch_forward(
            _chunk_logits_view(logits, plan), _target_rows(head.target, rows, positions), head.class_weight, spec,
            grad=_chunk_logits_view(logits, plan) if any(grads) else None, divisors=divisors,
            grad_output=grad_output[loss_rows_of] if per_row_upstream else grad_output,
            grad_output_per_row=per_row_upstream, out=(loss_rows[loss_rows_of], lse[loss_rows_of]))
        if need_input:
            torch.mm(logits, head.weight, out=grad_input[rows])  # ∂input = ∂logits · W
        head_grads.add(logits, input_chunk)  # ∂W = ∂logitsᵀ · input, ∂b = Σ_rows ∂logits
    return loss_rows, lse, (grad_input, *head_grads.results())


def _probability_target_mass(head: _Head, spec: LossSpec) -> Tensor:
    """A_i = Σ_c w_c q_ic of (N, V) probability targets, on the device."""
    target = head.target
    n_rows, n_classes = target.shape
    mass = target.new_empty(n_rows, dtype=ops.compute_dtype(head.input.dtype))
    rows = max(1, min(SLICE_TILE // MASS_BLOCK, triton.next_power_of_2(max(n_rows, 1))))
    linear_target_mass_kernel[(triton.cdiv(n_rows, rows),)](
        target, head.class_weight, mass, target.stride(0), target.stride(1), n_rows, n_classes,
        spec.label_smoothing, ROWS=rows, BLOCK_SIZE=min(MASS_BLOCK, triton.next_power_of_2(n_classes)),
        HAS_WEIGHT=head.class_weight is not None, COMPUTE_DTYPE=ops._triton_dtype(head.input.dtype))
    return mass


def vocab_walk(head: _Head, spec: LossSpec, divisors: Tensor, lse: Tensor, plan: Plan, grad_output: Tensor, *,
               need_weight: bool, need_bias: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """∂W and ∂b slice by slice of the vocabulary, for the upstream gradient `grad_output` (a scalar,
    or one value per row for 'none'), from the forward's per-row lse."""
    n_rows, in_features = head.input.shape
    n_classes = head.weight.shape[0]
    prob_target = head.target.is_floating_point()
    per_row_upstream = spec.reduction == "none"
    grad_output = grad_output.reshape(-1).contiguous()
    grad_weight = torch.empty_like(head.weight) if need_weight else None
    grad_bias = torch.empty_like(head.bias) if need_bias else None
    if n_rows == 0:
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        return grad_weight, grad_bias
    mass = _probability_target_mass(head, spec) if prob_target else lse
    weight_sum = divisors  # a placeholder pointer unless hard targets are smoothed with class weights
    if not prob_target and head.class_weight is not None and spec.label_smoothing > 0:
        weight_sum = head.class_weight.sum(0, keepdim=True)
    storage = head.input.new_empty(n_rows * plan.slice_classes)
    ones = _ones_row(head.input, n_rows) if need_bias else None
    target_strides = (head.target.stride(0), head.target.stride(1)) if prob_target else (1, 0)
    for start in range(0, n_classes, plan.slice_classes):
        classes = slice(start, min(start + plan.slice_classes, n_classes))
        width = classes.stop - classes.start
        logits = storage[: n_rows * width].view(n_rows, width)  # contiguous, so GEMMs write it in place
        if head.bias is None:
            torch.mm(head.input, head.weight[classes].t(), out=logits)
        else:
            torch.addmm(head.bias[classes], head.input, head.weight[classes].t(), out=logits)
        block = min(SLICE_BLOCK, triton.next_power_of_2(width))
        rows_per_program = max(1, min(SLICE_TILE // block, triton.next_power_of_2(n_rows)))
        grid = (triton.cdiv(n_rows, rows_per_program), triton.cdiv(width, block))
        linear_vocab_slice_grad_kernel[grid](
            logits, head.target, head.class_weight, lse, mass, weight_sum, divisors, divisors[1:], grad_output,
            logits.stride(0), *target_strides, n_rows, width, start, n_classes,
            spec.ignore_index, spec.label_smoothing, spec.z_loss, spec.softcap if spec.softcap is not None else 1.0,
            ROWS=rows_per_program, BLOCK_SIZE=block, PROB_TARGET=prob_target,
            HAS_WEIGHT=head.class_weight is not None, HAS_SMOOTHING=spec.label_smoothing > 0,
            HAS_Z_LOSS=spec.z_loss != 0, HAS_SOFTCAP=spec.softcap is not None, MEAN=spec.reduction == "mean",
            GRAD_OUTPUT=2 if per_row_upstream else 1, COMPUTE_DTYPE=ops._triton_dtype(head.input.dtype),
            num_warps=SLICE_WARPS)
        if need_weight:
            torch.mm(logits.t(), head.input, out=grad_weight[classes])  # the slice of ∂W, complete
        if need_bias:
            _column_sums(logits, ones, out=grad_bias[classes])  # the slice of ∂b, complete
    return grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Forward and backward bodies (shared by eager mode and the custom ops)


def grads_made_in_forward(plan: Plan, reduction: str, grads: _GradsNeeded) -> _GradsNeeded:
    """Which of the needed gradients the forward computes (for an upstream gradient of 1)."""
    if plan.walk == VOCAB:
        return (grads[0], False, False)
    if reduction == "none":
        # ∂W sums rows, so it needs each row's upstream gradient: backward recomputes the chunks with
        # it folded in, and ∂input comes out of that pass too (rounded once, at no extra GEMM)
        return _NO_GRADS
    return grads


def forward(head: _Head, spec: LossSpec, plan: Plan, *, grads: _GradsNeeded, validate: str):
    """Per-row loss and lse, the mean's divisors, and the gradients `grads` for an upstream gradient
    of 1. Class indices are validated here, before any GEMM, as `validate` says (fastce._validation)."""
    n_classes = head.weight.shape[0] // plan.positions
    placeholder = head.input.new_empty(()).expand(head.n_rows, n_classes, plan.positions)
    divisors = ops.statistics(placeholder, head.target, head.class_weight, spec, validate)[:2]
    loss_rows, lse, made = token_walk(head, spec, divisors, plan, grads=grads)
    return loss_rows, lse, divisors, made


def backward(head: _Head, spec: LossSpec, plan: Plan, divisors: Tensor, lse: Tensor, grad_output: Tensor, *,
             grads: _GradsNeeded):
    """(∂input, ∂W, ∂b) among `grads` for `grad_output`, computed afresh: ∂input by the token walk,
    ∂W and ∂b by the plan's walk."""
    need_input, need_weight, need_bias = grads
    per_row = spec.reduction == "none"
    grad_output = grad_output.reshape(-1) if per_row else grad_output.reshape(())
    results = [None, None, None]
    token_grads = (need_input, need_weight and plan.walk == TOKENS, need_bias and plan.walk == TOKENS)
    if any(token_grads):
        _, _, made = token_walk(head, spec, divisors, plan, grads=token_grads, grad_output=grad_output,
                                out=tuple(torch.empty_like(lse) for _ in range(2)))
        results = list(made)
    if plan.walk == VOCAB and (need_weight or need_bias):
        results[1:] = vocab_walk(head, spec, divisors, lse, plan, grad_output, need_weight=need_weight,
                                 need_bias=need_bias)
    return tuple(results)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (eager calls the functions above directly).
# Arguments: the head's tensors, LossSpec's fields, then Plan's fields.


def _empty_if_none(grads, like: Tensor) -> tuple[Tensor, ...]:
    return tuple(like.new_empty(0) if g is None else g for g in grads)


@torch.library.custom_op("fastce::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward_op(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
    gamma: float, focal: bool, walk: str, chunk_rows: int, slice_classes: int, positions: int,
    input_grad: bool, weight_grad: bool, bias_grad: bool, validate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = LossSpec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal)
    loss_rows, lse, divisors, made = forward(
        _Head(input, linear_weight, linear_bias, target, weight), spec,
        Plan(walk, chunk_rows, slice_classes, positions), grads=(input_grad, weight_grad, bias_grad),
        validate=validate)
    return (loss_rows, lse, divisors, *_empty_if_none(made, input))


def _fake_grads(input, linear_weight, linear_bias, grads) -> tuple[Tensor, ...]:
    shapes = (input.shape, linear_weight.shape, linear_weight.shape[:1])
    return tuple(input.new_empty(shape if needed else (0,)) for shape, needed in zip(shapes, grads))


@linear_cross_entropy_forward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss,
      softcap, gamma, focal, walk, chunk_rows, slice_classes, positions, input_grad, weight_grad, bias_grad,
      validate):
    acc = ops.compute_dtype(input.dtype)
    n_loss_rows = input.shape[0] * positions
    return (input.new_empty(n_loss_rows, dtype=acc), input.new_empty(n_loss_rows, dtype=acc),
            input.new_empty(2, dtype=acc), *_fake_grads(input, linear_weight, linear_bias,
                                                        (input_grad, weight_grad, bias_grad)))


@torch.library.custom_op("fastce::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    divisors: Tensor, lse: Tensor, grad_output: Tensor, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: Optional[float], gamma: float, focal: bool, walk: str, chunk_rows: int,
    slice_classes: int, positions: int, input_grad: bool, weight_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    spec = LossSpec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal)
    grads = backward(_Head(input, linear_weight, linear_bias, target, weight), spec,
                     Plan(walk, chunk_rows, slice_classes, positions), divisors, lse, grad_output,
                     grads=(input_grad, weight_grad, bias_grad))
    return _empty_if_none(grads, input)


@linear_cross_entropy_backward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, divisors, lse, grad_output, ignore_index, reduction,
      label_smoothing, z_loss, softcap, gamma, focal, walk, chunk_rows, slice_classes, positions, input_grad,
      weight_grad, bias_grad):
    return _fake_grads(input, linear_weight, linear_bias, (input_grad, weight_grad, bias_grad))


def _forward_op(head: _Head, spec: LossSpec, plan: Plan, *, grads: _GradsNeeded, validate: str):
    if torch.compiler.is_compiling():
        loss_rows, lse, divisors, *made = torch.ops.fastce.linear_cross_entropy_forward(
            *head, *spec, *plan, *grads, validate)
        return loss_rows, lse, divisors, tuple(g if needed else None for g, needed in zip(made, grads))
    return forward(head, spec, plan, grads=grads, validate=validate)


def _backward_op(head: _Head, spec: LossSpec, plan: Plan, divisors: Tensor, lse: Tensor, grad_output: Tensor, *,
                 grads: _GradsNeeded):
    if torch.compiler.is_compiling():
        made = torch.ops.fastce.linear_cross_entropy_backward(*head, divisors, lse, grad_output, *spec, *plan, *grads)
        return tuple(g if needed else None for g, needed in zip(made, grads))
    return backward(head, spec, plan, divisors, lse, grad_output, grads=grads)


def _scaled(unit_grad: Tensor, grad_output: Tensor, per_row: bool) -> Tensor:
    """unit_grad × the upstream gradient (one value per row of unit_grad when per_row)."""
    if torch.compiler.is_compiling():
        # out of place: AOTAutograd donates the saved buffer and Inductor writes the product over it
        factor = grad_output.reshape(-1, 1) if per_row else grad_output
        return unit_grad * factor.to(unit_grad.dtype)
    ops.launch_scale_gradient(unit_grad, grad_output)
    return unit_grad


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(input (N, H), weight (V·D, H), bias (V·D) or None, target, class weights, spec, plan,
    validate) -> (loss, lse per loss row); gradients for input, weight and bias."""

    @staticmethod
    def forward(ctx, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                weight: Optional[Tensor], spec: LossSpec, plan: Plan, validate: str):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.plan = spec, plan
        ctx.grads_needed = tuple(ctx.needs_input_grad[:3])
        ctx.made_in_forward = grads_made_in_forward(plan, spec.reduction, ctx.grads_needed)
        ctx.handed_out = False
        head = _Head(input, linear_weight, linear_bias, target, weight)
        loss_rows, lse, divisors, made = _forward_op(head, spec, plan, grads=ctx.made_in_forward, validate=validate)
        ctx.save_for_backward(*head, divisors, lse, *made)
        ctx.mark_non_differentiable(lse)
        loss_shape = (input.shape[0] * plan.positions,)
        return reduce_rows(loss_rows, spec.reduction, loss_shape, input.dtype), lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        no_grads = (None,) * 5  # target, weight, spec, plan, validate
        if grad_loss is None:
            return (None, None, None, *no_grads)
        *head, divisors, lse, grad_input, grad_weight, grad_bias = ctx.saved_tensors
        head = _Head(*head)
        per_row = ctx.spec.reduction == "none"
        results = [grad_input, grad_weight, grad_bias]
        from_forward = ctx.made_in_forward if not ctx.handed_out else _NO_GRADS
        ctx.handed_out = True  # a backward through a retained graph recomputes them
        for i, made in enumerate(from_forward):
            if made:
                results[i] = _scaled(results[i], grad_loss, per_row and i == 0)
        missing = tuple(needed and not made for needed, made in zip(ctx.grads_needed, from_forward))
        if any(missing):
            recomputed = _backward_op(head, ctx.spec, ctx.plan, divisors, lse, grad_loss, grads=missing)
            results = [new if redo else old for new, old, redo in zip(recomputed, results, missing)]
        return (*results, *no_grads)


def run(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
        weight: Optional[Tensor], spec: LossSpec, *, walk: Optional[str], chunk_rows: Optional[int],
        slice_classes: Optional[int], validate: str):
    """(loss, lse) for already-checked arguments (`validate`: the class-index check's mode): input (…, H) with linear_weight (V, H), or input
    (N, H) with linear_weight (V, d1, …, dk, H), the K-dimensional loss over positions (d1, …, dk)."""
    in_features = input.shape[-1]
    out_features = linear_weight.shape[1:-1]
    positions = math.prod(out_features)
    n_classes = linear_weight.shape[0]
    loss_shape = input.shape[:-1] + out_features
    input = input.reshape(-1, in_features)
    n_rows = input.shape[0]
    if target.is_floating_point():  # (N, V, d…) probabilities: rows stay whole, positions trail
        target = target.reshape(n_rows, n_classes, positions) if positions > 1 else target.reshape(n_rows, n_classes)
    else:
        target = target.reshape(-1)
    if weight is not None:
        weight = weight.to(ops.compute_dtype(input.dtype)).contiguous()
    plan = make_plan(n_rows, n_classes, in_features, input.dtype, positions, walk=walk, chunk_rows=chunk_rows,
                     slice_classes=slice_classes)
    head = _Head(input, linear_weight.reshape(-1, in_features),
                 None if linear_bias is None else linear_bias.reshape(-1), target, weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in head[:3]):
        loss, lse = LinearCrossEntropyFunction.apply(*head, spec, plan, validate)
    else:  # no gradient work at all: the kernel writes no gradient, no gradient GEMMs run
        loss_rows, lse, _, _ = _forward_op(head, spec, plan, grads=_NO_GRADS, validate=validate)
        loss = reduce_rows(loss_rows, spec.reduction, loss_rows.shape, input.dtype)
    if spec.reduction == "none":
        loss = loss.reshape(loss_shape)
    return loss, lse.reshape(loss_shape)

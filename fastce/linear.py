"""Fused linear + cross-entropy: cross_entropy(input @ W.T + b) without the (N, V) logits.

Design: chunk the N rows. Per chunk of R rows, one cuBLAS matmul writes the chunk's logits
(R × V) into a buffer reused by every chunk; the fused cross-entropy kernel (ops.launch_forward)
reads them and writes their gradient over them in place (it reads each element before it
overwrites it); two more matmuls turn that gradient into the chunk's rows of ∂input and its
contribution to ∂W (and a row sum to ∂b). The mean's divisors are computed once on the whole
target, on the device, so every chunk's gradient is already final.

Why chunking rather than logit tiles computed inside a Triton kernel (tl.dot, Cut Cross-Entropy
style). Measured with fastce.profiling at N=1024, H=64, V=8192 fp32 (tests/test_linear_cross_entropy.py
holds the numbers as budgets):
- Memory: the chunk buffer is the only logits-sized storage, and at this shape the rule below
  keeps it at 1/32 of the full logits: the whole call peaks at 3.2% of the logits' bytes beyond
  the gradients (PyTorch 2.13's chunked path, counted the same way: 7.0%). A tiled kernel would save that 3%
  but still needs the fp32 ∂W accumulator that both designs share.
- Work: chunking runs the three GEMMs a training step needs (logits, ∂input, ∂W: 2·N·H·V flops
  each) on cuBLAS, once each. A tiled kernel must recompute the logits in backward (a fourth
  GEMM, since the gradient needs the row's log-sum-exp, known only after the whole row) and runs
  its GEMMs on tl.dot, which reaches less of the tensor cores than cuBLAS; its bytes saved (the
  chunk's write + two reads per logit, ~5 bytes of traffic per 2·3·H flops of GEMM) are small next
  to that once H is in the hundreds, i.e. for every language-model head.
- Features: the fused kernel already has every option (class weights, smoothing, probability
  targets, z-loss, soft-capping, each reduction, per-row upstream gradients) with its tested
  gradients; a second kernel would write them all again.
(No GPU was lent to this task, so the comparison rests on the measured bytes and the flop count,
not on timings.)

Gradient strategy, as for the plain loss (fastce/autograd.py): for 'mean' and 'sum' all the
gradients are produced in the forward, and backward only rescales them when the upstream gradient
is not 1 (on the device, no sync). For 'none' the per-row upstream gradient must be applied before
the rows are summed into ∂W, so backward recomputes the chunks with it. Under torch.compile the
forward computes the loss only and backward recomputes (a compiled graph may not mutate a saved
buffer), one extra logits GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._validation import check_target_range, logits_placeholder
from .autograd import reduce_rows
from .ops import LossSpec

# Chunk rule.
# - Memory: a chunk holds at most 1/LOGITS_FRACTION of the rows, so its logits buffer is at most
#   1/32 (3.1%) of what the full logits would take: the 5% budget leaves room for the per-row fp32
#   loss/lse buffers and the bias gradient. MAX_CHUNK_BYTES caps the buffer (past 32 GiB of full
#   logits there are more chunks, not larger ones), so memory stops growing with N·V there.
# - Speed: every chunk reads W twice (the logits and ∂input GEMMs) and adds its ∂W into the fp32
#   accumulator (a bf16 product, then a read-modify-write in fp32), about 16 bytes per element of W,
#   against its 6·R·H·V flops of GEMM. At an H100's ~165 flops per byte of HBM bandwidth that weight
#   traffic costs 440/R of the GEMM time: 170% at the 256 rows N/32 gives for N = 8192 tokens, 21% at
#   2048. So a chunk may hold up to WEIGHT_AMORTISING_ROWS rows as long as its logits buffer stays
#   within 2·V·H bytes (2H/b rows of b-byte logits): the size of a bf16 W, half the fp32 ∂W
#   accumulator that a backward over several chunks allocates anyway. Language-model heads (H in
#   the thousands) get 2048-row chunks; small heads keep N/32.
# - At least MIN_CHUNK_ROWS rows (one tensor-core tile of M): fewer make every GEMM a GEMV.
LOGITS_FRACTION = 32
WEIGHT_AMORTISING_ROWS = 2048
MIN_CHUNK_ROWS = 16
MAX_CHUNK_BYTES = 1 << 30

_GradsNeeded = tuple[bool, bool, bool]  # ∂input, ∂linear_weight, ∂linear_bias
_NO_GRADS: _GradsNeeded = (False, False, False)


def default_chunk_rows(n_rows: int, n_classes: int, in_features: int, element_size: int) -> int:
    """Rows per chunk by the rule above."""
    by_memory = n_rows // LOGITS_FRACTION
    by_weight_traffic = min(WEIGHT_AMORTISING_ROWS, 2 * in_features // element_size)
    by_ceiling = MAX_CHUNK_BYTES // (n_classes * element_size)
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, min(max(by_memory, by_weight_traffic), by_ceiling))))


class _HeadGradients:
    """∂W = Σ_chunks grad_cᵀ·input_c and ∂b = Σ_chunks Σ_rows grad_c, summed across chunks in fp32
    (fp64 for fp64 inputs): bf16 sums across chunks make training diverge. A single chunk is one
    GEMM straight into ∂W (its accumulation over rows is fp32 inside the GEMM, rounded once)."""

    def __init__(self, linear_weight: Tensor, need_weight: bool, need_bias: bool, n_chunks: int, chunk_rows: int):
        self.dtype = linear_weight.dtype
        self.acc_dtype = ops.compute_dtype(self.dtype)
        self.single_chunk = n_chunks == 1
        self.weight = self.bias = self.weight_scratch = None
        n_classes, in_features = linear_weight.shape
        if need_weight and not self.single_chunk:
            self.weight = linear_weight.new_zeros(linear_weight.shape, dtype=self.acc_dtype)
            if self.acc_dtype != self.dtype:
                # GEMMs write the input dtype: each chunk's product lands in this scratch, then is
                # added in fp32, a vocabulary slice at a time so the scratch is no larger than the
                # chunk's logits buffer.
                slice_classes = max(1, min(n_classes, chunk_rows * n_classes // in_features))
                self.weight_scratch = linear_weight.new_empty(slice_classes, in_features)
        if need_bias and not self.single_chunk:
            self.bias = linear_weight.new_zeros(n_classes, dtype=self.acc_dtype)
        self.need_weight, self.need_bias = need_weight, need_bias

    def add(self, grad_chunk: Tensor, input_chunk: Tensor) -> None:
        if self.single_chunk:
            if self.need_weight:
                self.weight = torch.mm(grad_chunk.t(), input_chunk)
            if self.need_bias:
                self.bias = grad_chunk.sum(0, dtype=self.acc_dtype)
            return
        if self.need_weight:
            if self.weight_scratch is None:
                self.weight.addmm_(grad_chunk.t(), input_chunk)
            else:
                step = self.weight_scratch.shape[0]
                for start in range(0, grad_chunk.shape[1], step):
                    part = self.weight_scratch[: min(step, grad_chunk.shape[1] - start)]
                    torch.mm(grad_chunk[:, start:start + step].t(), input_chunk, out=part)
                    self.weight[start:start + step] += part
        if self.need_bias:
            self.bias += grad_chunk.sum(0, dtype=self.acc_dtype)

    def results(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return tuple(None if g is None else g.to(self.dtype) for g in (self.weight, self.bias))


def chunked_pass(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                 weight: Optional[Tensor], spec: LossSpec, divisors: Tensor, *, chunk_rows: int,
                 grads_needed: _GradsNeeded = _NO_GRADS, grad_output: Optional[Tensor] = None):
    """Per-row loss and lse (fp32) of 2-D `input` (N, H), and the requested gradients for the
    upstream gradient `grad_output` (None: 1; a scalar, or one value per row for 'none')."""
    n_rows, n_classes = input.shape[0], linear_weight.shape[0]
    chunk_rows = max(1, min(chunk_rows, n_rows))
    need_input, need_weight, need_bias = grads_needed
    compute_grad = any(grads_needed)
    per_row_upstream = grad_output is not None and spec.reduction == "none"
    logits_buffer = input.new_empty(chunk_rows if n_rows else 0, n_classes)
    grad_input = torch.empty_like(input) if need_input else None
    head_grads = _HeadGradients(linear_weight, need_weight, need_bias, -(-n_rows // chunk_rows), chunk_rows)
    loss_parts, lse_parts = [], []
    for start in range(0, max(n_rows, 1), chunk_rows):  # an empty batch is one empty chunk
        rows = slice(start, min(start + chunk_rows, n_rows))
        input_chunk = input[rows]
        logits = logits_buffer[: input_chunk.shape[0]]
        if linear_bias is None:
            torch.mm(input_chunk, linear_weight.t(), out=logits)
        else:
            torch.addmm(linear_bias, input_chunk, linear_weight.t(), out=logits)
        # the kernel writes ∂loss/∂logits over the logits it has read (same buffer)
        loss_rows, lse = ops.launch_forward(
            logits, target[rows], weight, spec, grad=logits if compute_grad else None, divisors=divisors,
            grad_output=grad_output[rows] if per_row_upstream else grad_output,
            grad_output_per_row=per_row_upstream)
        loss_parts.append(loss_rows)
        lse_parts.append(lse)
        if need_input:
            torch.mm(logits, linear_weight, out=grad_input[rows])  # ∂input = ∂logits · W
        head_grads.add(logits, input_chunk)  # ∂W = ∂logitsᵀ · input, ∂b = Σ_rows ∂logits
    return torch.cat(loss_parts), torch.cat(lse_parts), (grad_input, *head_grads.results())


def forward(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
            weight: Optional[Tensor], spec: LossSpec, *, chunk_rows: int, grads_needed: _GradsNeeded,
            validate: bool):
    """Per-row loss and lse, the mean's divisors, and the requested gradients for an upstream
    gradient of 1. Validation of class indices (one host sync) happens here, before any kernel."""
    n_classes = linear_weight.shape[0]
    if validate and not target.is_floating_point():
        check_target_range(target, n_classes, spec.ignore_index)
    divisors = ops.mean_divisors(logits_placeholder(input, input.shape[0], n_classes), target, weight, spec)
    loss_rows, lse, grads = chunked_pass(input, linear_weight, linear_bias, target, weight, spec, divisors,
                                         chunk_rows=chunk_rows, grads_needed=grads_needed)
    return loss_rows, lse, divisors, grads


def recompute_gradients(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                        weight: Optional[Tensor], spec: LossSpec, divisors: Tensor, grad_output: Tensor, *,
                        chunk_rows: int, grads_needed: _GradsNeeded):
    """(∂input, ∂W, ∂b) for `grad_output`, recomputing the chunks' logits."""
    _, _, grads = chunked_pass(input, linear_weight, linear_bias, target, weight, spec, divisors,
                               chunk_rows=chunk_rows, grads_needed=grads_needed,
                               grad_output=grad_output.reshape(-1).contiguous())
    return grads


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (eager calls the functions above directly).


@torch.library.custom_op("fastce::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward_op(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
    gamma: float, focal: bool, chunk_rows: int, validate: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    spec = LossSpec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal)
    loss_rows, lse, divisors, _ = forward(input, linear_weight, linear_bias, target, weight, spec,
                                          chunk_rows=chunk_rows, grads_needed=_NO_GRADS, validate=validate)
    return loss_rows, lse, divisors


@linear_cross_entropy_forward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss,
      softcap, gamma, focal, chunk_rows, validate):
    acc = ops.compute_dtype(input.dtype)
    return input.new_empty(input.shape[0], dtype=acc), input.new_empty(input.shape[0], dtype=acc), \
        input.new_empty(2, dtype=acc)


@torch.library.custom_op("fastce::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    divisors: Tensor, grad_output: Tensor, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: Optional[float], gamma: float, focal: bool, chunk_rows: int,
    input_grad: bool, weight_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    spec = LossSpec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal)
    grads = recompute_gradients(input, linear_weight, linear_bias, target, weight, spec, divisors, grad_output,
                                chunk_rows=chunk_rows, grads_needed=(input_grad, weight_grad, bias_grad))
    return tuple(input.new_empty(0) if g is None else g for g in grads)


@linear_cross_entropy_backward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, divisors, grad_output, ignore_index, reduction,
      label_smoothing, z_loss, softcap, gamma, focal, chunk_rows, input_grad, weight_grad, bias_grad):
    shapes = (input.shape, linear_weight.shape, linear_weight.shape[:1])
    return tuple(input.new_empty(shape if needed else (0,))
                 for shape, needed in zip(shapes, (input_grad, weight_grad, bias_grad)))


def _forward_op(input, linear_weight, linear_bias, target, weight, spec: LossSpec, *, chunk_rows: int,
                grads_needed: _GradsNeeded, validate: bool):
    if torch.compiler.is_compiling():
        loss_rows, lse, divisors = torch.ops.fastce.linear_cross_entropy_forward(
            input, linear_weight, linear_bias, target, weight, *spec, chunk_rows, validate)
        return loss_rows, lse, divisors, (None, None, None)
    return forward(input, linear_weight, linear_bias, target, weight, spec, chunk_rows=chunk_rows,
                   grads_needed=grads_needed, validate=validate)


def _recompute_op(input, linear_weight, linear_bias, target, weight, spec: LossSpec, divisors, grad_output, *,
                  chunk_rows: int, grads_needed: _GradsNeeded):
    if torch.compiler.is_compiling():
        grads = torch.ops.fastce.linear_cross_entropy_backward(
            input, linear_weight, linear_bias, target, weight, divisors, grad_output, *spec, chunk_rows,
            *grads_needed)
        return tuple(g if needed else None for g, needed in zip(grads, grads_needed))
    return recompute_gradients(input, linear_weight, linear_bias, target, weight, spec, divisors, grad_output,
                               chunk_rows=chunk_rows, grads_needed=grads_needed)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(input (N, H), linear_weight (V, H), linear_bias (V) or None, target, weight, spec,
    chunk_rows, validate) -> (loss, lse per row); gradients for input, linear_weight, linear_bias."""

    @staticmethod
    def forward(ctx, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                weight: Optional[Tensor], spec: LossSpec, chunk_rows: int, validate: bool):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.chunk_rows = spec, chunk_rows
        ctx.grads_needed = tuple(ctx.needs_input_grad[:3])
        # A compiled graph recomputes in backward instead: it may not mutate a saved buffer.
        ctx.grad_in_forward = spec.reduction != "none" and not torch.compiler.is_compiling()
        ctx.grads_handed_out = False
        loss_rows, lse, divisors, grads = _forward_op(
            input, linear_weight, linear_bias, target, weight, spec, chunk_rows=chunk_rows,
            grads_needed=ctx.grads_needed if ctx.grad_in_forward else _NO_GRADS, validate=validate)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, divisors, *grads)
        ctx.mark_non_differentiable(lse)
        return reduce_rows(loss_rows, spec.reduction, input.shape[:1], input.dtype), lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        no_grads = (None,) * 5  # target, weight, spec, chunk_rows, validate
        if grad_loss is None:
            return (None, None, None, *no_grads)
        input, linear_weight, linear_bias, target, weight, divisors, *grads = ctx.saved_tensors
        if ctx.grad_in_forward and not ctx.grads_handed_out:
            # First backward: scale the forward's gradients in place (nothing moves when
            # grad_loss == 1) and hand them out; a backward through a retained graph recomputes.
            ctx.grads_handed_out = True
            for grad in grads:
                if grad is not None:
                    ops.launch_scale_gradient(grad, grad_loss)
            return (*grads, *no_grads)
        grads = _recompute_op(input, linear_weight, linear_bias, target, weight, ctx.spec, divisors, grad_loss,
                              chunk_rows=ctx.chunk_rows, grads_needed=ctx.grads_needed)
        return (*grads, *no_grads)


def run(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
        weight: Optional[Tensor], spec: LossSpec, *, chunk_rows: Optional[int], validate: bool):
    """(loss, lse) for already-validated arguments, input (…, H): rows flattened, chunked."""
    row_shape = input.shape[:-1]
    n_classes = linear_weight.shape[0]
    input = input.reshape(-1, input.shape[-1])
    target = target.reshape(-1, n_classes) if target.is_floating_point() else target.reshape(-1)
    if weight is not None:
        weight = weight.to(ops.compute_dtype(input.dtype)).contiguous()
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(input.shape[0], n_classes, input.shape[1], input.element_size())
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)):
        loss, lse = LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, spec,
                                                     chunk_rows, validate)
    else:  # no gradient work at all: the kernel writes no gradient, no gradient GEMMs run
        loss_rows, lse, _, _ = _forward_op(input, linear_weight, linear_bias, target, weight, spec,
                                           chunk_rows=chunk_rows, grads_needed=_NO_GRADS, validate=validate)
        loss = reduce_rows(loss_rows, spec.reduction, input.shape[:1], input.dtype)
    if spec.reduction == "none":
        loss = loss.reshape(row_shape)
    return loss, lse.reshape(row_shape)

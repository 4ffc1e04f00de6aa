"""Per-token log-probabilities and entropy (DESIGN §7.2): launchers, torch.library custom ops,
autograd, and the linear form that never holds the (N, V) logits.

The family has its own kernels (fastce/kernels/token_stats.py) and its own module, as the linear
head has fastce/linear.py: launchers, ops and autograd Functions of one feature in one place, the
functional layer (fastce.functional) importing it only when a call runs the kernels.

Cost of token_logprobs (bytes as multiples of the logits'): the forward reads the logits once and
writes 4 bytes per row per output, plus 12 bytes of row statistics when a backward will follow.
The backward reads the logits once more and writes their gradient: the upstream gradients of the
two outputs are known only after the forward, and the gradient needs every p_j, so no design moves
less than read + read + write (3×) for a training step with arbitrary per-token weights (a loss
whose gradient is known in the forward, as cross-entropy's, can write it there: 2×).

The linear form (linear_token_logprobs): logits = hidden @ W.T + b, in two walks over one buffer of
E = R·V elements:
- forward, by chunks of R rows: one GEMM writes the chunk's logits, the forward kernel reads them
  (the row statistics need whole rows);
- backward, by vocabulary slices of E/N classes: one GEMM recomputes the slice's logits for every
  row, the backward kernel (which needs only the forward's row statistics, not whole rows) writes
  their gradient over them, and three more GEMMs give the slice's ∂W rows complete (fp32
  accumulation inside one GEMM, no (V, H) accumulator), its ∂b entries, and its term of ∂hidden,
  summed over slices in fp32 (into ∂hidden itself for fp32 inputs; else an (N, H) fp32 accumulator
  and an (N, H) product scratch).
GEMM work: 8·N·H·V flops (4/3 of a training step's minimum 6·N·H·V: the backward recomputes the
logits because its upstream gradients exist only then). Memory beyond inputs and gradients:
E·b bytes of buffer (b bytes per element), + 6·N·H bytes when b < 4 (accumulator and scratch),
+ 20·N bytes of per-row outputs and statistics. The chunk rule is at default_chunk_rows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from . import ops
from .kernels.token_stats import N_STATS, token_stats_bwd_kernel, token_stats_fwd_kernel
from .reference import compute_dtype


class TokenStatsSpec(NamedTuple):
    """The scalar options of one call (hashable)."""
    temperature: float = 1.0
    ignore_index: int = -100
    return_entropy: bool = False


# Launch rule: the cross-entropy kernel's (ops.launch_config, measured on an H200: rows of more than
# 4096 classes stream in 2048-class tiles, one row a program, 16 values of a tile per thread; shorter
# rows are one tile, several rows a program when V is small), with warps for 16 elements per thread
# everywhere. Neither token kernel keeps a row on chip (the forward is one online pass, the backward
# needs no reduction over the row), so a streamed row is still read once; and their tiles keep
# several values live per element (z, e = exp(z − ref), z − ref and their products; log p, p and the
# gradient in the backward), so the 32 elements per thread the cross-entropy rule gives a one-tile
# row spill when compiled for sm_90 (tools/sm90_compile.py), where 16 do not.
ELEMENTS_PER_WARP = 512


def launch_config(n_rows: int, n_classes: int) -> ops.LaunchConfig:
    """Rows per program, classes per tile and warps, by the rule above."""
    config = ops.launch_config(n_rows, n_classes)
    warps = triton.next_power_of_2(config.rows * config.block_size // ELEMENTS_PER_WARP)
    return config._replace(num_warps=min(32, max(4, warps)))


def launch_forward(logits: Tensor, target: Tensor, spec: TokenStatsSpec, *, store_stats: bool,
                   out: Optional[tuple] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(log-probability, entropy or None, (3, N) statistics or None) of (N, V) logits and (N) class
    indices, into `out`'s three tensors if given (None where not computed)."""
    n_rows, n_classes = logits.shape
    acc_dtype = compute_dtype(logits.dtype)
    if out is None:
        out = (logits.new_empty(n_rows, dtype=acc_dtype),
               logits.new_empty(n_rows, dtype=acc_dtype) if spec.return_entropy else None,
               logits.new_empty(N_STATS, n_rows, dtype=acc_dtype) if store_stats else None)
    logprob, entropy, stats = out
    if n_rows == 0:
        return logprob, entropy, stats
    config = launch_config(n_rows, n_classes)
    token_stats_fwd_kernel[(triton.cdiv(n_rows, config.rows),)](
        logits, target, logprob, entropy if entropy is not None else logprob, stats if stats is not None else logprob,
        logits.stride(0), logits.stride(1), stats.stride(0) if stats is not None else 0,
        n_rows, n_classes, spec.ignore_index, 1.0 / spec.temperature,
        ROWS=config.rows, BLOCK_SIZE=config.block_size, HAS_ENTROPY=entropy is not None,
        STORE_STATS=stats is not None, COMPUTE_DTYPE=ops._triton_dtype(logits.dtype), num_warps=config.num_warps)
    return logprob, entropy, stats


def launch_backward(logits: Tensor, target: Tensor, stats: Tensor, entropy: Tensor, grad_logprob: Optional[Tensor],
                    grad_entropy: Optional[Tensor], spec: TokenStatsSpec, *, grad: Tensor, class_offset: int = 0,
                    n_classes_total: Optional[int] = None) -> Tensor:
    """Writes into `grad` (N, V_slice) the gradient of Σ_i (grad_logprob_i·logprob_i + grad_entropy_i·H_i)
    with respect to `logits` (N, V_slice), which hold classes [class_offset, class_offset + V_slice)
    of rows of n_classes_total classes (default: all of them). `grad` may be `logits` itself."""
    n_rows, n_classes = logits.shape
    if n_rows == 0 or n_classes == 0:
        return grad
    config = launch_config(n_rows, n_classes)
    token_stats_bwd_kernel[(triton.cdiv(n_rows, config.rows),)](
        logits, target, stats, entropy, _per_row(grad_logprob, stats), _per_row(grad_entropy, stats), grad,
        logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1), stats.stride(0),
        n_rows, n_classes, class_offset, spec.ignore_index,
        n_classes if n_classes_total is None else n_classes_total, 1.0 / spec.temperature,
        ROWS=config.rows, BLOCK_SIZE=config.block_size, HAS_GRAD_LOGPROB=grad_logprob is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, COMPUTE_DTYPE=ops._triton_dtype(logits.dtype),
        num_warps=config.num_warps)
    return grad


def _per_row(grad_output: Optional[Tensor], placeholder: Tensor) -> Tensor:
    # autograd may hand out expanded or strided upstream gradients: the kernel reads one value per row
    return placeholder if grad_output is None else grad_output.reshape(-1).contiguous()


# ---------------------------------------------------------------------------------------------
# token_logprobs on (N, V) logits


def logits_gradient(logits, target, stats, entropy, grad_logprob, grad_entropy, spec: TokenStatsSpec) -> Tensor:
    """∂L/∂logits in the logits' dtype, one pass over the logits."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return launch_backward(logits, target, stats, entropy, grad_logprob, grad_entropy, spec, grad=grad)


@torch.library.custom_op("fastce::token_logprobs_forward", mutates_args=())
def token_logprobs_forward_op(logits: Tensor, target: Tensor, temperature: float, ignore_index: int,
                              return_entropy: bool, store_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    logprob, entropy, stats = launch_forward(logits, target, TokenStatsSpec(temperature, ignore_index, return_entropy),
                                             store_stats=store_stats)
    return logprob, _or_empty(entropy, logits), _or_empty(stats, logits)


@token_logprobs_forward_op.register_fake
def _(logits, target, temperature, ignore_index, return_entropy, store_stats):
    return _fake_outputs(logits, logits.shape[0], return_entropy, store_stats)


@torch.library.custom_op("fastce::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(logits: Tensor, target: Tensor, stats: Tensor, entropy: Tensor,
                               grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor], temperature: float,
                               ignore_index: int) -> Tensor:
    return logits_gradient(logits, target, stats, entropy, grad_logprob, grad_entropy,
                           TokenStatsSpec(temperature, ignore_index))


@token_logprobs_backward_op.register_fake
def _(logits, target, stats, entropy, grad_logprob, grad_entropy, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # a custom op returns tensors only: an empty one stands for "not computed"
    return like.new_empty(0, dtype=compute_dtype(like.dtype)) if t is None else t


def _fake_outputs(like: Tensor, n_rows: int, return_entropy: bool, store_stats: bool):
    acc = compute_dtype(like.dtype)
    return (like.new_empty(n_rows, dtype=acc), like.new_empty(n_rows if return_entropy else 0, dtype=acc),
            like.new_empty((N_STATS, n_rows) if store_stats else (0,), dtype=acc))


def _forward_op(logits, target, spec: TokenStatsSpec, *, store_stats: bool):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.token_logprobs_forward(logits, target, *spec, store_stats)
    logprob, entropy, stats = launch_forward(logits, target, spec, store_stats=store_stats)
    return logprob, _or_empty(entropy, logits), _or_empty(stats, logits)


def _backward_op(logits, target, stats, entropy, grad_logprob, grad_entropy, spec: TokenStatsSpec):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.token_logprobs_backward(logits, target, stats, entropy, grad_logprob, grad_entropy,
                                                        spec.temperature, spec.ignore_index)
    return logits_gradient(logits, target, stats, entropy, grad_logprob, grad_entropy, spec)


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs: chunked, from hidden states

# Chunk rule: R rows per forward chunk; the backward's vocabulary slices hold the same E = R·V
# elements (E/N classes each).
# - Memory: at most 1/LOGITS_FRACTION of the rows, so the buffer is at most 1/32 (3.1%) of the full
#   logits, within the 5% budget with the per-row outputs; MAX_BUFFER_BYTES caps it.
# - GEMM shape: on a wide head a chunk takes up to GEMM_ROWS rows, as long as the buffer stays
#   within the bytes of a bf16 copy of W (2·V·H, i.e. R ≤ 2H/b rows): each forward chunk reads all
#   of W (V·H·b bytes) for 2·R·H·V flops, and an H100 (~165 flops per byte of HBM) computes them in
#   less time than it reads W from R ≈ 165 rows (bf16) on. Narrow heads (2H/b below N/32), whose
#   GEMMs are memory-bound whatever R, keep the memory rule.
LOGITS_FRACTION = 32
GEMM_ROWS = 256
MAX_BUFFER_BYTES = 1 << 30


def default_chunk_rows(n_rows: int, n_classes: int, in_features: int, element_size: int) -> int:
    """Rows per forward chunk (and E = rows·V elements per backward slice) by the rule above."""
    by_memory = n_rows // LOGITS_FRACTION
    by_gemm = min(GEMM_ROWS, 2 * in_features // element_size)
    by_ceiling = MAX_BUFFER_BYTES // (n_classes * element_size)
    return max(1, min(n_rows, max(by_memory, by_gemm), by_ceiling))


def slice_classes(chunk_rows: int, n_rows: int, n_classes: int) -> int:
    """Classes per backward slice: the forward chunk's R·V elements, spread over all N rows."""
    return max(1, min(n_classes, chunk_rows * n_classes // max(n_rows, 1)))


def _logits_into(out: Tensor, hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]) -> Tensor:
    if linear_bias is None:
        return torch.mm(hidden, linear_weight.t(), out=out)
    return torch.addmm(linear_bias, hidden, linear_weight.t(), out=out)


def linear_forward(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                   spec: TokenStatsSpec, *, chunk_rows: int, store_stats: bool):
    """(log-probability, entropy or None, statistics or None) of hidden (N, H) through the head, by
    chunks of rows: one (chunk_rows, V) buffer for every chunk's logits."""
    n_rows, n_classes = hidden.shape[0], linear_weight.shape[0]
    acc_dtype = compute_dtype(hidden.dtype)
    logprob = hidden.new_empty(n_rows, dtype=acc_dtype)
    entropy = hidden.new_empty(n_rows, dtype=acc_dtype) if spec.return_entropy else None
    stats = hidden.new_empty(N_STATS, n_rows, dtype=acc_dtype) if store_stats else None
    chunk_rows = max(1, min(chunk_rows, n_rows))
    buffer = hidden.new_empty(chunk_rows * n_classes)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        n_chunk = rows.stop - start
        logits = _logits_into(buffer[: n_chunk * n_classes].view(n_chunk, n_classes), hidden[rows], linear_weight,
                              linear_bias)
        launch_forward(logits, target[rows], spec, store_stats=store_stats,
                       out=(logprob[rows], None if entropy is None else entropy[rows],
                            None if stats is None else stats[:, rows]))
    return logprob, entropy, stats


class _HiddenGradient:
    """∂hidden = Σ_slices ∂logits_s·W_s, summed in fp32 (fp64 for fp64): straight into the gradient for
    fp32/fp64 inputs; otherwise each product lands in an (N, H) scratch of the input dtype (GEMMs write
    their inputs' dtype) and is added into an fp32 accumulator, as linear.py does for ∂W."""

    def __init__(self, hidden: Tensor):
        acc_dtype = compute_dtype(hidden.dtype)
        self.dtype = hidden.dtype
        self.total = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)
        self.scratch = None if acc_dtype == hidden.dtype else torch.empty_like(self.total, dtype=hidden.dtype)

    def add(self, grad_logits: Tensor, weight_slice: Tensor) -> None:
        if self.scratch is None:
            self.total.addmm_(grad_logits, weight_slice)
        else:
            self.total += torch.mm(grad_logits, weight_slice, out=self.scratch)

    def result(self) -> Tensor:
        return self.total.to(self.dtype)


def linear_backward(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                    stats: Tensor, entropy: Tensor, grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor],
                    spec: TokenStatsSpec, *, chunk_rows: int, grads_needed: tuple[bool, bool, bool]):
    """(∂hidden, ∂W, ∂b), None where not needed, by vocabulary slices (see the module docstring)."""
    need_hidden, need_weight, need_bias = grads_needed
    n_rows, n_classes = hidden.shape[0], linear_weight.shape[0]
    width = slice_classes(chunk_rows, n_rows, n_classes)
    buffer = hidden.new_empty(n_rows * width)
    grad_hidden = _HiddenGradient(hidden) if need_hidden else None
    grad_weight = torch.empty_like(linear_weight) if need_weight else None
    grad_bias = torch.empty_like(linear_bias) if need_bias else None
    grad_logprob, grad_entropy = (_per_row(g, None) for g in (grad_logprob, grad_entropy))
    for start in range(0, n_classes, width):
        classes = slice(start, min(start + width, n_classes))
        n_slice = classes.stop - start
        weight_slice = linear_weight[classes]
        logits = _logits_into(buffer[: n_rows * n_slice].view(n_rows, n_slice), hidden, weight_slice,
                              None if linear_bias is None else linear_bias[classes])
        # the kernel writes ∂L/∂logits over the logits it has read (same buffer)
        launch_backward(logits, target, stats, entropy, grad_logprob, grad_entropy, spec, grad=logits,
                        class_offset=start, n_classes_total=n_classes)
        if need_weight:
            torch.mm(logits.t(), hidden, out=grad_weight[classes])  # the slice's ∂W rows, complete
        if need_bias:
            grad_bias[classes] = logits.sum(0, dtype=compute_dtype(hidden.dtype))
        if need_hidden:
            grad_hidden.add(logits, weight_slice)
    return None if grad_hidden is None else grad_hidden.result(), grad_weight, grad_bias


@torch.library.custom_op("fastce::linear_token_logprobs_forward", mutates_args=())
def linear_token_logprobs_forward_op(
    hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, temperature: float,
    ignore_index: int, return_entropy: bool, store_stats: bool, chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:
    logprob, entropy, stats = linear_forward(hidden, linear_weight, linear_bias, target,
                                             TokenStatsSpec(temperature, ignore_index, return_entropy),
                                             chunk_rows=chunk_rows, store_stats=store_stats)
    return logprob, _or_empty(entropy, hidden), _or_empty(stats, hidden)


@linear_token_logprobs_forward_op.register_fake
def _(hidden, linear_weight, linear_bias, target, temperature, ignore_index, return_entropy, store_stats,
      chunk_rows):
    return _fake_outputs(hidden, hidden.shape[0], return_entropy, store_stats)


@torch.library.custom_op("fastce::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
    hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, stats: Tensor,
    entropy: Tensor, grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor], temperature: float,
    ignore_index: int, chunk_rows: int, hidden_grad: bool, weight_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = linear_backward(hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy,
                            TokenStatsSpec(temperature, ignore_index), chunk_rows=chunk_rows,
                            grads_needed=(hidden_grad, weight_grad, bias_grad))
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_token_logprobs_backward_op.register_fake
def _(hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy, temperature,
      ignore_index, chunk_rows, hidden_grad, weight_grad, bias_grad):
    shapes = (hidden.shape, linear_weight.shape, linear_weight.shape[:1])
    return tuple(hidden.new_empty(shape if needed else (0,))
                 for shape, needed in zip(shapes, (hidden_grad, weight_grad, bias_grad)))


def _linear_forward_op(hidden, linear_weight, linear_bias, target, spec: TokenStatsSpec, *, chunk_rows: int,
                       store_stats: bool):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.linear_token_logprobs_forward(hidden, linear_weight, linear_bias, target, *spec,
                                                              store_stats, chunk_rows)
    logprob, entropy, stats = linear_forward(hidden, linear_weight, linear_bias, target, spec,
                                             chunk_rows=chunk_rows, store_stats=store_stats)
    return logprob, _or_empty(entropy, hidden), _or_empty(stats, hidden)


def _linear_backward_op(hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy,
                        spec: TokenStatsSpec, *, chunk_rows: int, grads_needed: tuple[bool, bool, bool]):
    if torch.compiler.is_compiling():
        grads = torch.ops.fastce.linear_token_logprobs_backward(
            hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy,
            spec.temperature, spec.ignore_index, chunk_rows, *grads_needed)
        return tuple(g if needed else None for g, needed in zip(grads, grads_needed))
    return linear_backward(hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy,
                           spec, chunk_rows=chunk_rows, grads_needed=grads_needed)


# ---------------------------------------------------------------------------------------------
# autograd, for both forms


class TokenStatsFunction(torch.autograd.Function):
    """apply(spec, chunk_rows, target (N), *inputs) -> (log-probability (N), entropy (N) or empty), with
    gradients for the inputs: logits (N, V) when chunk_rows is None, else hidden (N, H),
    linear_weight (V, H) and linear_bias (V) or None (the linear form, chunk_rows rows a chunk).

    The forward keeps the row statistics (12 bytes a row); the backward makes one pass over the
    logits (recomputed by slices in the linear form) with the upstream gradients of both outputs."""

    @staticmethod
    def forward(ctx, spec: TokenStatsSpec, chunk_rows: Optional[int], target: Tensor, *inputs: Optional[Tensor]):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.chunk_rows = spec, chunk_rows
        ctx.grads_needed = tuple(ctx.needs_input_grad[3:])
        if chunk_rows is None:
            logprob, entropy, stats = _forward_op(*inputs, target, spec, store_stats=True)
        else:
            logprob, entropy, stats = _linear_forward_op(*inputs, target, spec, chunk_rows=chunk_rows,
                                                         store_stats=True)
        ctx.save_for_backward(target, stats, entropy, *inputs)
        if not spec.return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        target, stats, entropy, *inputs = ctx.saved_tensors
        no_grads = (None, None, None)  # spec, chunk_rows, target
        if not ctx.spec.return_entropy:
            grad_entropy = None
        if grad_logprob is None and grad_entropy is None:
            return (*no_grads, *(None for _ in inputs))
        if ctx.chunk_rows is None:
            logits, = inputs
            return *no_grads, _backward_op(logits, target, stats, entropy, grad_logprob, grad_entropy, ctx.spec)
        return *no_grads, *_linear_backward_op(*inputs, target, stats, entropy, grad_logprob, grad_entropy, ctx.spec,
                                               chunk_rows=ctx.chunk_rows, grads_needed=ctx.grads_needed)


# ---------------------------------------------------------------------------------------------
# entry points (fastce.functional)


def run(logits: Tensor, target: Tensor, spec: TokenStatsSpec):
    """(log-probability, entropy or None) shaped like `target`, for validated (…, V) logits."""
    n_classes = logits.shape[-1]
    rows = logits.reshape(-1, n_classes)  # a view where the leading dims merge, else one copy
    flat_target = target.reshape(-1).contiguous()  # the kernels read class indices densely
    if torch.is_grad_enabled() and logits.requires_grad:
        logprob, entropy = TokenStatsFunction.apply(spec, None, flat_target, rows)
    else:  # one read of the logits, no statistics kept
        logprob, entropy, _ = _forward_op(rows, flat_target, spec, store_stats=False)
    return _shaped(logprob, entropy, target.shape, spec)


def run_linear(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
               spec: TokenStatsSpec, *, chunk_rows: Optional[int]):
    """(log-probability, entropy or None) shaped like `target`, for validated hidden (…, H)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_target = target.reshape(-1).contiguous()  # the kernels read class indices densely
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(rows.shape[0], linear_weight.shape[0], rows.shape[1], rows.element_size())
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, linear_weight, linear_bias)):
        logprob, entropy = TokenStatsFunction.apply(spec, chunk_rows, flat_target, rows, linear_weight,
                                                    linear_bias)
    else:  # no statistics kept, no gradient work
        logprob, entropy, _ = _linear_forward_op(rows, linear_weight, linear_bias, flat_target, spec,
                                                 chunk_rows=chunk_rows, store_stats=False)
    return _shaped(logprob, entropy, target.shape, spec)


def _shaped(logprob: Tensor, entropy: Tensor, shape: torch.Size, spec: TokenStatsSpec):
    return logprob.reshape(shape), entropy.reshape(shape) if spec.return_entropy else None

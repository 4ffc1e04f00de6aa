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
whose gradient is known in the forward, as cross-entropy's and policy_gradient_loss's, can write it
there: 2×).

The linear form (linear_token_logprobs): logits = hidden @ W.T + b, in two walks, each over one
buffer of logits:
- forward, by chunks of R rows: one GEMM writes the chunk's R·V logits, the forward kernel reads
  them (the row statistics need whole rows);
- backward, by vocabulary slices of w classes: one GEMM recomputes the slice's N·w logits, the
  backward kernel (which needs only the forward's row statistics, not whole rows) writes their
  gradient over them, and three more GEMMs give the slice's ∂W rows complete (fp32 accumulation
  inside one GEMM, no (V, H) accumulator), its ∂b entries, and its term of ∂hidden, summed over
  slices in fp32 (into ∂hidden itself for fp32 inputs; else an (N, H) fp32 accumulator and an
  (N, H) product scratch).
GEMM work: 8·N·H·V flops (4/3 of a training step's minimum 6·N·H·V: the backward recomputes the
logits because its upstream gradients exist only then). Memory beyond inputs and gradients: the
larger of the two passes' buffers and per-row tensors, + (4 + b)·N·H bytes in the backward when the
input's b bytes per element are fewer than 4; R and w come from that byte model (default_chunks).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from . import ops
from .autograd import reduce_rows
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


class PolicyLoss(NamedTuple):
    """What the forward kernel needs to write the policy-gradient loss per row (and its gradient)."""
    advantages: Tensor          # (N), the compute dtype: one advantage per row
    entropy_coef: float
    divisor: Optional[Tensor]   # "mean": a device scalar, the number of non-ignored rows; else None
    loss_rows: Tensor           # (N) out: the loss per row (already divided by the divisor)
    grad: Optional[Tensor]      # (N, V) out: its gradient for an upstream gradient of 1, or None


def launch_forward(logits: Tensor, target: Tensor, spec: TokenStatsSpec, *, store_stats: bool,
                   out: Optional[tuple] = None, policy: Optional[PolicyLoss] = None
                   ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(log-probability, entropy or None, (3, N) statistics or None) of (N, V) logits and (N) class
    indices, into `out`'s three tensors if given (None where not computed); with `policy`, also its
    loss rows (and gradient) into the tensors it holds."""
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
    grad = None if policy is None else policy.grad
    token_stats_fwd_kernel[(triton.cdiv(n_rows, config.rows),)](
        logits, target, logprob, _or_placeholder(entropy, logprob), _or_placeholder(stats, logprob),
        logprob if policy is None else policy.advantages,
        logprob if policy is None else _or_placeholder(policy.divisor, logprob),
        logprob if policy is None else policy.loss_rows, _or_placeholder(grad, logprob),
        logits.stride(0), logits.stride(1), stats.stride(0) if stats is not None else 0,
        grad.stride(0) if grad is not None else 0, grad.stride(1) if grad is not None else 0,
        n_rows, n_classes, spec.ignore_index, 1.0 / spec.temperature,
        0.0 if policy is None else policy.entropy_coef,
        ROWS=config.rows, BLOCK_SIZE=config.block_size, HAS_ENTROPY=entropy is not None,
        STORE_STATS=stats is not None, POLICY_LOSS=policy is not None,
        MEAN=policy is not None and policy.divisor is not None, STORE_GRAD=grad is not None,
        COMPUTE_DTYPE=ops._triton_dtype(logits.dtype), num_warps=config.num_warps)
    return logprob, entropy, stats


def _or_placeholder(t: Optional[Tensor], placeholder: Tensor) -> Tensor:
    # a pointer the kernel never dereferences (its flag is off)
    return placeholder if t is None else t


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
# policy_gradient_loss: the loss −(A·logprob + c·H) of known per-token weights, its gradient written
# in the forward
#
# With the advantages known at forward time (on-policy: the importance ratio is 1), ∂loss/∂logprob
# and ∂loss/∂H are known before any backward, so the forward kernel writes the logits' gradient in
# the same pass that reads them, as cross-entropy's does: a training step reads the logits once and
# writes their gradient once (2×). The backward rescales that gradient in place by the loss's scalar
# upstream gradient, on the device, skipping it where it is 1 (the usual loss.backward()): a
# low-precision gradient is then rounded twice. The gradient travels to the backward as in
# fastce/ops.py's design note (an attribute of a saved output, outside torch.compile's graph); where
# it does not arrive (a second backward through a retained graph, saved-tensor hooks that copy, CUDA
# graphs), the backward computes it from the logits and the kept statistics in one pass. 'none'
# returns the per-token loss, whose upstream gradients exist only in the backward: the forward keeps
# the statistics and the backward computes the gradient (3×, as token_logprobs).


class PolicyGradientSpec(NamedTuple):
    """The scalar options of one policy_gradient_loss call (hashable)."""
    entropy_coef: float = 0.0
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    return_stats: bool = False

    @property
    def token_stats(self) -> TokenStatsSpec:
        """The statistics it computes: the entropy where the loss or the caller uses it."""
        return TokenStatsSpec(self.temperature, self.ignore_index, self.entropy_coef != 0 or self.return_stats)


def policy_gradient_forward(logits: Tensor, target: Tensor, advantages: Tensor, spec: PolicyGradientSpec, *,
                            needs_grad: bool, keep_gradient: bool):
    """(loss rows, logprob, entropy or empty, statistics or empty, divisors or empty) of (N, V) logits,
    (N) class indices and (N) advantages in the compute dtype. The loss rows are already divided by
    the mean's divisor (divisors[1], the number of non-ignored rows), so every reduction is a sum.
    With needs_grad the statistics are kept for a backward; with keep_gradient ('mean' and 'sum') the
    gradient for an upstream gradient of 1 is written too and kept with them."""
    acc_dtype = compute_dtype(logits.dtype)
    mean = spec.reduction == "mean"
    divisors = logits.new_empty(3 if mean else 0, dtype=acc_dtype)
    if mean:  # on the device: no host sync
        ops.target_stats(target, None, logits.shape[1], spec.ignore_index, divisors)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if keep_gradient else None
    policy = PolicyLoss(advantages, spec.entropy_coef, divisors[1:2] if mean else None,
                        logits.new_empty(logits.shape[0], dtype=acc_dtype), grad)
    logprob, entropy, stats = launch_forward(logits, target, spec.token_stats, store_stats=needs_grad, policy=policy)
    stats = _or_empty(stats, logits)
    if keep_gradient:
        setattr(stats, ops._FORWARD_GRADIENT, grad)
    return policy.loss_rows, logprob, _or_empty(entropy, logits), stats, divisors


def policy_gradient_backward(logits: Tensor, target: Tensor, advantages: Tensor, stats: Tensor, entropy: Tensor,
                             divisors: Tensor, grad_loss: Tensor, spec: PolicyGradientSpec) -> Tensor:
    """∂loss/∂logits for the loss's upstream gradient (a scalar; one per row for 'none'): the forward's
    gradient rescaled in place when it kept one, else one pass over the logits."""
    grad = getattr(stats, ops._FORWARD_GRADIENT, None)
    if grad is not None:
        delattr(stats, ops._FORWARD_GRADIENT)  # handed out once: it becomes the caller's
        ops.launch_scale_gradient(grad, grad_loss)
        return grad
    # the chain rule through loss_i = −w (A_i·logprob_i + c·H_i), w = 1/divisor for 'mean':
    # ∂/∂logprob_i = −g_i·w·A_i, ∂/∂H_i = −g_i·w·c
    upstream = grad_loss.reshape(-1).to(advantages.dtype)
    if spec.reduction == "mean":
        upstream = upstream / divisors[1]
    grad_entropy = (-spec.entropy_coef * upstream).expand(advantages.shape) if spec.entropy_coef != 0 else None
    return logits_gradient(logits, target, stats, entropy, -upstream * advantages, grad_entropy, spec.token_stats)


@torch.library.custom_op("fastce::policy_gradient_forward", mutates_args=())
def policy_gradient_forward_op(logits: Tensor, target: Tensor, advantages: Tensor, entropy_coef: float,
                               temperature: float, ignore_index: int, reduction: str, return_stats: bool,
                               needs_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = PolicyGradientSpec(entropy_coef, temperature, ignore_index, reduction, return_stats)
    # a CUDA graph captured by torch.compile replays without running this Python: nothing could hand
    # the kept gradient to the backward, which then computes it itself
    capturing = logits.is_cuda and torch.cuda.is_current_stream_capturing()
    return policy_gradient_forward(logits, target, advantages, spec, needs_grad=needs_grad,
                                   keep_gradient=needs_grad and reduction != "none" and not capturing)


@policy_gradient_forward_op.register_fake
def _(logits, target, advantages, entropy_coef, temperature, ignore_index, reduction, return_stats, needs_grad):
    n_rows = logits.shape[0]
    spec = PolicyGradientSpec(entropy_coef, temperature, ignore_index, reduction, return_stats)
    logprob, entropy, stats = _fake_outputs(logits, n_rows, spec.token_stats.return_entropy, needs_grad)
    return (logits.new_empty(n_rows, dtype=logprob.dtype), logprob, entropy, stats,
            logits.new_empty(3 if reduction == "mean" else 0, dtype=logprob.dtype))


@torch.library.custom_op("fastce::policy_gradient_backward", mutates_args=())
def policy_gradient_backward_op(logits: Tensor, target: Tensor, advantages: Tensor, stats: Tensor, entropy: Tensor,
                                divisors: Tensor, grad_loss: Tensor, entropy_coef: float, temperature: float,
                                ignore_index: int, reduction: str) -> Tensor:
    return policy_gradient_backward(logits, target, advantages, stats, entropy, divisors, grad_loss,
                                    PolicyGradientSpec(entropy_coef, temperature, ignore_index, reduction))


@policy_gradient_backward_op.register_fake
def _(logits, target, advantages, stats, entropy, divisors, grad_loss, entropy_coef, temperature, ignore_index,
      reduction):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _policy_forward_op(logits, target, advantages, spec: PolicyGradientSpec, *, needs_grad: bool):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.policy_gradient_forward(logits, target, advantages, *spec, needs_grad)
    return policy_gradient_forward(logits, target, advantages, spec, needs_grad=needs_grad,
                                   keep_gradient=needs_grad and spec.reduction != "none")


def _policy_backward_op(logits, target, advantages, stats, entropy, divisors, grad_loss, spec: PolicyGradientSpec):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.policy_gradient_backward(logits, target, advantages, stats, entropy, divisors,
                                                         grad_loss, *spec[:4])
    return policy_gradient_backward(logits, target, advantages, stats, entropy, divisors, grad_loss, spec)


class PolicyGradientFunction(torch.autograd.Function):
    """apply(spec, target (N), advantages (N), logits (N, V), row_shape) -> (loss, logprob (N),
    entropy (N) or empty), differentiable in the logits through the loss only (the statistics are
    for logging)."""

    @staticmethod
    def forward(ctx, spec: PolicyGradientSpec, target: Tensor, advantages: Tensor, logits: Tensor,
                row_shape: torch.Size):
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        loss_rows, logprob, entropy, stats, divisors = _policy_forward_op(logits, target, advantages, spec,
                                                                          needs_grad=True)
        ctx.save_for_backward(logits, target, advantages, stats, entropy, divisors)
        ctx.mark_non_differentiable(logprob, entropy)
        return reduce_rows(loss_rows, spec.reduction, row_shape, loss_rows.dtype), logprob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_logprob, grad_entropy):
        if grad_loss is None:
            return None, None, None, None, None
        logits, target, advantages, stats, entropy, divisors = ctx.saved_tensors
        grad = _policy_backward_op(logits, target, advantages, stats, entropy, divisors, grad_loss, ctx.spec)
        return None, None, None, grad, None


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs: chunked, from hidden states

# Chunk rule, from a byte model of the peak memory beyond inputs and gradients (N rows, H features,
# V classes, b bytes per input element, a = 4 bytes per fp32 value, 8 for fp64):
#   forward, chunks of R rows:       R·V·b        the chunk's logits
#                                  + 5·a·N        log-probability, entropy and 3 statistics per row
#   backward, slices of w classes:   N·w·b        the slice's logits, then their gradient
#                                  + 7·a·N        the same, and the two upstream gradients autograd hands in
#                                  + (4 + b)·N·H  for b < 4: ∂hidden's fp32 accumulator and its product scratch
# (fastce.profiling counts these to the byte at the bar shape). The passes never overlap, so each
# buffer gets what PEAK_BUDGET of the logits' N·V·b bytes leaves beside its pass's other terms: the
# contract's 5% less a tenth for allocations the model leaves out (the caller's own upstream
# computation). At N = 1024, H = 64, V = 8192 that is 44 rows and slices of 162 classes in bf16, 45
# rows and 361 classes in fp32 (4.5% either way). Floors, where the budget leaves too little:
# - GEMM shape: a forward chunk reads all of W (V·H·b bytes) for 2·R·H·V flops, and an H100 (~165
#   flops per byte of HBM) computes them in less time than it reads W from R ≈ 165 rows (bf16) on.
#   On wide heads, where GEMM_ROWS rows of logits take no more bytes than a bf16 copy of W
#   (2H/b ≥ GEMM_ROWS), a chunk takes at least GEMM_ROWS rows, over the budget at small N (e.g.
#   25% of the logits at N = 1024, H = 4096, V = 128256 in bf16). Narrower heads' GEMMs are
#   memory-bound whatever R: the budget decides.
# - A slice of at least min(V, H) classes: each slice's GEMMs read all of hidden, and adding its
#   ∂hidden term moves (4 + b)·N·H more, which a narrower slice's own traffic (~6·N·w·b) no longer
#   covers. This binds where the bf16 accumulator alone nearly fills the budget (V below ~67·H, e.g.
#   a language-model head at H = 4096: slices of 4096 classes, the accumulator 9.6% of the logits).
# MAX_BUFFER_BYTES caps either buffer. An explicit chunk_size sets R, and slices of R·V/N classes.
PEAK_BUDGET = 0.045
GEMM_ROWS = 256
MAX_BUFFER_BYTES = 1 << 30


class LinearChunks(NamedTuple):
    rows: int     # rows per forward chunk
    classes: int  # classes per backward slice


def _budget_bytes(n_rows: int, n_classes: int, element_size: int, per_row_values: int) -> int:
    """PEAK_BUDGET of the logits' bytes, less `per_row_values` values of the compute dtype per row."""
    value_size = max(4, element_size)
    return int(PEAK_BUDGET * n_rows * n_classes * element_size) - per_row_values * value_size * n_rows


def default_chunks(n_rows: int, n_classes: int, in_features: int, element_size: int) -> LinearChunks:
    """Rows per forward chunk and classes per backward slice, by the rule above."""
    row_bytes = n_classes * element_size
    rows_by_budget = _budget_bytes(n_rows, n_classes, element_size, 5) // row_bytes
    rows_by_gemm = GEMM_ROWS if 2 * in_features >= GEMM_ROWS * element_size else 1
    rows = min(n_rows, max(rows_by_budget, rows_by_gemm), MAX_BUFFER_BYTES // row_bytes)
    column_bytes = max(n_rows, 1) * element_size
    accumulator = (4 + element_size) * n_rows * in_features if element_size < 4 else 0
    classes_by_budget = (_budget_bytes(n_rows, n_classes, element_size, 7) - accumulator) // column_bytes
    classes = min(n_classes, max(classes_by_budget, in_features), MAX_BUFFER_BYTES // column_bytes)
    return LinearChunks(max(1, rows), max(1, classes))


def chunks_of(chunk_rows: int, n_rows: int, n_classes: int) -> LinearChunks:
    """An explicit chunk size: slices of the forward chunk's R·V elements, spread over all N rows."""
    return LinearChunks(chunk_rows, max(1, min(n_classes, chunk_rows * n_classes // max(n_rows, 1))))


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
                    spec: TokenStatsSpec, *, slice_classes: int, grads_needed: tuple[bool, bool, bool]):
    """(∂hidden, ∂W, ∂b), None where not needed, by vocabulary slices of slice_classes classes (see
    the module docstring)."""
    need_hidden, need_weight, need_bias = grads_needed
    n_rows, n_classes = hidden.shape[0], linear_weight.shape[0]
    width = max(1, min(slice_classes, n_classes))
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
    ignore_index: int, slice_classes: int, hidden_grad: bool, weight_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = linear_backward(hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy,
                            TokenStatsSpec(temperature, ignore_index), slice_classes=slice_classes,
                            grads_needed=(hidden_grad, weight_grad, bias_grad))
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_token_logprobs_backward_op.register_fake
def _(hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy, temperature,
      ignore_index, slice_classes, hidden_grad, weight_grad, bias_grad):
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
                        spec: TokenStatsSpec, *, slice_classes: int, grads_needed: tuple[bool, bool, bool]):
    if torch.compiler.is_compiling():
        grads = torch.ops.fastce.linear_token_logprobs_backward(
            hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy,
            spec.temperature, spec.ignore_index, slice_classes, *grads_needed)
        return tuple(g if needed else None for g, needed in zip(grads, grads_needed))
    return linear_backward(hidden, linear_weight, linear_bias, target, stats, entropy, grad_logprob, grad_entropy,
                           spec, slice_classes=slice_classes, grads_needed=grads_needed)


# ---------------------------------------------------------------------------------------------
# autograd, for both forms


class TokenStatsFunction(torch.autograd.Function):
    """apply(spec, chunks, target (N), *inputs) -> (log-probability (N), entropy (N) or empty), with
    gradients for the inputs: logits (N, V) when chunks is None, else hidden (N, H), linear_weight
    (V, H) and linear_bias (V) or None (the linear form, chunked as `chunks`, a LinearChunks, says).

    The forward keeps the row statistics (12 bytes a row); the backward makes one pass over the
    logits (recomputed by slices in the linear form) with the upstream gradients of both outputs."""

    @staticmethod
    def forward(ctx, spec: TokenStatsSpec, chunks: Optional[LinearChunks], target: Tensor,
                *inputs: Optional[Tensor]):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.chunks = spec, chunks
        ctx.grads_needed = tuple(ctx.needs_input_grad[3:])
        if chunks is None:
            logprob, entropy, stats = _forward_op(*inputs, target, spec, store_stats=True)
        else:
            logprob, entropy, stats = _linear_forward_op(*inputs, target, spec, chunk_rows=chunks.rows,
                                                         store_stats=True)
        ctx.save_for_backward(target, stats, entropy, *inputs)
        if not spec.return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        target, stats, entropy, *inputs = ctx.saved_tensors
        no_grads = (None, None, None)  # spec, chunks, target
        if not ctx.spec.return_entropy:
            grad_entropy = None
        if grad_logprob is None and grad_entropy is None:
            return (*no_grads, *(None for _ in inputs))
        if ctx.chunks is None:
            logits, = inputs
            return *no_grads, _backward_op(logits, target, stats, entropy, grad_logprob, grad_entropy, ctx.spec)
        return *no_grads, *_linear_backward_op(*inputs, target, stats, entropy, grad_logprob, grad_entropy, ctx.spec,
                                               slice_classes=ctx.chunks.classes, grads_needed=ctx.grads_needed)


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
    n_rows, n_classes = rows.shape[0], linear_weight.shape[0]
    chunks = (default_chunks(n_rows, n_classes, rows.shape[1], rows.element_size()) if chunk_rows is None
              else chunks_of(chunk_rows, n_rows, n_classes))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, linear_weight, linear_bias)):
        logprob, entropy = TokenStatsFunction.apply(spec, chunks, flat_target, rows, linear_weight, linear_bias)
    else:  # no statistics kept, no gradient work
        logprob, entropy, _ = _linear_forward_op(rows, linear_weight, linear_bias, flat_target, spec,
                                                 chunk_rows=chunks.rows, store_stats=False)
    return _shaped(logprob, entropy, target.shape, spec)


def run_policy_gradient(logits: Tensor, target: Tensor, advantages: Tensor, spec: PolicyGradientSpec):
    """(loss, logprob, entropy or None) for validated (…, V) logits, class indices (…) and advantages
    broadcastable to them; the statistics shaped like `target`, never differentiable."""
    n_classes = logits.shape[-1]
    rows = logits.reshape(-1, n_classes)  # a view where the leading dims merge, else one copy
    flat_target = target.reshape(-1).contiguous()  # the kernels read class indices densely
    acc_dtype = compute_dtype(logits.dtype)
    per_row_advantages = advantages.detach().to(acc_dtype).expand(target.shape).reshape(-1).contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, logprob, entropy = PolicyGradientFunction.apply(spec, flat_target, per_row_advantages, rows,
                                                              target.shape)
    else:  # one read of the logits, no statistics or gradient kept
        loss_rows, logprob, entropy, _, _ = _policy_forward_op(rows, flat_target, per_row_advantages, spec,
                                                               needs_grad=False)
        loss = reduce_rows(loss_rows, spec.reduction, target.shape, acc_dtype)
    return (loss, *_shaped(logprob, entropy, target.shape, spec.token_stats))


def _shaped(logprob: Tensor, entropy: Tensor, shape: torch.Size, spec: TokenStatsSpec):
    return logprob.reshape(shape), entropy.reshape(shape) if spec.return_entropy else None

"""Triton kernels of the fused linear head's vocabulary walk (fastce/linear.py).

The backward of linear cross-entropy may walk the vocabulary in slices: each slice's logits
(all N rows × S classes) are recomputed by a GEMM, turned into their gradient here, and one more
GEMM makes that slice of ∂W complete. The gradient of an element needs only per-row values that
the forward already knows (its log-sum-exp, the target mass A = Σ_c a_c), so a slice is processed
elementwise, without the rest of its row. Notation and formulas as in kernels/cross_entropy.py,
whose helpers do the arithmetic, so both paths compute the same gradient:

    ∂L/∂x'_j = (A·p_j − a_j)·ce_scale + 2·z·lse·p_j·z_scale,  p_j = exp(x'_j − lse)

(times 1 − (x'_j/s)² through a soft-cap, and the upstream gradient of the row).
"""
import triton
import triton.language as tl

from .common import expm1, mean_scale, to_storage
from .cross_entropy import _gradient, _load_logits, _mask_rows, _row_targets, _target_mass, _upstream


@triton.jit
def linear_vocab_slice_grad_kernel(
    # pointers
    logits_ptr,                        # (N, S) logits of classes [class_start, class_start + S); gradient written over them
    target_ptr, weight_ptr,            # class indices (N) or probabilities (N, C); class weights (C)
    lse_ptr, mass_ptr,                 # per-row log-sum-exp (forward) and target mass A (probability targets)
    weight_sum_ptr,                    # Σ_c w_c, a device scalar (hard targets with smoothing and weights)
    stats_ptr,                         # [divisor of the loss, divisor of the z-loss] of the "mean" reduction
    grad_output_ptr,                   # upstream gradient (GRAD_OUTPUT > 0)
    lse_grad_ptr,                      # upstream gradient of the returned lse, per row (HAS_LSE_GRAD)
    # strides, in elements (class indices: target_stride_row alone)
    logits_stride_row, target_stride_row, target_stride_class, grad_output_stride, lse_grad_stride,
    # sizes
    n_rows, n_slice_classes, class_start, n_classes,
    # scalars
    # scalars: float64 on the way in, cast once to COMPUTE_DTYPE (as in cross_entropy_fwd_kernel)
    ignore_index, label_smoothing: "fp64", z_loss: "fp64", softcap: "fp64",
    # compile-time flags
    ROWS: tl.constexpr,            # rows per program
    BLOCK_SIZE: tl.constexpr,      # classes per program
    WIDE_OFFSETS: tl.constexpr,    # probability-target class offsets need int64
    PROB_TARGET: tl.constexpr,     # target is an (N, C) probability tensor, not class indices
    HAS_WEIGHT: tl.constexpr,      # per-class weights at weight_ptr
    HAS_SMOOTHING: tl.constexpr,   # label_smoothing > 0
    HAS_Z_LOSS: tl.constexpr,      # z_loss != 0
    HAS_SOFTCAP: tl.constexpr,     # soft-cap the logits
    MEAN: tl.constexpr,            # scale by the mean's device-side divisors
    GRAD_OUTPUT: tl.constexpr,     # upstream gradient: 0 none (=1), 1 scalar, 2 one per row
    HAS_LSE_GRAD: tl.constexpr,    # the lse has an upstream gradient too: + g_lse·p_j
    COMPUTE_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
):
    label_smoothing = tl.full((), label_smoothing, COMPUTE_DTYPE)
    z_loss = tl.full((), z_loss, COMPUTE_DTYPE)
    softcap = tl.full((), softcap, COMPUTE_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    local_cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    cols = class_start + local_cols  # class indices, for targets and weights
    row_in_bounds = rows < n_rows
    in_slice = local_cols < n_slice_classes

    y, valid, bad_target, w_y = _row_targets(target_ptr, weight_ptr, rows, row_in_bounds, target_stride_row, n_classes,
                                             ignore_index, ROWS, PROB_TARGET, HAS_WEIGHT, COMPUTE_DTYPE)
    if PROB_TARGET:
        mass = tl.load(mass_ptr + rows, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    else:
        # A = Σ_c a_c = (1 − ε)·w_y + (ε/C)·Σ_c w_c: the whole row's mass from two numbers
        mass = (1.0 - label_smoothing) * w_y
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                smoothing_mass = label_smoothing / n_classes * tl.load(weight_sum_ptr).to(COMPUTE_DTYPE)
            else:
                smoothing_mass = label_smoothing  # (ε/C)·C
            mass += tl.where(valid, smoothing_mass, 0.0)
    ce_scale = mean_scale(stats_ptr, ROWS, MEAN, COMPUTE_DTYPE)
    z_scale = mean_scale(stats_ptr + 1, ROWS, MEAN, COMPUTE_DTYPE)
    upstream = _upstream(grad_output_ptr, rows, row_in_bounds, grad_output_stride, ROWS, GRAD_OUTPUT, COMPUTE_DTYPE)

    mask = valid[:, None] & in_slice[None, :]
    logits_row_offs = rows * logits_stride_row
    x = _load_logits(logits_ptr, logits_row_offs, local_cols, mask, 1, softcap, HAS_SOFTCAP, False, COMPUTE_DTYPE)
    a = _target_mass(target_ptr, rows * target_stride_row, target_stride_class, weight_ptr, cols, mask, y, w_y,
                     label_smoothing, n_classes, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, WIDE_OFFSETS,
                     COMPUTE_DTYPE)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    shifted = x - lse[:, None]  # log p
    p = tl.exp(shifted)
    is_target = cols[None, :] == y[:, None]
    # 1 − p_y = −expm1(log p_y), exact to fp32 as p_y → 1 (only read where the target sits in this slice)
    target_miss = tl.sum(tl.where(is_target & mask, -expm1(shifted), 0.0), 1)
    no_focal = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    lse_upstream = no_focal
    if HAS_LSE_GRAD:
        lse_upstream = tl.load(lse_grad_ptr + rows * lse_grad_stride, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    grad = _gradient(x, a, p, lse, is_target, target_miss, mass, no_focal, no_focal, ce_scale, z_scale, upstream,
                     lse_upstream, z_loss, softcap, PROB_TARGET, HAS_Z_LOSS, HAS_SOFTCAP, False, HAS_LSE_GRAD)
    grad = _mask_rows(grad, valid, bad_target)
    tl.store(logits_ptr + logits_row_offs[:, None] + local_cols[None, :], to_storage(grad, logits_ptr.dtype.element_ty),
             mask=row_in_bounds[:, None] & in_slice[None, :])


@triton.jit
def linear_target_mass_kernel(
    target_ptr, weight_ptr, mass_ptr,      # probabilities (N, C), class weights (C), A per row (out)
    target_stride_row, target_stride_class,
    n_rows, n_classes, label_smoothing: "fp64",
    ROWS: tl.constexpr,                    # rows per program
    BLOCK_SIZE: tl.constexpr,              # classes per step
    WIDE_OFFSETS: tl.constexpr,            # class offsets need int64
    HAS_WEIGHT: tl.constexpr,              # per-class weights at weight_ptr
    COMPUTE_DTYPE: tl.constexpr,           # fp32, or fp64 for float64 inputs
):
    # A_i = Σ_c w_c ((1 − ε) t_ic + ε/C) of probability targets, summed in fixed order (no atomics):
    # the vocabulary walk needs it before it sees any whole row. (_target_mass reads no class index
    # or target weight for probability targets: `rows` and `total` only fill those places.)
    label_smoothing = tl.full((), label_smoothing, COMPUTE_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in_bounds = rows < n_rows
    total = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    for start in range(0, n_classes, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = row_in_bounds[:, None] & (cols < n_classes)[None, :]
        total += tl.sum(_target_mass(target_ptr, rows * target_stride_row, target_stride_class, weight_ptr, cols, mask,
                                     rows, total, label_smoothing, n_classes, True, HAS_WEIGHT, False, WIDE_OFFSETS,
                                     COMPUTE_DTYPE), 1)
    tl.store(mass_ptr + rows, total, mask=row_in_bounds)

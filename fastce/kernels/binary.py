"""Triton kernels of the binary (sigmoid) losses: binary cross-entropy with logits, soft margin
and the sigmoid focal loss, elementwise over tensors of any shape and strides (DESIGN.md §7.1).

Notation, per element: x the logit, t the target, s = σ(x), r = σ(−x) = 1 − s and
sp(v) = log(1 + e^v) (softplus), so that log σ(x) = −sp(−x) and log(1 − σ(x)) = −sp(x):
    BCE          ℓ = w·[pw·t·sp(−x) + (1 − t)·sp(x)]        (w weight, pw pos_weight; 1 where absent)
    soft margin  ℓ = sp(−t·x)                               (log(1 + exp(−y·x)) for labels y = ±1)
    focal        ℓ = a·ce·q^γ, with ce = t·sp(−x) + (1 − t)·sp(x) (BCE without weights),
                 q = 1 − p_t = s·(1 − t) + r·t and a = α·t + (1 − α)·(1 − t) (a = 1 when α < 0)

Layout: the launcher orders the dimensions by the memory order of the outputs and merges the
neighbours that every tensor can merge, into four: (d0, d1, d2, d3), leading ones of size 1.
A program covers a tile of ROWS × BLOCK_SIZE elements: ROWS consecutive rows of the flattened
d0·d1·d2 and BLOCK_SIZE elements along d3. Every tensor is read and written at its own strides
(a broadcast weight has stride 0 where it repeats), so no input is copied or expanded.

Gradient strategy (fastce/_launch.py): for 'mean' and 'sum' the forward writes the gradient for an
upstream gradient of 1 beside the loss (one read of x and t, one write of the gradient) and reduces
the loss on the device; the backward rescales it (kernels/common.py's scale_kernel) only when the
upstream gradient is not 1.
"""
import triton
import triton.language as tl

from .common import class_offsets, finish_loss, to_storage

BCE = tl.constexpr(0)
SOFT_MARGIN = tl.constexpr(1)
FOCAL = tl.constexpr(2)


@triton.jit
def _offsets(i0, i1, i2, cols, strides, WIDE_OFFSETS: tl.constexpr):
    # element (row, col) of a tensor with merged `strides`: row = (i0, i1, i2) in int64, col along d3
    row_offs = i0 * strides[0] + i1 * strides[1] + i2 * strides[2]
    return row_offs[:, None] + class_offsets(cols, strides[3], WIDE_OFFSETS)


@triton.jit
def _sigmoid_softplus(x):
    # (σ(x), σ(−x), sp(x), sp(−x)) from e = exp(−|x|) ∈ [0, 1], which never overflows.
    # With u = 1 + e: σ(|x|) = 1/u and σ(−|x|) = e/u, neither computed as 1 − the other, so both
    # keep full relative precision as they tend to 0 (|x| = 1e4 included).
    # log(1 + e) = log(u) + (e − (u − 1))/u: the second term puts back what rounding u to the
    # nearest float lost (log1p without libdevice; exact for tiny e, where log(u) = 0).
    # sp(x) = max(x, 0) + log(1 + e^−|x|), likewise sp(−x).
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    inv_u = 1.0 / u
    log1p_e = tl.log(u) + (e - (u - 1.0)) * inv_u
    positive = x >= 0
    s = tl.where(positive, inv_u, e * inv_u)
    r = tl.where(positive, e * inv_u, inv_u)
    return s, r, tl.maximum(x, 0.0) + log1p_e, tl.maximum(-x, 0.0) + log1p_e


@triton.jit
def _bce_terms(x, t, w, pw, HAS_POS_WEIGHT: tl.constexpr):
    # (ℓ, ∂ℓ/∂x, ∂ℓ/∂t) of ℓ = w·[pw·t·sp(−x) + (1 − t)·sp(x)].
    # ∂ℓ/∂x = w·[−pw·t·σ(−x) + (1 − t)·σ(x)]  (sp' = σ): DESIGN's w·[(pw·t + 1 − t)·σ(x) − pw·t],
    #   written with s and r so that a hard target's gradient does not cancel (t = 1: −w·pw·r,
    #   exact where s rounds to 1).
    # ∂ℓ/∂t = w·[pw·sp(−x) − sp(x)]            (= −w·x without pos_weight).
    s, r, sp_x, sp_neg_x = _sigmoid_softplus(x)
    if HAS_POS_WEIGHT:
        positive = pw * t
    else:
        positive = t
    loss = w * (positive * sp_neg_x + (1.0 - t) * sp_x)
    grad_x = w * ((1.0 - t) * s - positive * r)
    grad_t = w * (pw * sp_neg_x - sp_x)
    return loss, grad_x, grad_t


@triton.jit
def _soft_margin_terms(x, t):
    # (ℓ, ∂ℓ/∂x, ∂ℓ/∂t) of ℓ = sp(z), z = −t·x: ∂ℓ/∂x = σ(z)·∂z/∂x = −t·σ(−t·x), ∂ℓ/∂t = −x·σ(−t·x).
    s_z, _, sp_z, _ = _sigmoid_softplus(-t * x)
    return sp_z, -t * s_z, -x * s_z


@triton.jit
def _focal_terms(x, t, alpha, gamma, HAS_ALPHA: tl.constexpr, GAMMA_INT: tl.constexpr):
    # (ℓ, ∂ℓ/∂x, ∂ℓ/∂t) of ℓ = a·ce·q^γ, torchvision's sigmoid_focal_loss. q = 1 − p_t is built from
    # s and r directly: for t = 1 it is σ(−x) to full precision as p_t → 1, where 1 − p_t is 0 in fp32.
    # Derivatives: ∂ce/∂x = s − t = s(1 − t) − t·r (no cancellation for hard t), ∂ce/∂t = −x,
    #   ∂q/∂x = s·r·(1 − 2t), ∂q/∂t = r − s, ∂a/∂t = 2α − 1. With c = γ·ce·q^(γ−1):
    #   ∂ℓ/∂x = a·[q^γ·(s(1 − t) − t·r) + c·s·r·(1 − 2t)]
    #   ∂ℓ/∂t = q^γ·[(2α − 1)·ce − a·x] + a·c·(r − s)
    # c at q = 0 (saturated: s·r = 0 too) is 0 in the limit (ce/q stays bounded), also for γ < 1.
    s, r, sp_x, sp_neg_x = _sigmoid_softplus(x)
    ce = t * sp_neg_x + (1.0 - t) * sp_x
    q = s * (1.0 - t) + r * t
    if GAMMA_INT >= 0:
        # an integer γ (torchvision's default 2): q^γ and q^(γ−1) by products, no pow
        q_pow = tl.full(q.shape, 1.0, q.dtype)
        for _ in tl.static_range(GAMMA_INT - 1):
            q_pow *= q
        slope = gamma * ce * q_pow  # c = γ·ce·q^(γ−1)  (0 for γ = 0)
        if GAMMA_INT >= 1:
            q_pow *= q
    else:
        q_pow = tl.where(q > 0.0, tl.exp2(gamma * tl.log2(q)), 0.0)
        slope = tl.where(q > 0.0, gamma * q_pow * (ce / q), 0.0)
    if HAS_ALPHA:
        a = alpha * t + (1.0 - alpha) * (1.0 - t)
        grad_t = q_pow * ((2.0 * alpha - 1.0) * ce - a * x) + a * slope * (r - s)
    else:
        a = 1.0
        grad_t = -q_pow * x + slope * (r - s)
    loss = a * ce * q_pow
    grad_x = a * (q_pow * (s * (1.0 - t) - t * r) + slope * s * r * (1.0 - 2.0 * t))
    return loss, grad_x, grad_t


@triton.jit
def binary_loss_fwd_kernel(
    # pointers
    input_ptr, target_ptr, weight_ptr, pos_weight_ptr,  # inputs; weight/pos_weight broadcast by strides
    grad_output_ptr,                                    # upstream gradient (GRAD_OUTPUT > 0)
    loss_ptr, work_ptr,                                 # the loss (per element, or reduced); [counter, partial sums]
    grad_input_ptr, grad_target_ptr,                    # gradients (GRAD_INPUT / GRAD_TARGET)
    # strides: a 4-tuple of element strides per tensor, over the merged dims (d0, d1, d2, d3)
    input_strides, target_strides, weight_strides, pos_weight_strides, grad_output_strides,
    loss_strides, grad_input_strides, grad_target_strides,
    # sizes: rows are the d0·d1·d2 leading positions, cols run along d3; n_elements divides the mean
    size1, size2, n_rows, n_cols, n_elements,
    # scalars
    alpha, gamma,
    # compile-time flags
    LOSS: tl.constexpr,            # BCE, SOFT_MARGIN or FOCAL
    ROWS: tl.constexpr,            # rows per tile
    BLOCK_SIZE: tl.constexpr,      # elements per row of the tile
    HAS_WEIGHT: tl.constexpr,      # BCE weight at weight_ptr
    HAS_POS_WEIGHT: tl.constexpr,  # BCE pos_weight at pos_weight_ptr
    HAS_ALPHA: tl.constexpr,       # focal alpha >= 0
    GAMMA_INT: tl.constexpr,       # focal gamma when it is a small integer, else -1
    STORE_LOSS: tl.constexpr,      # write the per-element loss ('none')
    REDUCE: tl.constexpr,          # reduce the loss into loss_ptr ('mean', 'sum')
    MEAN: tl.constexpr,            # divide the loss sum and the gradients by n_elements
    GRAD_INPUT: tl.constexpr,      # write ∂loss/∂input
    GRAD_TARGET: tl.constexpr,     # write ∂loss/∂target
    GRAD_OUTPUT: tl.constexpr,     # upstream gradient: 0 none (= 1), 1 a scalar, 2 one per element
    WIDE_OFFSETS: tl.constexpr,    # offsets along d3 need int64 (n_cols × stride ≥ 2^31)
    COMPUTE_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
):
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_SIZE)
    rows = (pid // n_col_blocks).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    i2 = rows % size2
    i1 = (rows // size2) % size1
    i0 = rows // size2 // size1
    if WIDE_OFFSETS:
        cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    else:
        cols = (pid % n_col_blocks) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]

    x = tl.load(input_ptr + _offsets(i0, i1, i2, cols, input_strides, WIDE_OFFSETS), mask=mask,
                other=0.0).to(COMPUTE_DTYPE)
    t = tl.load(target_ptr + _offsets(i0, i1, i2, cols, target_strides, WIDE_OFFSETS), mask=mask,
                other=0.0).to(COMPUTE_DTYPE)
    if LOSS == BCE:
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + _offsets(i0, i1, i2, cols, weight_strides, WIDE_OFFSETS), mask=mask,
                        other=0.0).to(COMPUTE_DTYPE)
        else:
            w = 1.0
        if HAS_POS_WEIGHT:
            pw = tl.load(pos_weight_ptr + _offsets(i0, i1, i2, cols, pos_weight_strides, WIDE_OFFSETS),
                         mask=mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            pw = 1.0
        loss, grad_x, grad_t = _bce_terms(x, t, w, pw, HAS_POS_WEIGHT)
    elif LOSS == SOFT_MARGIN:
        loss, grad_x, grad_t = _soft_margin_terms(x, t)
    else:
        loss, grad_x, grad_t = _focal_terms(x, t, alpha, gamma, HAS_ALPHA, GAMMA_INT)

    if STORE_LOSS:
        tl.store(loss_ptr + _offsets(i0, i1, i2, cols, loss_strides, WIDE_OFFSETS),
                 to_storage(loss, loss_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        # the programs' partial sums, added in a fixed order by the last one (bitwise reproducible)
        total = tl.sum(tl.sum(tl.where(mask, loss, 0.0), 1), 0)
        if MEAN:
            total = total / n_elements
        finish_loss(work_ptr + 1, work_ptr, loss_ptr, total, tl.num_programs(0), 256)

    if GRAD_INPUT or GRAD_TARGET:
        # chain rule: every element's gradient times the upstream gradient (and 1/n for the mean)
        scale = tl.full((ROWS, BLOCK_SIZE), 1.0, COMPUTE_DTYPE)
        if MEAN:
            scale = scale / n_elements
        if GRAD_OUTPUT == 1:
            scale = scale * tl.load(grad_output_ptr).to(COMPUTE_DTYPE)
        elif GRAD_OUTPUT == 2:
            scale = scale * tl.load(grad_output_ptr + _offsets(i0, i1, i2, cols, grad_output_strides, WIDE_OFFSETS),
                                    mask=mask, other=0.0).to(COMPUTE_DTYPE)
        if GRAD_INPUT:
            tl.store(grad_input_ptr + _offsets(i0, i1, i2, cols, grad_input_strides, WIDE_OFFSETS),
                     to_storage(grad_x * scale, grad_input_ptr.dtype.element_ty), mask=mask)
        if GRAD_TARGET:
            tl.store(grad_target_ptr + _offsets(i0, i1, i2, cols, grad_target_strides, WIDE_OFFSETS),
                     to_storage(grad_t * scale, grad_target_ptr.dtype.element_ty), mask=mask)

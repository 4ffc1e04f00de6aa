"""Triton kernels of per-token statistics: the log-probability of a target token and the entropy.

Notation (DESIGN.md §7.2), per row i of the logits x (V classes, class dimension last), temperature T:
    z_j   = x_j / T
    ref   = max_j z_j (0 while every z_j seen is −inf), e_j = exp(z_j − ref), s = Σ_j e_j
    log p_j = (z_j − ref) − log s
    logprob = log p_y                                    (y the row's target)
    entropy = H = −Σ_j p_j log p_j = log s − Σ_j e_j (z_j − ref) / s

Forward: one online pass over the row (max, s, s without the target, Σ e (z − ref), z_y) gives both
outputs and the per-row statistics the backward needs: ref, log s and 1 − p_y (= Σ_{j≠y} e_j / s,
exact where p_y → 1, where 1 − exp(log p_y) would keep few digits).
Backward: given the upstream gradients of the two outputs, the gradient of each logit depends on the
row only through those statistics (derivation at token_gradient), so one pass reads every logit once
and writes its gradient, in tiles, with no reduction over the row: rows of any length stream, and a
vocabulary slice of a row can be processed on its own (the linear form does).
Policy-gradient loss (POLICY_LOSS, fastce.policy_gradient_loss): the forward also writes the row's
loss −w (A·logprob + c·H) for a per-token advantage A, and, where its weights are known in the
forward (STORE_GRAD), the gradient too: then a training step reads the logits once and writes their
gradient once (a row that fits one tile is read once; a streamed row is read again by the same
program for the gradient, as the cross-entropy kernel's).
"""
import triton
import triton.language as tl

from .common import class_offsets, load_class_index, to_storage

# rows of the (3, N) statistics tensor
STAT_REF = tl.constexpr(0)
STAT_LOG_SUM = tl.constexpr(1)
STAT_TARGET_MISS = tl.constexpr(2)
N_STATS = 3


@triton.jit
def _scaled_logits(logits_ptr, row_offs, cols, valid, n_classes, stride_class, inv_temperature,
                   WIDE_OFFSETS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    # z = x / T; padded lanes and ignored rows read nothing and stay −inf (probability 0)
    mask = valid[:, None] & (cols < n_classes)[None, :]
    x = tl.load(logits_ptr + row_offs[:, None] + class_offsets(cols, stride_class, WIDE_OFFSETS),
                mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
    return x * inv_temperature


@triton.jit
def _merge_tile(z, is_target, m, s, s_other, shifted_sum, z_target, HAS_ENTROPY: tl.constexpr):
    # Merge a tile into the running sums, all taken relative to ref (ref_old → ref_new scales each e
    # by exp(ref_old − ref_new) and adds ref_old − ref_new to each z − ref).
    m_new = tl.maximum(m, tl.max(z, 1))
    ref_old = tl.where(m == float("-inf"), 0.0, m)
    ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - ref_new)
    shifted = z - ref_new[:, None]
    e = tl.exp(shifted)
    if HAS_ENTROPY:
        # e·(z − ref) is 0 where e is 0 (a −inf logit: 0·log 0 = 0, not 0·−inf)
        shifted_sum = rescale * (shifted_sum + s * (ref_old - ref_new)) + \
            tl.sum(tl.where(e > 0.0, e * shifted, 0.0), 1)
    s = s * rescale + tl.sum(e, 1)
    s_other = s_other * rescale + tl.sum(tl.where(is_target, 0.0, e), 1)
    z_target += tl.sum(tl.where(is_target, z, 0.0), 1)
    return m_new, s, s_other, shifted_sum, z_target


@triton.jit
def token_gradient(z, is_target, ref, log_s, target_miss, entropy, a, b, inv_temperature,
                   HAS_A: tl.constexpr, HAS_B: tl.constexpr):
    # The gradient of a·logprob + b·H with respect to a tile of the row's logits x (z = x/T), for the
    # row's weights a and b (a = ∂L/∂logprob, b = ∂L/∂H), with ∂p_c/∂z_j = p_c(δ_cj − p_j):
    #   ∂log p_y/∂z_j = δ_jy − p_j
    #   ∂H/∂z_j = −Σ_c (log p_c + 1) p_c (δ_cj − p_j) = −p_j (log p_j + 1) + p_j Σ_c p_c (log p_c + 1)
    #           = −p_j (log p_j + 1) + p_j (1 − H) = −p_j (log p_j + H)
    #   ∂L/∂x_j = (1/T) [a (δ_jy − p_j) − b p_j (log p_j + H)]
    # Every term is per element given the row's (ref, log s, 1 − p_y, H, a, b): no reduction over the
    # row, so a tile of a vocabulary slice (fastce.distributed) is processed on its own. At the target
    # a (1 − p_y) takes the forward's exact 1 − p_y; p_j log p_j → 0 as p_j → 0 (−inf logits) is taken
    # explicitly. `is_target` marks y's column in the tile.
    logp = (z - ref[:, None]) - log_s[:, None]
    p = tl.exp(logp)
    grad = tl.zeros(z.shape, dtype=z.dtype)
    if HAS_B:
        grad -= tl.where(p > 0.0, p * (logp + entropy[:, None]), 0.0) * b[:, None]
    if HAS_A:
        grad += tl.where(is_target, target_miss[:, None], -p) * a[:, None]
    return grad * inv_temperature


@triton.jit
def _store_gradient(z, cols, local_target, ref, log_s, target_miss, entropy, a, b, valid, bad_target,
                    row_in_bounds, n_classes, inv_temperature, grad_ptr, grad_row_offs, grad_stride_class,
                    HAS_A: tl.constexpr, HAS_B: tl.constexpr, WIDE_OFFSETS: tl.constexpr):
    # token_gradient of a tile (`local_target`: y's column in this tile's numbering), stored: 0 on
    # ignored rows, NaN on rows whose class index is out of range
    grad = token_gradient(z, cols[None, :] == local_target[:, None], ref, log_s, target_miss, entropy, a, b,
                          inv_temperature, HAS_A, HAS_B)
    grad = tl.where(valid[:, None], grad, 0.0)
    grad = tl.where(bad_target[:, None], float("nan"), grad)
    tl.store(grad_ptr + grad_row_offs[:, None] + class_offsets(cols, grad_stride_class, WIDE_OFFSETS),
             to_storage(grad, grad_ptr.dtype.element_ty), mask=row_in_bounds[:, None] & (cols < n_classes)[None, :])


@triton.jit
def token_stats_fwd_kernel(
    # pointers
    logits_ptr, target_ptr,                 # inputs: logits (N, V), class indices (N)
    logprob_ptr, entropy_ptr, stats_ptr,    # outputs: (N), (N) if HAS_ENTROPY, (3, N) if STORE_STATS
    advantages_ptr, divisor_ptr,            # POLICY_LOSS: advantage per row; the mean's divisor (MEAN)
    loss_ptr, grad_ptr,                     # POLICY_LOSS: loss per row (N); gradient (N, V) if STORE_GRAD
    # strides, in elements (the 1-D class indices and advantages are read with theirs)
    logits_stride_row, logits_stride_class, stats_stride, grad_stride_row, grad_stride_class, target_stride,
    advantages_stride,
    # sizes
    n_rows, n_classes,
    # scalars: float64 on the way in (a plain Python float would reach a compiled kernel as float32),
    # cast once to COMPUTE_DTYPE below
    ignore_index, inv_temperature: "fp64", entropy_coef: "fp64",
    # compile-time flags
    ROWS: tl.constexpr,            # rows per program (several when V is small)
    BLOCK_SIZE: tl.constexpr,      # classes per tile
    SINGLE_PASS: tl.constexpr,     # the whole row fits in one tile: the gradient is written from registers
    HAS_ENTROPY: tl.constexpr,     # compute and store the entropy
    STORE_STATS: tl.constexpr,     # store (ref, log s, 1 − p_y) for a backward
    POLICY_LOSS: tl.constexpr,     # store the policy-gradient loss per row
    MEAN: tl.constexpr,            # ... divided by the number of non-ignored rows at divisor_ptr
    STORE_GRAD: tl.constexpr,      # ... and its gradient, for an upstream gradient of 1
    WIDE_OFFSETS: tl.constexpr,    # class offsets need int64 (class stride × V ≥ 2^31)
    COMPUTE_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 logits
):
    inv_temperature = tl.full((), inv_temperature, COMPUTE_DTYPE)
    entropy_coef = tl.full((), entropy_coef, COMPUTE_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in_bounds = rows < n_rows
    row_offs = rows * logits_stride_row
    y, valid, bad_target = load_class_index(target_ptr, rows, row_in_bounds, target_stride, n_classes, ignore_index)

    m = tl.full((ROWS,), float("-inf"), dtype=COMPUTE_DTYPE)
    s = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    s_other = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)   # s without the target class
    shifted_sum = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)  # Σ e (z − ref)
    z_target = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    cols = tl.arange(0, BLOCK_SIZE)
    if SINGLE_PASS:  # z stays in registers for the gradient
        z = _scaled_logits(logits_ptr, row_offs, cols, valid, n_classes, logits_stride_class, inv_temperature,
                           WIDE_OFFSETS, COMPUTE_DTYPE)
        m, s, s_other, shifted_sum, z_target = _merge_tile(z, cols[None, :] == y[:, None], m, s, s_other,
                                                           shifted_sum, z_target, HAS_ENTROPY)
    else:
        for start in range(0, n_classes, BLOCK_SIZE):
            z = _scaled_logits(logits_ptr, row_offs, start + cols, valid, n_classes, logits_stride_class,
                               inv_temperature, WIDE_OFFSETS, COMPUTE_DTYPE)
            m, s, s_other, shifted_sum, z_target = _merge_tile(z, (start + cols)[None, :] == y[:, None], m, s,
                                                               s_other, shifted_sum, z_target, HAS_ENTROPY)

    ref = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    # log p_y = (z_y − ref) − log s: z_y − ref is exact near the max, where z_y − lse would carry
    # lse's rounding
    logprob = (z_target - ref) - log_s
    logprob = tl.where(valid, logprob, 0.0)
    target_miss = tl.where(valid, s_other / s, 0.0)
    tl.store(logprob_ptr + rows, tl.where(bad_target, float("nan"), logprob), mask=row_in_bounds)
    entropy = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    if HAS_ENTROPY:
        entropy = tl.where(valid, log_s - shifted_sum / s, 0.0)
        tl.store(entropy_ptr + rows, tl.where(bad_target, float("nan"), entropy), mask=row_in_bounds)
    if STORE_STATS:
        tl.store(stats_ptr + STAT_REF * stats_stride + rows, ref, mask=row_in_bounds)
        tl.store(stats_ptr + STAT_LOG_SUM * stats_stride + rows, tl.where(valid, log_s, 0.0), mask=row_in_bounds)
        tl.store(stats_ptr + STAT_TARGET_MISS * stats_stride + rows, target_miss, mask=row_in_bounds)

    if POLICY_LOSS:
        # The row's loss, with advantage A, entropy coefficient c and w = 1/(non-ignored rows) for
        # "mean", 1 otherwise:  ℓ = −w (A·log p_y + c·H). Its weights on the two statistics,
        #   a = ∂ℓ/∂logprob = −w A,  b = ∂ℓ/∂H = −w c,
        # are known here, so the gradient (token_gradient's derivation)
        #   ∂ℓ/∂x_j = (1/T) [a (δ_jy − p_j) − b p_j (log p_j + H)] = (w/T) [A (p_j − δ_jy) + c p_j (log p_j + H)]
        # is written in this pass, for an upstream gradient of 1 (the backward rescales it by a scalar).
        advantage = tl.load(advantages_ptr + rows * advantages_stride, mask=valid, other=0.0).to(COMPUTE_DTYPE)
        w = tl.full((ROWS,), 1.0, dtype=COMPUTE_DTYPE)
        if MEAN:
            # every row ignored: w = 1/0 and the loss rows 0·inf = NaN, as a mean over nothing (0/0)
            w = w / tl.load(divisor_ptr).to(COMPUTE_DTYPE)
        a = -w * advantage
        b = -w * entropy_coef
        row_loss = tl.where(valid, a * logprob + b * entropy, 0.0 * w)
        tl.store(loss_ptr + rows, tl.where(bad_target, float("nan"), row_loss), mask=row_in_bounds)
        if STORE_GRAD:
            grad_row_offs = rows * grad_stride_row
            if SINGLE_PASS:
                _store_gradient(z, cols, y, ref, log_s, target_miss, entropy, a, b, valid, bad_target,
                                row_in_bounds, n_classes, inv_temperature, grad_ptr, grad_row_offs,
                                grad_stride_class, True, HAS_ENTROPY, WIDE_OFFSETS)
            else:
                # second read of the row, by the program that just read it (L2 serves it, as in the
                # cross-entropy kernel's streamed rows)
                for start in range(0, n_classes, BLOCK_SIZE):
                    z = _scaled_logits(logits_ptr, row_offs, start + cols, valid, n_classes, logits_stride_class,
                                       inv_temperature, WIDE_OFFSETS, COMPUTE_DTYPE)
                    _store_gradient(z, start + cols, y, ref, log_s, target_miss, entropy, a, b, valid, bad_target,
                                    row_in_bounds, n_classes, inv_temperature, grad_ptr, grad_row_offs,
                                    grad_stride_class, True, HAS_ENTROPY, WIDE_OFFSETS)


@triton.jit
def token_stats_bwd_kernel(
    # pointers
    logits_ptr, target_ptr, stats_ptr, entropy_ptr,   # inputs: logits (N, V), class indices, forward's
    grad_logprob_ptr, grad_entropy_ptr,                # statistics and entropy; upstream gradients (N)
    grad_ptr,                                          # output: ∂L/∂logits (N, V); may alias logits
    # strides, in elements (class indices and upstream gradients: 1-D, read with their strides)
    logits_stride_row, logits_stride_class, grad_stride_row, grad_stride_class, stats_stride, target_stride,
    grad_logprob_stride, grad_entropy_stride,
    # sizes: the logits hold classes [class_offset, class_offset + n_classes) of each row
    n_rows, n_classes, class_offset,
    # scalars (inv_temperature: float64 on the way in, as in the forward)
    ignore_index, n_classes_total, inv_temperature: "fp64",
    # compile-time flags
    ROWS: tl.constexpr,              # rows per program
    BLOCK_SIZE: tl.constexpr,        # classes per tile
    HAS_GRAD_LOGPROB: tl.constexpr,  # the log-probability has an upstream gradient
    HAS_GRAD_ENTROPY: tl.constexpr,  # the entropy has an upstream gradient
    WIDE_OFFSETS: tl.constexpr,      # class offsets need int64 (class stride × V ≥ 2^31)
    COMPUTE_DTYPE: tl.constexpr,     # fp32, or fp64 for float64 logits
):
    # ∂L/∂x for L = Σ_i a_i·logprob_i + b_i·H_i (a, b the upstream gradients): _store_gradient per tile,
    # one read of each logit, one write of its gradient.
    inv_temperature = tl.full((), inv_temperature, COMPUTE_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in_bounds = rows < n_rows
    y, valid, bad_target = load_class_index(target_ptr, rows, row_in_bounds, target_stride, n_classes_total,
                                            ignore_index)
    ref = tl.load(stats_ptr + STAT_REF * stats_stride + rows, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    log_s = tl.load(stats_ptr + STAT_LOG_SUM * stats_stride + rows, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    a = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    target_miss = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    b = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    entropy = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    if HAS_GRAD_LOGPROB:
        a = tl.load(grad_logprob_ptr + rows * grad_logprob_stride, mask=valid, other=0.0).to(COMPUTE_DTYPE)
        target_miss = tl.load(stats_ptr + STAT_TARGET_MISS * stats_stride + rows, mask=valid,
                              other=0.0).to(COMPUTE_DTYPE)
    if HAS_GRAD_ENTROPY:
        b = tl.load(grad_entropy_ptr + rows * grad_entropy_stride, mask=valid, other=0.0).to(COMPUTE_DTYPE)
        entropy = tl.load(entropy_ptr + rows, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    logits_row_offs = rows * logits_stride_row
    grad_row_offs = rows * grad_stride_row
    local_target = y - class_offset
    cols = tl.arange(0, BLOCK_SIZE)
    for start in range(0, n_classes, BLOCK_SIZE):
        z = _scaled_logits(logits_ptr, logits_row_offs, start + cols, valid, n_classes, logits_stride_class,
                           inv_temperature, WIDE_OFFSETS, COMPUTE_DTYPE)
        _store_gradient(z, start + cols, local_target, ref, log_s, target_miss, entropy, a, b, valid, bad_target,
                        row_in_bounds, n_classes, inv_temperature, grad_ptr, grad_row_offs, grad_stride_class,
                        HAS_GRAD_LOGPROB, HAS_GRAD_ENTROPY, WIDE_OFFSETS)

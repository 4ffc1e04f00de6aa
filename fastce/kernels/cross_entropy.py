"""Triton kernels of the cross-entropy family (cross-entropy, focal loss, z-loss, soft-capping).

Notation (DESIGN.md §2), per row i of the logits x (C classes):
    x'    = s·tanh(x/s) if soft-capping, else x
    lse   = log Σ_c exp(x'_c),  p_c = exp(x'_c − lse)
    a_c   = w_c q_c, with q = (1−ε)·onehot(y) + ε/C (hard targets) or (1−ε)·t + ε/C (probabilities),
            w the class weights (cross-entropy) or alpha (focal), 1 where absent
    A     = Σ_c a_c
    CE    = −Σ_c a_c log p_c = Σ_c a_c (lse − x'_c)
    focal = −Σ_c a_c (1 − p_c)^γ log p_c
    z     = z_loss · lse²

A row is processed in tiles of ROWS × BLOCK_SIZE. When a whole row fits in one tile
(SINGLE_PASS) it is read once and the gradient is written from the same registers (the launcher
may split such a tile across a Hopper cluster: Triton then lowers the row reductions to
distributed shared memory, and nothing here changes); otherwise
the row is streamed: one pass for the online log-sum-exp (and the target sums), one more for the
focal sums, and one that re-reads the row to write the gradient.
"""
import triton
import triton.language as tl

from .common import (
    class_offsets,
    class_weight_of,
    expm1,
    finish_loss,
    load_class_index,
    log1p,
    mean_scale,
    row_offsets,
    tanh,
    to_storage,
)



@triton.jit
def _load_logits(logits_ptr, row_offs, cols, mask, stride_class, softcap,
                 HAS_SOFTCAP: tl.constexpr, WIDE_OFFSETS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    x = tl.load(logits_ptr + row_offs[:, None] + class_offsets(cols, stride_class, WIDE_OFFSETS),
                mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
    if HAS_SOFTCAP:
        # padded lanes stay −inf: tanh(−inf) would make them −s and give them probability
        x = tl.where(mask, softcap * tanh(x / softcap), float("-inf"))
    return x


@triton.jit
def _target_mass(target_ptr, target_row_offs, target_stride_class, weight_ptr, cols, mask, y, w_y,
                 label_smoothing, n_classes,
                 PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                 WIDE_OFFSETS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    # a_c = w_c q_c for the tile's classes; zero on padded lanes
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=cols < n_classes, other=0.0).to(COMPUTE_DTYPE)[None, :]
    else:
        w = 1.0
    if PROB_TARGET:
        t = tl.load(target_ptr + target_row_offs[:, None] + class_offsets(cols, target_stride_class, WIDE_OFFSETS),
                    mask=mask, other=0.0).to(COMPUTE_DTYPE)
        a = w * ((1.0 - label_smoothing) * t + label_smoothing / n_classes)
    else:
        a = tl.where(cols[None, :] == y[:, None], (1.0 - label_smoothing) * w_y[:, None], 0.0)
        if HAS_SMOOTHING:
            a += (label_smoothing / n_classes) * w
    return tl.where(mask, a, 0.0)


@triton.jit
def _online_update(x, a, mask, is_target, m, s, s_other, mass, weighted_sum, target_logit,
                   DENSE_TARGET: tl.constexpr, HARD_TARGET: tl.constexpr):
    # Merge a tile into the running (max m, Σ exp(x − ref), the same sum without the target
    # class, A, Σ a(x − ref), the target's logit) with ref = m, or 0 while m is still −inf
    # (masked vocabulary in leading tiles must not produce −inf − −inf).
    m_new = tl.maximum(m, tl.max(x, 1))
    ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - ref_new)
    e = tl.exp(x - ref_new[:, None])
    s = s * rescale + tl.sum(e, 1)
    s_other = s_other * rescale + tl.sum(tl.where(is_target, 0.0, e), 1)
    if DENSE_TARGET:
        # probabilities or smoothing put mass on every class; classes without mass add nothing,
        # even at x = −inf (0·log 0 = 0)
        ref_old = tl.where(m == float("-inf"), 0.0, m)
        shifted = tl.where(mask & (a != 0.0), a * (x - ref_new[:, None]), 0.0)
        weighted_sum = weighted_sum + mass * (ref_old - ref_new) + tl.sum(shifted, 1)
        mass = mass + tl.sum(a, 1)
    if HARD_TARGET:
        # without smoothing, one class holds all the mass: its logit gives A and Σ a(x − ref),
        # which spares the registers of a second row-sized tile
        target_logit = target_logit + tl.sum(tl.where(is_target, x, 0.0), 1)
    return m_new, s, s_other, mass, weighted_sum, target_logit


@triton.jit
def _log_softmax(x, ref, log_s):
    # (x − ref) − log Σ exp(x − ref): x − ref is exact near the max, where x − lse would inherit
    # lse's rounding (an ulp of a 1e4 logit is 1e-3)
    return (x - ref[:, None]) - log_s[:, None]


@triton.jit
def _focal_terms(x, a, ref, log_s, gamma):
    # With u = 1 − p and h(p) = p·f'(p) = u^γ (γ p log p / u − 1), f(p) = −(1−p)^γ log p:
    # returns the loss terms −a u^γ log p and a·h(p). u comes from expm1 so it is exact as p → 1,
    # log p / u → −1 there, and p log p → 0 as p → 0: both limits are taken explicitly.
    logp = _log_softmax(x, ref, log_s)
    p = tl.exp(logp)
    u = -expm1(logp)
    u_pow = tl.where(u > 0.0, tl.exp2(gamma * tl.log2(u)), 0.0)
    log_ratio = tl.where(u > 0.0, logp / u, -1.0)
    p_log_ratio = tl.where(p > 0.0, p * log_ratio, 0.0)
    h = u_pow * (gamma * p_log_ratio - 1.0)
    loss_terms = tl.where(a != 0.0, -a * u_pow * logp, 0.0)
    return loss_terms, tl.where(a != 0.0, a * h, 0.0), p


@triton.jit
def _gradient(x, a, p, lse, is_target, target_miss, mass, focal_sum, focal_other, ce_scale, z_scale, upstream,
              lse_upstream, z_loss, softcap, PROB_TARGET: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, FOCAL: tl.constexpr, HAS_LSE_GRAD: tl.constexpr):
    # Cross-entropy: ∂/∂x'_j Σ_c a_c (lse − x'_c) = A·p_j − a_j   (∂lse/∂x'_j = p_j).
    #   Computed in fp32 and rounded once, so the target's p − 1 does not cancel in bf16.
    # Focal: ∂L/∂x'_j = Σ_c a_c f'(p_c) ∂p_c/∂x'_j with ∂p_c/∂x'_j = p_c(δ_cj − p_j)
    #   = a_j h(p_j) − p_j Σ_c a_c h(p_c),  h(p) = p f'(p).
    # z-loss: ∂(z·lse²)/∂x'_j = 2 z lse p_j.
    # Both scaled by the loss's upstream gradient g; the returned lse's own upstream gradient
    #   g_lse adds g_lse·∂lse/∂x'_j = g_lse·p_j (the same pass, one rounding).
    # Soft-cap: x' = s tanh(x/s) ⇒ ∂x'/∂x = 1 − tanh² = 1 − (x'/s)².
    if FOCAL:
        grad = a - p * focal_sum[:, None]  # a here is a·h(p) (see _focal_terms)
        if not PROB_TARGET:
            # At the target a_y h_y − p_y Σ_c a_c h_c = a_y h_y (1 − p_y) − p_y Σ_{c≠y} a_c h_c, with
            # 1 − p_y and the non-target sum each summed on its own: nothing cancels as p_y → 1.
            at_target = a * target_miss[:, None] - p * focal_other[:, None]
            grad = tl.where(is_target, at_target, grad)
    else:
        grad = p * mass[:, None] - a
        if not PROB_TARGET:
            # At the target class A·p − a = (A − a)·p − a·(1 − p), with 1 − p_y = Σ_{c≠y} p_c summed
            # on its own: exact to fp32 even at p_y = 0.9999, where 1 − p would keep 3 digits.
            at_target = (mass[:, None] - a) * p - a * target_miss[:, None]
            grad = tl.where(is_target, at_target, grad)
    grad = grad * ce_scale[:, None]
    if HAS_Z_LOSS:
        grad += (2.0 * z_loss * lse * z_scale)[:, None] * p
    grad = grad * upstream[:, None]
    if HAS_LSE_GRAD:
        grad += lse_upstream[:, None] * p
    if HAS_SOFTCAP:
        capped = x / softcap
        grad = grad * (1.0 - capped * capped)
    return grad


@triton.jit
def _mask_rows(grad, valid, bad_target):
    # ignored rows get an exact zero gradient (also when the mean's divisor is 0); a row whose
    # class index is out of range (validate=False) gets NaN
    grad = tl.where(valid[:, None], grad, 0.0)
    return tl.where(bad_target[:, None], float("nan"), grad)


@triton.jit
def _load_tile(cols, valid, read_rows, logits_ptr, logits_row_offs, logits_stride_class, target_ptr,
               target_row_offs, target_stride_class, weight_ptr, y, w_y, n_classes, label_smoothing, softcap,
               PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, WIDE_OFFSETS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    # (logits x', target mass a, mask of the valid rows' classes) of the tile; the logits of rows
    # outside read_rows are not read at all
    in_row = (cols < n_classes)[None, :]
    mask = valid[:, None] & in_row
    x = _load_logits(logits_ptr, logits_row_offs, cols, read_rows[:, None] & in_row, logits_stride_class, softcap,
                     HAS_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)
    a = _target_mass(target_ptr, target_row_offs, target_stride_class, weight_ptr, cols, mask, y, w_y,
                     label_smoothing, n_classes, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, WIDE_OFFSETS,
                     COMPUTE_DTYPE)
    return x, a, mask


@triton.jit
def _store_gradient(x, a, cols, y, ref, log_s, target_miss, mass, focal_sum, focal_other, ce_scale, z_scale,
                    upstream, lse_upstream, valid, bad_target, row_in_bounds, grad_ptr, grad_row_offs,
                    grad_stride_class, n_classes, z_loss, softcap, gamma, PROB_TARGET: tl.constexpr,
                    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FOCAL: tl.constexpr,
                    HAS_LSE_GRAD: tl.constexpr, WIDE_OFFSETS: tl.constexpr):
    if FOCAL:
        _, a, p = _focal_terms(x, a, ref, log_s, gamma)  # a becomes a·h(p)
    else:
        p = tl.exp(_log_softmax(x, ref, log_s))
    grad = _gradient(x, a, p, ref + log_s, cols[None, :] == y[:, None], target_miss, mass, focal_sum, focal_other,
                     ce_scale, z_scale, upstream, lse_upstream, z_loss, softcap, PROB_TARGET, HAS_Z_LOSS,
                     HAS_SOFTCAP, FOCAL, HAS_LSE_GRAD)
    grad = _mask_rows(grad, valid, bad_target)
    tl.store(grad_ptr + grad_row_offs[:, None] + class_offsets(cols, grad_stride_class, WIDE_OFFSETS),
             to_storage(grad, grad_ptr.dtype.element_ty), mask=row_in_bounds[:, None] & (cols < n_classes)[None, :])


@triton.jit
def _upstream(grad_output_ptr, rows, row_in_bounds, stride, ROWS: tl.constexpr, GRAD_OUTPUT: tl.constexpr,
              COMPUTE_DTYPE: tl.constexpr):
    # the loss's upstream gradient of each row: none (1), one scalar, or one per row (read with its
    # stride: autograd hands out expanded and strided ones)
    if GRAD_OUTPUT == 1:
        return tl.zeros((ROWS,), dtype=COMPUTE_DTYPE) + tl.load(grad_output_ptr).to(COMPUTE_DTYPE)
    elif GRAD_OUTPUT == 2:
        return tl.load(grad_output_ptr + rows * stride, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    return tl.full((ROWS,), 1.0, dtype=COMPUTE_DTYPE)


@triton.jit
def _row_targets(target_ptr, weight_ptr, rows, row_in_bounds, target_stride, n_classes, ignore_index,
                 ROWS: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 COMPUTE_DTYPE: tl.constexpr):
    # (class index y, counted, class index out of range, w_y) of each row
    if PROB_TARGET:
        y = tl.zeros((ROWS,), dtype=tl.int64)
        valid = row_in_bounds
        bad_target = tl.zeros((ROWS,), dtype=tl.int1)
        w_y = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    else:
        y, valid, bad_target = load_class_index(target_ptr, rows, row_in_bounds, target_stride, n_classes,
                                                ignore_index)
        w_y = class_weight_of(weight_ptr, y, valid, HAS_WEIGHT, COMPUTE_DTYPE)
    return y, valid, bad_target, w_y


@triton.jit
def cross_entropy_fwd_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr,            # inputs; weight = class weights / focal alpha
    loss_ptr, lse_ptr, grad_ptr,                   # loss (per row, or reduced), lse per row (fp32/fp64), gradient
    stats_ptr,                                     # [divisor of the loss, of the z-loss, -, counter, partial sums…]
    grad_output_ptr, lse_grad_ptr,                 # upstream gradients of the loss and of the returned lse
    # strides, in elements: row r -> (r // inner_size)·outer + (r % inner_size)·inner
    logits_stride_outer, logits_stride_inner, logits_stride_class,
    target_stride_outer, target_stride_inner, target_stride_class,  # class indices: target_stride_outer alone
    grad_stride_outer, grad_stride_inner, grad_stride_class,
    grad_output_stride, lse_grad_stride,           # per-row upstream gradients
    # sizes
    n_rows, n_classes, inner_size,
    # scalars: float64 on the way in (a plain Python float would reach a compiled kernel as
    # float32), cast once to COMPUTE_DTYPE below, so that fp64 kernels compute with fp64 values
    ignore_index, label_smoothing: "fp64", z_loss: "fp64", softcap: "fp64", gamma: "fp64",
    # compile-time flags
    ROWS: tl.constexpr,            # rows per block (a program's, or in rework mode several a program)
    BLOCK_SIZE: tl.constexpr,      # classes per tile
    SINGLE_PASS: tl.constexpr,     # the whole row fits in one tile: read it once
    WIDE_OFFSETS: tl.constexpr,    # class offsets need int64 (class stride × C ≥ 2^31)
    PROB_TARGET: tl.constexpr,     # target is a (…, C) probability tensor, not class indices
    HAS_WEIGHT: tl.constexpr,      # per-class weights (or alpha) at weight_ptr
    HAS_SMOOTHING: tl.constexpr,   # label_smoothing > 0
    HAS_Z_LOSS: tl.constexpr,      # z_loss != 0
    HAS_SOFTCAP: tl.constexpr,     # soft-cap the logits
    FOCAL: tl.constexpr,           # focal loss with exponent gamma instead of cross-entropy
    MEAN: tl.constexpr,            # scale loss and gradient by the mean's device-side divisors
    STORE_LOSS: tl.constexpr,      # 0: no loss; 1: the loss of each row (in loss_ptr's dtype); 2: their sum
    STORE_LSE: tl.constexpr,       # write the lse of each row
    COMPUTE_GRAD: tl.constexpr,    # write the gradient (forward-fused or backward recompute)
    GRAD_OUTPUT: tl.constexpr,     # upstream gradient of the loss: 0 none (=1), 1 scalar, 2 one per row
    HAS_LSE_GRAD: tl.constexpr,    # the lse has an upstream gradient too (lse_grad_ptr)
    SKIP_IGNORED_ROWS: tl.constexpr,  # leave ignored rows' logits unread (the class axis is contiguous)
    KEEP_UNIT_ROWS: tl.constexpr,  # grad_ptr holds the forward's gradient for upstream 1: blocks whose
                                   # rows all have upstream 1 and no lse gradient leave it be
    COMPUTE_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
):
    label_smoothing = tl.full((), label_smoothing, COMPUTE_DTYPE)
    z_loss = tl.full((), z_loss, COMPUTE_DTYPE)
    softcap = tl.full((), softcap, COMPUTE_DTYPE)
    gamma = tl.full((), gamma, COMPUTE_DTYPE)
    if KEEP_UNIT_ROWS and GRAD_OUTPUT == 1 and not HAS_LSE_GRAD:
        # decided on the device (no host sync): the usual loss.backward() moves nothing at all
        if tl.load(grad_output_ptr) == 1.0:
            return
    # One block of ROWS rows a program; a backward that rewrites the forward's gradient (KEEP_UNIT_ROWS) runs
    # few programs, each over the blocks pid, pid + grid, …
    if KEEP_UNIT_ROWS:
        first, last, step = tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)
    else:
        first, last, step = 0, 1, 1  # constant bounds: the loop folds into straight-line code
    total = tl.zeros((), dtype=COMPUTE_DTYPE)
    for index in range(first, last, step):
        block = index if KEEP_UNIT_ROWS else tl.program_id(0)
        rows = tl.cast(block, tl.int64) * ROWS + tl.arange(0, ROWS)
        row_in_bounds = rows < n_rows
        upstream = _upstream(grad_output_ptr, rows, row_in_bounds, grad_output_stride, ROWS, GRAD_OUTPUT,
                             COMPUTE_DTYPE)
        lse_upstream = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
        if HAS_LSE_GRAD:
            lse_upstream = tl.load(lse_grad_ptr + rows * lse_grad_stride, mask=row_in_bounds,
                                   other=0.0).to(COMPUTE_DTYPE)
        run = True
        if KEEP_UNIT_ROWS:
            # any upstream gradient other than 1 recomputes the block's rows from the logits, so that a
            # low-precision gradient is rounded once (scaling the stored one would round it twice)
            rework = row_in_bounds & ((upstream != 1.0) | (lse_upstream != 0.0))
            run = tl.max(rework.to(tl.int32), 0) > 0
        if run:
            logits_row_offs = row_offsets(rows, inner_size, logits_stride_outer, logits_stride_inner)
            target_row_offs = row_offsets(rows, inner_size, target_stride_outer, target_stride_inner)
            grad_row_offs = row_offsets(rows, inner_size, grad_stride_outer, grad_stride_inner)

            y, valid, bad_target, w_y = _row_targets(target_ptr, weight_ptr, rows, row_in_bounds, target_stride_outer,
                                                     n_classes, ignore_index, ROWS, PROB_TARGET, HAS_WEIGHT, COMPUTE_DTYPE)

            # Ignored rows' logits are skipped where the class axis is the contiguous one (a per-row mask
            # keeps the loads along it wide); where the rows are ((N, C, d…) inputs), a per-row mask
            # would split the loads into scalars, so every row in bounds is read.
            read_rows = valid if SKIP_IGNORED_ROWS else row_in_bounds
            ce_scale = mean_scale(stats_ptr, ROWS, MEAN, COMPUTE_DTYPE)
            z_scale = mean_scale(stats_ptr + 1, ROWS, MEAN, COMPUTE_DTYPE)

            m = tl.full((ROWS,), float("-inf"), dtype=COMPUTE_DTYPE)
            s = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
            s_other = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
            mass = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
            weighted_sum = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
            target_logit = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
            cols = tl.arange(0, BLOCK_SIZE)

            # Pass 1: online log-sum-exp and target sums. A single-pass row stays in registers (x, and
            # a for probability targets; a hard target's mass is rebuilt for the gradient).
            if SINGLE_PASS:
                x, a, mask = _load_tile(cols, valid, read_rows, logits_ptr, logits_row_offs, logits_stride_class,
                                        target_ptr, target_row_offs, target_stride_class, weight_ptr, y, w_y, n_classes,
                                        label_smoothing, softcap, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                                        WIDE_OFFSETS, COMPUTE_DTYPE)
                m, s, s_other, mass, weighted_sum, target_logit = _online_update(
                    x, a, mask, cols[None, :] == y[:, None], m, s, s_other, mass, weighted_sum, target_logit,
                    PROB_TARGET or HAS_SMOOTHING, not PROB_TARGET)
            else:
                for start in range(0, n_classes, BLOCK_SIZE):
                    x, a, mask = _load_tile(start + cols, valid, read_rows, logits_ptr, logits_row_offs,
                                            logits_stride_class, target_ptr, target_row_offs, target_stride_class,
                                            weight_ptr, y, w_y, n_classes, label_smoothing, softcap, PROB_TARGET,
                                            HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)
                    m, s, s_other, mass, weighted_sum, target_logit = _online_update(
                        x, a, mask, (start + cols)[None, :] == y[:, None], m, s, s_other, mass, weighted_sum,
                        target_logit, PROB_TARGET or HAS_SMOOTHING, not PROB_TARGET)

            ref = tl.where(m == float("-inf"), 0.0, m)
            log_s = tl.log(s)
            if not PROB_TARGET:
                # When the target holds the row's max, s = 1 + Σ_{c≠y} e^(x_c − ref) and −log p_y = log s
                # is tiny for a confident row: log1p of the non-target sum keeps its digits, where log of
                # s = 1 + 1e-5 would keep two.
                log_s = tl.where(target_logit == ref, log1p(s_other), log_s)
                if not HAS_SMOOTHING:
                    mass = w_y
                    weighted_sum = w_y * (target_logit - ref)
            lse = ref + log_s
            target_miss = s_other / s  # 1 − p_y for hard targets
            # CE = Σ a (lse − x) = A·(lse − ref) − Σ a (x − ref): no large numbers cancel
            loss = mass * log_s - weighted_sum

            # Pass 2 (focal only): the loss and Σ a h(p) (and the same without the target class)
            # need p, hence the final lse.
            focal_sum = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
            focal_other = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
            if FOCAL:
                if SINGLE_PASS:
                    loss_terms, a_h, _ = _focal_terms(x, a, ref, log_s, gamma)
                    loss = tl.sum(loss_terms, 1)
                    focal_sum = tl.sum(a_h, 1)
                    focal_other = tl.sum(tl.where(cols[None, :] == y[:, None], 0.0, a_h), 1)
                else:
                    loss = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
                    for start in range(0, n_classes, BLOCK_SIZE):
                        x, a, mask = _load_tile(start + cols, valid, read_rows, logits_ptr, logits_row_offs,
                                                logits_stride_class, target_ptr, target_row_offs, target_stride_class,
                                                weight_ptr, y, w_y, n_classes, label_smoothing, softcap, PROB_TARGET,
                                                HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)
                        loss_terms, a_h, _ = _focal_terms(x, a, ref, log_s, gamma)
                        loss += tl.sum(loss_terms, 1)
                        focal_sum += tl.sum(a_h, 1)
                        focal_other += tl.sum(tl.where((start + cols)[None, :] == y[:, None], 0.0, a_h), 1)

            z_term = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
            if HAS_Z_LOSS:
                z_term = tl.where(valid, z_loss * lse * lse, 0.0)
            loss = tl.where(valid, loss, 0.0)
            # ignored rows: 0·(1/divisor) is NaN when every row is ignored, as torch's 0/0
            row_loss = loss * ce_scale + z_term * z_scale
            row_loss = tl.where(bad_target, float("nan"), row_loss)
            if STORE_LOSS == 1:
                tl.store(loss_ptr + rows, to_storage(row_loss, loss_ptr.dtype.element_ty), mask=row_in_bounds)
            if STORE_LSE:
                tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=row_in_bounds)

            # Last pass: the gradient, from registers for a single-pass row.
            if COMPUTE_GRAD:
                if SINGLE_PASS:
                    if not PROB_TARGET:
                        # rebuilt from (y, w): cheaper than keeping a second row-sized tile live in registers
                        a = _target_mass(target_ptr, target_row_offs, target_stride_class, weight_ptr, cols,
                                         valid[:, None] & (cols < n_classes)[None, :], y, w_y, label_smoothing,
                                         n_classes, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, WIDE_OFFSETS, COMPUTE_DTYPE)
                    _store_gradient(x, a, cols, y, ref, log_s, target_miss, mass, focal_sum, focal_other, ce_scale,
                                    z_scale, upstream, lse_upstream, valid, bad_target, row_in_bounds, grad_ptr,
                                    grad_row_offs, grad_stride_class, n_classes, z_loss, softcap, gamma, PROB_TARGET,
                                    HAS_Z_LOSS, HAS_SOFTCAP, FOCAL, HAS_LSE_GRAD, WIDE_OFFSETS)
                else:
                    # Second read of the row. One row per program and about one program per SM in flight
                    # keep the rows being re-read (≤ 132 × 512 KiB at 256k bf16) inside the 50 MB L2, so
                    # the re-read is served from cache rather than HBM.
                    for start in range(0, n_classes, BLOCK_SIZE):
                        x, a, mask = _load_tile(start + cols, valid, read_rows, logits_ptr, logits_row_offs,
                                                logits_stride_class, target_ptr, target_row_offs, target_stride_class,
                                                weight_ptr, y, w_y, n_classes, label_smoothing, softcap, PROB_TARGET,
                                                HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)
                        _store_gradient(x, a, start + cols, y, ref, log_s, target_miss, mass, focal_sum, focal_other,
                                        ce_scale, z_scale, upstream, lse_upstream, valid, bad_target, row_in_bounds,
                                        grad_ptr, grad_row_offs, grad_stride_class, n_classes, z_loss, softcap, gamma,
                                        PROB_TARGET, HAS_Z_LOSS, HAS_SOFTCAP, FOCAL, HAS_LSE_GRAD, WIDE_OFFSETS)
            row_loss = tl.where(row_in_bounds, row_loss, 0.0)
            if STORE_LOSS == 2:
                total += tl.sum(row_loss, 0)
    if STORE_LOSS == 2:
        finish_loss(stats_ptr + 4, stats_ptr + 3, loss_ptr, total, tl.num_programs(0), 256)

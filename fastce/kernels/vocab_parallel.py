"""Triton kernels of vocabulary-parallel cross-entropy (fastce.distributed).

Each rank r of a tensor-parallel group holds a slice x[:, s_r : s_r + V_r] of the class dimension
(V = Σ_r V_r classes in all). Notation of fastce/kernels/cross_entropy.py: x' the (soft-capped)
logits, w the class weights (1 where absent), ε the label smoothing, y the global target class,
t the probability targets (the rank's slice of them), a_c = w_c q_c the target mass.

    CE_i = Σ_c a_c (lse − x'_c) = A·(lse − REF) − Σ_c a_c (x'_c − REF)      for any reference REF,

with a_c = (1−ε)·w_y·[c = y] + (ε/V)·w_c (hard targets) or w_c·((1−ε)·t_c + ε/V) (probabilities),
A = Σ_c a_c, so every rank can contribute sums over its own classes. One step of the forward:

1. vocab_parallel_stats_kernel reads the slice once (online over tiles) and writes the local max
   m_r and, relative to ref_r = m_r (0 while m_r is −inf: masked vocabulary), the partial sums
       S   = Σ_{c≠y} e^(x'_c − ref_r)    (every c for probability targets)
       Y   = x'_y where this rank holds y, else 0                   (hard targets)
       T   = Σ w_c t_c (x'_c − ref_r),  T_m = Σ w_c t_c            (probability targets)
       U   = Σ w_c (x'_c − ref_r)                                   (label smoothing)
2. all-reduce MAX of m → M (REF = M, or 0 while −inf).
3. vocab_parallel_rescale_kernel moves the sums to REF: S·e^(m_r − REF), T + (ref_r − REF)·T_m,
   U + (ref_r − REF)·Σ_slice w; and appends V_r, so that the sum below tells every rank V.
4. all-reduce SUM of the packed statistics (N·K + 1 values, K = 2 to 4 per row).
5. vocab_parallel_finish_kernel: per row, log s = log Σ_c e^(x'_c − REF), the loss (already
   divided by the mean's divisors, as the fused kernel does), lse, A and 1 − p_y.
The backward is local: vocab_parallel_grad_kernel reads the slice once and writes its gradient once.

Token statistics (fastce.distributed.vocab_parallel_token_logprobs; notation of
fastce/kernels/token_stats.py) are the same steps on z = x / T (HAS_TEMPERATURE): the log-probability
is −CE of an unweighted, unsmoothed row, (Y − REF) − log s; the entropy (HAS_ENTROPY) takes one more
sum, E = Σ_{c≠y} e^(z_c − ref_r)(z_c − ref_r) (the target left out, as in S; moved to REF with S:
e^(ref_r − REF)·(E + (ref_r − REF)·S)), and the finish adds the target's term back:
H = log s − (E + e^(Y − REF)(Y − REF)) / s. Their gradient (TOKEN_STATS) is token_gradient's, from the
same per-row values and the upstream gradients of both outputs.

Sums are shifted by the row's reference so that no large numbers cancel (x' ~ 1e4 in fp32
would lose every digit of a loss of ~10 in Σ w x' − A·lse).
"""
import triton
import triton.language as tl

from .common import class_offsets, load_class_index, mean_scale, row_offsets, to_storage
from .cross_entropy import _load_logits, _mask_rows
from .token_stats import token_gradient


@triton.jit
def _class_weights(weight_ptr, global_cols, in_slice, HAS_WEIGHT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    # w_c of the tile's classes (full (V,) weight vector indexed by global class), 0 past the slice
    if HAS_WEIGHT:
        return tl.load(weight_ptr + global_cols, mask=in_slice, other=0.0).to(COMPUTE_DTYPE)[None, :]
    return tl.where(in_slice, 1.0, 0.0).to(COMPUTE_DTYPE)[None, :]


@triton.jit
def _hard_target(target_ptr, weight_ptr, rows, row_in_bounds, vocab_size, n_weights, ignore_index,
                 HAS_WEIGHT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    # (y, valid, bad, w_y) of the global class indices; V (vocab_size) is a device value here, known
    # only after the statistics' all-reduce (y is compared with it in the compute dtype)
    y, valid, bad = load_class_index(target_ptr, rows, row_in_bounds, 1, vocab_size, ignore_index)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=valid & (y < n_weights), other=0.0).to(COMPUTE_DTYPE)
    else:
        w_y = tl.where(valid, 1.0, 0.0).to(COMPUTE_DTYPE)
    return y, valid, bad, w_y


@triton.jit
def _slice_tile(start, valid, n_classes, logits_ptr, logits_row_offs, logits_stride_class, softcap, inv_temperature,
                BLOCK_SIZE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                WIDE_OFFSETS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    # (local columns, which of them lie in this rank's slice, the valid rows' mask, logits x', or
    # z = x / T with a temperature) of the tile at `start`: the statistics and the gradient walk the
    # slice alike; padded lanes stay −inf
    cols = start + tl.arange(0, BLOCK_SIZE)
    in_slice = cols < n_classes
    mask = valid[:, None] & in_slice[None, :]
    x = _load_logits(logits_ptr, logits_row_offs, cols, mask, logits_stride_class, softcap,
                     HAS_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)
    if HAS_TEMPERATURE:
        x = x * inv_temperature
    return cols, in_slice, mask, x


@triton.jit
def _shifted_sum(total, mass, ref_old, ref_new, factor, x):
    # Σ f (x − ref) and Σ f, moved from ref_old to ref_new and merged with the tile; classes without
    # mass add nothing, even at x = −inf (0·log 0 = 0)
    shifted = tl.where(factor != 0.0, factor * (x - ref_new[:, None]), 0.0)
    return total + mass * (ref_old - ref_new) + tl.sum(shifted, 1), mass + tl.sum(factor, 1)


@triton.jit
def vocab_parallel_stats_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr,            # this rank's logits slice, targets, full (V,) class weights
    maxima_ptr,                                    # out: (2, N) local max per row, twice (row 0 is all-reduced)
    stats_ptr,                                     # out: (N, N_STATS) partial sums relative to the local max
    # strides, in elements: row r -> (r // inner_size)·outer + (r % inner_size)·inner
    logits_stride_outer, logits_stride_inner, logits_stride_class,
    target_stride_outer, target_stride_inner, target_stride_class,  # probability targets only
    # sizes
    n_rows, n_classes, inner_size, vocab_start,    # n_classes = V_r, the slice's width
    # scalars: float64 on the way in (a Python float would reach a compiled kernel as float32), cast
    # once to COMPUTE_DTYPE, so that fp64 kernels compute with fp64 values
    ignore_index, softcap: "fp64", inv_temperature: "fp64",
    # compile-time flags
    ROWS: tl.constexpr,            # rows per program
    BLOCK_SIZE: tl.constexpr,      # classes per tile
    N_STATS: tl.constexpr,         # statistics per row (2 + PROB_TARGET + HAS_SMOOTHING + HAS_ENTROPY)
    PROB_TARGET: tl.constexpr,     # target is the (…, V_r) slice of probabilities
    HAS_WEIGHT: tl.constexpr,      # class weights at weight_ptr
    HAS_SMOOTHING: tl.constexpr,   # label_smoothing > 0: also U
    HAS_SOFTCAP: tl.constexpr,     # soft-cap the logits
    HAS_TEMPERATURE: tl.constexpr,  # z = x / T (token statistics)
    HAS_ENTROPY: tl.constexpr,     # also E, in the last slot (token statistics: no U, no probabilities)
    WIDE_OFFSETS: tl.constexpr,    # class offsets need int64
    COMPUTE_DTYPE: tl.constexpr,   # fp32, or fp64 for float64 inputs
):
    softcap = tl.full((), softcap, COMPUTE_DTYPE)
    inv_temperature = tl.full((), inv_temperature, COMPUTE_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in_bounds = rows < n_rows
    logits_row_offs = row_offsets(rows, inner_size, logits_stride_outer, logits_stride_inner)
    if PROB_TARGET:
        valid = row_in_bounds
        y_local = tl.full((ROWS,), -1, dtype=tl.int64)
        target_row_offs = row_offsets(rows, inner_size, target_stride_outer, target_stride_inner)
    else:
        y = tl.load(target_ptr + rows, mask=row_in_bounds, other=ignore_index).to(tl.int64)
        valid = row_in_bounds & (y != ignore_index)  # ignored rows are not read
        y_local = y - vocab_start  # the target's column here; outside [0, V_r): another rank's class

    m = tl.full((ROWS,), float("-inf"), dtype=COMPUTE_DTYPE)
    s = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    target_sum = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)  # Y (hard) or T (probabilities)
    target_mass = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    smooth_sum = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    smooth_mass = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    entropy_sum = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)  # E
    for start in range(0, n_classes, BLOCK_SIZE):
        cols, in_slice, mask, x = _slice_tile(start, valid, n_classes, logits_ptr, logits_row_offs,
                                              logits_stride_class, softcap, inv_temperature, BLOCK_SIZE,
                                              HAS_SOFTCAP, HAS_TEMPERATURE, WIDE_OFFSETS, COMPUTE_DTYPE)
        # (a padded lane past the slice may carry the next rank's first class number: not a target)
        is_target = (cols[None, :] == y_local[:, None]) & in_slice[None, :]
        # online log-sum-exp with ref = m, or 0 while m is −inf (no −inf − −inf)
        m_new = tl.maximum(m, tl.max(x, 1))
        ref_old = tl.where(m == float("-inf"), 0.0, m)
        ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(x - ref_new[:, None])
        rescale = tl.exp(m - ref_new)
        if HAS_ENTROPY:
            # Σ e (z − ref), moved from ref_old to ref_new as token_stats' _merge_tile does; e·(z − ref)
            # is 0 where e is 0 (0·log 0 = 0 at −inf logits and padded lanes)
            entropy_sum = rescale * (entropy_sum + s * (ref_old - ref_new)) + \
                tl.sum(tl.where(is_target | (e == 0.0), 0.0, e * (x - ref_new[:, None])), 1)
        s = s * rescale + tl.sum(tl.where(is_target, 0.0, e), 1)
        if PROB_TARGET or HAS_SMOOTHING:
            w = tl.where(mask, _class_weights(weight_ptr, vocab_start + cols, in_slice, HAS_WEIGHT, COMPUTE_DTYPE), 0.0)
        if PROB_TARGET:
            t = tl.load(target_ptr + target_row_offs[:, None] + class_offsets(cols, target_stride_class, WIDE_OFFSETS),
                        mask=mask, other=0.0).to(COMPUTE_DTYPE)
            target_sum, target_mass = _shifted_sum(target_sum, target_mass, ref_old, ref_new, w * t, x)
        else:
            target_sum += tl.sum(tl.where(is_target, x, 0.0), 1)  # raw x'_y: exactly one rank adds it
        if HAS_SMOOTHING:
            smooth_sum, smooth_mass = _shifted_sum(smooth_sum, smooth_mass, ref_old, ref_new, w, x)
        m = m_new

    tl.store(maxima_ptr + rows, m, mask=row_in_bounds)
    tl.store(maxima_ptr + n_rows + rows, m, mask=row_in_bounds)
    out = stats_ptr + rows * N_STATS
    tl.store(out, s, mask=row_in_bounds)
    tl.store(out + 1, target_sum, mask=row_in_bounds)
    if PROB_TARGET:
        tl.store(out + 2, target_mass, mask=row_in_bounds)
    if HAS_SMOOTHING:
        tl.store(out + N_STATS - 1, smooth_sum, mask=row_in_bounds)
    if HAS_ENTROPY:
        tl.store(out + N_STATS - 1, entropy_sum, mask=row_in_bounds)


@triton.jit
def vocab_parallel_rescale_kernel(
    stats_ptr,                 # in/out: (N·N_STATS + 1) partial sums, moved from the local max to the global one
    maxima_ptr,                # (2, N): global max (all-reduced), local max
    slice_mass_ptr,            # Σ_slice w (device scalar; HAS_WEIGHT only, else slice_width)
    n_rows, slice_width,       # slice_width = V_r as a float, appended to the statistics
    BLOCK_ROWS: tl.constexpr, N_STATS: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_ENTROPY: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_bounds = rows < n_rows
    global_max = tl.load(maxima_ptr + rows, mask=in_bounds, other=0.0)
    local_max = tl.load(maxima_ptr + n_rows + rows, mask=in_bounds, other=0.0)
    ref = tl.where(global_max == float("-inf"), 0.0, global_max)
    # Σ e^(x − ref_r)·e^(ref_r − REF); a rank whose classes are all −inf (m_r = −inf) has S = 0
    shift = tl.where(local_max == float("-inf"), 0.0, local_max) - ref
    ptrs = stats_ptr + rows * N_STATS
    s = tl.load(ptrs, mask=in_bounds)
    factor = tl.exp(local_max - ref)
    tl.store(ptrs, s * factor, mask=in_bounds)
    if HAS_ENTROPY:
        # Σ e^(z − REF)(z − REF) = e^(ref_r − REF)·(E + (ref_r − REF)·S), both relative to ref_r
        tl.store(ptrs + N_STATS - 1, factor * (tl.load(ptrs + N_STATS - 1, mask=in_bounds) + shift * s),
                 mask=in_bounds)
    if PROB_TARGET:
        # Σ f (x − REF) = Σ f (x − ref_r) + (ref_r − REF)·Σ f
        tl.store(ptrs + 1, tl.load(ptrs + 1, mask=in_bounds) + shift * tl.load(ptrs + 2, mask=in_bounds),
                 mask=in_bounds)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            slice_mass = tl.load(slice_mass_ptr).to(COMPUTE_DTYPE)
        else:
            slice_mass = slice_width
        tl.store(ptrs + N_STATS - 1, tl.load(ptrs + N_STATS - 1, mask=in_bounds) + shift * slice_mass,
                 mask=in_bounds)
    if tl.program_id(0) == 0:
        tl.store(stats_ptr + n_rows * N_STATS, slice_width)


@triton.jit
def vocab_parallel_finish_kernel(
    stats_ptr,                 # (N·N_STATS + 1) statistics summed over the group; the last value is V
    maxima_ptr,                # (N) global max per row
    target_ptr, weight_ptr,    # targets (hard: class indices), full class weights
    divisors_ptr,              # mean's divisors [Σ w_y, #valid rows] (MEAN)
    weight_total_ptr,          # Σ_c w_c over all V classes (HAS_WEIGHT; else V)
    loss_ptr, lse_ptr,         # out: per-row loss (divided by the mean's divisor), lse (0 where ignored)
    row_state_ptr,             # out: (N, 3) [log s, A, 1 − p_y] for the backward
    entropy_ptr,               # out: (N) entropy (HAS_ENTROPY)
    n_rows, n_weights, ignore_index, label_smoothing: "fp64", z_loss: "fp64",  # fp64 in, as above
    BLOCK_ROWS: tl.constexpr, N_STATS: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, MEAN: tl.constexpr,
    TOKEN_STATS: tl.constexpr,     # loss_ptr gets the log-probability log p_y instead of the loss
    HAS_ENTROPY: tl.constexpr,     # ... and entropy_ptr the entropy (token statistics)
    COMPUTE_DTYPE: tl.constexpr,
):
    label_smoothing = tl.full((), label_smoothing, COMPUTE_DTYPE)
    z_loss = tl.full((), z_loss, COMPUTE_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_bounds = rows < n_rows
    vocab_size = tl.load(stats_ptr + n_rows * N_STATS).to(COMPUTE_DTYPE)
    global_max = tl.load(maxima_ptr + rows, mask=in_bounds, other=0.0)
    ref = tl.where(global_max == float("-inf"), 0.0, global_max)
    stats = stats_ptr + rows * N_STATS
    s = tl.load(stats, mask=in_bounds, other=1.0)
    if PROB_TARGET:
        valid = in_bounds
        bad = tl.zeros((BLOCK_ROWS,), dtype=tl.int1)
        log_s = tl.log(s)
        target_miss = tl.zeros((BLOCK_ROWS,), dtype=COMPUTE_DTYPE)
        mass = (1.0 - label_smoothing) * tl.load(stats + 2, mask=in_bounds, other=0.0)
        weighted_sum = (1.0 - label_smoothing) * tl.load(stats + 1, mask=in_bounds, other=0.0)
    else:
        _, valid, bad, w_y = _hard_target(target_ptr, weight_ptr, rows, in_bounds, vocab_size, n_weights,
                                          ignore_index, HAS_WEIGHT, COMPUTE_DTYPE)
        # S above left the target out: Σ_c e^(x'_c − REF) = S + e^(x'_y − REF), and 1 − p_y = S / that
        # exactly, also when p_y rounds to 1
        target_shift = tl.load(stats + 1, mask=in_bounds, other=0.0) - ref
        s_all = s + tl.exp(target_shift)
        log_s = tl.log(s_all)
        target_miss = s / s_all
        mass = (1.0 - label_smoothing) * w_y
        weighted_sum = mass * target_shift
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            weight_total = tl.load(weight_total_ptr).to(COMPUTE_DTYPE)
        else:
            weight_total = vocab_size
        mass += label_smoothing / vocab_size * weight_total
        weighted_sum += label_smoothing / vocab_size * tl.load(stats + N_STATS - 1, mask=in_bounds, other=0.0)
    # CE = A·(lse − REF) − Σ a (x' − REF): no large numbers cancel
    loss = tl.where(valid, mass * log_s - weighted_sum, 0.0)
    lse = ref + log_s
    ce_scale = mean_scale(divisors_ptr, BLOCK_ROWS, MEAN, COMPUTE_DTYPE)
    z_scale = mean_scale(divisors_ptr + 1, BLOCK_ROWS, MEAN, COMPUTE_DTYPE)
    row_loss = loss * ce_scale  # 0·(1/0) is NaN when every row is ignored, as torch's 0/0
    if HAS_Z_LOSS:
        row_loss += tl.where(valid, z_loss * lse * lse, 0.0) * z_scale
    if TOKEN_STATS:
        # log p_y = (z_y − REF) − log s: the negated loss of a row without weights or smoothing,
        # written as fastce/kernels/token_stats.py writes it (z_y − REF is exact near the max)
        row_loss = tl.where(valid, target_shift - log_s, 0.0)
    if HAS_ENTROPY:
        # H = log s − Σ_c e^(z_c − REF)(z_c − REF) / s, E having left the target out (as S did)
        e_target = tl.exp(target_shift)
        shifted_sum = tl.load(stats + N_STATS - 1, mask=in_bounds, other=0.0) + \
            tl.where(e_target > 0.0, e_target * target_shift, 0.0)
        entropy = tl.where(valid, log_s - shifted_sum / s_all, 0.0)
        tl.store(entropy_ptr + rows, tl.where(bad, float("nan"), entropy), mask=in_bounds)
    tl.store(loss_ptr + rows, tl.where(bad, float("nan"), row_loss), mask=in_bounds)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=in_bounds)
    state = row_state_ptr + rows * 3
    tl.store(state, tl.where(valid, log_s, 0.0), mask=in_bounds)
    tl.store(state + 1, tl.where(valid, mass, 0.0), mask=in_bounds)
    tl.store(state + 2, tl.where(valid, target_miss, 0.0), mask=in_bounds)


@triton.jit
def vocab_parallel_grad_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr,
    maxima_ptr,                # (N) global max per row
    row_state_ptr,             # (N, 3) [log s, A, 1 − p_y] from the finish kernel
    vocab_size_ptr,            # V (the last summed statistic)
    divisors_ptr,              # mean's divisors (MEAN)
    grad_output_ptr,           # upstream gradient (GRAD_OUTPUT > 0; TOKEN_STATS: the log-probability's)
    entropy_ptr, grad_entropy_ptr,  # TOKEN_STATS and HAS_GRAD_ENTROPY: the entropy, its upstream gradient
    grad_ptr,                  # out: ∂loss/∂(this rank's logits); may alias logits_ptr
    # strides, in elements
    logits_stride_outer, logits_stride_inner, logits_stride_class,
    target_stride_outer, target_stride_inner, target_stride_class,  # probability targets only
    grad_stride_outer, grad_stride_inner, grad_stride_class,
    # sizes
    n_rows, n_classes, inner_size, vocab_start, n_weights,
    # scalars (fp64 in, as above)
    ignore_index, label_smoothing: "fp64", z_loss: "fp64", softcap: "fp64", inv_temperature: "fp64",
    # compile-time flags
    ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr,
    GRAD_OUTPUT: tl.constexpr,     # upstream gradient: 0 none (=1; TOKEN_STATS: 0), 1 scalar, 2 one per row
    TOKEN_STATS: tl.constexpr,     # the gradient of Σ a·logprob + b·H (a at grad_output_ptr) instead of the loss
    HAS_GRAD_ENTROPY: tl.constexpr,  # ... with b at grad_entropy_ptr
    HAS_TEMPERATURE: tl.constexpr,   # z = x / T
    WIDE_OFFSETS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    label_smoothing = tl.full((), label_smoothing, COMPUTE_DTYPE)
    z_loss = tl.full((), z_loss, COMPUTE_DTYPE)
    softcap = tl.full((), softcap, COMPUTE_DTYPE)
    inv_temperature = tl.full((), inv_temperature, COMPUTE_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in_bounds = rows < n_rows
    logits_row_offs = row_offsets(rows, inner_size, logits_stride_outer, logits_stride_inner)
    grad_row_offs = row_offsets(rows, inner_size, grad_stride_outer, grad_stride_inner)
    vocab_size = tl.load(vocab_size_ptr).to(COMPUTE_DTYPE)
    if PROB_TARGET:
        target_row_offs = row_offsets(rows, inner_size, target_stride_outer, target_stride_inner)
        valid = row_in_bounds
        bad = tl.zeros((ROWS,), dtype=tl.int1)
        y = tl.full((ROWS,), -1, dtype=tl.int64)
        w_y = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    else:
        y, valid, bad, w_y = _hard_target(target_ptr, weight_ptr, rows, row_in_bounds, vocab_size, n_weights,
                                          ignore_index, HAS_WEIGHT, COMPUTE_DTYPE)
    global_max = tl.load(maxima_ptr + rows, mask=row_in_bounds, other=0.0)
    ref = tl.where(global_max == float("-inf"), 0.0, global_max)
    state = row_state_ptr + rows * 3
    log_s = tl.load(state, mask=row_in_bounds, other=0.0)
    mass = tl.load(state + 1, mask=row_in_bounds, other=0.0)
    target_miss = tl.load(state + 2, mask=row_in_bounds, other=0.0)
    lse = ref + log_s
    ce_scale = mean_scale(divisors_ptr, ROWS, MEAN, COMPUTE_DTYPE)
    z_scale = mean_scale(divisors_ptr + 1, ROWS, MEAN, COMPUTE_DTYPE)
    if GRAD_OUTPUT == 1:
        upstream = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE) + tl.load(grad_output_ptr).to(COMPUTE_DTYPE)
    elif GRAD_OUTPUT == 2:
        upstream = tl.load(grad_output_ptr + rows, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    else:
        upstream = tl.full((ROWS,), 1.0, dtype=COMPUTE_DTYPE)
    grad_entropy = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    entropy = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.load(grad_entropy_ptr + rows, mask=valid, other=0.0).to(COMPUTE_DTYPE)
        entropy = tl.load(entropy_ptr + rows, mask=valid, other=0.0).to(COMPUTE_DTYPE)

    for start in range(0, n_classes, BLOCK_SIZE):
        cols, in_slice, mask, x = _slice_tile(start, valid, n_classes, logits_ptr, logits_row_offs,
                                              logits_stride_class, softcap, inv_temperature, BLOCK_SIZE,
                                              HAS_SOFTCAP, HAS_TEMPERATURE, WIDE_OFFSETS, COMPUTE_DTYPE)
        global_cols = vocab_start + cols
        is_target = (global_cols[None, :] == y[:, None]) & in_slice[None, :]
        if TOKEN_STATS:
            grad = token_gradient(x, is_target, ref, log_s, target_miss, entropy, upstream, grad_entropy,
                                  inv_temperature, GRAD_OUTPUT == 2, HAS_GRAD_ENTROPY)
        else:
            # p = e^((x' − REF) − log s): x' − REF is exact near the max, where x' − lse would carry
            # lse's rounding
            p = tl.exp((x - ref[:, None]) - log_s[:, None])
            if PROB_TARGET or HAS_SMOOTHING:
                w = _class_weights(weight_ptr, global_cols, in_slice, HAS_WEIGHT, COMPUTE_DTYPE)
            if PROB_TARGET:
                t = tl.load(target_ptr + target_row_offs[:, None]
                            + class_offsets(cols, target_stride_class, WIDE_OFFSETS), mask=mask, other=0.0)
                t = t.to(COMPUTE_DTYPE)
                a = w * ((1.0 - label_smoothing) * t)
            else:
                a = tl.where(is_target, (1.0 - label_smoothing) * w_y[:, None], 0.0)
            if HAS_SMOOTHING:
                a += label_smoothing / vocab_size * w
            a = tl.where(mask, a, 0.0)
            # Cross-entropy: ∂/∂x'_j Σ_c a_c (lse − x'_c) = A·p_j − a_j (∂lse/∂x'_j = p_j), rounded once.
            # At a hard target, A·p − a = (A − a)·p − a·(1 − p) with 1 − p_y = Σ_{c≠y} p_c from the
            # forward: exact even at p_y = 0.9999, where 1 − p would keep 3 digits in fp32.
            grad = p * mass[:, None] - a
            if not PROB_TARGET:
                grad = tl.where(is_target, (mass[:, None] - a) * p - a * target_miss[:, None], grad)
            grad = grad * ce_scale[:, None]
            if HAS_Z_LOSS:
                # z-loss: ∂(z·lse²)/∂x'_j = 2 z lse p_j
                grad += (2.0 * z_loss * lse * z_scale)[:, None] * p
            grad = grad * upstream[:, None]
            if HAS_SOFTCAP:
                # x' = s tanh(x/s) ⇒ ∂x'/∂x = 1 − tanh² = 1 − (x'/s)²
                capped = x / softcap
                grad = grad * (1.0 - capped * capped)
        grad = _mask_rows(grad, valid, bad)
        tl.store(grad_ptr + grad_row_offs[:, None] + class_offsets(cols, grad_stride_class, WIDE_OFFSETS),
                 to_storage(grad, grad_ptr.dtype.element_ty), mask=row_in_bounds[:, None] & in_slice[None, :])

"""Triton kernels of the distillation family (DESIGN §7.5): forward KL, reverse KL and the generalized
Jensen-Shannon divergence between a student's and a teacher's rows, class dimension last.

Notation, per row (token) of K classes; x the raw logits, a the logit scale, c the softcap, T:
    z = c·tanh(a·x/c)/T (student), u likewise (teacher); −inf on padded lanes and ignored rows
    ref = row max (0 while everything seen is −inf), s = Σ exp(· − ref), log p = (z − ref_z) − log s_z
    p = softmax(z), q = softmax(u), d = (z − ref_z) − (u − ref_u), D = log s_z − log s_u
    S − Q = d − D,  ρ = Q − S = D − d     (d is shift-invariant and exact near each row's max)
MODE 0 (β = 0):  L = Σ q (Q − S) = KL(q ‖ p)
MODE 1 (β = 1):  L = Σ p (S − Q) = KL(p ‖ q)
MODE 2 (0<β<1):  m = β q + (1−β) p, r = S − M = log(p/m), t = Q − M = log(q/m) = r + ρ,
                 L = β Σ q t + (1−β) Σ p r
Gradients (derivations beside _element_gradient): MODE 0 p_j − q_j; MODE 1 p_j (d_j − ⟨d⟩_p);
MODE 2 (1−β) p_j (r_j − ⟨r⟩_p); then the chain rule through softcap, scale and T.

Passes. The statistics (ref and s of both rows, and for MODE 1 A = Σ e^(z−ref_z)·d, whence ⟨d⟩_p =
A/s_z) are online sums: one pass. Everything else needs the final statistics (p_j and q_j need both
lse's, log m_j is a non-linear function of D, and the JSD's gradient needs ⟨r⟩_p, a sum over the row
of such terms). So a row of one tile (SINGLE_PASS) is read once and everything comes from registers;
a streamed row is re-read by the program that just read it (L2 serves the re-read while the row pairs
in flight fit in it): once for the loss and the gradient (MODE 0, 1), twice for the JSD (the loss and
⟨r⟩_p, then the gradient).

The loss is summed per element in its non-negative generalised-KL form a·log(a/b) − a + b (the sums
equal the KLs since Σa = Σb = 1), so nothing cancels as the distributions agree; the JSD's element
β q t + (1−β) p r is β·[q t − q + m] + (1−β)·[p r − p + m].
"""
import triton
import triton.language as tl

from .common import class_offsets, expm1, finish_loss, log1p, tanh, to_storage

MODE_FORWARD_KL = tl.constexpr(0)   # β = 0: KL(teacher ‖ student)
MODE_REVERSE_KL = tl.constexpr(1)   # β = 1: KL(student ‖ teacher)
MODE_JSD = tl.constexpr(2)          # 0 < β < 1: generalized Jensen-Shannon

# rows of the (N_STATS, N) per-row statistics a vocabulary slice's gradient needs (the fused heads)
STAT_REF_Z = tl.constexpr(0)
STAT_LOG_S_Z = tl.constexpr(1)
STAT_REF_U = tl.constexpr(2)
STAT_LOG_S_U = tl.constexpr(3)
STAT_MEAN = tl.constexpr(4)     # ⟨d⟩_p (MODE 1) or ⟨r⟩_p (MODE 2)
STAT_WEIGHT = tl.constexpr(5)   # the row's gradient factor: mean scale · (1 − β in MODE 2), 0 if ignored
N_STATS = 6


@triton.jit
def _phi_series(l):
    # φ(l) = l − 1 + e^(−l) = l² Σ_{k≥0} (−l)^k/(k+2)!: to l⁹ in fp32 (truncation below 3e-9 of φ at
    # |l| < 0.5), to l¹³ in fp64 (below 1e-17 at |l| < 0.2)
    v = -l
    if l.dtype == tl.float64:
        series = 1 / 2 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v * (1 / 720 + v * (1 / 5040 + v * (
            1 / 40320 + v * (1 / 362880 + v * (1 / 3628800 + v * (1 / 39916800 + v * (
                1 / 479001600 + v * (1 / 6227020800)))))))))))
    else:
        series = 1 / 2 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v * (1 / 720 + v * (1 / 5040 + v * (
            1 / 40320 + v * (1 / 362880)))))))
    return l * l * series


@triton.jit
def _kl_element(a, b, l):
    # a·log(a/b) − a + b ≥ 0 for probabilities a, b and l = log a − log b:
    #   a·φ(l) by the series where |l| is small (a·l and b − a would cancel to first order there);
    #   a(l − 1) + b beyond (φ ≥ 0.1 l: at most ~3 bits lost; no e^(−l) to overflow where a ≪ b);
    #   b where a = 0 (0·log 0 = 0), also where l is NaN (both probabilities 0).
    small = 0.2 if l.dtype == tl.float64 else 0.5
    element = tl.where(tl.abs(l) < small, a * _phi_series(l), a * (l - 1.0) + b)
    return tl.where(a > 0.0, element, b)


@triton.jit
def _mixture_log_ratios(rho, weight, log_weight):
    # (log(a/m), log(b/m)) for m = w b + (1−w) a and rho = log(b/a):
    #   log(a/m) = −log(1 − w + w e^ρ) = −log1p(w·expm1(ρ)): relative precision as ρ → 0 (≈ −wρ),
    #   −log(1−w) at ρ = −inf; log(b/m) = log(a/m) + ρ.
    # Far out (ρ > 80 in fp32, 700 in fp64: a ≪ b, before w e^ρ overflows) the (1−w) a term of m is
    # below an ulp of w b: log(a/m) = −ρ − log w and log(b/m) = −log w, exact also at ρ = +inf, with
    # no exp or log per element.
    far = 700.0 if rho.dtype == tl.float64 else 80.0
    near = -log1p(weight * expm1(tl.minimum(rho, far)))
    a_ratio = tl.where(rho > far, -rho - log_weight, near)
    b_ratio = tl.where(rho > far, -log_weight, near + rho)
    return a_ratio, b_ratio


@triton.jit
def _scaled(x, mask, logit_scale, softcap, inv_temperature, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # z = softcap(scale·x)/T: scale first, then cap, then temperature; lanes outside `mask` stay −inf,
    # also after soft-capping (tanh(−inf) = −1 would give them probability)
    if HAS_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        x = tl.where(mask, softcap * tanh(x / softcap), float("-inf"))
    return x * inv_temperature


@triton.jit
def _load_row_tile(ptr, row_offs, cols, mask, stride_class, logit_scale, softcap, inv_temperature,
                   HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
                   COMPUTE_DTYPE: tl.constexpr):
    # a tile of one model's z; lanes outside `mask` (padding, ignored rows) read nothing and are −inf
    x = tl.load(ptr + row_offs[:, None] + class_offsets(cols, stride_class, WIDE_OFFSETS), mask=mask,
                other=float("-inf")).to(COMPUTE_DTYPE)
    return _scaled(x, mask, logit_scale, softcap, inv_temperature, HAS_SCALE, HAS_SOFTCAP)


@triton.jit
def _online_update(z, u, m_z, s_z, m_u, s_u, a_sum, MODE: tl.constexpr):
    # Merge a tile into (max, Σ exp(· − ref)) of both rows, ref = the max or 0 while it is −inf (a
    # masked vocabulary in leading tiles must not give −inf − −inf), and for MODE 1
    # A = Σ e^(z − ref_z)·d: when the refs move by Δ_z, Δ_u every d moves by Δ_u − Δ_z, so
    # A ← e^(ref_z − ref_z')·(A + s_z·(Δ_u − Δ_z)) + Σ_tile e·d.
    mz_new = tl.maximum(m_z, tl.max(z, 1))
    mu_new = tl.maximum(m_u, tl.max(u, 1))
    rz_old = tl.where(m_z == float("-inf"), 0.0, m_z)
    ru_old = tl.where(m_u == float("-inf"), 0.0, m_u)
    rz = tl.where(mz_new == float("-inf"), 0.0, mz_new)
    ru = tl.where(mu_new == float("-inf"), 0.0, mu_new)
    rescale_z = tl.exp(m_z - rz)
    zs = z - rz[:, None]
    e_z = tl.exp(zs)
    if MODE == MODE_REVERSE_KL:
        # e·d is 0 where e is 0 (z = −inf: d is −inf or NaN there)
        d = zs - (u - ru[:, None])
        a_sum = rescale_z * (a_sum + s_z * ((ru - ru_old) - (rz - rz_old))) + \
            tl.sum(tl.where(e_z > 0.0, e_z * d, 0.0), 1)
    s_z = s_z * rescale_z + tl.sum(e_z, 1)
    s_u = s_u * tl.exp(m_u - ru) + tl.sum(tl.exp(u - ru[:, None]), 1)
    return mz_new, s_z, mu_new, s_u, a_sum


@triton.jit
def _ratios(zs, us, log_s_z, log_s_u, beta, log_weight, MODE: tl.constexpr, MIX_FROM_STUDENT: tl.constexpr):
    # Per element, from the final statistics: (d, ρ = Q − S, r = S − M, t = Q − M); r and t only in
    # MODE 2. One of r, t comes from the stable form, the other by adding ρ: as ρ → 0, r ≈ −βρ and
    # t ≈ (1−β)ρ, so deriving the smaller-weight one loses at most a factor 1/max(β, 1−β) ≤ 2 (a bit).
    d = zs - us
    rho = (log_s_z - log_s_u)[:, None] - d   # NaN only where both are −inf (p = q = 0)
    r = rho
    t = rho
    if MODE == MODE_JSD:
        if MIX_FROM_STUDENT:  # β ≤ 1/2
            r, t = _mixture_log_ratios(rho, beta, log_weight)
        else:
            t, r = _mixture_log_ratios(-rho, 1.0 - beta, log_weight)
    return d, rho, r, t


@triton.jit
def _final_tile(student_ptr, teacher_ptr, s_offs, t_offs, cols, mask, student_stride_class, teacher_stride_class,
                ref_z, log_s_z, ref_u, log_s_u, beta, log_weight, student_logit_scale, student_softcap,
                teacher_logit_scale, teacher_softcap, inv_temperature, MODE: tl.constexpr,
                MIX_FROM_STUDENT: tl.constexpr, STUDENT_SCALE: tl.constexpr, STUDENT_SOFTCAP: tl.constexpr,
                TEACHER_SCALE: tl.constexpr, TEACHER_SOFTCAP: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
                COMPUTE_DTYPE: tl.constexpr):
    # A tile of both rows read after the statistics are final (a streamed row's later passes, a vocabulary
    # slice): (z, p, q, d, ρ, r, t)
    z = _load_row_tile(student_ptr, s_offs, cols, mask, student_stride_class, student_logit_scale, student_softcap,
                       inv_temperature, STUDENT_SCALE, STUDENT_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)
    u = _load_row_tile(teacher_ptr, t_offs, cols, mask, teacher_stride_class, teacher_logit_scale, teacher_softcap,
                       inv_temperature, TEACHER_SCALE, TEACHER_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)
    zs = z - ref_z[:, None]
    us = u - ref_u[:, None]
    p = tl.exp(zs - log_s_z[:, None])
    q = tl.exp(us - log_s_u[:, None])
    d, rho, r, t = _ratios(zs, us, log_s_z, log_s_u, beta, log_weight, MODE, MIX_FROM_STUDENT)
    return z, p, q, d, rho, r, t


@triton.jit
def _loss_terms(p, q, rho, r, t, beta, MODE: tl.constexpr):
    # the non-negative loss term of each element (module docstring)
    if MODE == MODE_FORWARD_KL:
        return _kl_element(q, p, rho)
    elif MODE == MODE_REVERSE_KL:
        return _kl_element(p, q, -rho)
    m = beta * q + (1.0 - beta) * p
    return beta * _kl_element(q, m, t) + (1.0 - beta) * _kl_element(p, m, r)


@triton.jit
def _p_log_ratio(p, r):
    # p·r with 0·log 0 = 0 (r = −inf where p = 0): the terms of ⟨r⟩_p
    return tl.where(p > 0.0, p * r, 0.0)


@triton.jit
def _element_gradient(z, p, q, d, r, mean, weight, student_chain, student_cap_inverse,
                      MODE: tl.constexpr, STUDENT_SOFTCAP: tl.constexpr):
    # ∂L/∂z_j, with ∂S_c/∂z_j = δ_cj − p_j and ∂p_c/∂z_j = p_c (δ_cj − p_j):
    #   MODE 0, L = Σ q (Q − S):  −Σ_c q_c (δ_cj − p_j) = p_j − q_j
    #   MODE 1, L = Σ p (S − Q):  Σ_c p_c (δ_cj − p_j)(S_c − Q_c + 1) = p_j (S_j − Q_j − L)
    #           = p_j (d_j − ⟨d⟩_p), since S − Q = d − D and L = ⟨d⟩_p − D: D cancels exactly (no lse
    #           rounding enters); 0 where p_j = 0 (d_j = −inf there)
    #   MODE 2, M_c = log m_c, ∂M_c/∂z_j = (1−β) p_c (δ_cj − p_j)/m_c: the teacher term gives
    #           −β(1−β) Σ_c (q_c p_c/m_c)(δ_cj − p_j), the student term (1−β) Σ_c p_c (δ_cj − p_j)(S_c − M_c)
    #           + (1−β)(p_j − p_j) − (1−β)² Σ_c (p_c²/m_c)(δ_cj − p_j); the two 1/m_c sums add to
    #           −(1−β) Σ_c p_c (δ_cj − p_j) = 0 (β q + (1−β) p = m), leaving (1−β) p_j (r_j − ⟨r⟩_p)
    #           (the (1−β) is in `weight`)
    # Each is a difference of terms accurate to a relative ε (no log of a difference, no 0·inf).
    # Chain rule: z = c·tanh(a x/c)/T ⇒ ∂z/∂x = (a/T)(1 − tanh²) = (a/T)(1 − (T z/c)²); student_chain
    # is a/T, student_cap_inverse T/c; `weight` the row's factor (the mean's 1/count, 0 if ignored).
    if MODE == MODE_FORWARD_KL:
        g = p - q
    elif MODE == MODE_REVERSE_KL:
        g = tl.where(p > 0.0, p * (d - mean[:, None]), 0.0)
    else:
        g = _p_log_ratio(p, r) - p * mean[:, None]
    g = g * (weight * student_chain)[:, None]
    if STUDENT_SOFTCAP:
        capped = z * student_cap_inverse
        g = g * (1.0 - capped * capped)
    # ignored rows: an exact 0 (weight 0; NaN·0 avoided where the mean's count is 0)
    return tl.where(weight[:, None] != 0.0, g, 0.0)


@triton.jit
def _store_tile(grad_ptr, row_offs, cols, mask, stride_class, g, WIDE_OFFSETS: tl.constexpr):
    tl.store(grad_ptr + row_offs[:, None] + class_offsets(cols, stride_class, WIDE_OFFSETS),
             to_storage(g, grad_ptr.dtype.element_ty), mask=mask)

@triton.jit
def _stream_row(student_ptr, teacher_ptr, grad_ptr, s_offs, t_offs, g_offs, cols, valid, row_in_bounds, n_classes,
                student_stride_class, teacher_stride_class, grad_stride_class, ref_z, log_s_z, ref_u, log_s_u, mean,
                weight, beta, log_weight, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
                inv_temperature, student_chain, student_cap_inverse, SUM_LOSS: tl.constexpr,
                STORE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr,
                MIX_FROM_STUDENT: tl.constexpr, STUDENT_SCALE: tl.constexpr, STUDENT_SOFTCAP: tl.constexpr,
                TEACHER_SCALE: tl.constexpr, TEACHER_SOFTCAP: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
                COMPUTE_DTYPE: tl.constexpr):
    # One more pass over a streamed row after its statistics are final: (Σ loss terms, Σ p·r) when
    # SUM_LOSS, the gradient (with `mean` = ⟨d⟩_p or ⟨r⟩_p) when STORE_GRAD
    loss = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    mean_r = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    for start in range(0, n_classes, BLOCK_SIZE):
        in_row = ((start + cols) < n_classes)[None, :]
        z, p, q, d, rho, r, t = _final_tile(
            student_ptr, teacher_ptr, s_offs, t_offs, start + cols, valid[:, None] & in_row, student_stride_class,
            teacher_stride_class, ref_z, log_s_z, ref_u, log_s_u, beta, log_weight, student_logit_scale,
            student_softcap, teacher_logit_scale, teacher_softcap, inv_temperature, MODE, MIX_FROM_STUDENT,
            STUDENT_SCALE, STUDENT_SOFTCAP, TEACHER_SCALE, TEACHER_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)
        if SUM_LOSS:
            loss += tl.sum(_loss_terms(p, q, rho, r, t, beta, MODE), 1)
            if MODE == MODE_JSD:
                mean_r += tl.sum(_p_log_ratio(p, r), 1)
        if STORE_GRAD:
            g = _element_gradient(z, p, q, d, r, mean, weight, student_chain, student_cap_inverse, MODE,
                                  STUDENT_SOFTCAP)
            _store_tile(grad_ptr, g_offs, start + cols, row_in_bounds[:, None] & in_row, grad_stride_class, g,
                        WIDE_OFFSETS)
    return loss, mean_r


@triton.jit
def _model_scalars(beta, inv_temperature, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
                   COMPUTE_DTYPE: tl.constexpr):
    # the float64 scalar arguments, cast once to the compute dtype
    return (tl.full((), beta, COMPUTE_DTYPE), tl.full((), inv_temperature, COMPUTE_DTYPE),
            tl.full((), student_logit_scale, COMPUTE_DTYPE), tl.full((), student_softcap, COMPUTE_DTYPE),
            tl.full((), teacher_logit_scale, COMPUTE_DTYPE), tl.full((), teacher_softcap, COMPUTE_DTYPE))


@triton.jit
def _store_row_stats(row_stats_ptr, rows, row_in_bounds, stride, ref_z, log_s_z, ref_u, log_s_u, mean, weight):
    out = row_stats_ptr + rows
    tl.store(out + STAT_REF_Z * stride, ref_z, mask=row_in_bounds)
    tl.store(out + STAT_LOG_S_Z * stride, log_s_z, mask=row_in_bounds)
    tl.store(out + STAT_REF_U * stride, ref_u, mask=row_in_bounds)
    tl.store(out + STAT_LOG_S_U * stride, log_s_u, mask=row_in_bounds)
    tl.store(out + STAT_MEAN * stride, mean, mask=row_in_bounds)
    tl.store(out + STAT_WEIGHT * stride, weight, mask=row_in_bounds)


@triton.jit
def distillation_fwd_kernel(
    # pointers
    student_ptr, teacher_ptr,        # logits (N, ≥K) each, any float dtype, any strides
    target_ptr,                      # (N) class indices, read only for ignore_index (HAS_TARGET)
    stats_ptr,                       # [-, #kept rows (target_stats), -, counter, partial sums…]
    loss_ptr,                        # out: the loss per row (STORE_LOSS 1) or their sum (2)
    row_stats_ptr,                   # out: (N_STATS, N) row statistics (STORE_STATS)
    grad_ptr,                        # out: ∂loss/∂student (N, ≥K) (COMPUTE_GRAD), may alias student_ptr
    grad_output_ptr,                 # the per-row upstream gradient (GRAD_OUTPUT)
    # strides, in elements (the 1-D class indices and upstream gradients are read with theirs)
    student_stride_row, student_stride_class, teacher_stride_row, teacher_stride_class,
    grad_stride_row, grad_stride_class, target_stride, grad_output_stride, row_stats_stride,
    # sizes
    n_rows, n_classes,               # n_classes = K, the classes both models share
    # scalars (float64 on the way in, cast once to COMPUTE_DTYPE)
    ignore_index, divisor_factor: "fp64", beta: "fp64", inv_temperature: "fp64",
    student_logit_scale: "fp64", student_softcap: "fp64", teacher_logit_scale: "fp64", teacher_softcap: "fp64",
    # compile-time flags
    ROWS: tl.constexpr,              # rows per program (several when K is small)
    BLOCK_SIZE: tl.constexpr,        # classes per tile
    SINGLE_PASS: tl.constexpr,       # the whole row is one tile: read once, everything from registers
    MODE: tl.constexpr,              # MODE_FORWARD_KL, MODE_REVERSE_KL or MODE_JSD
    MIX_FROM_STUDENT: tl.constexpr,  # MODE 2 with β ≤ 1/2: r = log(p/m) from the stable form, t = r + ρ
    HAS_TARGET: tl.constexpr,        # mask rows whose target is ignore_index
    MEAN: tl.constexpr,              # divide by the kept rows (stats_ptr[1], or 1 without a target) × divisor_factor
    STORE_LOSS: tl.constexpr,        # 1: the loss of each row; 2: their sum (reduced on the device)
    STORE_STATS: tl.constexpr,       # write the row statistics a vocabulary slice's gradient needs
    COMPUTE_GRAD: tl.constexpr,      # write the student's gradient
    GRAD_OUTPUT: tl.constexpr,       # upstream gradient of the loss: 0 none (= 1), 2 one per row
    STUDENT_SCALE: tl.constexpr,     # student_logit_scale != 1
    STUDENT_SOFTCAP: tl.constexpr,   # soft-cap the student's logits
    TEACHER_SCALE: tl.constexpr,     # teacher_logit_scale != 1
    TEACHER_SOFTCAP: tl.constexpr,   # soft-cap the teacher's logits
    WIDE_OFFSETS: tl.constexpr,      # class offsets need int64 (class stride × K ≥ 2^31)
    COMPUTE_DTYPE: tl.constexpr,     # fp32, or fp64 for float64 inputs
):
    divisor_factor = tl.full((), divisor_factor, COMPUTE_DTYPE)
    beta, inv_temperature, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap = \
        _model_scalars(beta, inv_temperature, student_logit_scale, student_softcap, teacher_logit_scale,
                       teacher_softcap, COMPUTE_DTYPE)

    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in_bounds = rows < n_rows
    valid = row_in_bounds
    if HAS_TARGET:
        # the labels only mask: every value but ignore_index keeps its row
        y = tl.load(target_ptr + rows * target_stride, mask=row_in_bounds, other=ignore_index).to(tl.int64)
        valid = row_in_bounds & (y != ignore_index)
    s_offs = rows * student_stride_row
    t_offs = rows * teacher_stride_row
    g_offs = rows * grad_stride_row
    cols = tl.arange(0, BLOCK_SIZE)

    m_z = tl.full((ROWS,), float("-inf"), dtype=COMPUTE_DTYPE)
    m_u = tl.full((ROWS,), float("-inf"), dtype=COMPUTE_DTYPE)
    s_z = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    s_u = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)
    a_sum = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE)

    # Pass 1: the online statistics. Ignored rows read nothing (their lanes are −inf).
    if SINGLE_PASS:
        mask = valid[:, None] & (cols < n_classes)[None, :]
        z = _load_row_tile(student_ptr, s_offs, cols, mask, student_stride_class, student_logit_scale,
                           student_softcap, inv_temperature, STUDENT_SCALE, STUDENT_SOFTCAP, WIDE_OFFSETS,
                           COMPUTE_DTYPE)
        u = _load_row_tile(teacher_ptr, t_offs, cols, mask, teacher_stride_class, teacher_logit_scale,
                           teacher_softcap, inv_temperature, TEACHER_SCALE, TEACHER_SOFTCAP, WIDE_OFFSETS,
                           COMPUTE_DTYPE)
        # the whole row at once: e = exp(· − ref) stays live, p = e/s needs no second exp
        m_z = tl.max(z, 1)
        m_u = tl.max(u, 1)
        zs = z - tl.where(m_z == float("-inf"), 0.0, m_z)[:, None]
        us = u - tl.where(m_u == float("-inf"), 0.0, m_u)[:, None]
        e_z = tl.exp(zs)
        e_u = tl.exp(us)
        s_z = tl.sum(e_z, 1)
        s_u = tl.sum(e_u, 1)
        if MODE == MODE_REVERSE_KL:
            a_sum = tl.sum(tl.where(e_z > 0.0, e_z * (zs - us), 0.0), 1)
    else:
        for start in range(0, n_classes, BLOCK_SIZE):
            mask = valid[:, None] & ((start + cols) < n_classes)[None, :]
            z = _load_row_tile(student_ptr, s_offs, start + cols, mask, student_stride_class, student_logit_scale,
                               student_softcap, inv_temperature, STUDENT_SCALE, STUDENT_SOFTCAP, WIDE_OFFSETS,
                               COMPUTE_DTYPE)
            u = _load_row_tile(teacher_ptr, t_offs, start + cols, mask, teacher_stride_class, teacher_logit_scale,
                               teacher_softcap, inv_temperature, TEACHER_SCALE, TEACHER_SOFTCAP, WIDE_OFFSETS,
                               COMPUTE_DTYPE)
            m_z, s_z, m_u, s_u, a_sum = _online_update(z, u, m_z, s_z, m_u, s_u, a_sum, MODE)

    ref_z = tl.where(m_z == float("-inf"), 0.0, m_z)
    ref_u = tl.where(m_u == float("-inf"), 0.0, m_u)
    log_s_z = tl.log(s_z)   # −inf for ignored rows: their terms are masked below
    log_s_u = tl.log(s_u)
    mean_d = a_sum / s_z    # ⟨d⟩_p (MODE 1)

    # the row's factor: the mean's 1/count (NaN for a count of 0: 0/0, as torch), (1 − β) in MODE 2,
    # the upstream gradient; 0 for ignored rows
    mean_scale = tl.full((ROWS,), 1.0, dtype=COMPUTE_DTYPE)
    if MEAN:
        count = divisor_factor
        if HAS_TARGET:
            count = count * tl.load(stats_ptr + 1).to(COMPUTE_DTYPE)
        mean_scale = mean_scale * tl.where(count == 0.0, float("nan"), 1.0 / count)
    weight = tl.where(valid, mean_scale, 0.0)
    if MODE == MODE_JSD:
        weight = weight * (1.0 - beta)
    if GRAD_OUTPUT == 2:
        weight = weight * tl.load(grad_output_ptr + rows * grad_output_stride, mask=row_in_bounds,
                                  other=0.0).to(COMPUTE_DTYPE)
    student_chain = (student_logit_scale if STUDENT_SCALE else 1.0) * inv_temperature
    student_cap_inverse = 1.0 / (inv_temperature * student_softcap)
    # log of the weight of the mixture's stable form: β (MIX_FROM_STUDENT) or 1 − β
    log_weight = tl.log(beta if MIX_FROM_STUDENT else 1.0 - beta)

    # Pass 2: the loss (and ⟨r⟩_p for MODE 2), the gradient where it needs no more.
    if SINGLE_PASS:
        p = e_z * (1.0 / s_z)[:, None]
        q = e_u * (1.0 / s_u)[:, None]
        d, rho, r, t = _ratios(zs, us, log_s_z, log_s_u, beta, log_weight, MODE, MIX_FROM_STUDENT)
        loss = tl.sum(_loss_terms(p, q, rho, r, t, beta, MODE), 1)
        mean = mean_d
        if MODE == MODE_JSD:
            mean = tl.sum(_p_log_ratio(p, r), 1)
        if COMPUTE_GRAD:
            g = _element_gradient(z, p, q, d, r, mean, weight, student_chain, student_cap_inverse, MODE,
                                  STUDENT_SOFTCAP)
            _store_tile(grad_ptr, g_offs, cols, row_in_bounds[:, None] & (cols < n_classes)[None, :],
                        grad_stride_class, g, WIDE_OFFSETS)
    else:
        # Second read of both rows by the program that just read them (L2-resident): the loss (and ⟨r⟩_p
        # for MODE 2), the gradient for MODE 0 and 1. Pass 3 (MODE 2): the gradient needs ⟨r⟩_p, a sum over
        # the row of a non-linear function of the final statistics: a third read of both rows.
        loss, mean_r = _stream_row(student_ptr, teacher_ptr, grad_ptr, s_offs, t_offs, g_offs, cols, valid,
                                   row_in_bounds, n_classes, student_stride_class, teacher_stride_class,
                                   grad_stride_class, ref_z, log_s_z, ref_u, log_s_u, mean_d, weight, beta,
                                   log_weight, student_logit_scale, student_softcap, teacher_logit_scale,
                                   teacher_softcap, inv_temperature, student_chain, student_cap_inverse, True,
                                   COMPUTE_GRAD and MODE != MODE_JSD, ROWS, BLOCK_SIZE, MODE, MIX_FROM_STUDENT,
                                   STUDENT_SCALE, STUDENT_SOFTCAP, TEACHER_SCALE, TEACHER_SOFTCAP, WIDE_OFFSETS,
                                   COMPUTE_DTYPE)
        mean = mean_r if MODE == MODE_JSD else mean_d
        if COMPUTE_GRAD and MODE == MODE_JSD:
            _stream_row(student_ptr, teacher_ptr, grad_ptr, s_offs, t_offs, g_offs, cols, valid, row_in_bounds,
                        n_classes, student_stride_class, teacher_stride_class, grad_stride_class, ref_z, log_s_z,
                        ref_u, log_s_u, mean, weight, beta, log_weight, student_logit_scale, student_softcap,
                        teacher_logit_scale, teacher_softcap, inv_temperature, student_chain, student_cap_inverse,
                        False, True, ROWS, BLOCK_SIZE, MODE, MIX_FROM_STUDENT, STUDENT_SCALE, STUDENT_SOFTCAP,
                        TEACHER_SCALE, TEACHER_SOFTCAP, WIDE_OFFSETS, COMPUTE_DTYPE)

    if STORE_STATS:
        _store_row_stats(row_stats_ptr, rows, row_in_bounds, row_stats_stride, ref_z, log_s_z, ref_u, log_s_u, mean,
                         weight)
    # ignored rows: 0, times the mean's scale (NaN when nothing is kept: the sum is NaN, as 0/0)
    row_loss = tl.where(valid, loss, 0.0) * mean_scale
    if STORE_LOSS == 1:
        tl.store(loss_ptr + rows, to_storage(row_loss, loss_ptr.dtype.element_ty), mask=row_in_bounds)
    if STORE_LOSS == 2:
        total = tl.sum(tl.where(row_in_bounds, row_loss, 0.0), 0)
        finish_loss(stats_ptr + 4, stats_ptr + 3, loss_ptr, total, tl.num_programs(0), 256)




@triton.jit
def distillation_slice_bwd_kernel(
    # pointers
    student_ptr, teacher_ptr,        # a slice of both models' logits, (N, S) each
    row_stats_ptr,                   # (N_STATS, N) from the forward (STORE_STATS)
    grad_output_ptr,                 # the per-row upstream gradient (GRAD_OUTPUT)
    grad_ptr,                        # out: ∂loss/∂student for the slice (N, S), may alias student_ptr
    # strides, in elements
    student_stride_row, teacher_stride_row, grad_stride_row, row_stats_stride, grad_output_stride,
    # sizes
    n_rows, n_slice_classes,
    # scalars (float64 on the way in)
    beta: "fp64", inv_temperature: "fp64", student_logit_scale: "fp64", student_softcap: "fp64",
    teacher_logit_scale: "fp64", teacher_softcap: "fp64",
    # compile-time flags
    ROWS: tl.constexpr,              # rows per program
    BLOCK_SIZE: tl.constexpr,        # classes per tile
    MODE: tl.constexpr,              # as distillation_fwd_kernel's
    MIX_FROM_STUDENT: tl.constexpr,
    GRAD_OUTPUT: tl.constexpr,       # 0 none (= 1), 2 one per row
    STUDENT_SCALE: tl.constexpr,
    STUDENT_SOFTCAP: tl.constexpr,
    TEACHER_SCALE: tl.constexpr,
    TEACHER_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,     # fp32, or fp64 for float64 inputs
):
    # A vocabulary slice's gradient (the fused heads' vocabulary walk): every term of _element_gradient is
    # per element given the row's statistics from the forward, so the slice needs no reduction over the row.
    # A program takes whole rows of the slice, tile after tile: the gradient may be written over the first
    # half of the student's fp32 row, which this program alone reads, and only where it has read it.
    beta, inv_temperature, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap = \
        _model_scalars(beta, inv_temperature, student_logit_scale, student_softcap, teacher_logit_scale,
                       teacher_softcap, COMPUTE_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in_bounds = rows < n_rows
    stats = row_stats_ptr + rows
    ref_z = tl.load(stats + STAT_REF_Z * row_stats_stride, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    log_s_z = tl.load(stats + STAT_LOG_S_Z * row_stats_stride, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    ref_u = tl.load(stats + STAT_REF_U * row_stats_stride, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    log_s_u = tl.load(stats + STAT_LOG_S_U * row_stats_stride, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    mean = tl.load(stats + STAT_MEAN * row_stats_stride, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    weight = tl.load(stats + STAT_WEIGHT * row_stats_stride, mask=row_in_bounds, other=0.0).to(COMPUTE_DTYPE)
    if GRAD_OUTPUT == 2:
        weight = weight * tl.load(grad_output_ptr + rows * grad_output_stride, mask=row_in_bounds,
                                  other=0.0).to(COMPUTE_DTYPE)
    log_weight = tl.log(beta if MIX_FROM_STUDENT else 1.0 - beta)
    student_chain = (student_logit_scale if STUDENT_SCALE else 1.0) * inv_temperature
    student_cap_inverse = 1.0 / (inv_temperature * student_softcap)
    cols = tl.arange(0, BLOCK_SIZE)
    for start in range(0, n_slice_classes, BLOCK_SIZE):
        mask = row_in_bounds[:, None] & ((start + cols) < n_slice_classes)[None, :]
        # ignored rows (weight 0) read nothing
        z, p, q, d, _, r, _ = _final_tile(
            student_ptr, teacher_ptr, rows * student_stride_row, rows * teacher_stride_row, start + cols,
            mask & (weight != 0.0)[:, None], 1, 1, ref_z, log_s_z, ref_u, log_s_u, beta, log_weight,
            student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap, inv_temperature, MODE,
            MIX_FROM_STUDENT, STUDENT_SCALE, STUDENT_SOFTCAP, TEACHER_SCALE, TEACHER_SOFTCAP, False, COMPUTE_DTYPE)
        g = _element_gradient(z, p, q, d, r, mean, weight, student_chain, student_cap_inverse, MODE, STUDENT_SOFTCAP)
        _store_tile(grad_ptr, rows * grad_stride_row, start + cols, mask, 1, g, False)

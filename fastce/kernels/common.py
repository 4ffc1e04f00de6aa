"""@triton.jit helpers and kernels shared by every kernel family: stores in a tensor's own precision,
row and class offsets, the per-row class-index loader, the mean's scale, stable expm1 / log1p / tanh,
the statistics of the class indices and the one in-place rescale of a gradient."""
import triton
import triton.language as tl


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    # fp32 → bf16 rounded to nearest-even by hand: Triton's interpreter truncates instead (it
    # ignores the rounding mode), which would leave the CPU suite a whole ulp of slack; on a GPU
    # the bits equal the hardware's conversion. (The quiet bit keeps a NaN a NaN.) Other dtypes
    # convert as they are (numpy rounds fp16 to nearest-even too).
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = tl.where(x != x, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def row_offsets(rows, inner_size, stride_outer, stride_inner):
    # row r of an (N, C, d1..dk) tensor is (n, s) = (r // S, r % S) with S = d1·…·dk (int64)
    return (rows // inner_size) * stride_outer + (rows % inner_size) * stride_inner


@triton.jit
def class_offsets(cols, stride_class, WIDE_OFFSETS: tl.constexpr):
    # int32 unless the last class sits 2^31 elements or more past its row (a huge class stride):
    # an int64 tile costs two registers per element for as long as it is live
    if WIDE_OFFSETS:
        return cols[None, :].to(tl.int64) * stride_class
    return cols[None, :] * stride_class


@triton.jit
def load_class_index(target_ptr, rows, row_in_bounds, target_stride, n_classes, ignore_index):
    # (y, rows that count, rows whose y is outside [0, n_classes)) of a 1-D tensor of class indices
    # read with its stride. An index out of range that is not ignore_index (possible only with
    # validate=False) makes its row NaN in the caller and is never used to address memory.
    y = tl.load(target_ptr + rows * target_stride, mask=row_in_bounds, other=ignore_index).to(tl.int64)
    counted = row_in_bounds & (y != ignore_index)
    bad = counted & ((y < 0) | (y >= n_classes))
    return y, counted & ~bad, bad


@triton.jit
def class_weight_of(weight_ptr, y, valid, HAS_WEIGHT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    # w_y of each valid row (1 without class weights), 0 elsewhere
    if HAS_WEIGHT:
        return tl.load(weight_ptr + y, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    return tl.where(valid, 1.0, 0.0).to(COMPUTE_DTYPE)


@triton.jit
def mean_scale(divisor_ptr, ROWS: tl.constexpr, MEAN: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    # 1/divisor for "mean" (a device scalar: no host sync), 1 otherwise. A zero divisor (every row
    # ignored, or zero weight at every target) gives NaN, as torch's 0/0: also where a term that
    # does not depend on the divisor's rows (smoothing, z-loss) alone would give ±inf
    if MEAN:
        divisor = tl.load(divisor_ptr).to(COMPUTE_DTYPE)
        return tl.zeros((ROWS,), dtype=COMPUTE_DTYPE) + tl.where(divisor == 0.0, float("nan"), 1.0 / divisor)
    return tl.full((ROWS,), 1.0, dtype=COMPUTE_DTYPE)


@triton.jit
def expm1(v):
    # exp(v) − 1 without cancellation: where |v| is small, its Taylor polynomial to v⁹ (the next
    # term is below 1e-9 of the value at |v| < 0.5 in fp32, 3e-16 at |v| < 0.1 in fp64); beyond,
    # exp(v) − 1 loses at most a few ulps of exp to the subtraction
    series = v * (1.0 + v * (1 / 2 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v * (
        1 / 720 + v * (1 / 5040 + v * (1 / 40320 + v * (1 / 362880)))))))))
    small = 0.1 if v.dtype == tl.float64 else 0.5
    return tl.where(tl.abs(v) < small, series, tl.exp(v) - 1.0)


@triton.jit
def log1p(v):
    # log(1 + v) for v > −1 to a few ulps (Kahan's, in Goldberg's paper): log u · v / (u − 1) with
    # u = 1 + v rounded corrects u's rounding (u − 1 is exact, so the factor is 1 + O(ε) for either sign
    # of v); log itself is accurate (libdevice's, not an approximation). Cross-entropy takes v ≥ 0, the
    # distillation mixture v = β·expm1(ρ) ∈ (−β, ∞).
    u = 1.0 + v
    return tl.where(u == 1.0, v, tl.log(u) * (v / (u - 1.0)))


@triton.jit
def tanh(u):
    # tanh(u) = sign(u)·t/(2 − t) with t = 1 − e^(−2|u|) = −expm1(−2|u|): relative precision
    # for |u| ≪ 1 (1 − 2/(e^(2u) + 1) would cancel there), and exactly ±1 as u → ±∞ (no inf/inf)
    t = -expm1(-2.0 * tl.abs(u))
    magnitude = t / (2.0 - t)
    return tl.where(u < 0.0, -magnitude, magnitude)


@triton.jit
def scale_kernel(
    grad_ptr, factor_ptr,            # a gradient written by a forward (scaled in place), its upstream factor
    n_rows, n_cols, inner_size,      # rows of n_cols; row r at (r // inner_size)·outer + (r % inner_size)·inner
    stride_outer, stride_inner, stride_col, factor_stride,
    ROWS: tl.constexpr,              # rows per tile
    BLOCK_SIZE: tl.constexpr,        # columns per tile
    SCALAR: tl.constexpr,            # one factor for every element, else one per row (factor_stride apart)
    WIDE_OFFSETS: tl.constexpr,      # column offsets need int64 (n_cols × stride_col ≥ 2^31)
    COMPUTE_DTYPE: tl.constexpr,     # fp32, or fp64 for float64 gradients
):
    # The forward stored ∂L/∂x for an upstream gradient of 1; the chain rule scales each row by its
    # upstream g. Rows where g == 1 (the usual loss.backward()) are neither read nor written, which the
    # device decides without a host sync; the programs stride over the tiles, so a unit scalar costs
    # one load per program.
    if SCALAR:
        g = tl.zeros((ROWS,), dtype=COMPUTE_DTYPE) + tl.load(factor_ptr).to(COMPUTE_DTYPE)
        if tl.load(factor_ptr) == 1.0:
            return
    col_tiles = tl.cdiv(n_cols, BLOCK_SIZE)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS) * col_tiles, tl.num_programs(0)):
        rows = tl.cast(tile // col_tiles, tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = (tile % col_tiles) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_rows = rows < n_rows
        if not SCALAR:
            g = tl.load(factor_ptr + rows * factor_stride, mask=in_rows, other=1.0).to(COMPUTE_DTYPE)
        needed = in_rows & (g != 1.0)
        if tl.max(needed.to(tl.int32), 0) > 0:
            mask = needed[:, None] & (cols < n_cols)[None, :]
            ptrs = grad_ptr + row_offsets(rows, inner_size, stride_outer, stride_inner)[:, None] + \
                class_offsets(cols, stride_col, WIDE_OFFSETS)
            grad = tl.load(ptrs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            tl.store(ptrs, to_storage(grad * g[:, None], grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _in_range_flag(n_bad):
    # 1 when no class index was out of range, else 0 (what torch._assert_async checks on the device)
    return tl.where(n_bad == 0, 1.0, 0.0)


@triton.jit
def target_stats_kernel(
    target_ptr, weight_ptr, stats_ptr,   # stats_ptr[4p:4p+4] = (Σ w_y, #valid rows, #out-of-range rows, 0)
    target_stride,                       # class indices: a 1-D tensor read with its stride
    n_rows, n_classes, ignore_index,     # of program p's rows; with FINISH, slot 2 is the in-range flag
    rows_per_program,                    # a multiple of BLOCK_SIZE
    BLOCK_SIZE: tl.constexpr,            # targets per step
    HAS_WEIGHT: tl.constexpr,            # class weights at weight_ptr (else w_y = 1: Σ w_y = #valid rows)
    FINISH: tl.constexpr,                # a single program: write the final statistics
    COMPUTE_DTYPE: tl.constexpr,         # fp32, or fp64 for float64 inputs
):
    # First level of the mean's divisors (and of the device-side range check): program p sums rows
    # [p·R, (p+1)·R) in a fixed order; sum_stats_kernel adds the programs' sums in a fixed order. No
    # atomics: the mean is bitwise reproducible. The fourth value is a zeroed counter, for the forward
    # kernel that runs next and reduces its loss on the device (its last program adds the partial sums).
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    weight_sum = tl.zeros((BLOCK_SIZE,), dtype=COMPUTE_DTYPE)
    count = tl.zeros((BLOCK_SIZE,), dtype=COMPUTE_DTYPE)
    n_bad = tl.zeros((BLOCK_SIZE,), dtype=COMPUTE_DTYPE)
    for start in range(0, rows_per_program, BLOCK_SIZE):
        rows = first + start + tl.arange(0, BLOCK_SIZE)
        y, counted, bad = load_class_index(target_ptr, rows, rows < n_rows, target_stride, n_classes, ignore_index)
        # an out-of-range class (validate=False) poisons the mean with NaN instead of reading memory
        weight_sum += tl.where(bad, float("nan"), class_weight_of(weight_ptr, y, counted, HAS_WEIGHT, COMPUTE_DTYPE))
        count += tl.where(counted | bad, 1.0, 0.0)
        n_bad += tl.where(bad, 1.0, 0.0)
    out = stats_ptr + tl.program_id(0) * 4
    tl.store(out, tl.sum(weight_sum, 0))
    tl.store(out + 1, tl.sum(count, 0))
    tl.store(out + 2, _in_range_flag(tl.sum(n_bad, 0)) if FINISH else tl.sum(n_bad, 0))
    tl.store(out + 3, 0.0)


@triton.jit
def sum_stats_kernel(
    partials_ptr, stats_ptr,     # the first level's (Σ w_y, #valid, #out-of-range, 0) per program -> the totals
    n_partials,
    BLOCK_SIZE: tl.constexpr,    # ≥ n_partials
):
    # Second level: one program adds the first level's sums in a fixed order.
    index = tl.arange(0, BLOCK_SIZE)
    mask = index < n_partials
    tl.store(stats_ptr, tl.sum(tl.load(partials_ptr + 4 * index, mask=mask, other=0.0), 0))
    tl.store(stats_ptr + 1, tl.sum(tl.load(partials_ptr + 4 * index + 1, mask=mask, other=0.0), 0))
    tl.store(stats_ptr + 2, _in_range_flag(tl.sum(tl.load(partials_ptr + 4 * index + 2, mask=mask, other=0.0), 0)))
    tl.store(stats_ptr + 3, 0.0)


@triton.jit(noinline=True)
def finish_loss(partial_ptr, counter_ptr, loss_ptr, partial, n_partials, BLOCK_SIZE: tl.constexpr):
    # The loss reduced on the device in a fixed order, inside the launch that computes it: each program
    # publishes its partial sum (a release store) and takes a ticket; the program holding the last
    # ticket sees every partial sum (acq_rel), adds them in index order and writes the loss in its
    # dtype. The counter was zeroed by the launch before (target_stats, or a zeroed buffer).
    # (the partial sum travels as the integer of its bits: Triton's interpreter exchanges integers only)
    if partial.dtype == tl.float64:
        bits_ptr = partial_ptr.to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(bits_ptr + tl.program_id(0), partial.to(tl.int64, bitcast=True), sem="release")
    else:
        bits_ptr = partial_ptr.to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(bits_ptr + tl.program_id(0), partial.to(tl.int32, bitcast=True), sem="release")
    ticket = tl.atomic_add(counter_ptr, 1.0, sem="acq_rel")
    if ticket == n_partials - 1:
        total = tl.zeros((BLOCK_SIZE,), dtype=partial.dtype)
        for start in range(0, n_partials, BLOCK_SIZE):
            index = start + tl.arange(0, BLOCK_SIZE)
            total += tl.load(partial_ptr + index, mask=index < n_partials, other=0.0, volatile=True)
        tl.store(loss_ptr, to_storage(tl.sum(total, 0), loss_ptr.dtype.element_ty))


@triton.jit
def accumulate_kernel(
    total_ptr, part_ptr,       # total (fp32/fp64) += part (the input dtype), elementwise, in place
    n_elements,
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    # A fused head's sums across pieces (∂W over row chunks, ∂input over vocabulary slices): each piece's
    # GEMM product, rounded once to the input dtype, is added in fp32, reading it and the total once and
    # writing the total once.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    total = tl.load(total_ptr + offsets, mask=mask)
    part = tl.load(part_ptr + offsets, mask=mask).to(total.dtype)
    tl.store(total_ptr + offsets, total + part, mask=mask)


@triton.jit
def _split_total(high_ptr, low_ptr, offsets, mask):
    # the fp32 value whose upper 16 bits are at high_ptr and lower 16 at low_ptr (2-byte integers)
    high = tl.load(high_ptr + offsets, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    low = tl.load(low_ptr + offsets, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    return ((high << 16) | low).to(tl.float32, bitcast=True)


@triton.jit
def split_accumulate_kernel(
    high_ptr, low_ptr,         # an fp32 total split in two 2-byte halves (int16 views), updated in place
    part_ptr,                  # the fp32 product to add
    n_elements,
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    # A fused head's exact sum across pieces in half the fp32 accumulator's memory: the total's upper half
    # lives in the low-precision result itself (split_round_kernel rounds it once at the end), the lower
    # half beside it. total + part is the fp32 sum, bit for bit as with an fp32 accumulator.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    total = _split_total(high_ptr, low_ptr, offsets, mask) + tl.load(part_ptr + offsets, mask=mask, other=0.0)
    bits = total.to(tl.uint32, bitcast=True)
    tl.store(high_ptr + offsets, (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    tl.store(low_ptr + offsets, (bits & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def split_round_kernel(
    high_ptr, low_ptr,         # the split fp32 total (split_accumulate_kernel's)
    out_ptr,                   # the result (bf16/fp16), the same memory as high_ptr: rounded once, in place
    n_elements,
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    total = _split_total(high_ptr, low_ptr, offsets, mask)
    tl.store(out_ptr + offsets, to_storage(total, out_ptr.dtype.element_ty), mask=mask)

"""Stores of fp32 results in a tensor's own (possibly lower) precision, shared by the kernel families."""
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

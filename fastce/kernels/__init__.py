"""@triton.jit kernels only: one module per kernel family."""

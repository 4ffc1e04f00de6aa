"""Compile the binary-loss kernels (fastce/kernels/binary.py) for an H100 (sm_90) without a GPU.

The same check as tools/sm90_compile.py (whose helpers it uses) for the elementwise sigmoid
losses: the real GPU compiler over the launch configurations fastce.binary uses, printing
registers and stack (spill) bytes per thread. It runs nothing.

    python tools/sm90_compile_binary.py
Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import triton
import triton.language as tl
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sm90_compile  # noqa: E402  (its _compile and resource_usage)

from fastce import binary  # noqa: E402
from fastce.kernels import binary as kernels  # noqa: E402

STRIDES = ("input_strides", "target_strides", "weight_strides", "pos_weight_strides", "grad_output_strides",
           "loss_strides", "grad_input_strides", "grad_target_strides")


class Variant(NamedTuple):
    name: str
    loss: str
    n_cols: int                # merged last dimension: the whole tensor (rows = 1), or the classes
    n_rows: int = 1
    dtype: str = "bf16"
    flags: tuple = ()          # boolean constexprs set to True
    gamma_int: int = -1
    grad_output: int = 0


def variants() -> list[Variant]:
    step = ("REDUCE", "MEAN", "GRAD_INPUT")
    elements = 16 * 900 * 91  # DETR-style: 16 images × 900 queries × 91 classes
    return [
        Variant("focal training step (gamma 2)", "focal", elements, flags=step + ("HAS_ALPHA",), gamma_int=2),
        Variant("focal training step (gamma 1.5)", "focal", elements, flags=step + ("HAS_ALPHA",)),
        Variant("focal, soft targets that learn", "focal", elements, flags=step + ("HAS_ALPHA", "GRAD_TARGET"),
                gamma_int=2),
        Variant("BCE training step", "bce", elements, flags=step),
        Variant("BCE, (C,) weight and pos_weight", "bce", 91, 16 * 900, flags=step + ("HAS_WEIGHT", "HAS_POS_WEIGHT")),
        Variant("soft margin training step", "soft_margin", elements, flags=step),
        Variant("'none' forward", "bce", elements, flags=("STORE_LOSS",)),
        Variant("'none' backward recompute", "focal", elements, flags=("GRAD_INPUT", "GRAD_TARGET", "HAS_ALPHA"),
                gamma_int=2, grad_output=2),
        Variant("float64 BCE", "bce", elements, dtype="fp64", flags=step + ("GRAD_TARGET",)),
    ]


FLAGS = ("HAS_WEIGHT", "HAS_POS_WEIGHT", "HAS_ALPHA", "STORE_LOSS", "REDUCE", "MEAN", "GRAD_INPUT", "GRAD_TARGET")


def _source(variant: Variant):
    """(signature, constexprs, attrs, warps) as a launch on contiguous tensors specialises them: integer
    arguments equal to 1 become constants, pointers and multiples of 16 carry the divisibility hint."""
    acc = "fp64" if variant.dtype == "fp64" else "fp32"
    block = min(1 << (variant.n_cols - 1).bit_length(), binary.TILE)
    rows = max(1, min(binary.TILE // block, variant.n_rows))
    flags = {name: name in variant.flags for name in FLAGS}
    constexprs = dict(LOSS=binary.LOSS_KERNEL_IDS[variant.loss], ROWS=rows, BLOCK_SIZE=block,
                      GAMMA_INT=variant.gamma_int, GRAD_OUTPUT=variant.grad_output, WIDE_OFFSETS=False,
                      COMPUTE_DTYPE=tl.float64 if acc == "fp64" else tl.float32, **flags)
    present = {"weight_ptr": flags["HAS_WEIGHT"], "pos_weight_ptr": flags["HAS_POS_WEIGHT"],
               "grad_output_ptr": variant.grad_output > 0, "loss_ptr": flags["STORE_LOSS"] or flags["REDUCE"],
               "work_ptr": flags["REDUCE"], "grad_input_ptr": flags["GRAD_INPUT"],
               "grad_target_ptr": flags["GRAD_TARGET"]}
    names = kernels.binary_loss_fwd_kernel.arg_names
    signature, attrs = {"input_ptr": f"*{variant.dtype}", "target_ptr": f"*{variant.dtype}"}, {}
    for name, here in present.items():
        signature[name] = (f"*{acc}" if name == "work_ptr" else f"*{variant.dtype}") if here else "constexpr"
        if not here:
            constexprs[name] = None

    def integer(name, value, path):
        if value == 1:
            constexprs[path] = 1
            return "constexpr"
        if value % 16 == 0:
            attrs[path] = [["tt.divisibility", 16]]
        return "i32"

    for name in STRIDES:  # contiguous rows of n_cols; (C,) weights repeat along the rows
        row_stride = 0 if name in ("weight_strides", "pos_weight_strides") else variant.n_cols
        index = names.index(name)
        signature[name] = tuple(integer(name, value, (index, i)) for i, value in enumerate((0, 0, row_stride, 1)))
    for name, value in (("size1", 1), ("size2", variant.n_rows), ("n_rows", variant.n_rows),
                        ("n_cols", variant.n_cols), ("n_elements", variant.n_rows * variant.n_cols)):
        signature[name] = integer(name, value, (names.index(name),))
    signature.update(alpha="fp32", gamma="fp32")
    for name in list(signature):
        if isinstance(signature[name], str) and signature[name].startswith("*"):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs if isinstance(name, str) and name.isupper()})
    return signature, constexprs, attrs, 8 if rows * block >= binary.TILE else 4


def compile_all(selected=None) -> list[tuple]:
    rows = []
    for variant in selected or variants():
        signature, constexprs, attrs, num_warps = _source(variant)
        source = ASTSource(fn=kernels.binary_loss_fwd_kernel, signature=signature, constexprs=constexprs,
                           attrs=attrs)
        compiled = triton.compile(source, target=sm90_compile.HOPPER, options={"num_warps": num_warps})
        rows.append((variant.name, num_warps, *sm90_compile.resource_usage(compiled.asm["cubin"])))
    return rows


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    print(f"{'kernel variant':36s} {'warps':>5s} {'regs':>5s} {'stack B':>8s}")
    for name, warps, registers, stack in compile_all():
        print(f"{name:36s} {warps:5d} {registers:5d} {stack:8d}")


if __name__ == "__main__":
    main()

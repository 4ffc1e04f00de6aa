"""Compile fastce's Triton kernels for an H100 (sm_90) on a machine without a GPU.

Triton compiles ahead of time for any target: this runs the real GPU compiler (Triton → LLVM →
PTX → ptxas) over the launch configurations fastce uses, so type errors that the interpreter
tolerates, and register spills of the launch rule, show up without a GPU. It runs nothing.

    python tools/sm90_compile.py      # table: variant, tile, warps, registers and stack bytes per thread
Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Iterable, NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastce import ops
from fastce.kernels import cross_entropy as kernels

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class Variant(NamedTuple):
    name: str
    n_classes: int
    dtype: str = "bf16"
    flags: tuple = ()  # names of the forward kernel's boolean constexprs set to True
    grad_output: int = 0
    clusters: str = ops.NO_CLUSTERS  # the launch rule's cluster policy (FASTCE_CLUSTER=1: CLUSTER_LONG_ROWS)


def forward_variants() -> list[Variant]:
    clustered = ops.CLUSTER_LONG_ROWS
    return [
        Variant("training step, V=4096", 4096, flags=("COMPUTE_GRAD", "MEAN")),
        Variant("streamed training step, V=32k", 32768, flags=("COMPUTE_GRAD", "MEAN")),
        Variant("streamed training step, V=256k", 262144, flags=("COMPUTE_GRAD", "MEAN")),
        Variant("clustered training step, V=32k", 32768, flags=("COMPUTE_GRAD", "MEAN"), clusters=clustered),
        Variant("clustered training step, V=50257", 50257, flags=("COMPUTE_GRAD", "MEAN"), clusters=clustered),
        Variant("clustered training step, V=128k", 131072, flags=("COMPUTE_GRAD", "MEAN"), clusters=clustered),
        Variant("clustered training step, V=256k", 262144, flags=("COMPUTE_GRAD", "MEAN"), clusters=clustered),
        Variant("no-grad forward, V=4096", 4096),
        Variant("streamed no-grad forward, V=128k", 131072),
        Variant("small V=256, rows per program", 256, flags=("COMPUTE_GRAD",)),
        Variant("all options, V=4096", 4096,
                flags=("COMPUTE_GRAD", "MEAN", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP")),
        Variant("streamed all options, V=32k", 32768,
                flags=("COMPUTE_GRAD", "MEAN", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP")),
        Variant("probability targets, V=4096", 4096, flags=("COMPUTE_GRAD", "PROB_TARGET", "HAS_WEIGHT")),
        Variant("focal, V=1000", 1000, flags=("COMPUTE_GRAD", "MEAN", "FOCAL", "HAS_WEIGHT")),
        Variant("focal streamed, V=100k", 100000, flags=("COMPUTE_GRAD", "FOCAL")),
        Variant("focal clustered, V=100k", 100000, flags=("COMPUTE_GRAD", "FOCAL"), clusters=clustered),
        Variant("'none' backward recompute, V=50257", 50257, flags=("COMPUTE_GRAD",), grad_output=2),
        Variant("float64, V=1000", 1000, dtype="fp64", flags=("COMPUTE_GRAD", "MEAN", "HAS_SMOOTHING")),
    ]


FLAGS = ("PROB_TARGET", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP", "FOCAL", "MEAN",
         "COMPUTE_GRAD")


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, num_ctas: int = 1):
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_ctas": num_ctas})


def _forward_source(variant: Variant):
    import triton.language as tl
    config = ops.launch_config(8192, variant.n_classes, variant.clusters)
    acc = "fp64" if variant.dtype == "fp64" else "fp32"
    flags = {name: name in variant.flags for name in FLAGS}
    constexprs = dict(ROWS=config.rows, BLOCK_SIZE=config.block_size,
                      SINGLE_PASS=variant.n_classes <= config.block_size, WIDE_OFFSETS=False,
                      GRAD_OUTPUT=variant.grad_output, HAS_LSE_GRAD=False, KEEP_UNIT_ROWS=False,
                      COMPUTE_DTYPE=tl.float64 if acc == "fp64" else tl.float32, **flags)
    signature = {
        "logits_ptr": f"*{variant.dtype}",
        "target_ptr": f"*{variant.dtype}" if flags["PROB_TARGET"] else "*i64",
        "weight_ptr": "*fp32" if flags["HAS_WEIGHT"] else "constexpr",
        "loss_ptr": f"*{acc}", "lse_ptr": f"*{acc}", "grad_ptr": f"*{variant.dtype}",
        "ce_divisor_ptr": f"*{acc}", "z_divisor_ptr": f"*{acc}",
        "grad_output_ptr": f"*{variant.dtype}" if variant.grad_output else f"*{acc}",
        "lse_grad_ptr": f"*{acc}",
    }
    for name in kernels.cross_entropy_fwd_kernel.fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_stride_outer") or name.endswith("_stride_inner") or name.endswith("_stride_class"):
            signature[name] = "i64"
        elif name in ("n_rows", "n_classes", "inner_size", "ignore_index"):
            signature[name] = "i32"
        elif name in ("label_smoothing", "z_loss", "softcap", "gamma"):
            signature[name] = "fp64"  # the kernel's annotation: fp64 kernels compute with fp64 scalars
    if not flags["HAS_WEIGHT"]:
        constexprs["weight_ptr"] = None
    return signature, constexprs, config


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread: spills and local arrays) of an sm_90 cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def compile_all(variants: Iterable[Variant]) -> list[tuple]:
    rows = []
    for variant in variants:
        signature, constexprs, config = _forward_source(variant)
        compiled = _compile(kernels.cross_entropy_fwd_kernel.fn, signature, constexprs, config.num_warps,
                            config.num_ctas)
        rows.append((variant.name, config, *resource_usage(compiled.asm["cubin"])))
    # the backward scale kernel and the divisor kernel, once each
    scale_sig = {"grad_ptr": "*bf16", "grad_output_ptr": "*fp32", "grad_stride_outer": "i64",
                 "grad_stride_inner": "i64", "grad_stride_class": "i64", "n_rows": "i32", "n_classes": "i32",
                 "inner_size": "i32", "ROWS": "constexpr", "BLOCK_SIZE": "constexpr", "PER_ROW": "constexpr",
                 "COMPUTE_DTYPE": "constexpr", "WIDE_OFFSETS": "constexpr"}
    import triton.language as tl
    config = ops.launch_config(8192, 32768)
    compiled = _compile(kernels.cross_entropy_bwd_kernel.fn, scale_sig,
                        dict(ROWS=config.rows, BLOCK_SIZE=min(config.block_size, ops.SCALE_BLOCK), PER_ROW=True,
                             COMPUTE_DTYPE=tl.float32, WIDE_OFFSETS=False),
                        min(config.num_warps, ops.SCALE_WARPS))
    scale_config = ops.LaunchConfig(config.rows, min(config.block_size, ops.SCALE_BLOCK),
                                    min(config.num_warps, ops.SCALE_WARPS))
    rows.append(("backward scale, V=32k", scale_config, *resource_usage(compiled.asm["cubin"])))
    divisor_sig = {"target_ptr": "*i64", "weight_ptr": "*fp32", "stats_ptr": "*fp32", "n_rows": "i32",
                   "n_classes": "i32", "ignore_index": "i32", "rows_per_program": "i32", "BLOCK_SIZE": "constexpr",
                   "HAS_WEIGHT": "constexpr", "FINISH": "constexpr", "COMPUTE_DTYPE": "constexpr"}
    compiled = _compile(kernels.target_stats_kernel, divisor_sig,
                        dict(BLOCK_SIZE=ops.TARGET_STATS_BLOCK, HAS_WEIGHT=True, FINISH=False, COMPUTE_DTYPE=tl.float32), 4)
    rows.append(("mean divisor", ops.LaunchConfig(1, ops.TARGET_STATS_BLOCK, 4), *resource_usage(compiled.asm["cubin"])))
    return rows


# ---- per-token statistics (fastce/kernels/token_stats.py) --------------------------------------------

def token_stats_variants() -> list[tuple]:
    """(name, kernel, V, dtype, flags set to True) of the token-statistics kernels' launches."""
    fwd, bwd = "token_stats_fwd_kernel", "token_stats_bwd_kernel"
    return [
        ("token forward, V=128k", fwd, 131072, "bf16", ("HAS_ENTROPY", "STORE_STATS")),
        ("token forward, V=256", fwd, 256, "bf16", ("HAS_ENTROPY", "STORE_STATS")),
        ("token forward float64, V=1000", fwd, 1000, "fp64", ("HAS_ENTROPY", "STORE_STATS")),
        ("token backward, V=128k", bwd, 131072, "bf16", ("HAS_GRAD_LOGPROB", "HAS_GRAD_ENTROPY")),
        ("token backward, V=256", bwd, 256, "fp32", ("HAS_GRAD_LOGPROB", "HAS_GRAD_ENTROPY")),
        ("token backward, V=4096", bwd, 4096, "bf16", ("HAS_GRAD_LOGPROB", "HAS_GRAD_ENTROPY")),
    ]


def compile_token_stats(variants: Iterable[tuple]) -> list[tuple]:
    import triton.language as tl
    from fastce import token_stats
    from fastce.kernels import token_stats as token_kernels
    rows = []
    for name, kernel_name, n_classes, dtype, flags in variants:
        kernel = getattr(token_kernels, kernel_name).fn
        config = token_stats.launch_config(8192, n_classes)
        acc = "fp64" if dtype == "fp64" else "fp32"
        pointers = {arg: f"*{dtype}" if arg in ("logits_ptr", "grad_ptr") else "*i64" if arg == "target_ptr"
                    else f"*{acc}" for arg in kernel.arg_names if arg.endswith("_ptr")}
        constexprs = {arg: arg in flags for arg in kernel.arg_names if arg.isupper()}
        constexprs.update(ROWS=config.rows, BLOCK_SIZE=config.block_size, WIDE_OFFSETS=False,
                          COMPUTE_DTYPE=tl.float64 if acc == "fp64" else tl.float32)
        scalars = {arg: "fp32" if arg == "inv_temperature" else "i64" if "stride" in arg or arg == "class_offset"
                   else "i32" for arg in kernel.arg_names if arg not in pointers and arg not in constexprs}
        signature = {arg: pointers.get(arg) or scalars.get(arg) or "constexpr" for arg in kernel.arg_names}
        compiled = _compile(kernel, signature, constexprs, config.num_warps)
        rows.append((name, config, *resource_usage(compiled.asm["cubin"])))
    return rows


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    print(f"{'kernel variant':40s} {'rows':>4s} {'block':>7s} {'CTAs':>4s} {'warps':>5s} {'regs':>5s} {'stack B':>8s}")
    rows = compile_all(forward_variants()) + compile_token_stats(token_stats_variants())
    for name, config, registers, spills in rows:
        print(f"{name:40s} {config.rows:4d} {config.block_size:7d} {config.num_ctas:4d} {config.num_warps:5d} "
              f"{registers:5d} {spills:8d}")


if __name__ == "__main__":
    main()

"""Compile fastce's Triton kernels for an H100 (sm_90) on a machine without a GPU.

Triton compiles ahead of time for any target: this runs the real GPU compiler (Triton → LLVM →
PTX → ptxas) over what fastce's launchers launch for a set of workloads, so type errors that the
interpreter tolerates, register spills of the launch rule, and narrow memory accesses show up
without a GPU. It runs nothing on a device.

Each variant calls fastce's launchers on meta tensors (shapes and strides, no memory); every kernel
launch is intercepted and compiled with the specialisations Triton applies at run time: pointers
16-byte aligned (as PyTorch allocates them), integers equal to 1 turned into constants (unit
strides), integers divisible by 16 marked so. From the PTX it reports, per pointer argument, the
widths in bytes of the global loads and stores (16 = one 128-bit vector per thread and access).

    python tools/sm90_compile.py      # table: variant, kernel, tile, warps, registers, stack bytes, access widths
Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Callable, Iterable, NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastce import _launch, softmax_losses
from fastce._core import LossSpec, TokenStatsSpec, compute_dtype
from fastce.distributed import ops as vocab_parallel
from fastce.distributed.spec import token_loss_spec

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class Variant(NamedTuple):
    name: str
    launch: Callable[[], None]  # calls fastce's launchers on meta tensors


class Compiled(NamedTuple):
    variant: str
    kernel: str
    rows: int                  # the launch's ROWS (1 for kernels without one)
    block_size: int
    num_warps: int
    num_ctas: int
    registers: int             # per thread
    stack: int                 # bytes per thread: spills and local arrays
    fp64_params: int           # float64 scalar parameters of the compiled kernel
    widths: dict               # pointer argument -> {"ld": set of bytes, "st": set of bytes}


def _meta(shape, dtype=torch.bfloat16, layout: str = "contiguous"):
    if layout == "channels_last":  # (N, C, d…) stored as (N, d…, C)
        return torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype, device="meta").movedim(-1, 1)
    return torch.empty(shape, dtype=dtype, device="meta")


def _training_step(shape, dtype=torch.bfloat16, layout="contiguous", weight=False, probs=False, **spec):
    """The forward of a 'mean'/'sum' training step: the loss and the gradient for upstream 1."""
    def launch():
        logits = _meta(shape, dtype, layout)
        target = _meta(shape, dtype, layout) if probs else _meta(shape[:1] + shape[2:], torch.int64)
        class_weight = _meta(shape[1], compute_dtype(dtype)) if weight else None
        softmax_losses.forward(logits, target, class_weight, LossSpec(**spec), dtype, True, "none")
    return launch


def _no_grad_forward(shape, dtype=torch.bfloat16, **spec):
    def launch():
        softmax_losses.forward(_meta(shape, dtype), _meta(shape[:1], torch.int64), None, LossSpec(**spec), dtype, False,
                               "none")
    return launch


def _backward(shape, reduction, lse_grad=False, dtype=torch.bfloat16):
    """Backward: 'none' computes the gradient for per-row upstream gradients; 'mean' rewrites the
    forward's gradient (kept) where the upstream gradient is not 1 or the lse has one."""
    def launch():
        logits = _meta(shape, dtype)
        stats = _meta(_launch.N_TARGET_STATS, compute_dtype(dtype))
        if reduction != "none":
            _launch.keep_gradients(stats, torch.empty_like(logits))
        grad_output = _meta(shape[:1] if reduction == "none" else (), dtype)
        softmax_losses.backward(logits, _meta(shape[:1], torch.int64), None, stats, grad_output,
                                _meta(shape[:1], torch.float32) if lse_grad else None, LossSpec(reduction=reduction))
    return launch


def _rescale(shape, dtype=torch.bfloat16):
    """The shared rescale of a gradient kept by a forward (inplace_backward's, the fused heads')."""
    return lambda: _launch.scale_(_meta(shape, dtype), _meta((), dtype))


def _target_statistics(n_rows):
    """The class-index pass (mean's divisors, device-side check): both levels for a segmentation batch."""
    def launch():
        logits = _meta((n_rows, 21))
        softmax_losses.statistics(logits, _meta(n_rows, torch.int64), _meta(21, torch.float32), LossSpec(), "device")
    return launch


def _vocab_parallel_step(shape, token=None, dtype=torch.bfloat16, **spec):
    """One rank's steps of fastce.distributed (statistics, rescale, finish, gradient) on its slice:
    cross-entropy, or the token statistics with `token` (the gradient of both outputs)."""
    def launch():
        loss = token_loss_spec(token) if token else LossSpec(**spec)
        logits, target = _meta(shape, dtype), _meta(shape[:1], torch.int64)
        maxima, stats = vocab_parallel.statistics(logits, target, None, loss, shape[1], token)
        vocab_parallel.rescale(stats, maxima, None, loss, False, shape[1], shape[1], token)
        divisors = None if token else _meta(2, torch.float32)
        _, entropy, row_state = vocab_parallel.finish(stats, maxima, target, None, divisors, loss, token)
        upstream = _meta(shape[:1], torch.float32) if token else _meta((), torch.float32)
        vocab_parallel.gradient(logits, target, None, loss, shape[1], maxima, row_state, stats[-1:], divisors,
                                grad_output=upstream, token=token, entropy=entropy,
                                grad_entropy=upstream if token and token.return_entropy else None)
    return launch


STEP = dict(reduction="mean")
VARIANTS = [
    Variant("training step, V=4096", _training_step((8192, 4096), **STEP)),
    Variant("streamed training step, V=32k", _training_step((8192, 32768), **STEP)),
    Variant("streamed training step, V=50257", _training_step((8192, 50257), **STEP)),
    Variant("streamed training step, V=256k", _training_step((8192, 262144), **STEP)),
    Variant("no-grad forward, V=4096", _no_grad_forward((8192, 4096))),
    Variant("streamed no-grad forward, V=128k", _no_grad_forward((8192, 131072))),
    Variant("small V=256, rows per program", _training_step((8192, 256), reduction="sum")),
    Variant("K-dim (8, 21, 64, 64), rows per program", _training_step((8, 21, 64, 64), **STEP)),
    Variant("K-dim channels-last (8, 32, 64, 64)", _training_step((8, 32, 64, 64), layout="channels_last", **STEP)),
    Variant("all options, V=4096", _training_step((8192, 4096), weight=True, reduction="mean", label_smoothing=0.1,
                                                  z_loss=1e-4, softcap=30.0)),
    Variant("streamed all options, V=32k", _training_step((8192, 32768), weight=True, reduction="mean",
                                                          label_smoothing=0.1, z_loss=1e-4, softcap=30.0)),
    Variant("probability targets, V=4096", _training_step((8192, 4096), weight=True, probs=True)),
    Variant("focal, V=1000", _training_step((8192, 1000), weight=True, gamma=2.0, focal=True, **STEP)),
    Variant("focal streamed, V=100k", _training_step((8192, 100000), gamma=2.0, focal=True)),
    Variant("'none' backward, V=32k", _backward((8192, 32768), "none")),
    Variant("'mean' backward with an lse gradient, V=4096", _backward((8192, 4096), "mean", lse_grad=True)),
    Variant("float64, V=1000", _training_step((8192, 1000), torch.float64, label_smoothing=0.1, **STEP)),
    Variant("inplace rescale, V=32k", _rescale((8192, 32768))),
    Variant("class-index pass, 16x512x512 targets", _target_statistics(16 * 512 * 512)),
    Variant("vocabulary-parallel cross-entropy, V/tp=32k", _vocab_parallel_step((8192, 32768), label_smoothing=0.1,
                                                                              z_loss=1e-4, **STEP)),
    Variant("vocabulary-parallel token statistics, V/tp=32k",
            _vocab_parallel_step((8192, 32768), TokenStatsSpec(temperature=0.7, return_entropy=True))),
]


@contextlib.contextmanager
def _compile_instead_of_launching(compiled: list):
    """JITFunction.run compiles for sm_90 with Triton's run-time specialisation of the call's
    arguments (the same binder Triton launches with) and returns without launching."""
    backend = make_backend(HOPPER)
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization,
                                                                options)
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=HOPPER,
                                options=options.__dict__)
        arguments = [name for name, kind in signature.items() if kind != "constexpr"]
        compiled.append((self.fn.__name__, bound_args, kernel, arguments))

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, num_ctas: int = 1):
    """One kernel compiled for sm_90 from an explicit signature (the token-statistics table's and
    tools/sm90_compile_binary.py's way)."""
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_ctas": num_ctas})


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread: spills and local arrays) of an sm_90 cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[(\w+)_param_(\d+)\]")
_INSTRUCTION = re.compile(r"^(?:@!?%\w+\s+)?[\w.:]+\s+(%\w+)\s*,(.*)$")
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s.*?\[\s*(%\w+)")


def _entry_body(ptx: str, kernel: str) -> list[str]:
    """The lines of `kernel`'s .entry (each PTX function has its own register names)."""
    lines = [line.strip() for line in ptx.splitlines()]
    start = next(i for i, line in enumerate(lines) if ".entry" in line and f"{kernel}(" in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(".func") or
                lines[i].startswith(".visible .entry")), len(lines))
    return lines[start:end]


def access_widths(ptx: str, arguments: list[str], kernel: str) -> dict:
    """{pointer argument: {"ld": widths, "st": widths}} of the global loads and stores in `ptx`,
    in bytes per thread and access. An access is attributed to the pointer parameters of `kernel`
    its address register derives from (following the PTX's data flow; a non-inlined helper's
    accesses go unattributed: its parameters are not the kernel's)."""
    sources = defaultdict(set)  # register -> kernel parameters (by index) it is computed from
    lines = _entry_body(ptx, kernel)
    for line in lines:
        if (match := _PARAM.search(line)) and match.group(2) == kernel:
            sources[match.group(1)].add(int(match.group(3)))
    flow = [(match.group(1), re.findall(r"%\w+", match.group(2))) for line in lines
            if (match := _INSTRUCTION.match(line)) and not _PARAM.search(line)]
    changed = True
    while changed:  # to a fixed point: loops carry registers backwards
        changed = False
        for destination, operands in flow:
            before = len(sources[destination])
            for register in operands:
                sources[destination] |= sources.get(register, set())
            changed |= len(sources[destination]) != before
    widths = defaultdict(lambda: {"ld": set(), "st": set()})
    for line in lines:
        if (match := _ACCESS.search(line)):
            kind, vector, bits, address = match.groups()
            for index in sources[address]:
                if index < len(arguments) and arguments[index].endswith("_ptr"):
                    widths[arguments[index]][kind].add(int(vector or 1) * int(bits) // 8)
    return dict(widths)


def compile_all(variants: Iterable[Variant]) -> list[Compiled]:
    results = []
    for variant in variants:
        launches: list = []
        with _compile_instead_of_launching(launches):
            variant.launch()
        for name, bound_args, kernel, arguments in launches:
            registers, stack = resource_usage(kernel.asm["cubin"])
            ptx = kernel.asm["ptx"]
            results.append(Compiled(variant.name, name, bound_args.get("ROWS", 1), bound_args.get("BLOCK_SIZE", 0),
                                    kernel.metadata.num_warps, kernel.metadata.num_ctas, registers, stack,
                                    len(re.findall(r"\.param \.f64 ", ptx)), access_widths(ptx, arguments, name)))
    return results


def _widths_text(widths: dict) -> str:
    return " ".join(f"{name.removesuffix('_ptr')}:{kind}{'/'.join(map(str, sorted(sizes)))}"
                    for name, kinds in sorted(widths.items()) for kind, sizes in kinds.items() if sizes)


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
        # policy_gradient_loss: the gradient written in the forward, from registers for a one-tile row
        ("policy-gradient forward, V=4096", fwd, 4096, "bf16", POLICY_FLAGS),
        ("policy-gradient forward, V=128k", fwd, 131072, "bf16", POLICY_FLAGS),
        ("policy-gradient forward, V=256", fwd, 256, "fp32", POLICY_FLAGS),
    ]


POLICY_FLAGS = ("HAS_ENTROPY", "STORE_STATS", "POLICY_LOSS", "MEAN", "STORE_GRAD")


def compile_token_stats(variants: Iterable[tuple]) -> list[tuple]:
    import triton.language as tl
    from fastce import token_stats
    from fastce.kernels import token_stats as token_kernels
    rows = []
    for name, kernel_name, n_classes, dtype, flags in variants:
        kernel = getattr(token_kernels, kernel_name)
        config = token_stats.launch_config(8192, n_classes)
        acc = "fp64" if dtype == "fp64" else "fp32"
        pointers = {arg: f"*{dtype}" if arg in ("logits_ptr", "grad_ptr") else "*i64" if arg == "target_ptr"
                    else f"*{acc}" for arg in kernel.arg_names if arg.endswith("_ptr")}
        constexprs = {arg: arg in flags for arg in kernel.arg_names if arg.isupper()}
        constexprs.update(ROWS=config.rows, BLOCK_SIZE=config.block_size, WIDE_OFFSETS=False,
                          COMPUTE_DTYPE=tl.float64 if acc == "fp64" else tl.float32)
        if "SINGLE_PASS" in constexprs:  # the launcher's value
            constexprs["SINGLE_PASS"] = n_classes <= config.block_size
        scalars = {arg: "fp64" if arg in ("inv_temperature", "entropy_coef")
                   else "i64" if "stride" in arg or arg == "class_offset"
                   else "i32" for arg in kernel.arg_names if arg not in pointers and arg not in constexprs}
        signature = {arg: pointers.get(arg) or scalars.get(arg) or "constexpr" for arg in kernel.arg_names}
        compiled = _compile(kernel, signature, constexprs, config.num_warps)
        rows.append((name, config, *resource_usage(compiled.asm["cubin"])))
    return rows


# ---- distillation (fastce/kernels/distillation.py) and the engine's exact sums (kernels/common.py) -------

_DISTILLATION_FP64_SCALARS = ("divisor_factor", "beta", "inv_temperature", "student_logit_scale", "student_softcap",
                              "teacher_logit_scale", "teacher_softcap")


def distillation_variants() -> list[tuple]:
    """(name, kernel, K, logits dtype, gradient dtype, MODE, flags set to True) of the distillation
    kernels' launches: the logits form (loss reduced, gradient written), a fused head's chunk (fp32 logits,
    a bf16 gradient, row statistics, soft-capping) and its vocabulary slices."""
    fwd, slice_ = "distillation_fwd_kernel", "distillation_slice_bwd_kernel"
    logits_form = ("HAS_TARGET", "MEAN", "COMPUTE_GRAD")
    chunk = ("HAS_TARGET", "MEAN", "COMPUTE_GRAD", "STORE_STATS", "STUDENT_SOFTCAP", "TEACHER_SCALE")
    return [(f"distillation {label}, K={k}", fwd, k, dtype, dtype, mode, logits_form)
            for mode, label in ((0, "forward KL"), (1, "reverse KL"), (2, "JSD"))
            for k, dtype in ((4096, "bf16"), (131072, "bf16"))] + [
        ("distillation JSD float64, K=1000", fwd, 1000, "fp64", "fp64", 2, logits_form),
        ("fused-head chunk JSD, K=8192", fwd, 8192, "fp32", "bf16", 2, chunk),
        ("fused-head chunk JSD, K=2048", fwd, 2048, "fp32", "bf16", 2, chunk),
        ("fused-head slice JSD, S=1024", slice_, 1024, "fp32", "bf16", 2, ("STUDENT_SOFTCAP",)),
        ("fused-head slice reverse KL, S=256", slice_, 256, "fp32", "bf16", 1, ("GRAD_OUTPUT",)),
    ]


def compile_distillation(variants: Iterable[tuple]) -> list[tuple]:
    """(name, rows, block, warps, registers, stack bytes) of each variant compiled for sm_90, then the
    engine's split-sum kernels."""
    import triton.language as tl
    from fastce import _head, distillation
    from fastce.kernels import common, distillation as distillation_kernels
    rows = []
    for name, kernel_name, n_classes, dtype, grad_dtype, mode, flags in variants:
        kernel = getattr(distillation_kernels, kernel_name)
        if kernel_name == "distillation_slice_bwd_kernel":
            block = min(distillation.SLICE_BLOCK, triton.next_power_of_2(n_classes))
            config = _launch.RowLaunchConfig(max(1, distillation.SLICE_TILE // block), block, distillation.SLICE_WARPS)
        else:
            config = distillation.launch_config(8192, n_classes)
        acc = "fp64" if dtype == "fp64" else "fp32"
        pointers = {arg: f"*{dtype}" if arg in ("student_ptr", "teacher_ptr") else f"*{grad_dtype}" if arg == "grad_ptr"
                    else "*i64" if arg == "target_ptr" else f"*{acc}" for arg in kernel.arg_names if arg.endswith("_ptr")}
        constexprs = {arg: arg in flags for arg in kernel.arg_names if arg.isupper()}
        constexprs.update(ROWS=config.rows, BLOCK_SIZE=config.block_size, MODE=mode, MIX_FROM_STUDENT=True,
                          GRAD_OUTPUT=2 if "GRAD_OUTPUT" in flags else 0,
                          COMPUTE_DTYPE=tl.float64 if acc == "fp64" else tl.float32)
        if "SINGLE_PASS" in constexprs:
            constexprs.update(SINGLE_PASS=n_classes <= config.block_size, WIDE_OFFSETS=False,
                              STORE_LOSS=1 if "STORE_STATS" in flags else 2)
        scalars = {arg: "fp64" if arg in _DISTILLATION_FP64_SCALARS else "i64" if "stride" in arg else "i32"
                   for arg in kernel.arg_names if arg not in pointers and arg not in constexprs}
        signature = {arg: pointers.get(arg) or scalars.get(arg) or "constexpr" for arg in kernel.arg_names}
        compiled = _compile(kernel, signature, constexprs, config.num_warps)
        rows.append((name, config.rows, config.block_size, config.num_warps, *resource_usage(compiled.asm["cubin"])))
    for kernel, pointers in ((common.split_accumulate_kernel, ("*i16", "*i16", "*fp32")),
                             (common.split_round_kernel, ("*i16", "*i16", "*bf16"))):
        signature = dict(zip(kernel.arg_names, (*pointers, "i32", "constexpr")))
        compiled = _compile(kernel, signature, {"BLOCK_SIZE": _head.ACCUMULATE_BLOCK}, _head.SPLIT_WARPS)
        rows.append((kernel.__name__, 1, _head.ACCUMULATE_BLOCK, _head.SPLIT_WARPS,
                     *resource_usage(compiled.asm["cubin"])))
    return rows


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    header = (f"{'variant':46s} {'kernel':25s} {'rows':>4s} {'block':>7s} {'CTAs':>4s} {'warps':>5s} {'regs':>5s} "
              f"{'stack B':>7s}  global access widths, bytes")
    print(header)
    for c in compile_all(VARIANTS):
        print(f"{c.variant:46s} {c.kernel:25s} {c.rows:4d} {c.block_size:7d} {c.num_ctas:4d} {c.num_warps:5d} "
              f"{c.registers:5d} {c.stack:7d}  {_widths_text(c.widths)}")
    print(f"\n{'token-statistics kernel variant':40s} {'rows':>4s} {'block':>7s} {'CTAs':>4s} {'warps':>5s} "
          f"{'regs':>5s} {'stack B':>8s}")
    for name, config, registers, spills in compile_token_stats(token_stats_variants()):
        print(f"{name:40s} {config.rows:4d} {config.block_size:7d} {1:4d} {config.num_warps:5d} "
              f"{registers:5d} {spills:8d}")


def print_distillation() -> None:
    print(f"\n{'distillation kernel variant':40s} {'rows':>4s} {'block':>7s} {'warps':>5s} {'regs':>5s} {'stack B':>8s}")
    for name, rows, block, warps, registers, stack in compile_distillation(distillation_variants()):
        print(f"{name:40s} {rows:4d} {block:7d} {warps:5d} {registers:5d} {stack:8d}")


if __name__ == "__main__":
    main()
    print_distillation()

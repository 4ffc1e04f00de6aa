"""The one launch mechanism of fastce's kernels.

- `Launch`: a kernel launch prepared once per call shape (grid, warps, constexprs and every scalar
  argument bound); a call passes only the tensors. On a GPU a repeated call goes straight to the
  compiled kernel's launcher (no binding, specialisation or heuristics in Python); the first call,
  a call whose pointers are not 16-byte aligned, and Triton's interpreter go through
  `kernel[grid](...)`.
- `KernelOp`: a family's op body as a torch.library custom op with its fake, which is what
  torch.compile traces; eager calls run the body directly. The only compile/eager switch of fastce.
- The gradient handoff: a gradient made in the forward (for an upstream gradient of 1) travels to
  the backward as an attribute of a saved output (the same eager and compiled; see `keep_gradient`).
- The launches every family shares: the statistics of the class indices (the mean's divisors and
  the device-side range check) and the in-place rescale of a gradient by its upstream gradient.
"""
from __future__ import annotations

import functools
import inspect
import sys
import typing
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from ._core import compute_dtype, interpreting, n_classes_of, per_row, row_layout
from ._validation import VALIDATE_DEVICE, VALIDATE_SYNC, check_target_range, out_of_range_message
from .kernels.common import scale_kernel, sum_stats_kernel, target_stats_kernel


def triton_dtype(dtype: torch.dtype):
    """The compute dtype of the kernels as a Triton type: fp64 for float64 tensors, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---- prepared launches -----------------------------------------------------------------------------

# Tests and tools may set this to a list: each launch appends its kernel's name.
launch_log: Optional[list] = None


class Launch:
    """kernel[grid](**arguments, num_warps=num_warps) with every argument but the tensors bound
    now; `launch(*tensors)` runs it with `tensors` in the order of `tensor_names`.

    Build one per call shape and reuse it (the families keep them in lru caches keyed by shapes,
    strides, dtypes and options): a repeated call then costs a few Python operations. Every integer
    argument must be fixed by that key (Triton specialises integers), which is why only tensors
    vary. Tensor slots take tensors only (a flag-disabled pointer gets a placeholder tensor).
    """

    __slots__ = ("kernel", "grid", "num_warps", "fixed", "tensor_names", "slots", "template", "compiled",
                 "name", "run")

    def __init__(self, kernel, grid: tuple, tensor_names: tuple, *, num_warps: int, **fixed):
        names = kernel.arg_names
        missing = set(names) - set(fixed) - set(tensor_names)
        assert not missing and len(names) == len(fixed) + len(tensor_names), f"{kernel.__name__}: {missing}"
        self.kernel, self.num_warps, self.fixed, self.tensor_names = kernel, num_warps, fixed, tensor_names
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.slots = tuple(names.index(name) for name in tensor_names)
        self.template = [fixed.get(name) for name in names]
        self.compiled = None  # the CompiledKernel of 16-byte-aligned pointers, after the first such call
        self.name = kernel.__name__
        # run(*tensors) launches: through kernel[grid], until a compiled kernel can be called directly
        self.run = self._through_triton

    def __call__(self, *tensors: Tensor) -> None:
        self.run(*tensors)

    def _through_triton(self, *tensors: Tensor) -> None:
        if launch_log is not None:
            launch_log.append(self.name)
        compiled = self.kernel[self.grid](**self.fixed, **dict(zip(self.tensor_names, tensors)),
                                          num_warps=self.num_warps)
        if not interpreting() and compiled is not None and all(t.data_ptr() % 16 == 0 for t in tensors):
            self.compiled = compiled
            self.run = self._direct_launcher()

    def _direct_launcher(self):
        """run(*tensors) for self.compiled: its launcher called as JITFunction.run would call it (the current
        device's stream, the launch hooks), or, when a pointer is not 16-byte aligned (the compiled kernel
        assumes they are), the way through Triton. Generated once, so that a call is a line of Python per
        tensor."""
        pointers = [f"p{i}" for i in range(len(self.slots))]
        tensors = ", ".join(f"t{i}" for i in range(len(pointers)))
        arguments = [f"c{i}" for i in range(len(self.template))]
        for slot, pointer in zip(self.slots, pointers):
            arguments[slot] = pointer
        # the run of fixed arguments after the last tensor travels as one constant tuple
        tail = max(self.slots) + 1 if self.slots else 0
        call_arguments = ", ".join(arguments[:tail] + ["*tail"])
        source = "\n".join([
            f"def run({tensors}):",
            *(f"    p{i} = t{i}.data_ptr()" for i in range(len(pointers))),
            f"    if ({' | '.join(pointers) or '0'}) & 15:",
            f"        return through_triton({tensors})",
            "    if module.launch_log is not None:",
            "        module.launch_log.append(name)",
            "    active = driver.active",
            "    stream = active.get_current_stream(active.get_current_device())",
            "    enter_hook = knobs.runtime.launch_enter_hook",
            f"    metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, {call_arguments})",
            "    compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter_hook,",
            f"                 knobs.runtime.launch_exit_hook, {call_arguments})",
        ])
        namespace = {f"c{i}": value for i, value in enumerate(self.template)}
        namespace.update(tail=tuple(self.template[tail:]), driver=triton.runtime.driver, knobs=knobs,
                         compiled=self.compiled, grid=self.grid, g0=self.grid[0], g1=self.grid[1], g2=self.grid[2],
                         through_triton=self._through_triton, module=sys.modules[__name__], name=self.name)
        exec(compile(source, f"<fastce launch of {self.name}>", "exec"), namespace)
        return namespace["run"]


@functools.lru_cache(maxsize=4096)
def _prepared(kernel, grid: tuple, tensor_names: tuple, num_warps: int, fixed: tuple) -> Launch:
    return Launch(kernel, grid, tensor_names, num_warps=num_warps, **dict(fixed))


def launch(kernel, grid: tuple, *args, num_warps: int = 4, **constexprs) -> None:
    """kernel[grid](*args, **constexprs, num_warps=num_warps) through a Launch cached by every argument but
    the tensors: the form for launches off the hot path, whose arguments it sorts out at each call (the
    hot ones keep their Launch in a cache keyed by their call's shape). A None pointer (its kernel's flag
    off) is passed as a placeholder tensor."""
    names = kernel.arg_names
    placeholder = next(a for a in args if isinstance(a, Tensor))
    tensor_names, tensors, fixed = [], [], []
    for name, value in zip(names, args):
        if value is None or isinstance(value, Tensor):
            tensor_names.append(name)
            tensors.append(placeholder if value is None else value)
        else:
            fixed.append((name, value))
    _prepared(kernel, tuple(grid), tuple(tensor_names), num_warps, tuple(fixed) + tuple(constexprs.items()))(*tensors)


# ---- custom ops --------------------------------------------------------------------------------------


def _is_options_record(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, tuple) and hasattr(annotation, "_fields")


class KernelOp:
    """body(*args) as the custom op fastce::<name>, which torch.compile traces (the fake gives its
    outputs' metadata); eager calls run body itself, skipping the dispatcher.

    `body` takes annotated arguments: tensors, scalars, and options records (NamedTuples such as
    LossSpec), which the op's schema spells out field by field. It returns a Tensor or a tuple
    of Tensors that never alias its inputs; `mutates` names the arguments it writes in place.
    """

    def __init__(self, name: str, body: Callable, fake: Callable, *, mutates: tuple = ()):
        self.body = body
        hints = typing.get_type_hints(body)
        parameters, self.records = [], []  # records: (position, record type) of each options record
        for position, name_ in enumerate(inspect.signature(body).parameters):
            annotation = hints[name_]
            if _is_options_record(annotation):
                self.records.append((position, annotation))
                fields = typing.get_type_hints(annotation)
                parameters += [(f"{name_}_{field}", fields[field]) for field in annotation._fields]
            else:
                parameters.append((name_, annotation))
        self.n_args = len(inspect.signature(body).parameters)

        def flat(*args):
            return body(*self._unflatten(args))

        def flat_fake(*args):
            return fake(*self._unflatten(args))

        flat.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a) for n, a in parameters],
            return_annotation=None if hints["return"] is type(None) else hints["return"])
        self.op = torch.library.custom_op(f"fastce::{name}", flat, mutates_args=mutates)
        self.op.register_fake(flat_fake)

    def _flatten(self, args: tuple) -> list:
        flat = list(args)
        for position, _ in reversed(self.records):
            flat[position:position + 1] = list(args[position])
        return flat

    def _unflatten(self, flat: tuple) -> list:
        args, index = [], 0
        records = dict(self.records)
        for position in range(self.n_args):
            record = records.get(position)
            if record is None:
                args.append(flat[index])
                index += 1
            else:
                args.append(record(*flat[index:index + len(record._fields)]))
                index += len(record._fields)
        return args

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*self._flatten(args))
        return self.body(*args)


def kernel_op(name: str, fake: Callable, *, mutates: tuple = ()):
    """Decorator form of KernelOp."""
    return lambda body: functools.update_wrapper(KernelOp(name, body, fake, mutates=mutates), body)


# ---- the gradient made in the forward ------------------------------------------------------------------
#
# Where a loss's gradient is known in the forward (its upstream gradient will be a scalar), the forward
# kernel writes it for an upstream gradient of 1 in the pass that reads the inputs, and the backward hands
# that buffer out: nothing moves when the upstream gradient is 1 (the usual loss.backward()). Any other
# upstream gradient is applied on the device, with no host sync, by the family: recomputed from the inputs
# in one pass where its kernel can (rounded once: cross-entropy, the binary losses, the policy-gradient
# loss), rescaled in place where the inputs would need GEMMs again (the fused heads: `scale_`).
#
# The buffer travels as an attribute of a forward output that autograd (eager) and AOTAutograd
# (torch.compile) both save for the backward; the backward takes it, once. Under torch.compile this keeps
# the buffer out of the graph on purpose: the graph holds pure forward and backward ops, so nothing is
# functionalised and a compiled step moves what an eager one moves (as a graph value, the buffer would need
# a backward op mutating a saved tensor, which AOTAutograd turns into a copy of the whole gradient).
# Wherever the attribute does not reach the backward (saved-tensor hooks that copy, a second backward
# through a retained graph, CUDA-graph replay, which runs no Python), the backward computes the gradient
# from the inputs: correct, one pass more.

_FORWARD_GRADIENTS = "_fastce_forward_gradients"


def keep_gradients(carrier: Tensor, *gradients: Optional[Tensor]) -> None:
    """Attach the forward's gradients to `carrier`, a forward output saved for the backward. Nothing is
    attached while a CUDA graph is captured: the replay would run no Python to hand it out."""
    if carrier.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    setattr(carrier, _FORWARD_GRADIENTS, gradients)


def take_gradients(carrier: Tensor) -> Optional[tuple]:
    """The gradients keep_gradients attached to `carrier`, handed out once (then None)."""
    gradients = getattr(carrier, _FORWARD_GRADIENTS, None)
    if gradients is not None:
        delattr(carrier, _FORWARD_GRADIENTS)
    return gradients


# ---- the launches every family shares -----------------------------------------------------------------------

# The rescale is a streaming multiply in tiles of 4096 elements over 8 warps (16 values a thread), by at
# most SCALE_PROGRAMS programs that stride over the tiles: for an upstream gradient of 1 they read it and
# stop.
SCALE_TILE = 4096
SCALE_WARPS = 8
SCALE_PROGRAMS = 1024


@functools.lru_cache(maxsize=1024)
def _scale_launch(layout: tuple, scalar: bool, factor_stride: int, dtype: torch.dtype) -> Launch:
    n_rows, n_cols, inner_size, stride_outer, stride_inner, stride_col = layout
    block = min(next_power_of_2(max(n_cols, 1)), SCALE_TILE)
    rows = max(1, min(SCALE_TILE // block, next_power_of_2(max(n_rows, 1))))
    n_tiles = cdiv(n_rows, rows) * cdiv(n_cols, block)
    return Launch(scale_kernel, (min(n_tiles, SCALE_PROGRAMS),), ("grad_ptr", "factor_ptr"), num_warps=SCALE_WARPS,
                  n_rows=n_rows, n_cols=n_cols, inner_size=inner_size, stride_outer=stride_outer,
                  stride_inner=stride_inner, stride_col=stride_col, factor_stride=factor_stride, ROWS=rows,
                  BLOCK_SIZE=block, SCALAR=scalar, WIDE_OFFSETS=n_cols * abs(stride_col) >= 2**31,
                  COMPUTE_DTYPE=triton_dtype(dtype))


def scale_(grad: Tensor, factor: Tensor) -> Tensor:
    """grad *= factor in place, on the device, leaving what has factor 1 untouched. `factor` holds one
    value (a scalar upstream gradient) or one per row of `grad`, rows as fastce's row kernels number
    them ((N, C) and (N, C, d…): torch's class dimension 1; read with its stride: autograd may hand out
    expanded ones)."""
    if grad.numel() == 0:
        return grad
    scalar = factor.numel() == 1
    if scalar and grad.is_contiguous():
        layout = (1, grad.numel(), 1, 0, 0, 1)  # one row: every element
    else:
        n_classes = n_classes_of(grad)
        layout = (grad.numel() // n_classes, n_classes, *row_layout(grad))
    factor = factor.reshape(()) if scalar else per_row(factor)
    _scale_launch(layout, scalar, 0 if scalar else factor.stride(0), grad.dtype).run(grad, factor)
    return grad


# The mean's divisors and the device-side range check come from one pass over the class indices: one
# program for up to TARGET_STATS_SINGLE targets (a language-model batch: one launch), else programs of a
# multiple of TARGET_STATS_BLOCK rows, at most TARGET_STATS_PROGRAMS of them (4M targets, a segmentation
# batch, spread over 1024 programs), whose sums one more program adds up, both in a fixed order.
TARGET_STATS_BLOCK = 4096
TARGET_STATS_SINGLE = 8 * TARGET_STATS_BLOCK
TARGET_STATS_PROGRAMS = 1024
N_TARGET_STATS = 4  # Σ w_y, #valid rows, the in-range flag, a zeroed counter (see target_stats)


def target_stats_plan(n_rows: int) -> tuple[int, int]:
    """(rows per program, programs) of the first level of target_stats."""
    if n_rows <= TARGET_STATS_SINGLE:
        return max(TARGET_STATS_BLOCK, TARGET_STATS_BLOCK * cdiv(n_rows, TARGET_STATS_BLOCK)), 1
    steps = cdiv(n_rows, TARGET_STATS_BLOCK)
    rows_per_program = TARGET_STATS_BLOCK * cdiv(steps, TARGET_STATS_PROGRAMS)
    return rows_per_program, cdiv(n_rows, rows_per_program)


@functools.lru_cache(maxsize=1024)
def _target_stats_launches(n_rows: int, target_stride: int, n_classes: int, ignore_index: int, has_weight: bool,
                           dtype: torch.dtype) -> tuple[Launch, Optional[Launch]]:
    rows_per_program, n_programs = target_stats_plan(n_rows)
    first = Launch(target_stats_kernel, (n_programs,), ("target_ptr", "weight_ptr", "stats_ptr"), num_warps=4,
                   target_stride=target_stride, n_rows=n_rows, n_classes=n_classes, ignore_index=ignore_index,
                   rows_per_program=rows_per_program, BLOCK_SIZE=TARGET_STATS_BLOCK, HAS_WEIGHT=has_weight,
                   FINISH=n_programs == 1, COMPUTE_DTYPE=triton_dtype(dtype))
    second = None
    if n_programs > 1:
        second = Launch(sum_stats_kernel, (1,), ("partials_ptr", "stats_ptr"), num_warps=4, n_partials=n_programs,
                        BLOCK_SIZE=TARGET_STATS_PROGRAMS)
    return first, second


def target_stats(target: Tensor, weight: Optional[Tensor], n_classes: int, ignore_index: int, out: Tensor) -> Tensor:
    """out[:4] = (Σ w_y over non-ignored rows (w = 1 without weights), their count, 1.0 if every class
    index is ignore_index or in [0, C) else 0.0, a zero), on the device, in a fixed order. `target` is
    1-D (read with its stride); the zero is a counter the forward kernels' last program uses."""
    n_rows = target.numel()
    launches = _target_stats_launches(n_rows, target.stride(0) if n_rows > 1 else 1, n_classes, ignore_index,
                                      weight is not None, out.dtype)
    return run_target_stats(launches, target, weight, out)


def run_target_stats(launches: tuple, target: Tensor, weight: Optional[Tensor], out: Tensor) -> Tensor:
    """target_stats by launches prepared with _target_stats_launches."""
    first, second = launches
    weight = out if weight is None else weight
    if second is None:
        first.run(target, weight, out)
    else:
        partials = out.new_empty(N_TARGET_STATS * first.grid[0])
        first.run(target, weight, partials)
        second.run(partials, out)
    return out


def class_index_statistics(target: Tensor, weight: Optional[Tensor], n_classes: int, ignore_index: int, *,
                           validate: str, need_divisors: bool, out: Tensor) -> bool:
    """Checks the class indices (`target`, 1-D) as `validate` says and, when the call needs the mean's
    divisors or the device-side check, fills out[:4] (target_stats) and returns True. No host sync
    except validate == "sync"."""
    if validate == VALIDATE_SYNC:
        check_target_range(target, n_classes, ignore_index)
    if not (need_divisors or validate == VALIDATE_DEVICE):
        return False
    target_stats(target, weight, n_classes, ignore_index, out)
    if validate == VALIDATE_DEVICE:
        torch._assert_async(out[2], out_of_range_message(n_classes, ignore_index))
    return True


class RowLaunchConfig(NamedTuple):
    rows: int        # rows per program
    block_size: int  # classes per tile
    num_warps: int


# Measured on an H200 (bench/results/nvidia-h200/, python -m bench.launch_sweep): the fused training-step
# kernel at N = 8192 rows is fastest when each thread holds 16 values of a tile. Rows of up to 4096 classes
# are one tile, read once (1.99× the time of a copy of the same bytes at V = 4096); longer rows are
# streamed in 2048-class tiles over 4 warps: 1.99× at V = 8192, 2.1× at 32000 and 128256, 2.3× at 262144.
# One tile per row is slower past 4096 classes (2.5× at 8192, 2.6× at 32000 with 32 warps, 9.1× at 50257,
# where a 65536-class tile spills), and so are longer stream tiles (16384 classes over 16 warps: 3.0×). A
# streamed row is read twice, the statistics then the gradient, 3× the logits' bytes requested; the re-read
# follows the first read of the same row within one program, so with a few rows per SM in flight L2 serves
# it and DRAM sees the 2× floor (the profiler's distinct bytes).
SINGLE_PASS_MAX_CLASSES = 4096
STREAM_BLOCK = 2048
# For small C several rows share a program so that each program still moves a few KiB (one 64-row tile of
# 64 classes, ...): fewer, fuller programs instead of thousands of tiny ones.
SMALL_ROW_TILE = 4096
MAX_ROWS_PER_PROGRAM = 64
# One warp per 1024 tile elements (32 per thread per live tile value), between 4 and 32 warps: enough
# threads to cover the memory latency, few enough that each holds a useful amount.
ELEMENTS_PER_WARP = 1024


def row_launch_config(n_rows: int, n_classes: int, elements_per_warp: int = ELEMENTS_PER_WARP) -> RowLaunchConfig:
    """The launch rule of the row kernels (the constants above give the reasons)."""
    block = next_power_of_2(max(n_classes, 1))
    if block > SINGLE_PASS_MAX_CLASSES:
        return RowLaunchConfig(1, STREAM_BLOCK, max(4, STREAM_BLOCK // elements_per_warp))  # one row a program
    rows = max(1, min(SMALL_ROW_TILE // block, MAX_ROWS_PER_PROGRAM, next_power_of_2(max(n_rows, 1))))
    num_warps = min(32, max(4, next_power_of_2(rows * block // elements_per_warp)))
    return RowLaunchConfig(rows, block, num_warps)


def row_stats_buffer(n_programs: int, dtype: torch.dtype, device) -> Tensor:
    """The workspace of a row kernel that reduces its loss on the device: N_TARGET_STATS values
    (target_stats), then one partial loss sum per program."""
    return torch.empty(N_TARGET_STATS + n_programs, dtype=compute_dtype(dtype), device=device)

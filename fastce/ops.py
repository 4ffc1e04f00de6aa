"""Launchers of the Triton kernels, registered as torch.library custom ops.

Everything here takes already-validated arguments (fastce.functional checks them). Each op
is a custom op with a fake (meta) implementation so that torch.compile(fullgraph=True) traces
through fastce without a graph break; in eager mode the autograd layer calls the plain
launchers directly to skip the custom-op dispatch overhead.

Launch rules (block size, rows per program, warps) are written next to the constants below.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from .kernels.cross_entropy import (
    cross_entropy_bwd_kernel,
    cross_entropy_fwd_kernel,
    sum_stats_kernel,
    target_stats_kernel,
)
from ._validation import VALIDATE_DEVICE, VALIDATE_NONE, VALIDATE_SYNC, check_target_range, out_of_range_message
from .reference import compute_dtype

# Measured on an H200 (bench/results/nvidia-h200/, python -m bench.launch_sweep): the fused
# training-step kernel at N = 8192 rows is fastest when each thread holds 16 values of a tile.
# Rows of up to 4096 classes are one tile, read once (1.99× the time of a copy of the same bytes
# at V = 4096); longer rows are streamed in 2048-class tiles over 4 warps: 1.99× at V = 8192,
# 2.1× at 32000 and 128256, 2.3× at 262144. One tile per row is slower past 4096 classes (2.5×
# at 8192, 2.6× at 32000 with 32 warps, 9.1× at 50257, where a 65536-class tile spills), and so
# are longer stream tiles (16384 classes over 16 warps: 3.0×). A streamed row is read twice, the
# statistics then the gradient, 3× the logits' bytes requested; the re-read follows the first
# read of the same row within one program, so with a few rows per SM in flight L2 serves it and
# DRAM sees the 2× floor (the profiler's distinct bytes).
SINGLE_PASS_MAX_CLASSES = 4096
STREAM_BLOCK = 2048
# For small C several rows share a program so that each program still moves a few KiB
# (one 64-row tile of 64 classes, ...): fewer, fuller programs instead of thousands of tiny ones.
SMALL_ROW_TILE = 4096
MAX_ROWS_PER_PROGRAM = 64
# One warp per 1024 tile elements (32 per thread per live tile value), between 4 and 32 warps:
# enough threads to cover the memory latency, few enough that each holds a useful amount.
ELEMENTS_PER_WARP = 1024

# Opt-in (FASTCE_CLUSTER=1, Hopper): a row of 8k-256k classes is one tile split across a
# thread-block cluster of CTAs on neighbouring SMs, each holding CLUSTER_TILE classes, the row's
# max and sums crossing CTAs through distributed shared memory, so the row is read once (2× the
# logits' bytes for a training step instead of the streamed 3× requested). Triton 3.9 compiles
# these launches for sm_90 (tools/sm90_compile.py: no spills up to 128k classes, 88 B per thread
# at 256k); Triton 3.6 rejects them (its TritonGPUPlanCTAPass fails, seen on an H200), so each
# cluster configuration is checked against the unclustered kernel on its first use
# (cluster_config_verified) and replaced by it, with a warning, when it fails or disagrees.
# Clusters of 16 CTAs are a non-portable size that Triton's launcher enables on Hopper.
CLUSTER_TILE = 8192
MAX_CLUSTER = 16
CLUSTER_MAX_CLASSES = 262144

# The in-place rescale of the backward is a plain streaming multiply: 4096-element tiles over
# 8 warps (16 values per thread) never spill, and a loop covers longer rows.
SCALE_BLOCK = 4096
SCALE_WARPS = 8

# The mean's divisors and the device-side range check come from one pass over the class indices:
# programs of a multiple of TARGET_STATS_BLOCK rows, at most TARGET_STATS_PROGRAMS of them (so
# that 4M targets, a segmentation batch, spread over 1024 programs), whose sums one more program
# adds up, both in a fixed order.
TARGET_STATS_BLOCK = 4096
TARGET_STATS_PROGRAMS = 1024


class LossSpec(NamedTuple):
    """The scalar options of one loss call (hashable, so it can also key caches)."""
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    gamma: float = 0.0
    focal: bool = False  # focal loss: "mean" divides by the non-ignored row count, not Σ w_y


class LaunchConfig(NamedTuple):
    rows: int
    block_size: int
    num_warps: int
    num_ctas: int = 1  # > 1: a Hopper thread-block cluster shares each tile (see below)


# Which rows a launch splits across a cluster (launch_config's `clusters`).
NO_CLUSTERS = "none"
CLUSTER_LONG_ROWS = "long_rows"  # every row of CLUSTER_TILE to CLUSTER_MAX_CLASSES classes (FASTCE_CLUSTER=1)


def launch_config(n_rows: int, n_classes: int, clusters: str = NO_CLUSTERS) -> LaunchConfig:
    """The launch rule (the constants above give the reasons)."""
    block = triton.next_power_of_2(max(n_classes, 1))
    num_ctas = 1
    if clusters == CLUSTER_LONG_ROWS and CLUSTER_TILE < block <= CLUSTER_MAX_CLASSES:
        num_ctas = min(MAX_CLUSTER, block // CLUSTER_TILE)
    elif block > SINGLE_PASS_MAX_CLASSES:
        return LaunchConfig(1, STREAM_BLOCK, max(4, STREAM_BLOCK // ELEMENTS_PER_WARP))  # one row a program
    rows = max(1, min(SMALL_ROW_TILE // block, MAX_ROWS_PER_PROGRAM, triton.next_power_of_2(max(n_rows, 1))))
    per_cta = rows * block // num_ctas
    num_warps = min(32, max(4, triton.next_power_of_2(per_cta // ELEMENTS_PER_WARP)))
    return LaunchConfig(rows, block, num_warps, num_ctas)


def n_classes_of(logits: Tensor) -> int:
    return logits.shape[0] if logits.dim() == 1 else logits.shape[1]


def row_layout(t: Tensor) -> tuple[int, int, int, int]:
    """(inner_size, stride_outer, stride_inner, stride_class) of a (C), (N, C) or (N, C, d…) tensor.

    Row r lives at (r // inner_size)·stride_outer + (r % inner_size)·stride_inner; the trailing
    dims must be mergeable into one stride (fastce.functional copies a tensor where they are not).
    """
    if t.dim() == 1:
        return 1, 0, 0, t.stride(0)
    if t.dim() == 2:
        return 1, t.stride(0), 0, t.stride(1)
    inner_stride = mergeable_stride(t.shape[2:], t.stride()[2:])
    assert inner_stride is not None, "trailing dims must be mergeable"
    return t[0, 0].numel(), t.stride(0), inner_stride, t.stride(1)


def mergeable_stride(sizes, strides) -> Optional[int]:
    """Stride of dims `sizes` flattened into one, or None when they cannot be (without a copy)."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    for (_, outer), (n_inner, inner) in zip(dims, dims[1:]):
        if outer != inner * n_inner:
            return None
    return dims[-1][1] if dims else 1


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _autotuned_fwd_kernel(num_ctas: int = 1):
    # Opt-in (FASTCE_AUTOTUNE=1, GPU only: the interpreter has no timer): searches warps per
    # kernel shape, keeping the launch rule's cluster; the in-place buffers are restored between trials.
    configs = [triton.Config({}, num_warps=w, num_ctas=num_ctas) for w in (4, 8, 16, 32)]
    return triton.autotune(configs, key=["n_classes", "n_rows"],
                           restore_value=["logits_ptr", "grad_ptr"])(cross_entropy_fwd_kernel)


def cluster_policy(logits: Tensor) -> str:
    """Rows are split across a cluster only with FASTCE_CLUSTER=1, on Hopper or later (the
    interpreter, which runs a cluster's tile as one program, follows it too)."""
    if os.environ.get("FASTCE_CLUSTER") != "1":
        return NO_CLUSTERS
    if logits.is_cuda and torch.cuda.get_device_capability(logits.device)[0] < 9:
        return NO_CLUSTERS
    return CLUSTER_LONG_ROWS


_CLUSTER_CHECKS: dict = {}  # (config, dtype, device) -> whether it matched the unclustered kernel


def cluster_config_verified(config: LaunchConfig, logits: Tensor) -> bool:
    """Whether `config`'s cluster launch gives the unclustered kernel's answer on this device.

    Checked once per configuration, dtype and device, on two random rows with the plain
    training-step options, the first time it is needed (one host sync then, never again); a launch that fails or disagrees is not used again,
    with a warning. During CUDA graph capture nothing can be checked, so an unchecked configuration
    is not used for that call.
    """
    if config.num_ctas == 1 or not logits.is_cuda:
        return True  # nothing to check, or the interpreter: one program runs the whole tile
    key = (config, logits.dtype, logits.device)
    if key not in _CLUSTER_CHECKS:
        if torch.cuda.is_current_stream_capturing():
            return False
        _CLUSTER_CHECKS[key] = _cluster_matches_unclustered(config, logits)
    return _CLUSTER_CHECKS[key]


def _cluster_matches_unclustered(config: LaunchConfig, logits: Tensor) -> bool:
    n_classes = n_classes_of(logits)
    generator = torch.Generator(logits.device).manual_seed(0)  # leaves the caller's RNG stream alone
    probe = (torch.randn(2, n_classes, device=logits.device, generator=generator) * 4).to(logits.dtype)
    target = torch.tensor([0, n_classes - 1], device=logits.device)
    spec = LossSpec(reduction="sum")
    outputs = []
    try:
        for probe_config in (config, launch_config(2, n_classes)):
            grad = torch.empty_like(probe)
            divisors = torch.ones(2, dtype=compute_dtype(probe.dtype), device=probe.device)
            outputs.append((*launch_forward(probe, target, None, spec, grad=grad, divisors=divisors,
                                            config=probe_config), grad.float()))
    except Exception as error:  # a cluster the device cannot launch (raised at launch)
        warnings.warn(f"fastce: the {config.num_ctas}-CTA cluster launch failed ({error}); "
                      f"rows of {n_classes} classes use the unclustered kernel")
        return False
    # both accumulate in fp32, in different orders: a rounding of the stored gradient may differ
    rtol = max(2 * torch.finfo(logits.dtype).eps, 1e-4)
    agree = all(torch.allclose(a, b, rtol=rtol, atol=1e-5) for a, b in zip(*outputs))
    if not agree:
        warnings.warn(f"fastce: the {config.num_ctas}-CTA cluster launch disagrees with the unclustered "
                      f"kernel on this device; rows of {n_classes} classes use the unclustered kernel")
    return agree


def _fwd_kernel_and_options(logits: Tensor, config: LaunchConfig):
    if logits.is_cuda and os.environ.get("FASTCE_AUTOTUNE") == "1":
        return _autotuned_fwd_kernel(config.num_ctas), {}
    return cross_entropy_fwd_kernel, {"num_warps": config.num_warps, "num_ctas": config.num_ctas}


def target_stats_plan(n_rows: int) -> tuple[int, int]:
    """(rows per program, programs) of the first level of target_stats."""
    steps = triton.cdiv(max(n_rows, 1), TARGET_STATS_BLOCK)
    rows_per_program = TARGET_STATS_BLOCK * triton.cdiv(steps, TARGET_STATS_PROGRAMS)
    return rows_per_program, triton.cdiv(max(n_rows, 1), rows_per_program)


def target_stats(target: Tensor, weight: Optional[Tensor], n_classes: int, ignore_index: int, out: Tensor) -> Tensor:
    """out[:3] = (Σ w_y over non-ignored rows (w = 1 without weights), their count, 1.0 if every
    class index is ignore_index or in [0, C) else 0.0), on the device, in a fixed order."""
    target = target.reshape(-1).contiguous()
    n_rows = target.numel()
    rows_per_program, n_programs = target_stats_plan(n_rows)
    partials = out if n_programs == 1 else out.new_empty(3 * n_programs)
    target_stats_kernel[(n_programs,)](
        target, weight, partials, n_rows, n_classes, ignore_index, rows_per_program,
        BLOCK_SIZE=TARGET_STATS_BLOCK, HAS_WEIGHT=weight is not None, FINISH=n_programs == 1,
        COMPUTE_DTYPE=_triton_dtype(out.dtype))
    if n_programs > 1:
        sum_stats_kernel[(1,)](partials, out, n_programs, BLOCK_SIZE=TARGET_STATS_PROGRAMS)
    return out


def statistics(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, validate: str,
               out: Optional[Tensor] = None) -> Tensor:
    """Validates the class indices as `validate` says, and returns a device tensor of three:
    the divisor of the loss and the divisor of the z-loss for the "mean" reduction (Σ w_y over
    non-ignored rows for cross-entropy, their count for focal loss and the z-loss, the row count
    for probability targets), and the device-side range check's flag. Nothing is computed that
    the call does not need (other reductions read no divisor). No host sync except "sync"."""
    n_classes = n_classes_of(logits)
    stats = torch.empty(3, dtype=compute_dtype(logits.dtype), device=logits.device) if out is None else out
    mean = spec.reduction == "mean"
    if target.is_floating_point():
        if mean:
            stats.fill_(float(logits.numel() // max(n_classes, 1)))
        return stats
    if validate == VALIDATE_SYNC:
        check_target_range(target, n_classes, spec.ignore_index)
    if mean or validate == VALIDATE_DEVICE:
        target_stats(target, weight if mean and not spec.focal else None, n_classes, spec.ignore_index, stats)
    if validate == VALIDATE_DEVICE:
        torch._assert_async(stats[2], out_of_range_message(n_classes, spec.ignore_index))
    return stats


def mean_divisors(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec) -> Tensor:
    """Device tensor [divisor of the loss, divisor of the z-loss] of the "mean" reduction (see
    statistics; validation is the caller's)."""
    return statistics(logits, target, weight, spec, VALIDATE_NONE)[:2]


def launch_forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, *,
                   grad: Optional[Tensor], divisors: Tensor, grad_output: Optional[Tensor] = None,
                   grad_output_per_row: bool = False, lse_grad: Optional[Tensor] = None,
                   keep_unit_rows: bool = False, out: Optional[tuple[Tensor, Tensor]] = None,
                   config: Optional[LaunchConfig] = None) -> tuple[Tensor, Tensor]:
    """Run the fused kernel: returns per-row (loss contribution, lse), into `out` if given;
    writes `grad` if given, for the upstream gradients `grad_output` of the loss (None: 1; a
    scalar, or one value per row) and `lse_grad` of the lse (one value per row, or None).

    The per-row loss is already divided by the mean's divisors when spec.reduction == "mean",
    so every reduction is a plain sum of it. `grad` may alias `logits` (in-place backward): each
    element is read before it is overwritten. With `keep_unit_rows`, `grad` already holds the
    gradient for an upstream gradient of 1 and programs whose rows need no other are skipped
    (their loss and lse rows are not written then). `config` overrides the launch rule.
    """
    n_classes = n_classes_of(logits)
    n_rows = logits.numel() // max(n_classes, 1)
    acc_dtype = compute_dtype(logits.dtype)
    if out is None:
        out = (torch.empty(n_rows, dtype=acc_dtype, device=logits.device),
               torch.empty(n_rows, dtype=acc_dtype, device=logits.device))
    loss_rows, lse = out
    if n_rows == 0:
        return loss_rows, lse
    if config is None:
        config = launch_config(n_rows, n_classes, cluster_policy(logits))
        if not cluster_config_verified(config, logits):
            config = launch_config(n_rows, n_classes)
    inner_size, l_outer, l_inner, l_class = row_layout(logits)
    prob_target = target.is_floating_point()
    t_outer, t_inner, t_class = row_layout(target)[1:] if prob_target else (0, 0, 0)
    g_outer, g_inner, g_class = row_layout(grad)[1:] if grad is not None else (0, 0, 0)
    if not prob_target:
        target = target.reshape(-1).contiguous()  # the kernel reads class indices densely
    kernel, launch_options = _fwd_kernel_and_options(logits, config)
    grid = (triton.cdiv(n_rows, config.rows),)
    kernel[grid](
        logits, target, weight, loss_rows, lse, grad if grad is not None else loss_rows,
        divisors, divisors[1:], grad_output if grad_output is not None else divisors,
        lse_grad if lse_grad is not None else divisors,
        l_outer, l_inner, l_class, t_outer, t_inner, t_class, g_outer, g_inner, g_class,
        n_rows, n_classes, inner_size,
        spec.ignore_index, spec.label_smoothing, spec.z_loss,
        spec.softcap if spec.softcap is not None else 1.0, spec.gamma,
        ROWS=config.rows, BLOCK_SIZE=config.block_size,
        PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=spec.label_smoothing > 0, HAS_Z_LOSS=spec.z_loss != 0,
        HAS_SOFTCAP=spec.softcap is not None, FOCAL=spec.focal and spec.gamma != 0,
        MEAN=spec.reduction == "mean", COMPUTE_GRAD=grad is not None,
        GRAD_OUTPUT=0 if grad_output is None else (2 if grad_output_per_row else 1),
        HAS_LSE_GRAD=lse_grad is not None, KEEP_UNIT_ROWS=keep_unit_rows,
        # rows are the contiguous axis of an (N, C, d…) input: a per-row mask would narrow the loads
        SKIP_IGNORED_ROWS=not (inner_size > 1 and l_inner == 1 and l_class != 1),
        COMPUTE_DTYPE=_triton_dtype(logits.dtype), **launch_options)
    return loss_rows, lse


def launch_scale_gradient(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output in place (a scalar, or one value per row), skipping rows where it is 1."""
    n_classes = n_classes_of(grad)
    n_rows = grad.numel() // max(n_classes, 1)
    if n_rows == 0:
        return
    # one value per row ('none'), read densely (autograd hands out expanded or strided ones);
    # a single value (also 'none' of one row) scales every row
    per_row = grad_output.numel() != 1
    config = launch_config(n_rows, n_classes)
    inner_size, g_outer, g_inner, g_class = row_layout(grad)
    cross_entropy_bwd_kernel[(triton.cdiv(n_rows, config.rows),)](
        grad, grad_output.reshape(-1).contiguous(), g_outer, g_inner, g_class, n_rows, n_classes, inner_size,
        ROWS=config.rows, BLOCK_SIZE=min(config.block_size, SCALE_BLOCK), PER_ROW=per_row,
        COMPUTE_DTYPE=_triton_dtype(grad.dtype), num_warps=min(config.num_warps, SCALE_WARPS))


# ---------------------------------------------------------------------------------------------
# Op bodies (shared by the eager path and the custom ops)
#
# For 'mean' and 'sum' the forward writes ∂loss/∂logits for an upstream gradient of 1 (one read of
# the logits gives the loss and the gradient), and backward hands that buffer out: nothing moves
# when the upstream gradient is 1 (the usual loss.backward()); any other upstream gradient, or one
# for the returned lse, rewrites it from the logits in one pass (a rescale would move as many
# bytes, and would round a low-precision gradient twice). For 'none' the per-row upstream gradient
# is usually not 1, so the forward writes no gradient and backward computes it.
#
# The buffer travels as an attribute of the forward's `divisors` output, which autograd (eager)
# and AOTAutograd (torch.compile) both save for backward; backward takes it, once. Under
# torch.compile this keeps the buffer out of the graph on purpose: the graph holds a forward op
# with outputs (loss_rows, lse, divisors) and a backward op that returns a fresh gradient, both
# pure, so nothing is functionalized and a compiled step moves what an eager one moves. As a graph
# value, the buffer would need a backward op that mutates a saved tensor, which AOTAutograd turns
# into a copy of the whole gradient (aot_eager clones it, inductor into a self-copy: a third
# logits-sized pass). Wherever the attribute does not reach backward (saved-tensor hooks that copy,
# a second backward through a retained graph, CUDA-graph replay under torch.compile, which runs no
# Python), backward computes the gradient from the logits: correct, one pass more.

_FORWARD_GRADIENT = "_fastce_forward_gradient"


def forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, *, keep_gradient: bool,
            validate: str) -> tuple[Tensor, Tensor, Tensor]:
    """Loss per row, lse per row and the mean's divisors. With keep_gradient, the gradient for an
    upstream gradient of 1 is written too and kept with the divisors for `backward`."""
    divisors = statistics(logits, target, weight, spec, validate)
    grad = torch.empty_like(logits) if keep_gradient else None
    loss_rows, lse = launch_forward(logits, target, weight, spec, grad=grad, divisors=divisors)
    if keep_gradient:
        setattr(divisors, _FORWARD_GRADIENT, grad)
    return loss_rows, lse, divisors


def forward_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, *, validate: str,
                    out: tuple[Tensor, Tensor, Tensor]) -> None:
    """forward() into `out` = (loss rows, lse, divisors), with the gradient for an upstream
    gradient of 1 written over the logits (inplace_backward=True)."""
    divisors = statistics(logits, target, weight, spec, validate, out=out[2])
    launch_forward(logits, target, weight, spec, grad=logits, divisors=divisors, out=out[:2])


def backward(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, divisors: Tensor,
             grad_output: Optional[Tensor], lse_grad: Optional[Tensor]) -> Tensor:
    """∂/∂logits for the upstream gradients of the loss (None if unused; a scalar, or one per row
    for 'none') and of the lse (one per row, or None): the forward's buffer when it kept one
    (rewritten only where needed), else a new one."""
    grad = getattr(divisors, _FORWARD_GRADIENT, None)
    kept = grad is not None
    if kept:
        delattr(divisors, _FORWARD_GRADIENT)  # handed out once: it becomes the caller's
    else:
        grad = torch.empty_like(logits)
    if grad_output is None:  # only the lse is used
        grad_output = torch.zeros((), dtype=divisors.dtype, device=divisors.device)
    launch_forward(logits, target, weight, spec, grad=grad, divisors=divisors,
                   grad_output=grad_output.reshape(-1).contiguous(), grad_output_per_row=grad_output.numel() > 1,
                   lse_grad=None if lse_grad is None else lse_grad.reshape(-1).contiguous(), keep_unit_rows=kept)
    return grad


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees. Outputs never alias inputs, so the in-place
# variants return the updated tensor through their mutated argument only.


def _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal) -> LossSpec:
    return LossSpec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal)


@torch.library.custom_op("fastce::cross_entropy_forward", mutates_args=())
def cross_entropy_forward_op(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: Optional[float], gamma: float, focal: bool,
    keep_gradient: bool, validate: str,
) -> tuple[Tensor, Tensor, Tensor]:
    spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal)
    # a CUDA graph captured by torch.compile replays without running this Python: nothing could
    # hand the kept buffer to backward, which then computes the gradient itself
    keep_gradient = keep_gradient and not (logits.is_cuda and torch.cuda.is_current_stream_capturing())
    return forward(logits, target, weight, spec, keep_gradient=keep_gradient, validate=validate)


@cross_entropy_forward_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal,
      keep_gradient, validate):
    n_rows = logits.numel() // n_classes_of(logits)
    acc = compute_dtype(logits.dtype)
    return (logits.new_empty(n_rows, dtype=acc), logits.new_empty(n_rows, dtype=acc),
            logits.new_empty(3, dtype=acc))


@torch.library.custom_op("fastce::cross_entropy_forward_inplace_",
                         mutates_args=("logits", "loss_rows", "lse", "divisors"))
def cross_entropy_forward_inplace_op(
    logits: Tensor, loss_rows: Tensor, lse: Tensor, divisors: Tensor, target: Tensor, weight: Optional[Tensor],
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
    gamma: float, focal: bool, validate: str,
) -> None:
    spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal)
    forward_inplace(logits, target, weight, spec, validate=validate, out=(loss_rows, lse, divisors))


@cross_entropy_forward_inplace_op.register_fake
def _(logits, loss_rows, lse, divisors, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      gamma, focal, validate):
    return None


@torch.library.custom_op("fastce::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], divisors: Tensor, grad_output: Optional[Tensor],
    lse_grad: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
    softcap: Optional[float], gamma: float, focal: bool,
) -> Tensor:
    spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, gamma, focal)
    return backward(logits, target, weight, spec, divisors, grad_output, lse_grad)


@cross_entropy_backward_op.register_fake
def _(logits, target, weight, divisors, grad_output, lse_grad, ignore_index, reduction, label_smoothing, z_loss,
      softcap, gamma, focal):
    return torch.empty_like(logits)


@torch.library.custom_op("fastce::cross_entropy_scale_grad_", mutates_args=("grad",))
def cross_entropy_scale_grad_op(grad: Tensor, grad_output: Tensor) -> None:
    launch_scale_gradient(grad, grad_output)


@cross_entropy_scale_grad_op.register_fake
def _(grad, grad_output):
    return None

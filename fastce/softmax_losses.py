"""The softmax losses, cross-entropy and focal loss, on the fused kernel (fastce/kernels/cross_entropy.py):
the launches, the custom ops and the autograd Functions behind fastce.cross_entropy and fastce.focal_loss.

A training step with 'mean' or 'sum' is three launches and no host sync: the class-index statistics
(the mean's divisor and the device-side range check, fastce._launch.target_stats), the forward kernel
(reads the logits once, writes the gradient for an upstream gradient of 1 and reduces the loss on the
device in the same launch) and, in the backward, the same kernel in rework mode, which leaves the
gradient as it is when the upstream gradient is 1 and recomputes it from the logits otherwise (one
rounding). 'none' writes no gradient in the forward: the backward computes it with each row's upstream
gradient. With inplace_backward=True the gradient is written over the logits by two Functions: one
overwrites the logits and marks them dirty (autograd requires that for a view, as `(h @ W).view(-1, V)`
is), the next turns the loss into the gradient's owner and scales it in the backward.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _launch
from ._core import (
    LossSpec,
    compute_dtype,
    loss_dtype,
    n_classes_of,
    once_differentiable,
    per_row,
    row_layout_of,
    row_shape,
)
from ._validation import VALIDATE_DEVICE, VALIDATE_SYNC, as_validation_mode, check_target_range, out_of_range_message
from ._launch import Launch, cdiv, keep_gradients, kernel_op, take_gradients, triton_dtype
from .kernels.cross_entropy import cross_entropy_fwd_kernel

# A backward in rework mode (the forward kept the gradient) runs at most this many programs, each over
# several blocks of rows: for an upstream gradient of 1 they read it once and stop.
REWORK_PROGRAMS = 1024

_TENSORS = ("logits_ptr", "target_ptr", "weight_ptr", "loss_ptr", "lse_ptr", "grad_ptr", "stats_ptr",
            "grad_output_ptr", "lse_grad_ptr")

# what each launch writes: the forward of a training step or of a no-grad call, the backward
FORWARD, BACKWARD = "forward", "backward"


class Layout(NamedTuple):
    """What the launch rule and the kernel's integer arguments depend on (the launch cache's key)."""
    shape: tuple
    strides: tuple
    dtype: torch.dtype
    target_strides: Optional[tuple]  # probability targets: their strides; class indices: None
    target_stride: int               # class indices: the stride of their flattened 1-D view
    has_weight: bool
    grad_strides: Optional[tuple]    # the gradient's strides (None: no gradient written)


def _layout(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad: Optional[Tensor]) -> Layout:
    """`target`: probabilities, or class indices as flat_target gives them."""
    prob_target = target.is_floating_point()
    return Layout(tuple(logits.shape), logits.stride(), logits.dtype, target.stride() if prob_target else None,
                  1 if prob_target or target.numel() <= 1 else target.stride(0), weight is not None,
                  None if grad is None else grad.stride())


@functools.lru_cache(maxsize=1024)
def _launch_for(layout: Layout, spec: LossSpec, mode: str, store_loss: int, grad_output: int, has_lse_grad: bool,
                keep_unit_rows: bool, grad_output_stride: int, lse_grad_stride: int,
                config: Optional[_launch.RowLaunchConfig] = None) -> Launch:
    """The prepared kernel launch for a call of this layout, options and mode (the kernel's flags
    are written out beside its parameters); `config` overrides the launch rule (bench.launch_sweep)."""
    shape = layout.shape
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    n_rows = math.prod(shape) // max(n_classes, 1)
    config = config or _launch.row_launch_config(n_rows, n_classes)
    inner_size, l_outer, l_inner, l_class = row_layout_of(shape, layout.strides)
    t_outer, t_inner, t_class = (layout.target_stride, 0, 0)
    if layout.target_strides is not None:
        t_outer, t_inner, t_class = row_layout_of(shape, layout.target_strides)[1:]
    g_outer, g_inner, g_class = (0, 0, 0)
    if layout.grad_strides is not None:
        g_outer, g_inner, g_class = row_layout_of(shape, layout.grad_strides)[1:]
    n_blocks = cdiv(n_rows, config.rows)
    grid = min(n_blocks, REWORK_PROGRAMS) if keep_unit_rows else n_blocks
    compute_grad = layout.grad_strides is not None
    return Launch(
        cross_entropy_fwd_kernel, (grid,), _TENSORS, num_warps=config.num_warps,
        logits_stride_outer=l_outer, logits_stride_inner=l_inner, logits_stride_class=l_class,
        target_stride_outer=t_outer, target_stride_inner=t_inner, target_stride_class=t_class,
        grad_stride_outer=g_outer, grad_stride_inner=g_inner, grad_stride_class=g_class,
        grad_output_stride=grad_output_stride, lse_grad_stride=lse_grad_stride,
        n_rows=n_rows, n_classes=n_classes, inner_size=inner_size,
        ignore_index=spec.ignore_index, label_smoothing=spec.label_smoothing, z_loss=spec.z_loss,
        softcap=spec.softcap if spec.softcap is not None else 1.0, gamma=spec.gamma,
        ROWS=config.rows, BLOCK_SIZE=config.block_size, SINGLE_PASS=n_classes <= config.block_size,
        WIDE_OFFSETS=n_classes * max(abs(l_class), abs(t_class), abs(g_class)) >= 2**31,
        PROB_TARGET=layout.target_strides is not None, HAS_WEIGHT=layout.has_weight,
        HAS_SMOOTHING=spec.label_smoothing > 0, HAS_Z_LOSS=spec.z_loss != 0, HAS_SOFTCAP=spec.softcap is not None,
        FOCAL=spec.focal and spec.gamma != 0, MEAN=spec.reduction == "mean",
        STORE_LOSS=store_loss, STORE_LSE=mode == FORWARD, COMPUTE_GRAD=compute_grad, GRAD_OUTPUT=grad_output,
        HAS_LSE_GRAD=has_lse_grad,
        # rows are the contiguous axis of an (N, C, d…) input: a per-row mask would narrow the loads
        SKIP_IGNORED_ROWS=not (inner_size > 1 and l_inner == 1 and l_class != 1),
        KEEP_UNIT_ROWS=keep_unit_rows, COMPUTE_DTYPE=triton_dtype(layout.dtype))


def flat_target(target: Tensor) -> Tensor:
    """Class indices as the 1-D tensor the kernels read with its stride (a view where they merge)."""
    return target if target.is_floating_point() else target.reshape(-1)


def statistics(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, validate: str,
               n_programs: int = 0) -> Tensor:
    """Validates the class indices as `validate` says and returns the device workspace of the kernel:
    [divisor of the loss, divisor of the z-loss, range flag, counter, n_programs partial sums]. The
    divisors are those of "mean" (Σ w_y over non-ignored rows for cross-entropy, their count for focal
    loss and the z-loss, the row count for probability targets); nothing is computed that the call does
    not need. No host sync except validate == "sync"."""
    n_classes = n_classes_of(logits)
    stats = _launch.row_stats_buffer(n_programs, logits.dtype, logits.device)
    mean = spec.reduction == "mean"
    if target.is_floating_point():
        if mean:
            stats[:2].fill_(float(logits.numel() // max(n_classes, 1)))
        stats[3:4].zero_()
        return stats
    divisor_weight = weight if mean and not spec.focal else None
    if not _launch.class_index_statistics(flat_target(target), divisor_weight, n_classes, spec.ignore_index,
                                          validate=validate, need_divisors=mean, out=stats):
        stats[3:4].zero_()  # the counter of the loss's reduction on the device
    return stats


def launch_forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, stats: Tensor, *,
                   loss: Tensor, lse: Tensor, grad: Optional[Tensor], reduce: bool,
                   config: Optional[_launch.RowLaunchConfig] = None) -> None:
    """One forward launch: the loss (reduced into the 0-d `loss` when `reduce`, else per row into `loss`),
    the lse per row and, into `grad` if given, the gradient for an upstream gradient of 1. `stats` is
    statistics()'s workspace (its partial sums for this launch's programs when `reduce`). The loss of
    "mean" is already divided by its divisor, so every reduction is a plain sum. `config` overrides the
    launch rule."""
    n_classes = n_classes_of(logits)
    if logits.numel() // max(n_classes, 1) == 0:
        return
    target = flat_target(target)
    launch = _launch_for(_layout(logits, target, weight, grad), spec, FORWARD, 2 if reduce else 1, 0, False, False,
                         0, 0, config)
    placeholder = stats
    launch(logits, target, placeholder if weight is None else weight, loss, lse,
           placeholder if grad is None else grad, stats, placeholder, placeholder)


def n_forward_programs(logits: Tensor) -> int:
    """The programs of a forward launch on these logits (each leaves one partial sum in the workspace)."""
    n_classes = n_classes_of(logits)
    n_rows = logits.numel() // max(n_classes, 1)
    return cdiv(n_rows, _launch.row_launch_config(n_rows, n_classes).rows) if n_rows else 0


def launch_backward(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, stats: Tensor,
                    grad: Tensor, grad_output: Optional[Tensor], lse_grad: Optional[Tensor], *,
                    keep_unit_rows: bool) -> Tensor:
    """Writes into `grad` ∂/∂logits for the upstream gradients `grad_output` of the loss (None: unused; a
    scalar, or one per row for 'none') and `lse_grad` of the lse (one per row, or None). With
    keep_unit_rows, `grad` holds the forward's gradient for an upstream gradient of 1 and only rows that
    need another are rewritten."""
    n_classes = n_classes_of(logits)
    if logits.numel() // max(n_classes, 1) == 0:
        return grad
    if grad_output is None:  # only the lse is used
        grad_output = stats.new_zeros(())
    per_row_upstream = grad_output.numel() > 1 or (spec.reduction == "none" and grad_output.dim() > 0)
    grad_output = per_row(grad_output) if per_row_upstream else grad_output
    lse_grad = None if lse_grad is None else per_row(lse_grad)
    target = flat_target(target)
    launch = _launch_for(_layout(logits, target, weight, grad), spec, BACKWARD, 0, 2 if per_row_upstream else 1,
                         lse_grad is not None, keep_unit_rows, grad_output.stride(0) if per_row_upstream else 0,
                         0 if lse_grad is None else lse_grad.stride(0))
    launch(logits, target, stats if weight is None else weight, stats, stats, grad, stats, grad_output,
           stats if lse_grad is None else lse_grad)
    return grad


# ---------------------------------------------------------------------------------------------
# Op bodies: what eager mode runs, and what torch.compile traces as custom ops


class _Plan(NamedTuple):
    """What a call of one layout and options launches, prepared once (_plan)."""
    forward: Launch                # the forward kernel
    rework: Optional[Launch]       # the backward of a kept gradient, for a scalar upstream gradient
    count: Optional[tuple]         # the class-index statistics' launches (target_stats), or None
    n_programs: int                # the forward's programs: one partial loss sum each
    loss_shape: tuple
    row_shape: tuple
    n_classes: int
    out_of_range: str              # the device-side check's message
    stats_size: int                # the workspace: N_TARGET_STATS values and n_programs partial sums
    acc_dtype: torch.dtype         # the kernel's compute dtype


@functools.lru_cache(maxsize=1024)
def _plan(shape: tuple, strides: tuple, grad_strides: Optional[tuple], dtype: torch.dtype, target_stride,
          has_weight: bool, spec: LossSpec, validate: str) -> _Plan:
    """The launches of a forward (and its backward) on logits of this shape, strides and dtype; target_stride
    is the flattened class indices' stride, or the probabilities' strides (a tuple); grad_strides those of
    the gradient a training step keeps (None: no gradient)."""
    prob_target = isinstance(target_stride, tuple)
    layout = Layout(shape, strides, dtype, target_stride if prob_target else None,
                    1 if prob_target else target_stride, has_weight, grad_strides)
    reduce = spec.reduction != "none"
    forward = _launch_for(layout, spec, FORWARD, 2 if reduce else 1, 0, False, False, 0, 0)
    rework = None
    if grad_strides is not None and reduce:
        rework = _launch_for(layout, spec, BACKWARD, 0, 1, False, True, 0, 0)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    n_rows = math.prod(shape) // max(n_classes, 1)
    count = None
    mean = spec.reduction == "mean"
    if not prob_target and (mean or validate == VALIDATE_DEVICE) and n_rows:
        count = _launch._target_stats_launches(n_rows, target_stride if n_rows > 1 else 1, n_classes,
                                               spec.ignore_index, has_weight and mean and not spec.focal,
                                               compute_dtype(dtype))
    row_shape_ = tuple(shape[:1] + shape[2:]) if len(shape) > 1 else ()
    return _Plan(forward, rework, count, forward.grid[0] if reduce and n_rows else 0,
                 () if reduce else row_shape_, row_shape_, n_classes, out_of_range_message(n_classes, spec.ignore_index),
                 _launch.N_TARGET_STATS + (forward.grid[0] if reduce and n_rows else 0), compute_dtype(dtype))


def _forward_fake(logits, target, weight, spec, out_dtype, keep_gradient, validate):
    shape, acc = row_shape(logits), compute_dtype(logits.dtype)
    loss_shape = shape if spec.reduction == "none" else ()
    n_programs = n_forward_programs(logits) if spec.reduction != "none" else 0
    return (logits.new_empty(loss_shape, dtype=out_dtype), logits.new_empty(shape, dtype=acc),
            logits.new_empty(_launch.N_TARGET_STATS + n_programs, dtype=acc))


@kernel_op("cross_entropy_forward", _forward_fake)
def forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, out_dtype: torch.dtype,
            keep_gradient: bool, validate: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse per row, the kernel's workspace). With keep_gradient the gradient for an upstream
    gradient of 1 is written too and kept with the workspace for `backward`. The class indices are
    checked as `validate` says (no host sync but for "sync")."""
    prob_target = target.is_floating_point()
    if not prob_target:
        target = target if target.dim() == 1 else target.reshape(-1)
    grad = torch.empty_like(logits) if keep_gradient else None
    plan = _plan(logits.shape, logits.stride(), None if grad is None else grad.stride(), logits.dtype,
                 target.stride() if prob_target else (target.stride(0) if target.numel() > 1 else 1),
                 weight is not None, spec, validate)
    mean = spec.reduction == "mean"
    device = logits.device
    stats = torch.empty(plan.stats_size, dtype=plan.acc_dtype, device=device)
    if validate == VALIDATE_SYNC and not prob_target:
        check_target_range(target, plan.n_classes, spec.ignore_index)
    if plan.count is not None:
        count, second = plan.count
        if second is None:
            count.run(target, weight if mean and weight is not None and not spec.focal else stats, stats)
        else:
            _launch.run_target_stats(plan.count, target, weight if mean and not spec.focal else None, stats)
        if validate == VALIDATE_DEVICE:
            torch._assert_async(stats[2], plan.out_of_range)
    elif prob_target:
        if mean:
            stats[:2].fill_(float(math.prod(plan.row_shape)))
        stats[3:4].zero_()
    elif plan.n_programs:
        stats[3:4].zero_()  # the counter of the loss's reduction on the device
    loss = torch.empty(plan.loss_shape, dtype=out_dtype, device=device)
    lse = torch.empty(plan.row_shape, dtype=plan.acc_dtype, device=device)
    if lse.numel() == 0:
        if spec.reduction != "none":
            loss.fill_(float("nan") if mean else 0.0)  # 0/0 for the mean, as torch
    else:
        plan.forward.run(logits, target, stats if weight is None else weight, loss, lse, stats if grad is None else grad,
                     stats, stats, stats)
    if keep_gradient:
        keep_gradients(stats, grad, plan)
    return loss, lse, stats


def _backward_fake(logits, target, weight, stats, grad_output, lse_grad, spec):
    return torch.empty_like(logits)


@kernel_op("cross_entropy_backward", _backward_fake)
def backward(logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor, grad_output: Optional[Tensor],
             lse_grad: Optional[Tensor], spec: LossSpec) -> Tensor:
    """∂/∂logits for the upstream gradients of the loss and of the lse: the forward's buffer when it
    kept one (rewritten only where needed), else a new one."""
    kept = take_gradients(stats)
    if kept is not None and lse_grad is None and grad_output is not None and grad_output.dim() == 0:
        grad, plan = kept
        if plan.rework is not None and grad.numel():
            flat = target if target.dim() <= 1 or target.is_floating_point() else target.reshape(-1)
            plan.rework.run(logits, flat, stats if weight is None else weight, stats, stats, grad, stats, grad_output,
                        stats)
        return grad
    grad = kept[0] if kept is not None else torch.empty_like(logits)
    return launch_backward(logits, target, weight, spec, stats, grad, grad_output, lse_grad,
                           keep_unit_rows=kept is not None)


def _forward_inplace_fake(logits, loss, lse, stats, target, weight, spec, validate):
    return None


@kernel_op("cross_entropy_forward_inplace_", _forward_inplace_fake, mutates=("logits", "loss", "lse", "stats"))
def forward_inplace(logits: Tensor, loss: Tensor, lse: Tensor, stats: Tensor, target: Tensor,
                    weight: Optional[Tensor], spec: LossSpec, validate: str) -> None:
    """forward() into (loss, lse, stats), with the gradient for an upstream gradient of 1 written over the
    logits (inplace_backward=True); `stats` is sized by n_forward_programs."""
    reduce = spec.reduction != "none"
    stats.copy_(statistics(logits, target, weight, spec, validate, stats.numel() - _launch.N_TARGET_STATS))
    if lse.numel() == 0:
        if reduce:
            loss.fill_(float("nan") if spec.reduction == "mean" else 0.0)
        return
    launch_forward(logits, target, weight, spec, stats, loss=loss, lse=lse, grad=logits, reduce=reduce)


def _scale_fake(grad, factor):
    return None


@kernel_op("scale_", _scale_fake, mutates=("grad",))
def scale_(grad: Tensor, factor: Tensor) -> None:
    """grad *= factor in place (fastce._launch.scale_): a scalar, or one value per row of a 2-D grad."""
    _launch.scale_(grad, factor)


# ---------------------------------------------------------------------------------------------
# autograd

_NO_GRADS = (None,) * 6  # target, weight, spec, loss dtype, validate, return_lse


class CrossEntropyFunction(torch.autograd.Function):
    """apply(logits, target, weight=None, spec=LossSpec(), validate=True, return_lse=False,
    out_dtype=None) -> loss, or (loss, lse) with return_lse; both differentiable in the logits.

    `spec` (fastce.LossSpec) carries ignore_index, reduction, label_smoothing, z_loss, softcap and the
    focal options; `validate` as fastce.cross_entropy's; `out_dtype` the loss's dtype (default: the
    logits', as torch). (inplace_backward=True goes through cross_entropy_inplace.)"""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                spec: Optional[LossSpec] = None, validate=True, return_lse: bool = False,
                out_dtype: Optional[torch.dtype] = None):
        spec = LossSpec() if spec is None else spec
        validate = as_validation_mode(validate, logits.device)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        loss, lse, stats = forward(logits, target, weight, spec, out_dtype or loss_dtype(logits, target),
                                   spec.reduction != "none", validate)
        ctx.save_for_backward(logits, target, weight, stats)
        return (loss, lse) if return_lse else loss

    @staticmethod
    @once_differentiable  # the gradient is not itself differentiable: a clear error on double backward
    def backward(ctx, grad_loss, grad_lse=None):
        if grad_loss is None and grad_lse is None:
            return None, *_NO_GRADS
        logits, target, weight, stats = ctx.saved_tensors
        return backward(logits, target, weight, stats, grad_loss, grad_lse, ctx.spec), *_NO_GRADS


class _OverwriteLogitsWithGradient(torch.autograd.Function):
    """logits ← ∂loss/∂logits for an upstream gradient of 1, in place; fills the loss and lse.

    Autograd-wise the identity: the gradient reaching the overwritten logits (from
    _LossFromOverwrittenLogits) is the logits' gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, spec, validate, loss, lse, stats):
        forward_inplace(logits, loss, lse, stats, target, weight, spec, validate)
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None, None, None


class _LossFromOverwrittenLogits(torch.autograd.Function):
    """The loss the kernel wrote; its backward hands out the overwritten logits, scaled by the upstream
    gradient on the device."""

    @staticmethod
    def forward(ctx, gradient, loss):
        ctx.save_for_backward(gradient)
        ctx.grad_handed_out = False
        return loss.view_as(loss)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grad_handed_out:
            raise RuntimeError(
                "fastce: backward through cross_entropy(..., inplace_backward=True) a second time: the "
                "logits' storage already holds their gradient and was handed out by the first backward. "
                "Use inplace_backward=False to backward through the same graph more than once.")
        ctx.grad_handed_out = True
        gradient, = ctx.saved_tensors
        scale_(gradient, grad_loss)
        # a fresh alias that nothing else references, so a leaf's AccumulateGrad can take it
        # without a copy even while the caller still holds the (overwritten) logits
        return gradient.detach(), None


def cross_entropy_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, validate: str,
                          out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(loss, lse) with the gradient written over the logits (inplace_backward=True)."""
    shape = row_shape(logits)
    reduce = spec.reduction != "none"
    loss = logits.new_empty(() if reduce else shape, dtype=out_dtype)
    lse = logits.new_empty(shape, dtype=compute_dtype(logits.dtype))
    stats = _launch.row_stats_buffer(n_forward_programs(logits) if reduce else 0, logits.dtype, logits.device)
    gradient = _OverwriteLogitsWithGradient.apply(logits, target, weight, spec, validate, loss, lse, stats)
    return _LossFromOverwrittenLogits.apply(gradient, loss), lse


def forward_no_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, validate: str,
                    out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(loss, lse) when no gradient is needed: one read of the logits, no gradient buffer."""
    loss, lse, _ = forward(logits, target, weight, spec, out_dtype, False, validate)
    return loss, lse


def run(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, *, inplace_backward: bool,
        validate: str, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(loss, lse) from the kernels for checked arguments, through autograd when a gradient is needed."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return forward_no_grad(logits, target, weight, spec, validate, out_dtype)
    if inplace_backward:
        if logits.is_leaf:
            raise RuntimeError(
                "fastce: inplace_backward=True writes the gradient over the logits, which cannot be a leaf "
                "tensor that requires grad (its .grad would alias its data); pass non-leaf logits (the output "
                "of a layer) or use inplace_backward=False")
        return cross_entropy_inplace(logits, target, weight, spec, validate, out_dtype)
    return CrossEntropyFunction.apply(logits, target, weight, spec, validate, True, out_dtype)


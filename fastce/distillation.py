"""Distillation losses (DESIGN §7.5) on fastce/kernels/distillation.py: the launches, custom ops and
autograd Functions behind fastce.distillation_loss and fastce.linear_distillation_loss (the latter on
the chunked-head engine, fastce/_head.py).

distillation_loss: one launch reads both models' rows once and writes the per-row loss (reduced on the
device) and the student's gradient for an upstream gradient of 1, kept for the backward (fastce._launch's
handoff), which rescales it in place where the upstream gradient is not 1 (a low-precision gradient is
then rounded twice). A training step moves ≤ 3.05× one model's logits' bytes for rows of one tile
(K ≤ 4096; a streamed row is re-read from L2 by the program that just read it), with no host sync.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _launch
from ._core import DistillationSpec, compute_dtype, once_differentiable, per_row
from ._launch import Launch, cdiv, keep_gradients, kernel_op, take_gradients, triton_dtype
from .kernels.distillation import N_STATS, distillation_fwd_kernel, distillation_slice_bwd_kernel

# Launch rule: the row kernels' (fastce._launch.row_launch_config) at 16 elements per thread: both rows'
# tiles and several per-element temporaries are live at once (z, u, p, q, d, and the mixture's ratios).
# Compiled for sm_90 (the prototype's measurements, Triton 3.9, bf16): a 1024-class tile over 4 warps
# takes 72 (forward KL) / 80 (reverse KL) / 96 (JSD) registers without spills, and the 2048-class stream
# tiles 64 / 72 / 120.
ELEMENTS_PER_WARP = 512

MODES = {0.0: 0, 1.0: 1}  # β → the kernel's MODE (else MODE_JSD, 2)

_FORWARD_TENSORS = ("student_ptr", "teacher_ptr", "target_ptr", "stats_ptr", "loss_ptr", "row_stats_ptr", "grad_ptr",
                    "grad_output_ptr")


def launch_config(n_rows: int, n_classes: int) -> _launch.RowLaunchConfig:
    return _launch.row_launch_config(n_rows, n_classes, ELEMENTS_PER_WARP)


def _mode(beta: float) -> int:
    return MODES.get(beta, 2)


def _divisor_factor(spec: DistillationSpec, n_classes: int, has_target: bool, total_rows: int) -> float:
    """What the kept-row count (or 1 without a target) is multiplied by to give the mean's divisor:
    'batchmean' divides by the kept rows (every row without a target), 'mean' by those × the classes."""
    return float((n_classes if spec.reduction == "mean" else 1) * (1 if has_target else total_rows))


def _spec_scalars(spec: DistillationSpec) -> dict:
    return dict(beta=spec.beta, inv_temperature=1.0 / spec.temperature, student_logit_scale=spec.student_logit_scale,
                student_softcap=spec.student_softcap or 1.0, teacher_logit_scale=spec.teacher_logit_scale,
                teacher_softcap=spec.teacher_softcap or 1.0, MODE=_mode(spec.beta), MIX_FROM_STUDENT=spec.beta <= 0.5,
                STUDENT_SCALE=spec.student_logit_scale != 1.0, STUDENT_SOFTCAP=spec.student_softcap is not None,
                TEACHER_SCALE=spec.teacher_logit_scale != 1.0, TEACHER_SOFTCAP=spec.teacher_softcap is not None)


@functools.lru_cache(maxsize=1024)
def _forward_launch(n_rows: int, n_classes: int, student_strides: tuple, teacher_strides: tuple,
                    grad_strides: Optional[tuple], target_stride: Optional[int], grad_output_stride: Optional[int],
                    row_stats_stride: Optional[int], store_loss: int, divisor_factor: float, spec: DistillationSpec,
                    dtype: torch.dtype) -> Launch:
    config = launch_config(n_rows, n_classes)
    g_row, g_class = grad_strides or (0, 0)
    return Launch(
        distillation_fwd_kernel, (cdiv(n_rows, config.rows),), _FORWARD_TENSORS, num_warps=config.num_warps,
        student_stride_row=student_strides[0], student_stride_class=student_strides[1],
        teacher_stride_row=teacher_strides[0], teacher_stride_class=teacher_strides[1], grad_stride_row=g_row,
        grad_stride_class=g_class, target_stride=target_stride or 0, grad_output_stride=grad_output_stride or 0,
        row_stats_stride=row_stats_stride or 0, n_rows=n_rows, n_classes=n_classes, ignore_index=spec.ignore_index,
        divisor_factor=divisor_factor, ROWS=config.rows, BLOCK_SIZE=config.block_size,
        SINGLE_PASS=n_classes <= config.block_size, HAS_TARGET=target_stride is not None,
        MEAN=spec.reduction in ("batchmean", "mean"), STORE_LOSS=store_loss, STORE_STATS=row_stats_stride is not None,
        COMPUTE_GRAD=grad_strides is not None, GRAD_OUTPUT=0 if grad_output_stride is None else 2,
        WIDE_OFFSETS=n_classes * max(abs(student_strides[1]), abs(teacher_strides[1]), abs(g_class)) >= 2**31,
        COMPUTE_DTYPE=triton_dtype(dtype), **_spec_scalars(spec))


def _stride(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else (t.stride(0) if t.numel() > 1 else 1)


def launch_forward(student: Tensor, teacher: Tensor, target: Optional[Tensor], spec: DistillationSpec, stats: Tensor,
                   *, loss: Tensor, store_loss: int, divisor_factor: float, dtype: torch.dtype,
                   grad: Optional[Tensor] = None, row_stats: Optional[Tensor] = None,
                   grad_output: Optional[Tensor] = None) -> None:
    """One forward launch over student and teacher rows (N, K) (any strides): the loss per row into `loss`
    (store_loss 1) or their sum into the 0-d `loss` (2, reduced on the device through `stats`, the
    workspace: its slot 1 the kept rows' count when there is a target, slot 3 a zeroed counter, then a
    partial sum per program) or nothing (0); with `grad` the student's gradient, for the upstream
    gradient `grad_output` (one per row) or 1; with `row_stats` the (N_STATS, N) row statistics."""
    n_rows, n_classes = student.shape
    if n_rows == 0:
        return
    launch = _forward_launch(n_rows, n_classes, student.stride(), teacher.stride(),
                             None if grad is None else grad.stride(), _stride(target), _stride(grad_output),
                             None if row_stats is None else row_stats.stride(0), store_loss, divisor_factor, spec,
                             dtype)
    placeholder = stats
    launch(student, teacher, placeholder if target is None else target, stats, loss,
           placeholder if row_stats is None else row_stats, placeholder if grad is None else grad,
           placeholder if grad_output is None else grad_output)


def n_programs(n_rows: int, n_classes: int) -> int:
    """The programs of a forward launch (each leaves one partial sum in the workspace)."""
    return cdiv(n_rows, launch_config(n_rows, n_classes).rows) if n_rows else 0


def kept_row_count(target: Optional[Tensor], spec: DistillationSpec, n_classes: int, stats: Tensor) -> None:
    """stats[:4] = target_stats' (…, the kept rows' count, …, a zeroed counter) where the mean needs the
    count (on the device: no host sync), else the zeroed counter alone."""
    if target is not None and spec.reduction in ("batchmean", "mean") and target.numel():
        _launch.target_stats(target, None, n_classes, spec.ignore_index, stats)
    else:
        stats[3:4].zero_()


def _empty_loss(loss: Tensor, spec: DistillationSpec) -> None:
    if spec.reduction != "none":
        loss.fill_(float("nan") if spec.reduction in ("batchmean", "mean") else 0.0)  # 0/0 for the means


# ---------------------------------------------------------------------------------------------
# distillation_loss on (N, V) logits


def _loss_shape(n_rows: int, spec: DistillationSpec) -> tuple:
    return (n_rows,) if spec.reduction == "none" else ()


def _forward_fake(student, teacher, target, spec, num_classes, keep_gradient):
    acc = compute_dtype(torch.promote_types(student.dtype, teacher.dtype))
    n_rows = student.shape[0]
    programs = n_programs(n_rows, num_classes) if spec.reduction != "none" else 0
    return (student.new_empty(_loss_shape(n_rows, spec), dtype=acc),
            student.new_empty(_launch.N_TARGET_STATS + programs, dtype=acc))


@kernel_op("distillation_forward", _forward_fake)
def forward(student: Tensor, teacher: Tensor, target: Optional[Tensor], spec: DistillationSpec, num_classes: int,
            keep_gradient: bool) -> tuple[Tensor, Tensor]:
    """(loss, the kernel's workspace) of student (N, V_s) and teacher (N, V_t) logits over their first
    num_classes classes, target (N) or None; with keep_gradient the student's gradient for an upstream
    gradient of 1 (N, V_s) is written in the same pass and kept with the workspace for `backward`."""
    acc = compute_dtype(torch.promote_types(student.dtype, teacher.dtype))
    n_rows = student.shape[0]
    reduce = spec.reduction != "none"
    stats = _launch.row_stats_buffer(n_programs(n_rows, num_classes) if reduce else 0, acc, student.device)
    kept_row_count(target, spec, num_classes, stats)
    loss = student.new_empty(_loss_shape(n_rows, spec), dtype=acc)
    grad = None
    if keep_gradient:
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        if num_classes < student.shape[1]:
            grad[:, num_classes:].zero_()  # classes beyond the shared ones take no part
    if n_rows == 0:
        _empty_loss(loss, spec)
    else:
        launch_forward(student[:, :num_classes], teacher[:, :num_classes], target, spec, stats, loss=loss,
                       store_loss=2 if reduce else 1, divisor_factor=_divisor_factor(spec, num_classes,
                                                                                    target is not None, n_rows),
                       dtype=acc, grad=None if grad is None else grad[:, :num_classes])
    if keep_gradient:
        keep_gradients(stats, grad)
    return loss, stats


def _backward_fake(student, teacher, target, stats, grad_output, spec, num_classes):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


@kernel_op("distillation_backward", _backward_fake)
def backward(student: Tensor, teacher: Tensor, target: Optional[Tensor], stats: Tensor, grad_output: Tensor,
             spec: DistillationSpec, num_classes: int) -> Tensor:
    """∂loss/∂student for the upstream `grad_output` (a scalar, or one per row for 'none'): the forward's
    gradient rescaled in place; where it did not reach the backward (a second backward through a retained
    graph), one more pass over both rows (with the count the forward left in `stats`)."""
    kept = take_gradients(stats)
    if kept is not None:
        grad = kept[0]
    else:
        acc = compute_dtype(torch.promote_types(student.dtype, teacher.dtype))
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        launch_forward(student[:, :num_classes], teacher[:, :num_classes], target, spec, stats, loss=stats,
                       store_loss=0, divisor_factor=_divisor_factor(spec, num_classes, target is not None,
                                                                    student.shape[0]),
                       dtype=acc, grad=grad[:, :num_classes])
    return _launch.scale_(grad, grad_output)


class DistillationFunction(torch.autograd.Function):
    """apply(student (N, V_s), teacher (N, V_t), target (N) or None, spec, num_classes) -> loss,
    differentiable in the student only (the teacher is detached)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, target: Optional[Tensor], spec: DistillationSpec,
                num_classes: int):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.num_classes = spec, num_classes
        loss, stats = forward(student, teacher, target, spec, num_classes, True)
        ctx.save_for_backward(student, teacher, target, stats)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None, None, None, None
        student, teacher, target, stats = ctx.saved_tensors
        return backward(student, teacher, target, stats, grad_loss, ctx.spec, ctx.num_classes), None, None, None, None


def run(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor], spec: DistillationSpec,
        num_classes: int) -> Tensor:
    """The loss for checked (…, V) logits (the teacher detached) and target (…) or None."""
    token_shape = student_logits.shape[:-1]
    student = student_logits.reshape(-1, student_logits.shape[-1])  # a view where the leading dims merge
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    flat_target = None if target is None else target.reshape(-1)  # read with its stride
    if torch.is_grad_enabled() and student.requires_grad:
        loss = DistillationFunction.apply(student, teacher, flat_target, spec, num_classes)
    else:  # one read of both rows, no gradient written
        loss, _ = forward(student, teacher, flat_target, spec, num_classes, False)
    return loss.reshape(token_shape) if spec.reduction == "none" else loss

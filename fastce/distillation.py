"""Distillation losses (DESIGN §7.5) on fastce/kernels/distillation.py: the launches, custom ops and
autograd Functions behind fastce.distillation_loss and fastce.linear_distillation_loss (the latter on
the chunked-head engine, fastce/_head.py).

distillation_loss: one launch reads both models' rows once and writes the per-row loss (reduced on the
device) and the student's gradient for an upstream gradient of 1, kept for the backward (fastce._launch's
handoff), which rescales it in place where the upstream gradient is not 1 (a low-precision gradient is
then rounded twice). A training step moves ≤ 3.05× one model's logits' bytes for rows of one tile
(K ≤ 4096; a streamed row is re-read from L2 by the program that just read it), with no host sync.

linear_distillation_loss walks both heads together (docs/distillation.md): the forward's row walk computes
each chunk's student and teacher logits in fp32 from the GEMM, the kernel writes the chunk's loss, row
statistics and student gradient (in the student's dtype, over the first half of the chunk's fp32 buffer),
and the engine makes ∂hidden complete and ∂W of the first `weight_classes` classes, summed exactly; a
vocabulary walk then makes ∂W of the other classes slice by slice from the row statistics (both heads'
slices recomputed). The teacher gets no gradient and no gradient buffer. What the forward makes is for an
upstream gradient of 1 (scaled in place otherwise); 'none' walks again in the backward with each row's
upstream gradient.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _head, _launch
from ._core import DistillationSpec, compute_dtype, once_differentiable, per_row, reduce_rows
from ._head import NOTHING, Head, Needs
from ._launch import Launch, cdiv, keep_gradients, kernel_op, next_power_of_2, take_gradients, triton_dtype
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


# ---------------------------------------------------------------------------------------------
# linear_distillation_loss: both heads walked together by the chunked-head engine

# Peak bytes beyond inputs and gradients: HEAD_BUDGET of the student's logits' bytes (N·K in its dtype).
# Both heads' chunks take fp32 buffers (4 bytes a logit each, twice a bf16 head's own logits), so a
# quarter of the budget goes to the chunks (at least MIN_ROWS rows), the rest to the exact ∂W sum of as
# many classes as fit (2 bytes per weight element: _head._ExactSum); the vocabulary walk's slices (both
# heads' fp32 logits of all rows) take the budget again. GEMMs of 2·N·K·H each: the forward's two
# logits GEMMs, ∂hidden, ∂W (f: the classes the row walk covers) and, for the other classes, both heads'
# logits again and ∂W: 6 − 2f, against the minimum 4 (f = 1 where the accumulator costs nothing: fp32).
HEAD_BUDGET = 0.10
SLICE_TILE = 2048   # the slice kernel: whole rows a program, in tiles of SLICE_TILE elements, up to SLICE_BLOCK wide
SLICE_BLOCK = 1024
SLICE_WARPS = 8


class HeadPlan(NamedTuple):
    chunk_rows: int      # rows per chunk of the row walk
    weight_classes: int  # ∂W of classes [0, weight_classes) by the row walk, the rest by the vocabulary walk
    slice_classes: int   # classes per slice of the vocabulary walk


def _compute_itemsize(dtype: torch.dtype) -> int:
    return compute_dtype(dtype).itemsize


def _fallback_bytes(dtype: torch.dtype, device_type: str) -> int:
    # mm_into's fp32 copies of operand blocks, where the GEMM cannot output fp32 itself
    if dtype in (torch.float32, torch.float64) or _head.wide_mm_available(device_type):
        return 0
    return 4 * _head.FP32_COPY_ELEMENTS


def _byte_terms(n_rows: int, n_classes: int, student: tuple, teacher: tuple, device_type: str) -> dict:
    """The byte model's terms: per row, per chunk row, per slice class, and the fixed ones. `student` and
    `teacher` are (dtype, in_features)."""
    (s_dtype, s_features), (t_dtype, t_features) = student, teacher
    acc = max(_compute_itemsize(s_dtype), _compute_itemsize(t_dtype))
    logit = _compute_itemsize(s_dtype) + _compute_itemsize(t_dtype)   # one logit of each head, fp32 buffers
    return dict(per_row=(1 + N_STATS) * acc * n_rows,                      # loss rows and row statistics
                chunk_row=n_classes * logit + n_classes,                   # + the exact sum's scratch (R·K bytes)
                slice_class=n_rows * logit,
                fallback=max(_fallback_bytes(s_dtype, device_type), _fallback_bytes(t_dtype, device_type)),
                weight_class=2 * s_features if s_dtype.itemsize == 2 else 0)  # the exact sum's lower halves


def make_plan(n_rows: int, n_classes: int, student: tuple, teacher: tuple, device_type: str, *,
              chunk_rows: Optional[int] = None) -> HeadPlan:
    """The walks' sizes by the rule above; `student` and `teacher` are (dtype, in_features)."""
    terms = _byte_terms(n_rows, n_classes, student, teacher, device_type)
    budget = int(HEAD_BUDGET * n_rows * n_classes * student[0].itemsize) - terms["per_row"] - terms["fallback"]
    if chunk_rows is None:
        chunk_rows = max(_head.MIN_ROWS, budget // 4 // terms["chunk_row"])
    chunk_rows = max(1, min(chunk_rows, n_rows))
    weight_classes = n_classes
    if terms["weight_class"]:
        free = budget - chunk_rows * terms["chunk_row"]
        weight_classes = max(0, min(n_classes, free // terms["weight_class"]))
    slice_classes = max(_head.MIN_CLASSES, budget // max(1, terms["slice_class"]))
    return HeadPlan(chunk_rows, weight_classes, max(1, min(slice_classes, n_classes)))


def working_memory_bytes(n_rows: int, n_classes: int, student: tuple, teacher: tuple, device_type: str,
                         plan: HeadPlan) -> int:
    """Peak bytes beyond inputs and gradients of a training step by `plan` (without a bias): the larger of
    the row walk's and the vocabulary walk's, with the per-row values beside either."""
    terms = _byte_terms(n_rows, n_classes, student, teacher, device_type)
    rows = plan.chunk_rows * terms["chunk_row"] + plan.weight_classes * terms["weight_class"]
    vocab = plan.slice_classes * terms["slice_class"] if plan.weight_classes < n_classes else 0
    return max(rows, vocab) + terms["per_row"] + terms["fallback"]


def gemm_flops(n_rows: int, n_classes: int, student_features: int, teacher_features: int, plan: HeadPlan) -> int:
    """GEMM flops of a training step ('batchmean', 'sum', 'mean') by `plan`, no bias."""
    rest = n_classes - plan.weight_classes
    return 2 * n_rows * (n_classes * (student_features + teacher_features + 2 * student_features)
                         + rest * (student_features + teacher_features))


@functools.lru_cache(maxsize=1024)
def _slice_launch(n_rows: int, width: int, student_stride: int, teacher_stride: int, grad_stride: int,
                  row_stats_stride: int, grad_output_stride: Optional[int], spec: DistillationSpec,
                  dtype: torch.dtype) -> Launch:
    block = min(SLICE_BLOCK, next_power_of_2(width))
    rows = max(1, min(SLICE_TILE // block, next_power_of_2(n_rows)))
    return Launch(
        distillation_slice_bwd_kernel, (cdiv(n_rows, rows),),
        ("student_ptr", "teacher_ptr", "row_stats_ptr", "grad_output_ptr", "grad_ptr"), num_warps=SLICE_WARPS,
        student_stride_row=student_stride, teacher_stride_row=teacher_stride, grad_stride_row=grad_stride,
        row_stats_stride=row_stats_stride, grad_output_stride=grad_output_stride or 0, n_rows=n_rows,
        n_slice_classes=width, ROWS=rows, BLOCK_SIZE=block, GRAD_OUTPUT=0 if grad_output_stride is None else 2,
        COMPUTE_DTYPE=triton_dtype(dtype), **_spec_scalars(spec))


def _gradient_view(logits: Tensor, dtype: torch.dtype) -> Tensor:
    # the piece's gradient in the student's dtype over the first bytes of each row of its fp32 logits
    # (row stride that of the buffer): each kernel program writes only the rows it has read
    return logits.view(dtype)[:, : logits.shape[1]]


class _Heads(NamedTuple):
    """The call's heads, flattened to (N, H) rows and truncated to the K shared classes."""
    student: Head
    teacher: Head
    target: Optional[Tensor]

    @property
    def acc(self) -> torch.dtype:
        return compute_dtype(torch.promote_types(self.student.input.dtype, self.teacher.input.dtype))


def _heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target,
           num_classes: int) -> _Heads:
    def head(hidden, weight, bias):
        return Head(hidden, weight[:num_classes], None if bias is None else bias[:num_classes])
    return _Heads(head(student_hidden, student_weight, student_bias), head(teacher_hidden, teacher_weight, teacher_bias),
                  target)


def _walk(heads: _Heads, spec: DistillationSpec, plan: HeadPlan, needs: Needs, stats: Tensor, row_stats: Optional[Tensor],
          out: tuple, *, loss_rows: Optional[Tensor] = None, upstream: Optional[Tensor] = None) -> None:
    """The row walk (the loss rows and row statistics when `loss_rows` is given; the gradients `needs`
    asks for into `out` for the upstream gradient `upstream`, one per row, or 1) and, for ∂W and ∂b of the
    classes past plan.weight_classes, the vocabulary walk."""
    student, teacher, target = heads
    n_rows, n_classes = student.input.shape[0], student.weight.shape[0]
    dtype, acc = student.input.dtype, heads.acc
    teacher_dtype = compute_dtype(teacher.input.dtype)
    factor = _divisor_factor(spec, n_classes, target is not None, n_rows)
    gradients = any(needs)
    teacher_buffer = teacher.input.new_empty(min(plan.chunk_rows, n_rows), n_classes, dtype=teacher_dtype)

    def visit_rows(logits: Tensor, rows: slice) -> Optional[Tensor]:
        teacher_logits = _head.chunk_logits(teacher, rows, teacher_buffer[: logits.shape[0]])
        grad = _gradient_view(logits, dtype) if gradients else None
        launch_forward(logits, teacher_logits, None if target is None else target[rows], spec, stats,
                       loss=stats if loss_rows is None else loss_rows[rows], store_loss=0 if loss_rows is None else 1,
                       divisor_factor=factor, dtype=acc, grad=grad,
                       row_stats=None if loss_rows is None or row_stats is None else row_stats[:, rows],
                       grad_output=None if upstream is None else upstream[rows])
        return grad

    row_needs = Needs(needs.input, needs.weight and plan.weight_classes > 0, needs.bias and plan.weight_classes > 0)
    _head.row_walk(student, plan.chunk_rows, visit_rows, row_needs, logits_dtype=compute_dtype(dtype),
                   weight_classes=plan.weight_classes, out=out)
    del teacher_buffer
    if not (needs.weight or needs.bias) or plan.weight_classes >= n_classes:
        return
    width = min(plan.slice_classes, n_classes - plan.weight_classes)
    teacher_storage = teacher.input.new_empty(n_rows * width, dtype=teacher_dtype)

    def visit_slice(logits: Tensor, classes: slice) -> Tensor:
        teacher_logits = _head.slice_logits(teacher, classes, teacher_storage[: logits.numel()].view(n_rows, -1))
        grad = _gradient_view(logits, dtype)
        launch = _slice_launch(n_rows, logits.shape[1], logits.stride(0), teacher_logits.stride(0), grad.stride(0),
                               row_stats.stride(0), _stride(upstream), spec, acc)
        launch(logits, teacher_logits, row_stats, row_stats if upstream is None else upstream, grad)
        return grad

    _head.vocab_walk(student, plan.slice_classes, visit_slice, Needs(False, needs.weight, needs.bias),
                     logits_dtype=compute_dtype(dtype), first_class=plan.weight_classes, out=out)


def _gradient_buffers(heads: _Heads, full_weight: Tensor, full_bias: Optional[Tensor], needs: Needs) -> tuple:
    """∂hidden, ∂W (V_s, H) and ∂b (V_s) as `needs` asks: classes past the K shared ones get 0."""
    def full(like, need):
        if not need:
            return None
        grad = torch.empty_like(like)
        if grad.shape[0] > heads.student.weight.shape[0]:
            grad[heads.student.weight.shape[0]:].zero_()
        return grad
    return (torch.empty_like(heads.student.input) if needs.input else None, full(full_weight, needs.weight),
            full(full_bias, needs.bias))


def _linear_forward_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                         target, spec, plan, num_classes, needs, keep_stats):
    acc = compute_dtype(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype))
    n_rows = student_hidden.shape[0]
    return (student_hidden.new_empty(n_rows, dtype=acc),
            student_hidden.new_empty((N_STATS, n_rows) if keep_stats else (0,), dtype=acc),
            student_hidden.new_empty(_launch.N_TARGET_STATS, dtype=acc))


@kernel_op("linear_distillation_forward", _linear_forward_fake)
def linear_forward(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                   teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                   target: Optional[Tensor], spec: DistillationSpec, plan: HeadPlan, num_classes: int, needs: Needs,
                   keep_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss per row (already divided by the mean's count), row statistics or empty, the workspace) of
    both heads' hidden rows (N, H); the student's gradients `needs` asks for, for an upstream gradient of
    1, are made too and kept with the workspace for the backward; keep_stats keeps the row statistics."""
    heads = _heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target,
                   num_classes)
    n_rows = student_hidden.shape[0]
    stats = student_hidden.new_empty(_launch.N_TARGET_STATS, dtype=heads.acc)
    kept_row_count(target, spec, num_classes, stats)
    loss_rows = student_hidden.new_empty(n_rows, dtype=heads.acc)
    row_stats = student_hidden.new_empty((N_STATS, n_rows) if keep_stats else (0,), dtype=heads.acc)
    out = _gradient_buffers(heads, student_weight, student_bias, needs)
    _walk(heads, spec, plan, needs, stats, row_stats if keep_stats else None, out, loss_rows=loss_rows)
    if any(needs):
        keep_gradients(stats, *out)
    return loss_rows, row_stats, stats


def _linear_backward_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          target, stats, row_stats, grad_output, spec, plan, num_classes, needs):
    shapes = (student_hidden.shape, student_weight.shape, student_weight.shape[:1])
    return [student_hidden.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


@kernel_op("linear_distillation_backward", _linear_backward_fake)
def linear_backward(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                    target: Optional[Tensor], stats: Tensor, row_stats: Tensor, grad_output: Tensor,
                    spec: DistillationSpec, plan: HeadPlan, num_classes: int, needs: Needs) -> list[Tensor]:
    """(∂hidden, ∂W, ∂b) among `needs` (an empty tensor elsewhere) for the upstream `grad_output`: the
    forward's, scaled in place, where it made them; else ('none', or where the handoff did not reach the
    backward) both walks again with each row's upstream gradient folded into the kernels."""
    kept = take_gradients(stats)
    if kept is not None:
        grads = [None if g is None else _launch.scale_(g, grad_output) for g in kept]
    else:
        heads = _heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       target, num_classes)
        grads = _gradient_buffers(heads, student_weight, student_bias, needs)
        upstream = per_row(grad_output) if spec.reduction == "none" else grad_output.reshape(()).expand(
            student_hidden.shape[0])
        _walk(heads, spec, plan, needs, stats, row_stats, grads, upstream=upstream)
    return [student_hidden.new_empty(0) if g is None else g for g in grads]


class LinearDistillationFunction(torch.autograd.Function):
    """apply(student_hidden (N, H_s), student_weight (V_s, H_s), student_bias (V_s) or None, teacher_hidden
    (N, H_t), teacher_weight (V_t, H_t), teacher_bias or None, target (N) or None, spec, plan, num_classes)
    -> loss; gradients for the student's three tensors only."""

    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                target: Optional[Tensor], spec: DistillationSpec, plan: HeadPlan, num_classes: int):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.plan, ctx.num_classes = spec, plan, num_classes
        ctx.needs = Needs(*ctx.needs_input_grad[:3])
        made = ctx.needs if spec.reduction != "none" else NOTHING
        teacher = tuple(None if t is None else t.detach() for t in (teacher_hidden, teacher_weight, teacher_bias))
        loss_rows, row_stats, stats = linear_forward(student_hidden, student_weight, student_bias, *teacher, target,
                                                     spec, plan, num_classes, made, True)
        ctx.save_for_backward(student_hidden, student_weight, student_bias, *teacher, target, stats, row_stats)
        return _reduce(loss_rows, spec)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        no_grads = (None,) * 7  # the teacher's three tensors, target, spec, plan, num_classes
        if grad_loss is None:
            return (None, None, None, *no_grads)
        grads = linear_backward(*ctx.saved_tensors, grad_loss, ctx.spec, ctx.plan, ctx.num_classes, ctx.needs)
        return (*(g if need else None for g, need in zip(grads, ctx.needs)), *no_grads)


def run_linear(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], teacher_hidden: Tensor,
               teacher_weight: Tensor, teacher_bias: Optional[Tensor], target: Optional[Tensor],
               spec: DistillationSpec, num_classes: int, *, chunk_rows: Optional[int] = None) -> Tensor:
    """The loss for checked heads: hidden (…, H) of each, the teacher's detached."""
    token_shape = student_hidden.shape[:-1]
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    flat_target = None if target is None else target.reshape(-1)
    plan = make_plan(student_rows.shape[0], num_classes, (student_rows.dtype, student_rows.shape[1]),
                     (teacher_rows.dtype, teacher_rows.shape[1]), student_rows.device.type, chunk_rows=chunk_rows)
    teacher = (teacher_rows, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    student = (student_rows, student_weight, student_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student):
        loss = LinearDistillationFunction.apply(*student, *teacher, flat_target, spec, plan, num_classes)
    else:  # no gradient work: no gradient written, no gradient GEMMs
        loss_rows, _, _ = linear_forward(*student, *teacher, flat_target, spec, plan, num_classes, NOTHING, False)
        loss = _reduce(loss_rows, spec)
    return loss.reshape(token_shape) if spec.reduction == "none" else loss


def _reduce(loss_rows: Tensor, spec: DistillationSpec) -> Tensor:
    # the rows are already divided by the mean's count: a sum (NaN for the means of nothing, as 0/0)
    reduction = "mean" if spec.reduction == "batchmean" else spec.reduction
    return reduce_rows(loss_rows, reduction, loss_rows.shape, loss_rows.dtype)

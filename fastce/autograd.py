"""torch.autograd.Function behind fastce.cross_entropy and fastce.focal_loss.

Gradient strategy (DESIGN §6): for 'mean' and 'sum' the forward kernel already writes
∂loss/∂logits for an upstream gradient of 1, so backward only rescales it, on the device and only
when the upstream gradient is not 1. For 'none' the upstream gradient is a per-row tensor that
is usually not 1: backward recomputes the gradient from the logits in one fused pass, which moves
fewer bytes than writing a gradient in forward and rescaling it. With inplace_backward=True the
gradient is written over the logits in forward (marked dirty), for every reduction.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .ops import LossSpec


def _forward_op(logits, target, weight, spec: LossSpec, *, compute_grad: bool, validate: bool):
    if torch.compiler.is_compiling():
        loss_rows, lse, grad, divisors = torch.ops.fastce.cross_entropy_forward(
            logits, target, weight, *spec, compute_grad, validate)
        return loss_rows, lse, grad if compute_grad else None, divisors
    return ops.forward(logits, target, weight, spec, compute_grad=compute_grad, inplace=False, validate=validate)


def _forward_inplace_op(logits, target, weight, spec: LossSpec, *, validate: bool):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.cross_entropy_forward_inplace(logits, target, weight, *spec, validate)
    loss_rows, lse, _, divisors = ops.forward(logits, target, weight, spec, compute_grad=True, inplace=True,
                                              validate=validate)
    return loss_rows, lse, divisors


def _recompute_grad_op(logits, target, weight, spec: LossSpec, divisors, grad_output):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.cross_entropy_recompute_grad(logits, target, weight, divisors, grad_output, *spec)
    return ops.recompute_gradient(logits, target, weight, spec, divisors, grad_output)


def _scale_grad_op(grad, grad_output):
    if torch.compiler.is_compiling():
        torch.ops.fastce.cross_entropy_scale_grad_(grad, grad_output)
    else:
        ops.launch_scale_gradient(grad, grad_output)


def reduce_rows(loss_rows: Tensor, reduction: str, row_shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """The loss from the kernel's per-row values (already divided by the mean's divisors)."""
    if reduction == "none":
        return loss_rows.reshape(row_shape).to(dtype)
    if reduction == "mean" and loss_rows.numel() == 0:
        return loss_rows.new_full((), float("nan"), dtype=dtype)  # 0/0, as torch
    return loss_rows.sum().to(dtype)


def row_shape(logits: Tensor) -> torch.Size:
    return torch.Size(()) if logits.dim() == 1 else logits.shape[:1] + logits.shape[2:]


def forward_no_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec,
                    validate: bool) -> tuple[Tensor, Tensor]:
    """(loss, lse) when no gradient is needed: one read of the logits, no gradient buffer."""
    loss_rows, lse, _, _ = _forward_op(logits, target, weight, spec, compute_grad=False, validate=validate)
    shape = row_shape(logits)
    return reduce_rows(loss_rows, spec.reduction, shape, logits.dtype), lse.reshape(shape)


# target, weight, spec, inplace_backward, validate, return_lse get no gradient
_NO_GRADS = (None,) * 6


class CrossEntropyFunction(torch.autograd.Function):
    """apply(logits, target, weight=None, spec=LossSpec(), inplace_backward=False, validate=True,
    return_lse=False) -> loss, or (loss, lse) with return_lse.

    `spec` (fastce.ops.LossSpec) carries ignore_index, reduction, label_smoothing, z_loss,
    softcap and the focal options. With inplace_backward the logits are written over by their
    gradient and marked dirty; autograd then also receives them as the last output.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                spec: Optional[LossSpec] = None, inplace_backward: bool = False, validate: bool = True,
                return_lse: bool = False):
        spec = LossSpec() if spec is None else spec
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.inplace = inplace_backward
        ctx.grad_handed_out = False
        if inplace_backward:
            loss_rows, lse, divisors = _forward_inplace_op(logits, target, weight, spec, validate=validate)
            ctx.mark_dirty(logits)
            ctx.save_for_backward(logits, target, weight, divisors)
        else:
            # A compiled graph recomputes in backward instead: it may not mutate a saved buffer.
            grad_in_forward = spec.reduction != "none" and not torch.compiler.is_compiling()
            loss_rows, lse, grad, divisors = _forward_op(logits, target, weight, spec,
                                                         compute_grad=grad_in_forward, validate=validate)
            ctx.grad_in_forward = grad_in_forward
            ctx.save_for_backward(logits, target, weight, divisors, grad)
        shape = row_shape(logits)
        outputs = [reduce_rows(loss_rows, spec.reduction, shape, logits.dtype)]
        if return_lse:
            outputs.append(lse.reshape(shape))
            ctx.mark_non_differentiable(outputs[-1])
        if inplace_backward:
            outputs.append(logits)  # autograd requires a dirty input to be returned
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_grads):
        if grad_loss is None:
            return None, *_NO_GRADS
        if ctx.inplace:
            grad, *_ = ctx.saved_tensors
            if ctx.grad_handed_out:
                raise RuntimeError(
                    "fastce: backward through cross_entropy(..., inplace_backward=True) a second time: the "
                    "logits' storage already holds their gradient and was handed out by the first backward. "
                    "Use inplace_backward=False to backward through the same graph more than once.")
            ctx.grad_handed_out = True
            _scale_grad_op(grad, grad_loss)
            return grad, *_NO_GRADS
        logits, target, weight, divisors, grad = ctx.saved_tensors
        if ctx.grad_in_forward and not ctx.grad_handed_out:
            # First backward: scale the forward's gradient in place (a no-op when grad_loss == 1)
            # and hand the buffer out; a later backward through a retained graph recomputes.
            ctx.grad_handed_out = True
            _scale_grad_op(grad, grad_loss)
            return grad, *_NO_GRADS
        return _recompute_grad_op(logits, target, weight, ctx.spec, divisors, grad_loss), *_NO_GRADS

"""torch.autograd.Function behind fastce.cross_entropy and fastce.focal_loss.

Gradient strategy (DESIGN §6, and the design note in fastce/ops.py): for 'mean' and 'sum' the
forward kernel already writes ∂loss/∂logits for an upstream gradient of 1, and backward hands it
out, rewriting it from the logits on the device only where the upstream gradient is not 1 or the
returned lse has a gradient too. For 'none' the upstream gradient is a per-row tensor that is
usually not 1: backward computes the gradient from the logits in one fused pass. Eager mode and
torch.compile take the same path (compiled, through the custom ops of fastce/ops.py).

With inplace_backward=True the gradient is written over the logits in forward, for every
reduction, by two Functions: one overwrites the logits and marks them dirty (it returns only
them, which autograd requires when the logits are a view, as `(h @ W).view(-1, V)` is), the next
turns the loss rows into the loss and hands the overwritten logits out as the gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops
from .ops import LossSpec
from .reference import loss_dtype, row_shape


def _forward_op(logits, target, weight, spec: LossSpec, *, keep_gradient: bool, validate: bool):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.cross_entropy_forward(logits, target, weight, *spec, keep_gradient, validate)
    return ops.forward(logits, target, weight, spec, keep_gradient=keep_gradient, validate=validate)


def _forward_inplace_op(logits, loss_rows, lse, divisors, target, weight, spec: LossSpec, *, validate: bool):
    if torch.compiler.is_compiling():
        torch.ops.fastce.cross_entropy_forward_inplace_(logits, loss_rows, lse, divisors, target, weight, *spec,
                                                       validate)
    else:
        ops.forward_inplace(logits, target, weight, spec, validate=validate, out=(loss_rows, lse, divisors))


def _backward_op(logits, target, weight, spec: LossSpec, divisors, grad_output, lse_grad):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.cross_entropy_backward(logits, target, weight, divisors, grad_output, lse_grad,
                                                       *spec)
    return ops.backward(logits, target, weight, spec, divisors, grad_output, lse_grad)


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


def forward_no_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec,
                    validate: bool) -> tuple[Tensor, Tensor]:
    """(loss, lse) when no gradient is needed: one read of the logits, no gradient buffer."""
    loss_rows, lse, _ = _forward_op(logits, target, weight, spec, keep_gradient=False, validate=validate)
    shape = row_shape(logits)
    return reduce_rows(loss_rows, spec.reduction, shape, loss_dtype(logits, target)), lse.reshape(shape)


# target, weight, spec, validate, return_lse get no gradient
_NO_GRADS = (None,) * 5


class CrossEntropyFunction(torch.autograd.Function):
    """apply(logits, target, weight=None, spec=LossSpec(), validate=True, return_lse=False)
    -> loss, or (loss, lse) with return_lse; both differentiable with respect to the logits.

    `spec` (fastce.ops.LossSpec) carries ignore_index, reduction, label_smoothing, z_loss,
    softcap and the focal options. (inplace_backward=True goes through `cross_entropy_inplace`.)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                spec: Optional[LossSpec] = None, validate: bool = True, return_lse: bool = False):
        spec = LossSpec() if spec is None else spec
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        loss_rows, lse, divisors = _forward_op(logits, target, weight, spec,
                                               keep_gradient=spec.reduction != "none", validate=validate)
        ctx.save_for_backward(logits, target, weight, divisors)
        shape = row_shape(logits)
        loss = reduce_rows(loss_rows, spec.reduction, shape, loss_dtype(logits, target))
        return (loss, lse.reshape(shape)) if return_lse else loss

    @staticmethod
    @once_differentiable  # the gradient is not itself differentiable: a clear error on double backward
    def backward(ctx, grad_loss, grad_lse=None):
        if grad_loss is None and grad_lse is None:
            return None, *_NO_GRADS
        logits, target, weight, divisors = ctx.saved_tensors
        return _backward_op(logits, target, weight, ctx.spec, divisors, grad_loss, grad_lse), *_NO_GRADS


class _OverwriteLogitsWithGradient(torch.autograd.Function):
    """logits ← ∂loss/∂logits for an upstream gradient of 1, in place; fills the loss-row buffers.

    Autograd-wise the identity: the gradient reaching the overwritten logits (from
    _LossFromOverwrittenLogits) is the logits' gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, spec, validate, loss_rows, lse, divisors):
        _forward_inplace_op(logits, loss_rows, lse, divisors, target, weight, spec, validate=validate)
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None, None, None


class _LossFromOverwrittenLogits(torch.autograd.Function):
    """The loss from the kernel's loss rows; its backward hands out the overwritten logits,
    scaled by the upstream gradient on the device."""

    @staticmethod
    def forward(ctx, gradient, loss_rows, reduction, shape, dtype):
        ctx.save_for_backward(gradient)
        ctx.grad_handed_out = False
        return reduce_rows(loss_rows, reduction, shape, dtype)

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
        _scale_grad_op(gradient, grad_loss)
        # a fresh alias that nothing else references, so a leaf's AccumulateGrad can take it
        # without a copy even while the caller still holds the (overwritten) logits
        return gradient.detach(), None, None, None, None


def cross_entropy_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec,
                          validate: bool) -> tuple[Tensor, Tensor]:
    """(loss, lse) with the gradient written over the logits (inplace_backward=True)."""
    n_rows = logits.numel() // ops.n_classes_of(logits)
    acc = ops.compute_dtype(logits.dtype)
    loss_rows = logits.new_empty(n_rows, dtype=acc)
    lse = logits.new_empty(n_rows, dtype=acc)
    divisors = logits.new_empty(3, dtype=acc)  # see ops.statistics
    gradient = _OverwriteLogitsWithGradient.apply(logits, target, weight, spec, validate, loss_rows, lse, divisors)
    shape = row_shape(logits)
    loss = _LossFromOverwrittenLogits.apply(gradient, loss_rows, spec.reduction, shape, loss_dtype(logits, target))
    return loss, lse.reshape(shape)

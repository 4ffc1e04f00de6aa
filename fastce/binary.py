"""The binary (sigmoid) losses on the Triton kernels: launchers, torch.library custom ops and the
autograd Function behind fastce.binary_cross_entropy_with_logits, soft_margin_loss and
sigmoid_focal_loss (DESIGN §7.1; kernels in fastce/kernels/binary.py).

This module holds the whole binary stack, as fastce/linear.py holds linear cross-entropy's: the
binary losses share no launcher, op or Function with the softmax family (their layout is
elementwise over any shape, not rows of classes), so they stay out of ops.py and autograd.py.

Layout rule: the dimensions are ordered as the outputs lie in memory (the outputs are allocated
like the input: with its strides when it is dense, else contiguous) and neighbours are merged
wherever every tensor allows, leaving at most MAX_DIMS; each tensor is then addressed with its
own strides. Broadcast weights, pos_weights and soft-margin targets are stride-0 views, never
materialised. Only a layout that still needs more than MAX_DIMS dimensions is copied.

Gradient strategy, as for cross-entropy (fastce/autograd.py): for 'mean' and 'sum' the forward
kernel writes ∂loss/∂input (and ∂loss/∂target when the target requires grad) for an upstream
gradient of 1, and backward rescales it in place on the device only when the upstream gradient
is not 1. For 'none', for a second backward through a retained graph, and under torch.compile
(a compiled graph may not mutate a saved buffer), backward recomputes the gradients in one pass.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from .kernels.binary import binary_loss_fwd_kernel, binary_scale_grad_kernel
from .ops import _triton_dtype
from .reference import binary_loss_dtype, compute_dtype

# Merged dimensions the kernel addresses: (N, C, H, W) inputs with a broadcast (C, 1, 1) weight or
# a target in another memory format need three; more than four after merging is copied.
MAX_DIMS = 4
# Elements per program: 8 per thread at 8 warps, one 16-byte load of a bf16 tensor per thread.
# Compiled for sm_90 (tools/sm90_compile_binary.py) every variant then fits in 126 registers
# without spilling (4096 spills in float64 and takes 211 registers with broadcast weights); the
# partial sums cost 4 bytes per 2048 elements, 0.1% of a bf16 input's bytes.
TILE = 2048
SCALE_BLOCK = 4096
# focal gamma values compiled as repeated products instead of exp2(gamma·log2 q)
INTEGER_GAMMAS = (0, 1, 2, 3, 4)

LOSS_KERNEL_IDS = {"bce": 0, "soft_margin": 1, "focal": 2}


class BinarySpec(NamedTuple):
    """The scalar options of one binary loss call."""
    loss: str                # "bce", "soft_margin" or "focal"
    reduction: str = "mean"
    alpha: float = -1.0      # focal: < 0 disables alpha
    gamma: float = 0.0       # focal exponent


def merged_layout(shape, strides, order):
    """(sizes, strides per tensor) over at most MAX_DIMS dimensions, or None.

    The dimensions of `shape` are sorted by `order` (strides of the outputs, outermost first) and
    neighbours are merged where every tensor's strides allow; size-1 dimensions are dropped and
    the result is padded in front with size-1 dimensions to exactly MAX_DIMS.
    """
    dims = sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: -order[d])
    sizes, merged = [], [[] for _ in strides]
    for d in dims:
        if sizes and all(m[-1] == st[d] * shape[d] for m, st in zip(merged, strides)):
            sizes[-1] *= shape[d]
            for m, st in zip(merged, strides):
                m[-1] = st[d]
        else:
            sizes.append(shape[d])
            for m, st in zip(merged, strides):
                m.append(st[d])
    if len(sizes) > MAX_DIMS:
        return None
    pad = MAX_DIMS - len(sizes)
    return [1] * pad + sizes, [tuple([0] * pad + m) for m in merged]


def _broadcast(t: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    return None if t is None else t.expand(shape)


def launch(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
           spec: BinarySpec, *, loss: Optional[Tensor] = None, grad_input: Optional[Tensor] = None,
           grad_target: Optional[Tensor] = None, grad_output: Optional[Tensor] = None,
           reduce: bool = False) -> Optional[Tensor]:
    """Run the fused kernel once over the input's elements.

    Writes the per-element loss into `loss`, the gradients into `grad_input` / `grad_target`
    (for the upstream `grad_output`: a scalar for 'mean'/'sum', input-shaped for 'none'; 1 when
    None) and, with reduce=True, returns one partial loss sum per program (already divided by
    the element count for 'mean'). Outputs must be allocated like the input (torch.empty_like).
    """
    shape = input.shape
    per_element_upstream = grad_output is not None and spec.reduction == "none"
    inputs = [input, _broadcast(target, shape), _broadcast(weight, shape), _broadcast(pos_weight, shape),
              _broadcast(grad_output, shape) if per_element_upstream else None]
    outputs = [loss, grad_input, grad_target]
    # memory order: that of the outputs allocated like the input (empty_like keeps the order of
    # the input's strides), or of the input itself when there are none
    order = next((out.stride() for out in outputs[:2] if out is not None), input.stride())
    layout = merged_layout(shape, [t.stride() for t in inputs + outputs if t is not None], order)
    staged = []  # (output, the stand-in the kernel writes instead)
    if layout is None:
        # more than MAX_DIMS dimensions even merged: the kernel runs on copies in the layout of
        # empty_like(input), where every tensor merges into one dimension
        inputs = [None if t is None else torch.empty_like(input, dtype=t.dtype).copy_(t) for t in inputs]
        order = inputs[0].stride()
        for i, out in enumerate(outputs):
            if out is not None and out.stride() != order:
                outputs[i] = torch.empty_like(input, dtype=out.dtype)
                staged.append((out, outputs[i]))
        loss, grad_input, grad_target = outputs
        layout = merged_layout(shape, [t.stride() for t in inputs + outputs if t is not None], order)
    sizes, merged = layout
    merged = iter(merged)
    strides = [next(merged) if t is not None else (0,) * MAX_DIMS for t in inputs + outputs]
    n_rows, n_cols = sizes[0] * sizes[1] * sizes[2], sizes[3]
    block = min(triton.next_power_of_2(n_cols), TILE)
    rows = max(1, min(TILE // block, triton.next_power_of_2(n_rows)))
    grid = triton.cdiv(n_rows, rows) * triton.cdiv(n_cols, block)
    partials = torch.empty(grid, dtype=compute_dtype(input.dtype), device=input.device) if reduce else None
    x, t, w, pw, go = inputs
    if grad_output is not None and not per_element_upstream:
        go = grad_output.reshape(())  # one value for every element
    gamma_int = int(spec.gamma) if spec.gamma in INTEGER_GAMMAS else -1
    binary_loss_fwd_kernel[(grid,)](
        x, t, w, pw, go, loss, partials, grad_input, grad_target, *strides,
        sizes[1], sizes[2], n_rows, n_cols, input.numel(), spec.alpha, spec.gamma,
        LOSS=LOSS_KERNEL_IDS[spec.loss], ROWS=rows, BLOCK_SIZE=block,
        HAS_WEIGHT=w is not None, HAS_POS_WEIGHT=pw is not None, HAS_ALPHA=spec.alpha >= 0,
        GAMMA_INT=gamma_int, STORE_LOSS=loss is not None, REDUCE=reduce, MEAN=spec.reduction == "mean",
        GRAD_INPUT=grad_input is not None, GRAD_TARGET=grad_target is not None,
        GRAD_OUTPUT=0 if grad_output is None else (2 if per_element_upstream else 1),
        COMPUTE_DTYPE=_triton_dtype(input.dtype), num_warps=8 if rows * block >= TILE else 4)
    for out, stand_in in staged:
        out.copy_(stand_in)
    return partials


def launch_scale_gradient(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output (a scalar) in place, on the device, and nothing at all when it is 1."""
    if grad.numel() == 0:
        return
    binary_scale_grad_kernel[(triton.cdiv(grad.numel(), SCALE_BLOCK),)](
        grad, grad_output.reshape(()), grad.numel(), BLOCK_SIZE=SCALE_BLOCK,
        COMPUTE_DTYPE=_triton_dtype(grad.dtype), num_warps=8)


# ---------------------------------------------------------------------------------------------
# Op bodies (shared by the eager path and the custom ops)


def forward(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
            spec: BinarySpec, *, grad_input: bool = False,
            grad_target: bool = False) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(loss, ∂loss/∂input, ∂loss/∂target); the gradients, for an upstream gradient of 1, only
    when asked for and the reduction is 'mean' or 'sum' (else None)."""
    out_dtype = binary_loss_dtype(spec.loss, input, target)
    if spec.reduction == "none":
        loss = torch.empty_like(input, dtype=out_dtype)
        if input.numel():
            launch(input, target, weight, pos_weight, spec, loss=loss)
        return loss, None, None
    fused_input = torch.empty_like(input) if grad_input else None
    fused_target = torch.empty_like(target) if grad_target else None
    if input.numel() == 0:
        empty_value = float("nan") if spec.reduction == "mean" else 0.0  # 0/0 for the mean, as torch
        return input.new_full((), empty_value, dtype=out_dtype), fused_input, fused_target
    partials = launch(input, target, weight, pos_weight, spec, grad_input=fused_input,
                      grad_target=fused_target, reduce=True)
    return partials.sum().to(out_dtype), fused_input, fused_target


def recompute_gradients(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                        grad_output: Tensor, spec: BinarySpec, *, grad_input: bool,
                        grad_target: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """∂loss/∂input and ∂loss/∂target (None where not asked for) for the upstream `grad_output`,
    from the input and target in one pass."""
    gradients = (torch.empty_like(input) if grad_input else None, torch.empty_like(target) if grad_target else None)
    if input.numel():
        launch(input, target, weight, pos_weight, spec, grad_input=gradients[0], grad_target=gradients[1],
               grad_output=grad_output)
    return gradients


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees. A compiled graph computes the loss in the
# forward op and both gradients in the backward op.


@torch.library.custom_op("fastce::binary_loss_forward", mutates_args=())
def binary_loss_forward_op(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                           loss: str, reduction: str, alpha: float, gamma: float) -> Tensor:
    return forward(input, target, weight, pos_weight, BinarySpec(loss, reduction, alpha, gamma))[0]


@binary_loss_forward_op.register_fake
def _(input, target, weight, pos_weight, loss, reduction, alpha, gamma):
    dtype = binary_loss_dtype(loss, input, target)
    return torch.empty_like(input, dtype=dtype) if reduction == "none" else input.new_empty((), dtype=dtype)


@torch.library.custom_op("fastce::binary_loss_backward", mutates_args=())
def binary_loss_backward_op(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                            grad_output: Tensor, loss: str, reduction: str, alpha: float, gamma: float,
                            grad_input: bool, grad_target: bool) -> tuple[Tensor, Tensor]:
    gradients = recompute_gradients(input, target, weight, pos_weight, grad_output,
                                    BinarySpec(loss, reduction, alpha, gamma), grad_input=grad_input,
                                    grad_target=grad_target)
    # a custom op returns tensors: an empty one stands for a gradient not asked for
    return tuple(g if g is not None else like.new_empty(0) for g, like in zip(gradients, (input, target)))


@binary_loss_backward_op.register_fake
def _(input, target, weight, pos_weight, grad_output, loss, reduction, alpha, gamma, grad_input, grad_target):
    return (torch.empty_like(input) if grad_input else input.new_empty(0),
            torch.empty_like(target) if grad_target else target.new_empty(0))


def _forward_op(input, target, weight, pos_weight, spec: BinarySpec, *, grad_input: bool, grad_target: bool):
    if torch.compiler.is_compiling():
        return torch.ops.fastce.binary_loss_forward(input, target, weight, pos_weight, *spec), None, None
    return forward(input, target, weight, pos_weight, spec, grad_input=grad_input, grad_target=grad_target)


def _recompute_op(input, target, weight, pos_weight, grad_output, spec: BinarySpec, *, grad_input: bool,
                  grad_target: bool):
    if torch.compiler.is_compiling():
        grads = torch.ops.fastce.binary_loss_backward(input, target, weight, pos_weight, grad_output, *spec,
                                                      grad_input, grad_target)
        return tuple(g if wanted else None for g, wanted in zip(grads, (grad_input, grad_target)))
    return recompute_gradients(input, target, weight, pos_weight, grad_output, spec, grad_input=grad_input,
                               grad_target=grad_target)


class BinaryLossFunction(torch.autograd.Function):
    """apply(input, target, weight, pos_weight, spec) -> loss, differentiable in input and target."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                spec: BinarySpec):
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.grad_handed_out = False
        ctx.grad_in_forward = spec.reduction != "none" and not torch.compiler.is_compiling()
        loss, grad_input, grad_target = _forward_op(
            input, target, weight, pos_weight, spec, grad_input=ctx.grad_in_forward and ctx.needs_input_grad[0],
            grad_target=ctx.grad_in_forward and ctx.needs_input_grad[1])
        ctx.save_for_backward(input, target, weight, pos_weight, grad_input, grad_target)
        return loss

    @staticmethod
    @once_differentiable  # the gradient is not itself differentiable: a clear error on double backward
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None, None, None, None
        input, target, weight, pos_weight, grad_input, grad_target = ctx.saved_tensors
        if ctx.grad_in_forward and not ctx.grad_handed_out:
            # First backward: scale the forward's gradients in place (nothing moves when grad_loss
            # is 1) and hand them out; a later backward through a retained graph recomputes.
            ctx.grad_handed_out = True
            for gradient in (grad_input, grad_target):
                if gradient is not None:
                    launch_scale_gradient(gradient, grad_loss)
            return grad_input, grad_target, None, None, None
        grad_input, grad_target = _recompute_op(input, target, weight, pos_weight, grad_loss, ctx.spec,
                                                grad_input=ctx.needs_input_grad[0],
                                                grad_target=ctx.needs_input_grad[1])
        return grad_input, grad_target, None, None, None


def run(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
        spec: BinarySpec) -> Tensor:
    """The loss from the Triton kernels, through autograd when a gradient is needed."""
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad):
        return BinaryLossFunction.apply(input, target, weight, pos_weight, spec)
    return _forward_op(input, target, weight, pos_weight, spec, grad_input=False, grad_target=False)[0]

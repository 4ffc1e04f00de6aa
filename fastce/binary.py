"""The binary (sigmoid) losses on fastce/kernels/binary.py: the launches, custom ops and autograd
Function behind fastce.binary_cross_entropy_with_logits, soft_margin_loss and sigmoid_focal_loss
(DESIGN §7.1).

Layout rule: the dimensions are ordered as the outputs lie in memory (the outputs are allocated like the
input: with its strides when it is dense, else contiguous) and neighbours are merged wherever every
tensor allows, leaving at most MAX_DIMS; each tensor is then addressed with its own strides. Broadcast
weights, pos_weights and soft-margin targets are stride-0 views, never materialised. Only a layout that
still needs more than MAX_DIMS dimensions is copied. Gradients: fastce/_launch.py's handoff, the same
eager and compiled ('none' computes them in the backward).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _launch
from ._core import BinarySpec, binary_loss_dtype, compute_dtype, once_differentiable
from ._launch import Launch, cdiv, keep_gradients, kernel_op, next_power_of_2, take_gradients, triton_dtype
from .kernels.binary import binary_loss_fwd_kernel

# Merged dimensions the kernel addresses: (N, C, H, W) inputs with a broadcast (C, 1, 1) weight or
# a target in another memory format need three; more than four after merging is copied.
MAX_DIMS = 4
# Elements per program: 8 per thread at 8 warps, one 16-byte load of a bf16 tensor per thread.
# Compiled for sm_90 (tools/sm90_compile_binary.py) every variant then fits in 126 registers
# without spilling (4096 spills in float64 and takes 211 registers with broadcast weights); the
# partial sums cost 4 bytes per 2048 elements, 0.1% of a bf16 input's bytes.
TILE = 2048
# focal gamma values compiled as repeated products instead of exp2(gamma·log2 q)
INTEGER_GAMMAS = (0, 1, 2, 3, 4)

LOSS_KERNEL_IDS = {"bce": 0, "soft_margin": 1, "focal": 2}
_TENSORS = ("input_ptr", "target_ptr", "weight_ptr", "pos_weight_ptr", "grad_output_ptr", "loss_ptr", "work_ptr",
            "grad_input_ptr", "grad_target_ptr")
_STRIDES = ("input_strides", "target_strides", "weight_strides", "pos_weight_strides", "grad_output_strides",
            "loss_strides", "grad_input_strides", "grad_target_strides")  # _Tensors' order


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


class _Tensors(NamedTuple):
    """The tensors of one launch, in the kernel's pointer order but for the workspace (None: not used)."""
    input: Tensor
    target: Tensor
    weight: Optional[Tensor]
    pos_weight: Optional[Tensor]
    grad_output: Optional[Tensor]  # one per element ('none'), or a 0-d scalar
    loss: Optional[Tensor]         # per element ('none') or the reduced 0-d loss
    grad_input: Optional[Tensor]
    grad_target: Optional[Tensor]


@functools.lru_cache(maxsize=1024)
def _launch_for(shape: tuple, strides: tuple, order: tuple, spec: BinarySpec, reduce: bool,
                grad_output: int, dtype: torch.dtype) -> Optional[Launch]:
    """The launch for tensors of these strides (None where absent), or None when their layout needs
    more than MAX_DIMS merged dimensions."""
    present = [st for st in strides if st is not None]
    layout = merged_layout(shape, present, order)
    if layout is None:
        return None
    sizes, merged = layout
    merged = iter(merged)
    by_name = {name: next(merged) if st is not None else (0,) * MAX_DIMS for name, st in zip(_STRIDES, strides)}
    n_rows, n_cols = sizes[0] * sizes[1] * sizes[2], sizes[3]
    block = min(next_power_of_2(n_cols), TILE)
    rows = max(1, min(TILE // block, next_power_of_2(n_rows)))
    grid = cdiv(n_rows, rows) * cdiv(n_cols, block)
    n_elements = 1
    for size in shape:
        n_elements *= size
    gamma_int = int(spec.gamma) if spec.gamma in INTEGER_GAMMAS else -1
    has = [st is not None for st in strides]
    return Launch(
        binary_loss_fwd_kernel, (grid,), _TENSORS, num_warps=8 if rows * block >= TILE else 4, **by_name,
        size1=sizes[1], size2=sizes[2], n_rows=n_rows, n_cols=n_cols, n_elements=n_elements, alpha=spec.alpha,
        gamma=spec.gamma, LOSS=LOSS_KERNEL_IDS[spec.loss], ROWS=rows, BLOCK_SIZE=block, HAS_WEIGHT=has[2],
        HAS_POS_WEIGHT=has[3], HAS_ALPHA=spec.alpha >= 0, GAMMA_INT=gamma_int, STORE_LOSS=has[5] and not reduce,
        REDUCE=reduce, MEAN=spec.reduction == "mean", GRAD_INPUT=has[6], GRAD_TARGET=has[7],
        GRAD_OUTPUT=grad_output, WIDE_OFFSETS=n_cols * max(1, *(abs(m[3]) for m in by_name.values())) >= 2**31,
        COMPUTE_DTYPE=triton_dtype(dtype))


def launch(tensors: _Tensors, spec: BinarySpec) -> Optional[Tensor]:
    """Run the fused kernel once over the input's elements: the loss into `loss` (per element for 'none',
    reduced into a 0-d tensor otherwise, through a workspace it returns), the gradients into
    `grad_input` / `grad_target` (for the upstream `grad_output`: input-shaped for 'none', a 0-d scalar
    otherwise; 1 when None). Outputs must be allocated like the input (torch.empty_like)."""
    input = tensors.input
    shape = input.shape
    per_element = tensors.grad_output is not None and spec.reduction == "none"
    expanded = tensors._replace(target=_broadcast(tensors.target, shape), weight=_broadcast(tensors.weight, shape),
                                pos_weight=_broadcast(tensors.pos_weight, shape),
                                grad_output=_broadcast(tensors.grad_output, shape) if per_element else None,
                                loss=tensors.loss if spec.reduction == "none" else None)
    # memory order: that of the outputs allocated like the input (empty_like keeps the order of the
    # input's strides), or of the input itself when there are none
    order = next((out.stride() for out in (expanded.loss, expanded.grad_input) if out is not None), input.stride())
    reduce = spec.reduction != "none" and tensors.loss is not None
    grad_output = 0 if tensors.grad_output is None else (2 if per_element else 1)
    strides = tuple(None if t is None else t.stride() for t in expanded)
    prepared = _launch_for(tuple(shape), strides, order, spec, reduce, grad_output, input.dtype)
    staged = []  # (output, the stand-in the kernel writes instead)
    if prepared is None:
        # more than MAX_DIMS dimensions even merged: the kernel runs on copies in the layout of
        # empty_like(input), where every tensor merges into one dimension
        def dense(t, output):
            if t is None or t.stride() == torch.empty_like(input).stride():
                return t
            copy = torch.empty_like(input, dtype=t.dtype)
            if output:
                staged.append((t, copy))
                return copy
            return copy.copy_(t)
        expanded = _Tensors(*(dense(t, name in ("loss", "grad_input", "grad_target"))
                              for name, t in zip(_Tensors._fields, expanded)))
        strides = tuple(None if t is None else t.stride() for t in expanded)
        prepared = _launch_for(tuple(shape), strides, expanded.input.stride(), spec, reduce, grad_output, input.dtype)
    placeholder = input
    pointers = list(expanded)
    work = None
    if reduce:
        # [a zeroed counter, one partial sum per program] (fastce/kernels/common.py's finish_loss)
        work = input.new_zeros(1 + prepared.grid[0], dtype=compute_dtype(input.dtype))
        pointers[5] = tensors.loss
    pointers.insert(6, work)
    if grad_output == 1:
        pointers[4] = tensors.grad_output.reshape(())
    prepared.run(*(placeholder if t is None else t for t in pointers))
    for out, stand_in in staged:
        out.copy_(stand_in)
    return work


# ---------------------------------------------------------------------------------------------
# Op bodies (eager, and the custom ops torch.compile traces)


def _forward_fake(input, target, weight, pos_weight, spec, keep_input_grad, keep_target_grad):
    dtype = binary_loss_dtype(spec.loss, input, target)
    loss = torch.empty_like(input, dtype=dtype) if spec.reduction == "none" else input.new_empty((), dtype=dtype)
    return loss, input.new_empty(0, dtype=compute_dtype(input.dtype))


@kernel_op("binary_loss_forward", _forward_fake)
def forward(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], spec: BinarySpec,
            keep_input_grad: bool, keep_target_grad: bool) -> tuple[Tensor, Tensor]:
    """(the loss, a carrier): with keep_*_grad ('mean' and 'sum'), the gradients for an upstream gradient
    of 1 are written in the same pass and kept with the carrier for the backward."""
    out_dtype = binary_loss_dtype(spec.loss, input, target)
    carrier = input.new_empty(0, dtype=compute_dtype(input.dtype))
    if spec.reduction == "none":
        loss = torch.empty_like(input, dtype=out_dtype)
        if input.numel():
            launch(_Tensors(input, target, weight, pos_weight, None, loss, None, None), spec)
        return loss, carrier
    grad_input = torch.empty_like(input) if keep_input_grad else None
    grad_target = torch.empty_like(target) if keep_target_grad else None
    if input.numel() == 0:
        loss = input.new_full((), float("nan") if spec.reduction == "mean" else 0.0, dtype=out_dtype)  # as torch
    else:
        loss = input.new_empty((), dtype=out_dtype)
        launch(_Tensors(input, target, weight, pos_weight, None, loss, grad_input, grad_target), spec)
    if keep_input_grad or keep_target_grad:
        keep_gradients(carrier, grad_input, grad_target)
    return loss, carrier


def _backward_fake(input, target, weight, pos_weight, carrier, grad_output, spec, input_grad, target_grad):
    return [torch.empty_like(input) if input_grad else input.new_empty(0),
            torch.empty_like(target) if target_grad else target.new_empty(0)]


@kernel_op("binary_loss_backward", _backward_fake)
def backward(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], carrier: Tensor,
             grad_output: Tensor, spec: BinarySpec, input_grad: bool, target_grad: bool) -> list[Tensor]:
    """[∂loss/∂input, ∂loss/∂target] (empty where not asked for) for the upstream `grad_output`: the
    forward's, rescaled in place, when it kept them; else computed from the inputs in one pass."""
    kept = take_gradients(carrier)
    if kept is not None:
        gradients = [g if g is None else _launch.scale_(g, grad_output) for g in kept]
    else:
        gradients = [torch.empty_like(input) if input_grad else None, torch.empty_like(target) if target_grad else None]
        if input.numel():
            launch(_Tensors(input, target, weight, pos_weight, grad_output, None, *gradients), spec)
    return [g if g is not None else like.new_empty(0) for g, like in zip(gradients, (input, target))]


class BinaryLossFunction(torch.autograd.Function):
    """apply(input, target, weight, pos_weight, spec) -> loss, differentiable in input and target."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                spec: BinarySpec):
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        in_forward = spec.reduction != "none"
        loss, carrier = forward(input, target, weight, pos_weight, spec, in_forward and ctx.needs_input_grad[0],
                                in_forward and ctx.needs_input_grad[1])
        ctx.save_for_backward(input, target, weight, pos_weight, carrier)
        return loss

    @staticmethod
    @once_differentiable  # the gradient is not itself differentiable: a clear error on double backward
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None, None, None, None
        grads = backward(*ctx.saved_tensors, grad_loss, ctx.spec, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:2])), None, None, None)


def run(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
        spec: BinarySpec) -> Tensor:
    """The loss from the Triton kernels, through autograd when a gradient is needed."""
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad):
        return BinaryLossFunction.apply(input, target, weight, pos_weight, spec)
    return forward(input, target, weight, pos_weight, spec, False, False)[0]

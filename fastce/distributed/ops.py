"""Launchers of the vocabulary-parallel kernels (fastce/kernels/vocab_parallel.py).

The per-rank steps of fastce.distributed on the Triton path; fastce/distributed/reference.py has
the same functions in pure PyTorch (the CPU path without Triton). Arguments are validated already;
`logits` is this rank's slice with the class dimension last, any leading shape (rows are addressed
with strides, as the fused kernel does); `weight` is the full (V,) vector in the compute dtype.
Nothing here communicates: fastce/distributed/autograd.py runs the all-reduces between the steps.
`token` (a TokenStatsSpec) turns a step into the token statistics' (fastce/distributed/spec.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _launch, softmax_losses
from .._core import LossSpec, TokenStatsSpec, compute_dtype, mergeable_stride
from .._launch import cdiv, triton_dtype
from ..kernels.vocab_parallel import (
    vocab_parallel_finish_kernel,
    vocab_parallel_grad_kernel,
    vocab_parallel_rescale_kernel,
    vocab_parallel_stats_kernel,
)
from .._validation import logits_placeholder
from .spec import has_entropy, inv_temperature, n_stats

# The per-row kernels (rescale, finish) touch a few values per row: one program per 1024 rows.
ROW_BLOCK = 1024


def n_rows_of(logits: Tensor) -> int:
    return logits.shape[:-1].numel()


def class_last_layout(t: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """(t, (inner_size, stride_outer, stride_inner, stride_class)) for a class-last tensor (…, C):
    row r sits at (r // inner_size)·outer + (r % inner_size)·inner. The leading dims merge into one
    stride, or into two (the first, and the rest: a DTensor's (N, d, C) view of (N, C, d) logits);
    any other layout is copied once."""
    for inner_size in (1, t.shape[1:-1].numel()):
        strides = _row_strides(t, inner_size)
        if strides is not None:
            return t, (inner_size, *strides)
    t = t.contiguous()
    return t, (1, t.shape[-1], 0, 1)


def _row_strides(t: Tensor, inner_size: int) -> Optional[tuple[int, int, int]]:
    """(stride_outer, stride_inner, stride_class) of t's rows for `inner_size` (1: every leading dim
    merged into the outer stride; else the first leading dim is outer, the others inner), or None."""
    lead_sizes, lead_strides = t.shape[:-1], t.stride()[:-1]
    stride_class = t.stride(-1) if t.dim() else 1
    if inner_size == 1:
        merged = mergeable_stride(lead_sizes, lead_strides)
        return None if merged is None else (merged, 0, stride_class)
    inner = mergeable_stride(lead_sizes[1:], lead_strides[1:])
    return None if inner is None else (lead_strides[0], inner, stride_class)


def statistics(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, vocab_start: int,
               token: Optional[TokenStatsSpec] = None) -> tuple[Tensor, Tensor]:
    """One read of the slice: (maxima (2, N): the local max per row twice, the first row to be
    all-reduced; stats (N·K + 1): the partial sums relative to the local max, one spare value)."""
    n_classes, n_rows = logits.shape[-1], n_rows_of(logits)
    prob_target = target.is_floating_point()
    acc = compute_dtype(logits.dtype)
    n_stat = n_stats(spec, prob_target, token)
    maxima = logits.new_empty((2, n_rows), dtype=acc)
    stats = logits.new_empty(n_rows * n_stat + 1, dtype=acc)
    if n_rows == 0:
        return maxima, stats
    logits, (inner_size, l_outer, l_inner, l_class) = class_last_layout(logits)
    if prob_target:
        target, (_, t_outer, t_inner, t_class) = class_last_layout(target)
    else:
        target, (t_outer, t_inner, t_class) = target.reshape(-1).contiguous(), (0, 0, 0)
    config = _launch.row_launch_config(n_rows, n_classes)
    _launch.launch(
        vocab_parallel_stats_kernel, (cdiv(n_rows, config.rows),),
        logits, target, weight, maxima, stats,
        l_outer, l_inner, l_class, t_outer, t_inner, t_class,
        n_rows, n_classes, inner_size, vocab_start,
        spec.ignore_index, spec.softcap if spec.softcap is not None else 1.0, inv_temperature(token),
        ROWS=config.rows, BLOCK_SIZE=config.block_size, N_STATS=n_stat, PROB_TARGET=prob_target,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=spec.label_smoothing > 0,
        HAS_SOFTCAP=spec.softcap is not None, HAS_TEMPERATURE=inv_temperature(token) != 1.0,
        HAS_ENTROPY=has_entropy(token),
        WIDE_OFFSETS=n_classes * max(abs(l_class), abs(t_class)) >= 2**31,
        COMPUTE_DTYPE=triton_dtype(logits.dtype), num_warps=config.num_warps)
    return maxima, stats


def rescale(stats: Tensor, maxima: Tensor, weight: Optional[Tensor], spec: LossSpec, prob_target: bool,
            vocab_start: int, n_classes: int, token: Optional[TokenStatsSpec] = None) -> None:
    """Moves the partial sums from the local max to the all-reduced one (maxima[0]), in place, and
    writes V_r into the spare value."""
    n_rows = maxima.shape[1]
    slice_mass = weight[vocab_start:vocab_start + n_classes].sum() if weight is not None else stats
    _launch.launch(
        vocab_parallel_rescale_kernel, (max(1, cdiv(n_rows, ROW_BLOCK)),),
        stats, maxima, slice_mass, n_rows, float(n_classes),
        BLOCK_ROWS=ROW_BLOCK, N_STATS=n_stats(spec, prob_target, token), PROB_TARGET=prob_target,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=spec.label_smoothing > 0, HAS_ENTROPY=has_entropy(token),
        COMPUTE_DTYPE=triton_dtype(stats.dtype))


def finish(stats: Tensor, maxima: Tensor, target: Tensor, weight: Optional[Tensor], divisors: Optional[Tensor],
           spec: LossSpec, token: Optional[TokenStatsSpec] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """From the summed statistics: (per-row loss divided by the mean's divisors, lse, row state
    (N, 3) = [log s, A, 1 − p_y] for the backward); with `token`, (log-probability, entropy or None,
    row state)."""
    n_rows = maxima.shape[1]
    prob_target = target.is_floating_point()
    loss_rows = stats.new_empty(n_rows)
    lse = stats.new_empty(n_rows)
    row_state = stats.new_empty((n_rows, 3))
    entropy = stats.new_empty(n_rows) if has_entropy(token) else None
    divisors = stats if divisors is None else divisors  # (read for 'mean' only)
    has_smoothing = spec.label_smoothing > 0
    weight_total = weight.sum() if weight is not None and has_smoothing else stats
    _launch.launch(
        vocab_parallel_finish_kernel, (max(1, cdiv(n_rows, ROW_BLOCK)),),
        stats, maxima, target.reshape(-1).contiguous() if not prob_target else stats, weight, divisors,
        weight_total, loss_rows, lse, row_state, lse if entropy is None else entropy,
        n_rows, weight.numel() if weight is not None else 0, spec.ignore_index, spec.label_smoothing, spec.z_loss,
        BLOCK_ROWS=ROW_BLOCK, N_STATS=n_stats(spec, prob_target, token), PROB_TARGET=prob_target,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=has_smoothing, HAS_Z_LOSS=spec.z_loss != 0,
        MEAN=spec.reduction == "mean", TOKEN_STATS=token is not None, HAS_ENTROPY=entropy is not None,
        COMPUTE_DTYPE=triton_dtype(stats.dtype))
    return (loss_rows, entropy, row_state) if token is not None else (loss_rows, lse, row_state)


def gradient(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, vocab_start: int,
             maxima: Tensor, row_state: Tensor, vocab_size: Tensor, divisors: Optional[Tensor],
             grad_output: Optional[Tensor] = None, out: Optional[Tensor] = None,
             token: Optional[TokenStatsSpec] = None, entropy: Optional[Tensor] = None,
             grad_entropy: Optional[Tensor] = None) -> Tensor:
    """∂loss/∂logits of this rank's slice for the upstream gradient `grad_output` (None: 1; a
    scalar; one value per row for 'none'), into `out` if given (which may be `logits` itself: each
    element is read before it is overwritten). One read of the slice, one write of the gradient.
    `vocab_size` is V as the summed statistics hold it (a 1-element device tensor). With `token`:
    the gradient of Σ_i grad_output_i·logprob_i + grad_entropy_i·H_i (each None: no term), `entropy`
    the forward's H."""
    grad = torch.empty_like(logits) if out is None else out
    n_classes, n_rows = logits.shape[-1], n_rows_of(logits)
    if grad.numel() == 0:
        return grad
    prob_target = target.is_floating_point()
    logits, (inner_size, l_outer, l_inner, l_class) = class_last_layout(logits)
    if prob_target:
        target, (_, t_outer, t_inner, t_class) = class_last_layout(target)
    else:
        target, (t_outer, t_inner, t_class) = target.reshape(-1).contiguous(), (0, 0, 0)
    g_outer, g_inner, g_class = _row_strides(grad, inner_size)  # empty_like: dense, any split works
    if grad_output is not None:
        grad_output = grad_output.reshape(-1).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.reshape(-1).contiguous()
    divisors = vocab_size if divisors is None else divisors  # (read for 'mean' only; a placeholder pointer)
    config = _launch.row_launch_config(n_rows, n_classes)
    _launch.launch(
        vocab_parallel_grad_kernel, (cdiv(n_rows, config.rows),),
        logits, target, weight, maxima, row_state, vocab_size, divisors,
        grad_output if grad_output is not None else divisors, divisors if entropy is None else entropy,
        divisors if grad_entropy is None else grad_entropy, grad,
        l_outer, l_inner, l_class, t_outer, t_inner, t_class, g_outer, g_inner, g_class,
        n_rows, n_classes, inner_size, vocab_start, weight.numel() if weight is not None else 0,
        spec.ignore_index, spec.label_smoothing, spec.z_loss, spec.softcap if spec.softcap is not None else 1.0,
        inv_temperature(token),
        ROWS=config.rows, BLOCK_SIZE=config.block_size, PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=spec.label_smoothing > 0, HAS_Z_LOSS=spec.z_loss != 0, HAS_SOFTCAP=spec.softcap is not None,
        MEAN=spec.reduction == "mean",
        GRAD_OUTPUT=0 if grad_output is None else (2 if spec.reduction == "none" else 1),
        TOKEN_STATS=token is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        HAS_TEMPERATURE=inv_temperature(token) != 1.0,
        WIDE_OFFSETS=n_classes * max(abs(l_class), abs(t_class), abs(g_class)) >= 2**31,
        COMPUTE_DTYPE=triton_dtype(logits.dtype), num_warps=config.num_warps)
    return grad


def mean_divisors(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec,
                  vocab_size: Optional[int]) -> Tensor:
    """Device tensor [Σ_valid w_y, #valid rows] (the row count for probability targets), from the
    targets every rank holds: no communication. `vocab_size` None: V is not known on the host
    (uneven slices, no weight, no validation); an out-of-range class then makes its row NaN in the
    finish kernel instead."""
    placeholder = logits_placeholder(logits, n_rows_of(logits), vocab_size or 2**31 - 1)
    return softmax_losses.statistics(placeholder, target, weight, LossSpec(ignore_index=spec.ignore_index), "none")


def scale_gradient(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output (a scalar) in place, on the device; nothing moves where it is 1."""
    _launch.scale_(grad, grad_output)

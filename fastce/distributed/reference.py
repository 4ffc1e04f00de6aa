"""The per-rank steps of fastce.distributed in pure PyTorch: the CPU path where the Triton kernels
cannot run (no Triton, or CPU tensors without TRITON_INTERPRET=1).

Same functions, arguments and results as fastce/distributed/ops.py, whose kernels' docstring
(fastce/kernels/vocab_parallel.py) defines the statistics. Written for clarity, not bytes: each step
reads the slice as often as it likes. The semantics every rank must reproduce are fastce.reference's
on the concatenated logits, which the tests hold both paths to.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._core import LossSpec, TokenStatsSpec
from .spec import has_entropy, inv_temperature, n_stats
from ..reference import compute_dtype, softcap_logits


def _rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    # (N, V_r), also for a slice without classes (where reshape(-1, 0) cannot tell N)
    return t.reshape(t.shape[:-1].numel(), t.shape[-1]).to(dtype)


def _logits(logits: Tensor, spec: LossSpec, token: Optional[TokenStatsSpec]) -> Tensor:
    # x' (soft-capped), or z = x / T for the token statistics, in the compute dtype
    x = softcap_logits(_rows(logits, compute_dtype(logits.dtype)), spec.softcap)
    return x if token is None else x * inv_temperature(token)


def _hard_target(target: Tensor, n_rows: int, spec: LossSpec, vocab_size: Tensor):
    y = target.reshape(n_rows).long()
    valid = y != spec.ignore_index
    bad = valid & ((y < 0) | (y >= vocab_size))
    return y, valid & ~bad, bad


def _slice_weights(weight: Optional[Tensor], vocab_start: int, n_classes: int, like: Tensor) -> Tensor:
    if weight is None:
        return like.new_ones(n_classes)
    return weight[vocab_start:vocab_start + n_classes].to(like.dtype)


def statistics(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, vocab_start: int,
               token: Optional[TokenStatsSpec] = None) -> tuple[Tensor, Tensor]:
    acc = compute_dtype(logits.dtype)
    n_classes = logits.shape[-1]
    x = _logits(logits, spec, token)
    n_rows = x.shape[0]
    prob_target = target.is_floating_point()
    if prob_target:
        valid = torch.ones(n_rows, dtype=torch.bool, device=x.device)
        is_target = torch.zeros_like(x, dtype=torch.bool)
    else:
        y = target.reshape(n_rows).long()
        valid = y != spec.ignore_index
        is_target = torch.arange(n_classes, device=x.device) == (y - vocab_start)[:, None]
    x = torch.where(valid[:, None], x, float("-inf"))  # ignored rows contribute nothing
    local_max = x.amax(1) if n_classes else x.new_full((n_rows,), float("-inf"))
    ref = torch.where(local_max == float("-inf"), 0.0, local_max)
    shifted = x - ref[:, None]
    columns = [torch.where(is_target, 0.0, shifted.exp()).sum(1)]
    w = _slice_weights(weight, vocab_start, n_classes, x)
    if prob_target:
        factor = w * _rows(target, acc)
        columns += [torch.where(factor != 0, factor * shifted, 0.0).sum(1), factor.sum(1)]
    else:
        columns.append(torch.where(is_target, x, 0.0).sum(1))
    if spec.label_smoothing > 0:
        factor = torch.where(valid[:, None], w, 0.0)
        columns.append(torch.where(factor != 0, factor * shifted, 0.0).sum(1))
    if has_entropy(token):  # E = Σ_{c≠y} e^(z − ref)(z − ref), 0·log 0 = 0
        e = torch.where(is_target, 0.0, shifted.exp())
        columns.append(torch.where(e > 0, e * shifted, 0.0).sum(1))
    stats = torch.cat([torch.stack(columns, 1).reshape(-1), x.new_zeros(1)])
    return torch.stack([local_max, local_max]), stats


def rescale(stats: Tensor, maxima: Tensor, weight: Optional[Tensor], spec: LossSpec, prob_target: bool,
            vocab_start: int, n_classes: int, token: Optional[TokenStatsSpec] = None) -> None:
    n_rows = maxima.shape[1]
    table = stats[:-1].view(n_rows, n_stats(spec, prob_target, token))
    global_max, local_max = maxima
    ref = torch.where(global_max == float("-inf"), 0.0, global_max)
    shift = torch.where(local_max == float("-inf"), 0.0, local_max) - ref
    factor = (local_max - ref).exp()
    if has_entropy(token):
        table[:, -1] = factor * (table[:, -1] + shift * table[:, 0])
    table[:, 0] *= factor
    if prob_target:
        table[:, 1] += shift * table[:, 2]
    if spec.label_smoothing > 0:
        table[:, -1] += shift * _slice_weights(weight, vocab_start, n_classes, stats).sum()
    stats[-1] = n_classes


def finish(stats: Tensor, maxima: Tensor, target: Tensor, weight: Optional[Tensor], divisors: Optional[Tensor],
           spec: LossSpec, token: Optional[TokenStatsSpec] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
    n_rows = maxima.shape[1]
    prob_target = target.is_floating_point()
    table = stats[:-1].view(n_rows, n_stats(spec, prob_target, token))
    vocab_size = stats[-1]
    eps = spec.label_smoothing
    ref = torch.where(maxima[0] == float("-inf"), 0.0, maxima[0])
    if prob_target:
        valid = torch.ones(n_rows, dtype=torch.bool, device=stats.device)
        bad = ~valid
        log_s = table[:, 0].log()
        target_miss = torch.zeros_like(log_s)
        mass, weighted_sum = (1 - eps) * table[:, 2], (1 - eps) * table[:, 1]
    else:
        y, valid, bad = _hard_target(target, n_rows, spec, vocab_size)
        w_y = weight.to(stats.dtype)[torch.where(valid, y, 0)] if weight is not None else stats.new_ones(n_rows)
        w_y = torch.where(valid, w_y, 0.0)
        target_shift = table[:, 1] - ref
        s_all = table[:, 0] + target_shift.exp()
        log_s, target_miss = s_all.log(), table[:, 0] / s_all
        mass = (1 - eps) * w_y
        weighted_sum = mass * target_shift
    if eps > 0:
        weight_total = weight.to(stats.dtype).sum() if weight is not None else vocab_size
        mass = mass + eps / vocab_size * weight_total
        weighted_sum = weighted_sum + eps / vocab_size * table[:, -1]
    loss = torch.where(valid, mass * log_s - weighted_sum, 0.0)
    lse = ref + log_s
    if spec.reduction == "mean":
        loss = loss / divisors[0]
    if spec.z_loss:
        z = torch.where(valid, spec.z_loss * lse * lse, 0.0)
        loss = loss + (z / divisors[1] if spec.reduction == "mean" else z)
    loss = torch.where(bad, float("nan"), loss)
    state = torch.where(valid[:, None], torch.stack([log_s, mass, target_miss], 1), 0.0)
    if token is None:
        return loss, torch.where(valid, lse, 0.0), state
    logprob = torch.where(bad, float("nan"), torch.where(valid, target_shift - log_s, 0.0))
    entropy = None
    if has_entropy(token):  # H = log s − (E + e^(Y − REF)(Y − REF)) / s
        e_target = target_shift.exp()
        shifted_sum = table[:, -1] + torch.where(e_target > 0, e_target * target_shift, 0.0)
        entropy = torch.where(bad, float("nan"), torch.where(valid, log_s - shifted_sum / s_all, 0.0))
    return logprob, entropy, state


def gradient(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, vocab_start: int,
             maxima: Tensor, row_state: Tensor, vocab_size: Tensor, divisors: Optional[Tensor],
             grad_output: Optional[Tensor] = None, out: Optional[Tensor] = None,
             token: Optional[TokenStatsSpec] = None, entropy: Optional[Tensor] = None,
             grad_entropy: Optional[Tensor] = None) -> Tensor:
    acc = compute_dtype(logits.dtype)
    n_classes = logits.shape[-1]
    x = _logits(logits, spec, token)
    n_rows = x.shape[0]
    prob_target = target.is_floating_point()
    vocab_size = vocab_size[0]
    eps = spec.label_smoothing
    ref = torch.where(maxima[0] == float("-inf"), 0.0, maxima[0])
    log_s, mass, target_miss = row_state.unbind(1)
    log_p = (x - ref[:, None]) - log_s[:, None]
    p = log_p.exp()
    w = _slice_weights(weight, vocab_start, n_classes, x)
    if token is not None:
        # fastce/kernels/token_stats.py's token_gradient: (1/T)[a (δ_jy − p_j) − b p_j (log p_j + H)]
        y, valid, bad = _hard_target(target, n_rows, spec, vocab_size)
        is_target = (torch.arange(n_classes, device=x.device) + vocab_start) == y[:, None]
        grad = torch.zeros_like(x)
        if grad_output is not None:
            a = grad_output.reshape(-1).to(acc)[:, None]
            grad = grad + torch.where(is_target, target_miss[:, None], -p) * a
        if grad_entropy is not None:
            b = grad_entropy.reshape(-1).to(acc)[:, None]
            grad = grad - torch.where(p > 0, p * (log_p + entropy[:, None]), 0.0) * b
        grad = grad * inv_temperature(token)
    elif prob_target:
        valid = torch.ones(n_rows, dtype=torch.bool, device=x.device)
        bad = ~valid
        a = w * (1 - eps) * _rows(target, acc)
        grad = p * mass[:, None] - a
    else:
        y, valid, bad = _hard_target(target, n_rows, spec, vocab_size)
        w_y = weight.to(acc)[torch.where(valid, y, 0)] if weight is not None else x.new_ones(n_rows)
        is_target = (torch.arange(n_classes, device=x.device) + vocab_start) == y[:, None]
        a = torch.where(is_target, (1 - eps) * w_y[:, None], 0.0)
        a = a + (eps / vocab_size * w if eps > 0 else 0.0)
        # at the target, A·p − a = (A − a)·p − a·(1 − p_y), 1 − p_y from the forward (exact)
        grad = torch.where(is_target, (mass[:, None] - a) * p - a * target_miss[:, None], p * mass[:, None] - a)
    if eps > 0 and prob_target:
        grad = grad - eps / vocab_size * w
    lse = ref + log_s
    if spec.reduction == "mean":
        grad = grad / divisors[0]
    if spec.z_loss:
        z_scale = 1 / divisors[1] if spec.reduction == "mean" else 1.0
        grad = grad + (2 * spec.z_loss * lse * z_scale)[:, None] * p
    if grad_output is not None and token is None:
        upstream = grad_output.reshape(-1).to(acc)
        grad = grad * (upstream[:, None] if spec.reduction == "none" else upstream)
    if spec.softcap is not None:
        grad = grad * (1 - (x / spec.softcap) ** 2)
    grad = torch.where(valid[:, None], grad, 0.0)
    grad = torch.where(bad[:, None], float("nan"), grad).reshape(logits.shape).to(logits.dtype)
    if out is None:
        return grad
    return out.copy_(grad)


def mean_divisors(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec,
                  vocab_size: Optional[int]) -> Tensor:
    acc = compute_dtype(logits.dtype)
    n_rows = logits.shape[:-1].numel()
    if target.is_floating_point():
        return torch.full((2,), float(n_rows), dtype=acc, device=logits.device)
    y = target.reshape(-1).long()
    valid = y != spec.ignore_index
    if weight is None:
        w_y = valid.to(acc)
    else:
        readable = valid & (y >= 0) & (y < weight.numel())
        w_y = torch.where(readable, weight.to(acc)[torch.where(readable, y, 0)], 0.0)
    return torch.stack([w_y.sum(), valid.sum().to(acc)])


def scale_gradient(grad: Tensor, grad_output: Tensor) -> None:
    grad.mul_(grad_output.to(grad.dtype))

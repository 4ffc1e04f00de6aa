"""Pure-PyTorch implementations of every fastce loss.

This is the one reference implementation of the project. It serves three roles:

* the CPU path when Triton cannot run (no Triton installed, or CPU tensors without
  ``TRITON_INTERPRET=1``),
* the test oracle (tests call it on float64 copies of their inputs),
* the PyTorch-eager baseline of the benchmark suite.

The functions here assume arguments that ``fastce.functional`` has already validated;
they are differentiable through ordinary autograd. Semantics are those of
``../shared/DESIGN.md`` section 2, written as directly as possible.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ._core import binary_loss_dtype, compute_dtype, loss_dtype as default_loss_dtype, row_shape

def class_last_rows(t: Tensor) -> Tensor:
    """(C) -> (1, C); (N, C) -> (N, C); (N, C, d1, ..., dk) -> (N*d1*...*dk, C)."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def softcap_logits(x: Tensor, softcap: Optional[float]) -> Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _row_targets(x: Tensor, target: Tensor, ignore_index: int, label_smoothing: float):
    """Return (q, valid, in_range, y): the smoothed target distribution (R, C) for hard or
    probability targets, the non-ignored rows, the rows whose hard target is a class, and the
    clamped class index (None for probability targets)."""
    n_rows, n_classes = x.shape
    eps = label_smoothing
    if target.is_floating_point():
        q = (1.0 - eps) * class_last_rows(target).to(x.dtype) + eps / n_classes
        ones = torch.ones(n_rows, dtype=torch.bool, device=x.device)
        return q, ones, ones, None
    y = target.reshape(-1).long()
    valid = y != ignore_index
    in_range = (y >= 0) & (y < n_classes)
    y_safe = torch.where(valid & in_range, y, torch.zeros_like(y))
    onehot = (y_safe[:, None] == torch.arange(n_classes, device=x.device)).to(x.dtype)  # also on meta tensors
    q = (1.0 - eps) * onehot + eps / n_classes
    return q, valid, in_range, y_safe


def _per_row_losses(input, target, class_factor, ignore_index, label_smoothing, softcap, gamma):
    """Per-row loss before reduction, plus what the reductions need.

    class_factor: per-class weight w (cross-entropy) or alpha (focal), or None.
    Returns (loss_rows, lse, valid, in_range, y_safe) in the compute dtype.
    """
    x = softcap_logits(class_last_rows(input).to(compute_dtype(default_loss_dtype(input, target))), softcap)
    lse = torch.logsumexp(x, dim=-1)
    # as torch: (x − max) − log Σ exp(x − max); x − lse would inherit lse's rounding, which at
    # logits of 1e4 is as large as the loss of a confident row
    logp = torch.log_softmax(x, dim=-1)
    q, valid, in_range, y_safe = _row_targets(x, target, ignore_index, label_smoothing)
    a = q if class_factor is None else q * class_factor.to(x.dtype)
    if gamma == 0.0:
        if y_safe is not None and label_smoothing == 0.0:
            # nll only: pick the target's log-probability so -inf elsewhere stays harmless.
            loss = -(a.gather(1, y_safe[:, None]) * logp.gather(1, y_safe[:, None])).squeeze(1)
        else:
            loss = -(a * logp).sum(-1)
    else:
        term = a * (-torch.expm1(logp)).pow(gamma) * logp  # 1 − p without cancellation as p → 1
        # a class with no target mass adds nothing, even where its logit is -inf
        loss = -torch.where(a == 0, torch.zeros_like(term), term).sum(-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    loss = torch.where(valid & ~in_range, torch.full_like(loss, float("nan")), loss)
    return loss, lse, valid, in_range, y_safe


def _reduce(loss_rows, divisor, z_rows, valid, reduction, shape, out_dtype):
    if reduction == "none":
        total = loss_rows if z_rows is None else loss_rows + z_rows
        return total.reshape(shape).to(out_dtype)
    if reduction == "sum":
        total = loss_rows.sum() if z_rows is None else (loss_rows + z_rows).sum()
        return total.to(out_dtype)
    # a zero divisor gives NaN, as torch's 0/0, also where the smoothing term alone is positive;
    # the gradient is NaN then too, except at ignored rows
    total = loss_rows.sum() * torch.where(divisor == 0, torch.nan, 1 / divisor)
    if z_rows is not None:
        total = total + z_rows.sum() / valid.sum()
    return total.to(out_dtype)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, return_lse: bool = False, loss_dtype: Optional[torch.dtype] = None):
    """Cross-entropy with torch's semantics plus z-loss and logit soft-capping.

    With ``return_lse=True`` returns ``(loss, lse)`` where lse is the per-row fp32
    log-sum-exp of the (soft-capped) logits, shaped like the 'none' loss. ``loss_dtype``: the
    loss's dtype (default: torch's, the input's).
    """
    loss_rows, lse, valid, in_range, y_safe = _per_row_losses(
        input, target, weight, ignore_index, label_smoothing, softcap, 0.0)
    if y_safe is None:  # probability targets: "mean" divides by the number of rows
        divisor = torch.tensor(float(loss_rows.numel()), dtype=loss_rows.dtype, device=loss_rows.device)
    elif weight is None:
        divisor = valid.sum().to(loss_rows.dtype)
    else:
        w_y = weight.to(loss_rows.dtype)[y_safe]
        divisor = torch.where(valid, w_y, torch.zeros_like(w_y)).sum()
    z_rows = None
    if z_loss:
        z_rows = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    loss = _reduce(loss_rows, divisor, z_rows, valid, reduction, row_shape(input),
                   loss_dtype or default_loss_dtype(input, target))
    if return_lse:
        lse = torch.where(valid, lse, torch.zeros_like(lse))
        return loss, lse.reshape(row_shape(input))
    return loss


def focal_loss(input: Tensor, target: Tensor, gamma: float = 2.0, alpha: Union[None, float, Tensor] = None,
               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Focal loss L_i = -sum_c alpha_c q_ic (1 - p_ic)^gamma log p_ic; "mean" over non-ignored rows."""
    if alpha is not None and not isinstance(alpha, Tensor):
        alpha = torch.full((input.shape[0 if input.dim() == 1 else 1],), float(alpha),
                           dtype=compute_dtype(input.dtype), device=input.device)
    loss_rows, _, valid, _, _ = _per_row_losses(
        input, target, alpha, ignore_index, label_smoothing, None, float(gamma))
    divisor = valid.sum().to(loss_rows.dtype)
    return _reduce(loss_rows, divisor, None, valid, reduction, row_shape(input), input.dtype)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    loss_dtype: Optional[torch.dtype] = None,
):
    """cross_entropy(linear(input, linear_weight, linear_bias)) with every logit materialised, for
    input (…, H) and linear_weight (C, H), or input (N, H) and linear_weight (C, d1, …, dk, H) (the
    K-dimensional loss over logits (N, C, d1, …, dk)); per-row outputs are shaped like the target's
    class indices."""
    n_classes, out_features, in_features = linear_weight.shape[0], linear_weight.shape[1:-1], input.shape[-1]
    n_rows = input.shape[:-1].numel()
    logits = torch.nn.functional.linear(input.reshape(n_rows, in_features),
                                        linear_weight.reshape(linear_weight.shape[:-1].numel(), in_features),
                                        None if linear_bias is None else linear_bias.reshape(-1))
    loss_shape = input.shape[:-1] + out_features
    logits = logits.reshape(n_rows, n_classes, *out_features)
    is_probabilities = target.shape == input.shape[:-1] + linear_weight.shape[:-1]
    rows_target = target.reshape(logits.shape) if is_probabilities else target.reshape(logits.shape[:1] + out_features)
    loss, lse = cross_entropy(logits, rows_target, weight, ignore_index, reduction, label_smoothing,
                              z_loss=z_loss, softcap=softcap, return_lse=True, loss_dtype=loss_dtype)
    if reduction == "none":
        loss = loss.reshape(loss_shape)
    return (loss, lse.reshape(loss_shape)) if return_lse else loss


# ---------------------------------------------------------------------------------------------
# Binary (sigmoid) losses, DESIGN §7.1: log σ(x) = logsigmoid(x) and log(1 − σ(x)) = logsigmoid(−x),
# the stable forms, whose autograd gradients are the stable σ(x) and σ(−x).


def _reduce_elements(loss: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return loss.to(dtype)
    return (loss.sum() if reduction == "sum" else loss.mean()).to(dtype)


def _binary_ce(x: Tensor, t: Tensor, pos_weight: Optional[Tensor]) -> Tensor:
    """−[pw·t·log σ(x) + (1 − t)·log(1 − σ(x))], elementwise."""
    positive = t if pos_weight is None else t * pos_weight.to(x.dtype)
    logsigmoid = torch.nn.functional.logsigmoid
    return -(positive * logsigmoid(x) + (1 - t) * logsigmoid(-x))


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                                     reduction: str = "mean", pos_weight: Optional[Tensor] = None) -> Tensor:
    """F.binary_cross_entropy_with_logits: weight and pos_weight broadcast to the input."""
    acc = compute_dtype(input.dtype)
    loss = _binary_ce(input.to(acc), target.to(acc), pos_weight)
    if weight is not None:
        loss = loss * weight.to(acc)
    return _reduce_elements(loss, reduction, binary_loss_dtype("bce", input, target))


def soft_margin_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """F.soft_margin_loss: log(1 + exp(−y·x)) = −log σ(y·x); the target broadcasts to the input."""
    acc = compute_dtype(input.dtype)
    loss = -torch.nn.functional.logsigmoid(input.to(acc) * target.to(acc))
    return _reduce_elements(loss, reduction, input.dtype)


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """torchvision.ops.sigmoid_focal_loss: ce·(1 − p_t)^γ, times α_t when alpha >= 0.

    1 − p_t is written as σ(x)(1 − t) + σ(−x)·t, exact as p_t → 1 (torchvision's 1 − p_t is 0
    there in fp32); the power's gradient is taken as its limit 0 where 1 − p_t = 0."""
    acc = compute_dtype(inputs.dtype)
    x, t = inputs.to(acc), targets.to(acc)
    loss = _binary_ce(x, t, None)
    if gamma != 0:
        q = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t
        positive = q > 0
        loss = loss * torch.where(positive, torch.where(positive, q, torch.ones_like(q)).pow(gamma),
                                  torch.zeros_like(q))
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return _reduce_elements(loss, reduction, binary_loss_dtype("focal", inputs, targets))


# Token statistics for RL and post-training (DESIGN §7.2)


def _token_rows(values: Tensor, valid: Tensor, in_range: Tensor) -> Tensor:
    """0 where the target is ignored, NaN where it is a class index outside [0, V)."""
    values = torch.where(valid, values, torch.zeros_like(values))
    return torch.where(valid & ~in_range, torch.full_like(values, float("nan")), values)


def token_logprobs(logits: Tensor, target: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False):
    """log softmax(logits / T)[target] and, with return_entropy, the entropy −Σ p log p of
    softmax(logits / T), for logits (…, V) (class dimension last) and class indices (…); fp32
    (fp64 for fp64 logits), 0 where target == ignore_index, NaN where it lies outside [0, V)."""
    x = logits.to(compute_dtype(logits.dtype)) / temperature
    log_p = torch.log_softmax(x, dim=-1)
    y = target.long()
    valid = y != ignore_index
    in_range = (y >= 0) & (y < logits.shape[-1])
    y_safe = torch.where(valid & in_range, y, torch.zeros_like(y))
    logprob = _token_rows(log_p.gather(-1, y_safe.unsqueeze(-1)).squeeze(-1), valid, in_range)
    if not return_entropy:
        return logprob
    p = log_p.exp()
    # 0·log 0 = 0: classes at −inf (a masked vocabulary) add nothing, and pass no NaN gradient back
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    return logprob, _token_rows(entropy, valid, in_range)


def linear_token_logprobs(hidden: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Optional[Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False):
    """token_logprobs(hidden @ linear_weight.T + linear_bias, target, …) with every logit materialised."""
    logits = torch.nn.functional.linear(hidden, linear_weight, linear_bias)
    return token_logprobs(logits, target, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


def policy_gradient_loss(logits: Tensor, target: Tensor, advantages: Tensor, *, entropy_coef: float = 0.0,
                         temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                         return_stats: bool = False):
    """The on-policy policy-gradient loss −(A·logprob + c·H) per token, from token_logprobs: 0 at
    ignored tokens; "mean" over the non-ignored tokens (NaN when there are none), "sum", or "none"
    (shaped like target). With return_stats, also (logprob, entropy), detached."""
    logprob, entropy = token_logprobs(logits, target, temperature=temperature, ignore_index=ignore_index,
                                      return_entropy=True)
    valid = target.long() != ignore_index  # compared in uint8, -100 would match the class index 156
    per_token = -(advantages.to(logprob.dtype) * logprob + entropy_coef * entropy)
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "mean":
        loss = per_token.sum() / valid.sum()
    else:
        loss = per_token.sum() if reduction == "sum" else per_token
    return (loss, logprob.detach(), entropy.detach()) if return_stats else loss


# Distillation (DESIGN §7.5): TRL's GKDTrainer.generalized_jsd_loss, class dimension last


def _scaled_logits(x: Tensor, logit_scale: float, softcap: Optional[float], temperature: float) -> Tensor:
    """softcap(scale · x) / T: scale first, then the cap, then the temperature (Gemma, Cohere, Granite)."""
    if logit_scale != 1.0:
        x = x * logit_scale
    return softcap_logits(x, softcap) / temperature


def _kl_elements(log_a: Tensor, log_b: Tensor) -> Tensor:
    """e^a (a − b) per element, 0 where e^a = 0; the unselected lanes hold stand-ins, so that autograd
    never multiplies 0 by an infinity (where() alone passes the other branch's NaN gradient back)."""
    live = log_a > float("-inf")
    a = torch.where(live, log_a, torch.zeros_like(log_a))
    b = torch.where(live, log_b, torch.zeros_like(log_b))
    return torch.where(live, a.exp() * (a - b), torch.zeros_like(a))


def _divergence(S: Tensor, Q: Tensor, beta: float) -> Tensor:
    """Per-token divergence from the log-softmaxes S (student) and Q (teacher), (…, K) -> (…)."""
    if beta == 0.0:
        return _kl_elements(Q, S).sum(-1)
    if beta == 1.0:
        return _kl_elements(S, Q).sum(-1)
    # M = log(β e^Q + (1−β) e^S) as a logsumexp; where both are −inf a stand-in 0 (the terms are 0 there)
    # keeps logsumexp's backward away from −inf − −inf
    dead = (S == float("-inf")) & (Q == float("-inf"))
    M = torch.logsumexp(torch.stack([torch.where(dead, 0.0, Q) + math.log(beta),
                                     torch.where(dead, 0.0, S) + math.log1p(-beta)]), dim=0)
    return (beta * _kl_elements(Q, M) + (1.0 - beta) * _kl_elements(S, M)).sum(-1)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                      beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                      reduction: str = "batchmean", num_classes: Optional[int] = None,
                      student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                      student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None) -> Tensor:
    """fastce.distillation_loss: S = log_softmax(student / T), Q = log_softmax(teacher / T) over the first
    num_classes classes (all by default); β = 0: KL(teacher ‖ student), β = 1: KL(student ‖ teacher), else
    β·KL(teacher ‖ M) + (1−β)·KL(student ‖ M) with M = log(β e^Q + (1−β) e^S). Tokens whose target is
    ignore_index count 0; "batchmean" divides by the kept tokens (all tokens without a target; NaN with
    a zero gradient when none is kept), "mean" by those × classes, "sum", "none" per token. Computed in
    float64 for a float64 input, else float32; the teacher is detached."""
    acc = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    K = student_logits.shape[-1] if num_classes is None else num_classes
    z = _scaled_logits(student_logits[..., :K].to(acc), student_logit_scale, student_softcap, temperature)
    u = _scaled_logits(teacher_logits[..., :K].detach().to(acc), teacher_logit_scale, teacher_softcap, temperature)
    loss = _divergence(torch.log_softmax(z, -1), torch.log_softmax(u, -1), beta)
    kept = torch.ones_like(loss, dtype=torch.bool) if target is None else target != ignore_index
    loss = torch.where(kept, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    count = kept.sum().to(acc) * (K if reduction == "mean" else 1)
    # 0/0 is NaN when nothing is kept, with an exact 0 gradient everywhere (the where() above)
    return total * torch.where(count == 0, torch.nan, 1.0 / count)


def linear_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                             teacher_weight: Tensor, target: Optional[Tensor] = None, *,
                             student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                             student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                             student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0, **options) -> Tensor:
    """distillation_loss of both heads' logits (hidden @ weight.T + bias), every logit materialised in the
    heads' dtype (as F.linear computes them)."""
    student_logits = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    teacher_logits = torch.nn.functional.linear(teacher_hidden.detach(), teacher_weight.detach(),
                                                None if teacher_bias is None else teacher_bias.detach())
    return distillation_loss(student_logits, teacher_logits, target, student_logit_scale=student_logit_scale,
                             teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                             teacher_softcap=teacher_softcap, **options)

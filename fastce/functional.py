"""Functional API: argument checks, dispatch between the Triton kernels and the reference.

Where code runs (DESIGN §3): CUDA tensors → Triton kernels; CPU tensors with TRITON_INTERPRET=1
→ the same kernels on Triton's interpreter; anything else (or no Triton) → fastce.reference.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch
from torch import Tensor

from . import reference
from ._validation import (
    VALIDATE_DEVICE,
    VALIDATE_SYNC,
    InvalidArgumentError,
    assert_target_range_on_device,
    check_advantages,
    check_binary,
    check_broadcastable,
    check_class_factor,
    check_ignore_index,
    check_input,
    check_label_smoothing,
    check_linear,
    check_no_gradient_wanted,
    check_reduction,
    check_target,
    check_target_range,
    check_token_logits,
    check_token_target,
    validation_mode,
)


_TRITON_IMPORTABLE: Optional[bool] = None


def _triton_importable() -> bool:
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            from . import ops  # noqa: F401  (imports triton and registers the custom ops)
            _TRITON_IMPORTABLE = True
        except ImportError:
            _TRITON_IMPORTABLE = False
    return _TRITON_IMPORTABLE


def uses_triton(input: Tensor) -> bool:
    """Whether a call on `input` runs the Triton kernels (else the pure-PyTorch reference)."""
    if input.device.type == "cuda":
        return _triton_importable()
    if input.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return _triton_importable()
    return False


def _kernel_layout(t: Tensor) -> Tensor:
    """The tensor itself when the kernels can address its rows with strides, else a copy.

    (N, C, d1, …, dk) is read in place (class dim strided) when d1…dk merge into one stride, as
    for contiguous and channels-last tensors; other layouts are copied once.
    """
    from .ops import mergeable_stride
    if t.dim() >= 3 and mergeable_stride(t.shape[2:], t.stride()[2:]) is None:
        return t.contiguous()
    return t


def _check_common(function, input, target, ignore_index, reduction, label_smoothing) -> tuple[int, int]:
    """(number of classes, ignore_index as an int) after the checks every loss shares."""
    ignore_index = check_ignore_index(ignore_index, function)
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    n_classes = check_input(input)
    check_target(input, target, ignore_index)
    return n_classes, ignore_index


def _check_not_differentiable(factor: Optional[Tensor], name: str) -> None:
    # torch's cross_entropy refuses a weight that requires grad rather than ignoring it
    if factor is not None and factor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"the derivative for '{name}' is not implemented: pass {name}.detach() "
                           f"(fastce, like torch.nn.functional.cross_entropy, does not train class {name}s)")


def _check_finite(name: str, value: float, minimum: float = -math.inf) -> None:
    if not (math.isfinite(value) and value >= minimum):
        raise InvalidArgumentError(f"{name} must be a finite number >= {minimum}, got {value}")


def _check_z_loss_softcap(z_loss: float, softcap: Optional[float]) -> None:
    _check_finite("z_loss", z_loss)
    if softcap is not None:
        _check_finite("softcap", softcap, 0.0)
        if softcap == 0:
            raise InvalidArgumentError("softcap must be positive (or None to disable soft-capping)")


def _runs_reference(input, target, n_classes: int, ignore_index: int, validate: str) -> bool:
    """Whether the call goes to fastce.reference (no Triton for this device, or a gradient into
    probability targets, which only the reference computes); if so, validates the class indices
    here (`validate`: a fastce._validation mode), as the kernels' launcher would."""
    if uses_triton(input) and not (target.requires_grad and torch.is_grad_enabled()):
        return False
    if not target.is_floating_point():
        if validate == VALIDATE_SYNC:
            check_target_range(target, n_classes, ignore_index)
        elif validate == VALIDATE_DEVICE:
            assert_target_range_on_device(target, n_classes, ignore_index)
    return True


def _is_dtensor(t) -> bool:
    # DTensors go to fastce.distributed (fastce/distributed/dtensor.py); plain tensors skip the import
    if type(t) in (Tensor, torch.nn.Parameter) or not isinstance(t, Tensor):
        return False
    from .distributed.dtensor import is_dtensor
    return is_dtensor(t)


def _cross_entropy_spec(ignore_index, reduction, label_smoothing, z_loss, softcap):
    from .ops import LossSpec
    return LossSpec(ignore_index, reduction, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap))


def _run(input, target, class_factor, spec, *, inplace_backward: bool, validate: str):
    """(loss, lse) from the Triton kernels, through autograd when a gradient is needed."""
    from .autograd import CrossEntropyFunction, cross_entropy_inplace, forward_no_grad

    input = _kernel_layout(input)
    if target.is_floating_point():
        target = _kernel_layout(target)
        # torch promotes input and probabilities together: with float64 probabilities the loss
        # is float64, hence computed in float64 (the rare mixed case pays a copy of the logits)
        promoted = reference.loss_dtype(input, target)
        if reference.compute_dtype(promoted) != reference.compute_dtype(input.dtype):
            input = input.to(promoted)
    if class_factor is not None:
        class_factor = class_factor.to(reference.compute_dtype(input.dtype)).contiguous()
    if not (torch.is_grad_enabled() and input.requires_grad):
        return forward_no_grad(input, target, class_factor, spec, validate)
    if inplace_backward and input.is_leaf:
        raise RuntimeError(
            "fastce: inplace_backward=True writes the gradient over the logits, which cannot be a leaf "
            "tensor that requires grad (its .grad would alias its data); pass non-leaf logits (the output "
            "of a layer) or use inplace_backward=False")
    if inplace_backward:
        return cross_entropy_inplace(input, target, class_factor, spec, validate)
    return CrossEntropyFunction.apply(input, target, class_factor, spec, validate, True)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    inplace_backward: bool = False,
    validate: Union[bool, str] = True,
    return_lse: bool = False,
):
    """Drop-in for torch.nn.functional.cross_entropy, plus z-loss and logit soft-capping.

    As torch, `ignore_index` must be an integer. `weight` may have any floating dtype (torch
    requires the input's): it is used at fp32 precision (fp64 for float64 inputs).

    Args beyond torch's:
        z_loss: adds z_loss·lse² per non-ignored row (averaged over non-ignored rows for "mean").
        softcap: replaces every logit x by softcap·tanh(x/softcap) first.
        inplace_backward: write the gradient over the logits' storage (saves a logits-sized
            buffer; the logits are then marked dirty and must not be a leaf).
        validate: check class indices against [0, C). True: on CUDA without a host sync, by a
            device-side assertion (as torch's CUDA kernels; the error surfaces at the next
            synchronisation), elsewhere an IndexError naming the index; "sync": that IndexError
            on CUDA too (one host sync); False: no check, an out-of-range index gives NaN for
            its row.
        return_lse: also return the per-row fp32 log-sum-exp of the (soft-capped) logits,
            shaped like the 'none' loss (0 at ignored rows); differentiable (∂lse/∂x = p).

    A DTensor `input` sharded on the class dimension (torch's loss_parallel convention) runs
    fastce.distributed's vocabulary-parallel loss on its mesh and returns a DTensor.
    """
    if _is_dtensor(input):
        from .distributed.dtensor import cross_entropy as dtensor_cross_entropy
        return dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss,
                                     softcap=softcap, inplace_backward=inplace_backward, validate=validate,
                                     return_lse=return_lse)
    n_classes, ignore_index = _check_common("cross_entropy", input, target, ignore_index, reduction, label_smoothing)
    validate = validation_mode(validate, input.device)
    check_class_factor(weight, n_classes, input, "weight")
    _check_not_differentiable(weight, "weight")
    _check_z_loss_softcap(z_loss, softcap)
    if _runs_reference(input, target, n_classes, ignore_index, validate):
        return reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                       z_loss=z_loss, softcap=softcap, return_lse=return_lse)
    spec = _cross_entropy_spec(ignore_index, reduction, label_smoothing, z_loss, softcap)
    loss, lse = _run(input, target, weight, spec, inplace_backward=inplace_backward, validate=validate)
    return (loss, lse) if return_lse else loss


def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: Union[None, float, Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    validate: Union[bool, str] = True,
) -> Tensor:
    """Focal loss −Σ_c α_c q_c (1 − p_c)^γ log p_c (Lin et al., 2017) with torch's target options.

    alpha: None, a float (every class), or a (C,) tensor of per-class factors of any floating
    dtype. "mean" divides by the number of non-ignored rows. gamma = 0 with alpha = None is
    cross-entropy. validate as in fastce.cross_entropy.
    """
    if _is_dtensor(input):
        raise NotImplementedError("fastce.focal_loss has no DTensor (vocabulary-parallel) form; pass a plain tensor")
    n_classes, ignore_index = _check_common("focal_loss", input, target, ignore_index, reduction, label_smoothing)
    validate = validation_mode(validate, input.device)
    _check_finite("gamma", float(gamma), 0.0)
    if alpha is not None and not isinstance(alpha, Tensor):
        _check_finite("alpha", float(alpha))
        alpha = torch.full((n_classes,), float(alpha), dtype=reference.compute_dtype(input.dtype),
                           device=input.device)
    check_class_factor(alpha, n_classes, input, "alpha")
    _check_not_differentiable(alpha, "alpha")
    if _runs_reference(input, target, n_classes, ignore_index, validate):
        return reference.focal_loss(input, target, float(gamma), alpha, ignore_index, reduction, label_smoothing)
    from .ops import LossSpec
    spec = LossSpec(ignore_index, reduction, float(label_smoothing), gamma=float(gamma), focal=True)
    loss, _ = _run(input, target, alpha, spec, inplace_backward=False, validate=validate)
    return loss


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    validate: Union[bool, str] = True,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
    walk: Optional[str] = None,
):
    """Drop-in for torch.nn.functional.linear_cross_entropy (PyTorch 2.13), also on older PyTorch:
    cross_entropy(linear(input, linear_weight, linear_bias), target, …) for input (…, H) and
    linear_weight (C, H), or input (N, H) and linear_weight (C, d1, …, dk, H), torch's K-dimensional
    loss over logits (N, C, d1, …, dk); linear_bias shaped like linear_weight without H. Gradients
    for input, linear_weight and linear_bias; the logits are never all in memory at once (see
    fastce/linear.py for the walks, their rule and their memory).

    target: class indices shaped like the logits without C, or probabilities shaped like the logits.
    'none' returns the loss shaped like the target's class indices would be. ignore_index=None
    means -100, and may not be given with probabilities, as in torch.
    Args beyond torch's: z_loss, softcap, validate and return_lse as in fastce.cross_entropy;
    chunk_size: rows per chunk of the token walk (default: fastce/linear.py's rule, N/16);
    vocab_chunk_size: classes per slice of the vocabulary walk (default V/16);
    walk: "vocab" or "tokens", how ∂W is made (default: the rule in fastce/linear.py: "vocab" for
        bf16/fp16 language-model heads, "tokens" for fp32 and K-dimensional heads).
    options: torch's LinearCrossEntropyOptions, accepted for drop-in use and ignored (fastce
    always walks in chunks, by the rules above).
    A DTensor `linear_weight` sharded on dim 0 (a column-parallel head) runs fastce.distributed's
    vocabulary-parallel form on its mesh and returns a DTensor.
    """
    if _is_dtensor(linear_weight) or _is_dtensor(input):
        from .distributed.dtensor import linear_cross_entropy as dtensor_linear_cross_entropy
        return dtensor_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=-100 if ignore_index is None else ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, validate=validate, return_lse=return_lse, chunk_size=chunk_size)
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    n_classes = check_linear(input, linear_weight, linear_bias, target, ignore_index, torch_rules=True)
    ignore_index = -100 if ignore_index is None else ignore_index
    check_class_factor(weight, n_classes, input, "weight")
    _check_not_differentiable(weight, "weight")
    _check_z_loss_softcap(z_loss, softcap)
    for name, size in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if size is not None and size < 1:
            raise InvalidArgumentError(f"{name} must be a positive number, got {size}")
    if walk not in (None, "vocab", "tokens"):
        raise InvalidArgumentError(f"walk must be None, 'vocab' or 'tokens', got {walk!r}")
    if walk == "vocab" and linear_weight.dim() > 2:
        raise InvalidArgumentError("walk='vocab' slices a contiguous class dimension: a K-dimensional "
                                   "linear_weight takes walk='tokens'")
    validate = validation_mode(validate, input.device)
    if _runs_reference(input, target, n_classes, ignore_index, validate):
        return reference.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            return_lse=return_lse)
    from . import linear
    spec = _cross_entropy_spec(ignore_index, reduction, label_smoothing, z_loss, softcap)
    loss, lse = linear.run(input, linear_weight, linear_bias, target, weight, spec, walk=walk,
                           chunk_rows=chunk_size, slice_classes=vocab_chunk_size, validate=validate)
    return (loss, lse) if return_lse else loss


# ---- binary (sigmoid) losses, DESIGN §7.1 ------------------------------------------------------


def _run_binary(loss, reduction, input, target, weight=None, pos_weight=None, alpha=-1.0, gamma=0.0):
    """The binary loss `loss` ("bce", "soft_margin", "focal") from the Triton kernels."""
    from .binary import BinarySpec, run
    return run(input, target, weight, pos_weight, BinarySpec(loss, reduction, alpha, gamma))


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
) -> Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits:
    −w·[pw·t·log σ(x) + (1 − t)·log(1 − σ(x))] per element, in its stable form.

    target: floating, the input's shape (soft labels allowed, and a gradient into it when it
    requires grad). weight broadcasts to the input, pos_weight too (usually a (C,) vector along
    the last dimension). "mean" divides by the number of elements. The loss comes back in the
    target's dtype, as torch's does.
    """
    check_reduction(reduction)
    check_binary("binary_cross_entropy_with_logits", input, target, same_shape=True)
    for name, factor in (("weight", weight), ("pos_weight", pos_weight)):
        check_broadcastable(factor, input, name)
        check_no_gradient_wanted(factor, "binary_cross_entropy_with_logits", name)
    if not uses_triton(input):
        return reference.binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
    return _run_binary("bce", reduction, input, target, weight, pos_weight)


def soft_margin_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.soft_margin_loss: log(1 + exp(−y·x)) per element, the
    binary cross-entropy of labels y = ±1, in its stable form (finite where torch's overflows).

    target: any real dtype, broadcast to the input (as torch); no gradient flows into it, as in
    torch. The loss comes back in the input's dtype.
    """
    check_reduction(reduction)
    check_binary("soft_margin_loss", input, target, same_shape=False)
    check_no_gradient_wanted(target, "soft_margin_loss", "target")
    if not uses_triton(input):
        return reference.soft_margin_loss(input, target, reduction)
    return _run_binary("soft_margin", reduction, input, target)


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Drop-in for torchvision.ops.sigmoid_focal_loss (RetinaNet's loss, Lin et al. 2017):
    α_t·BCE(x, t)·(1 − p_t)^γ per element, p_t = σ(x)·t + (1 − σ(x))·(1 − t),
    α_t = α·t + (1 − α)·(1 − t); alpha < 0 leaves α_t out. Note the default reduction "none",
    as torchvision's.

    targets: floating, the inputs' shape (soft labels allowed, and a gradient into them when they
    require grad). 1 − p_t is computed without cancellation, so easy examples keep their small
    loss exactly. The loss comes back in the promotion of the inputs' and targets' dtypes.
    """
    check_reduction(reduction)
    check_binary("sigmoid_focal_loss", inputs, targets, same_shape=True)
    _check_finite("alpha", float(alpha))
    _check_finite("gamma", float(gamma), 0.0)
    if not uses_triton(inputs):
        return reference.sigmoid_focal_loss(inputs, targets, float(alpha), float(gamma), reduction)
    return _run_binary("focal", reduction, inputs, targets, alpha=float(alpha), gamma=float(gamma))


# ---------------------------------------------------------------------------------------------
# Token statistics for RL and post-training (DESIGN §7.2): per-token log-probabilities and entropy


def _check_temperature(temperature: float) -> None:
    _check_finite("temperature", float(temperature), 0.0)
    if temperature == 0:
        raise InvalidArgumentError("temperature must be positive")


def _check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive number of rows, got {chunk_size}")


def token_logprobs(logits: Tensor, target: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False):
    """Per-token log-probability log softmax(logits / T)[target] and, with return_entropy, the entropy
    −Σ p log p of softmax(logits / T): what RL and distillation losses (GRPO, PPO, DPO) are built from.

    logits: (…, V), class dimension last, any floating dtype; target: class indices (…).
    Returns float32 tensors shaped like target (float64 for float64 logits), `logprob` or
    `(logprob, entropy)`: both 0 where target == ignore_index (with zero gradient), NaN where target
    lies outside [0, V) (no host sync checks it). Both are differentiable; a backward through either
    or both is one pass over the logits.
    """
    check_token_logits(logits)
    check_token_target(target, logits.shape[:-1], logits.device)
    _check_temperature(temperature)
    if not uses_triton(logits):
        return reference.token_logprobs(logits, target, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy)
    from .token_stats import TokenStatsSpec, run
    logprob, entropy = run(logits, target, TokenStatsSpec(float(temperature), int(ignore_index), return_entropy))
    return (logprob, entropy) if return_entropy else logprob


def linear_token_logprobs(hidden: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Optional[Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, chunk_size: Optional[int] = None):
    """token_logprobs(hidden @ linear_weight.T + linear_bias, target, …) for hidden (…, H),
    linear_weight (V, H), linear_bias (V), with gradients for all three, without ever holding the
    (…, V) logits: the forward computes them chunk_size rows at a time, the backward by vocabulary
    slices; see fastce/token_stats.py.

    chunk_size: rows per forward chunk, the backward's slices then holding as many logits (default:
    fastce.token_stats.default_chunks, which sizes each pass's buffer so that the peak memory beyond
    inputs and gradients stays within 4.5% of the logits' bytes where it can). No host sync.
    """
    check_linear(hidden, linear_weight, linear_bias, target, ignore_index)
    check_token_target(target, hidden.shape[:-1], hidden.device)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if not uses_triton(hidden):
        return reference.linear_token_logprobs(hidden, linear_weight, target, linear_bias=linear_bias,
                                               temperature=temperature, ignore_index=ignore_index,
                                               return_entropy=return_entropy)
    from .token_stats import TokenStatsSpec, run_linear
    logprob, entropy = run_linear(hidden, linear_weight, linear_bias, target,
                                  TokenStatsSpec(float(temperature), int(ignore_index), return_entropy),
                                  chunk_rows=chunk_size)
    return (logprob, entropy) if return_entropy else logprob


def policy_gradient_loss(logits: Tensor, target: Tensor, advantages: Tensor, *, entropy_coef: float = 0.0,
                         temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                         return_stats: bool = False):
    """The on-policy policy-gradient loss (REINFORCE, GRPO with importance ratio 1):
    −(A·logprob + entropy_coef·H) per token, with logprob = log softmax(logits / T)[target] and H the
    entropy of softmax(logits / T), as in token_logprobs; 0 at tokens where target == ignore_index.

    logits: (…, V), class dimension last, any floating dtype; target: class indices (…); advantages:
    floating, broadcastable to target's shape (one per token, or (B, 1) for one per sequence), a
    constant (a tensor that requires grad is refused). reduction: "mean" (the sum over non-ignored
    tokens divided by their number, as cross_entropy's unweighted mean; NaN with a zero gradient when
    every token is ignored), "sum", or "none" (the per-token loss, shaped like target). The loss is
    float32 (float64 for float64 logits). With return_stats, returns (loss, logprob, entropy), the
    statistics detached, for logging.

    Cost: for "mean" and "sum" the forward writes the logits' gradient in the pass that reads them (the
    advantages are known there), so a training step moves 2× the logits' bytes instead of
    token_logprobs' 3×; "none" computes the gradient in the backward (3×). No host sync.
    """
    check_token_logits(logits)
    check_token_target(target, logits.shape[:-1], logits.device)
    check_advantages(advantages, target.shape, logits.device)
    check_reduction(reduction)
    _check_temperature(temperature)
    _check_finite("entropy_coef", float(entropy_coef))
    if advantages.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("fastce.policy_gradient_loss does not differentiate with respect to advantages, which "
                           "are constants of the policy-gradient estimator: pass advantages.detach()")
    if not uses_triton(logits):
        return reference.policy_gradient_loss(logits, target, advantages, entropy_coef=entropy_coef,
                                              temperature=temperature, ignore_index=ignore_index,
                                              reduction=reduction, return_stats=return_stats)
    from .token_stats import PolicyGradientSpec, run_policy_gradient
    spec = PolicyGradientSpec(float(entropy_coef), float(temperature), int(ignore_index), reduction, return_stats)
    loss, logprob, entropy = run_policy_gradient(logits, target, advantages, spec)
    return (loss, logprob, entropy) if return_stats else loss

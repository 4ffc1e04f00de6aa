"""The public functions' thin front: argument checks, DTensor routing and the dispatch between the
families' kernels and fastce.reference.

Where code runs (DESIGN §3): CUDA tensors → Triton kernels; CPU tensors with TRITON_INTERPRET=1 → the
same kernels on Triton's interpreter; anything else (or no Triton) → fastce.reference.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import Tensor

from . import reference
from ._core import (
    BinarySpec,
    DistillationSpec,
    HeadOptions,
    LossSpec,
    PolicyGradientSpec,
    TokenStatsSpec,
    compute_dtype,
    kernel_layout,
    loss_dtype as default_loss_dtype,
    triton_importable as _triton_importable,  # noqa: F401  (the dispatch rule's parts, where tools patch them)
    uses_triton,
)
from ._validation import (
    VALIDATE_DEVICE,
    VALIDATE_SYNC,
    InvalidArgumentError,
    assert_target_range_on_device,
    check_binary,
    check_broadcastable,
    check_class_factor,
    check_distillation_heads,
    check_distillation_logits,
    check_distillation_options,
    check_finite,
    check_ignore_index,
    check_input,
    check_label_smoothing,
    check_linear,
    check_logit_transform,
    check_no_gradient_wanted,
    check_not_differentiable,
    check_policy_gradient,
    check_positive_size,
    check_reduction,
    check_target,
    check_target_range,
    check_temperature,
    check_token_logits,
    check_token_target,
    check_z_loss_softcap,
    validation_mode,
)


_FAMILIES = None


def _families():
    """The kernel families, imported on the first call that runs the kernels (they import Triton, which
    `import fastce` must not need)."""
    global _FAMILIES
    if _FAMILIES is None:
        from . import binary, linear, softmax_losses, token_stats
        _FAMILIES = softmax_losses, binary, linear, token_stats
    return _FAMILIES


def _check_common(function, input, target, ignore_index, reduction, label_smoothing) -> tuple[int, int]:
    """(number of classes, ignore_index as an int) after the checks every loss shares."""
    ignore_index = check_ignore_index(ignore_index, function)
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    n_classes = check_input(input)
    check_target(input, target, ignore_index)
    return n_classes, ignore_index


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


# The metadata of recent calls whose arguments passed the checks that depend on metadata alone (shapes,
# dtypes, devices and options): a repeated call skips them. Checks that depend on the grad mode, the
# validation mode or the class indices' values run at every call.
_CHECKED: dict = {}
_CHECKED_MAX = 1024
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_NUMBERS = (int, float)
_OPTIONAL_NUMBERS = (int, float, type(None))


def _call_key(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, loss_dtype):
    """The key of a cross_entropy call's metadata, or None where it has none (not plain tensors, or options
    of other types than the usual, which the checks then judge)."""
    if type(input) not in _PLAIN_TENSORS or type(target) not in _PLAIN_TENSORS or type(ignore_index) is not int:
        return None
    if type(label_smoothing) not in _NUMBERS or type(z_loss) not in _NUMBERS or type(softcap) not in _OPTIONAL_NUMBERS:
        return None
    if weight is not None:
        if type(weight) not in _PLAIN_TENSORS:
            return None
        weight = (weight.shape, weight.dtype, weight.device)
    return (input.shape, input.dtype, input.device, target.shape, target.dtype, target.device, weight, ignore_index,
            reduction, label_smoothing, z_loss, softcap, loss_dtype)


def _remember(key, checked) -> None:
    if key is None:
        return
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = checked


def _check_loss_dtype(loss_dtype: Optional[torch.dtype]) -> None:
    if loss_dtype is not None and not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point):
        raise TypeError(f"loss_dtype must be a floating point torch.dtype or None, got {loss_dtype!r}")


def _is_dtensor(t) -> bool:
    # DTensors go to fastce.distributed (fastce/distributed/dtensor.py); plain tensors skip the import
    if type(t) in (Tensor, torch.nn.Parameter) or not isinstance(t, Tensor):
        return False
    from .distributed.dtensor import is_dtensor  # torch.distributed is optional in torch builds
    return is_dtensor(t)


def _run_cross_entropy(input, target, class_factor, spec: LossSpec, *, inplace_backward: bool, validate: str,
                       out_dtype: torch.dtype):
    """(loss, lse) from the kernels, through autograd when a gradient is needed."""
    input = kernel_layout(input)
    if target.is_floating_point():
        target = kernel_layout(target)
        # torch promotes input and probabilities together: with float64 probabilities the loss
        # is float64, hence computed in float64 (the rare mixed case pays a copy of the logits)
        promoted = default_loss_dtype(input, target)
        if compute_dtype(promoted) != compute_dtype(input.dtype):
            input = input.to(promoted)
    if class_factor is not None:
        class_factor = class_factor.to(compute_dtype(input.dtype)).contiguous()
    softmax_losses, *_ = _families()
    return softmax_losses.run(input, target, class_factor, spec, inplace_backward=inplace_backward,
                             validate=validate, out_dtype=out_dtype)


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
    loss_dtype: Optional[torch.dtype] = None,
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
        loss_dtype: the dtype of the returned loss (default: the input's, as torch), e.g.
            torch.float32 for bf16 logits: the fp32 value, rounded once to it.

    A DTensor `input` sharded on the class dimension (torch's loss_parallel convention) runs
    fastce.distributed's vocabulary-parallel loss on its mesh and returns a DTensor.
    """
    if _is_dtensor(input):
        from .distributed.dtensor import cross_entropy as dtensor_cross_entropy
        return dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss,
                                     softcap=softcap, inplace_backward=inplace_backward, validate=validate,
                                     return_lse=return_lse, loss_dtype=loss_dtype)
    key = _call_key(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, loss_dtype)
    checked = _CHECKED.get(key) if key is not None else None
    if checked is None:
        n_classes, ignore_index = _check_common("cross_entropy", input, target, ignore_index, reduction,
                                                label_smoothing)
        check_class_factor(weight, n_classes, input, "weight")
        check_z_loss_softcap(z_loss, softcap)
        _check_loss_dtype(loss_dtype)
        spec = LossSpec(ignore_index, reduction, float(label_smoothing), float(z_loss),
                        None if softcap is None else float(softcap))
        checked = n_classes, spec, loss_dtype or default_loss_dtype(input, target)
        _remember(key, checked)
    n_classes, spec, out_dtype = checked
    validate = validation_mode(validate, input.device)
    check_not_differentiable(weight, "weight")
    if _runs_reference(input, target, n_classes, spec.ignore_index, validate):
        return reference.cross_entropy(input, target, weight, spec.ignore_index, reduction, label_smoothing,
                                       z_loss=z_loss, softcap=softcap, return_lse=return_lse, loss_dtype=loss_dtype)
    loss, lse = _run_cross_entropy(input, target, weight, spec, inplace_backward=inplace_backward, validate=validate,
                                   out_dtype=out_dtype)
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
    check_finite("gamma", float(gamma), 0.0)
    if alpha is not None and not isinstance(alpha, Tensor):
        check_finite("alpha", float(alpha))
        alpha = torch.full((n_classes,), float(alpha), dtype=compute_dtype(input.dtype), device=input.device)
    check_class_factor(alpha, n_classes, input, "alpha")
    check_not_differentiable(alpha, "alpha")
    if _runs_reference(input, target, n_classes, ignore_index, validate):
        return reference.focal_loss(input, target, float(gamma), alpha, ignore_index, reduction, label_smoothing)
    spec = LossSpec(ignore_index, reduction, float(label_smoothing), gamma=float(gamma), focal=True)
    loss, _ = _run_cross_entropy(input, target, alpha, spec, inplace_backward=False, validate=validate,
                                 out_dtype=input.dtype)
    return loss


def _head_options(options, chunk_size: Optional[int], vocab_chunk_size: Optional[int], walk: Optional[str],
                  function: str) -> HeadOptions:
    """fastce.HeadOptions from `options` (fastce's, torch's LinearCrossEntropyOptions, which fastce accepts
    and ignores, or None) and the deprecated keyword aliases (kept working, without a warning: a warning
    would break torch.compile(fullgraph=True) graphs that still use them)."""
    if options is not None and not isinstance(options, HeadOptions):
        if type(options).__name__ != "LinearCrossEntropyOptions":
            raise TypeError(f"{function}: options must be fastce.HeadOptions, torch's LinearCrossEntropyOptions "
                            f"or None, got {type(options).__name__}")
        options = None  # torch's chunking knobs: fastce always walks the head in chunks, by its own rule
    check_positive_size("chunk_size", chunk_size)
    check_positive_size("vocab_chunk_size", vocab_chunk_size)
    aliases = {"chunk_rows": chunk_size, "slice_classes": vocab_chunk_size, "walk": walk}
    given = {name: value for name, value in aliases.items() if value is not None}
    if given:
        options = dataclasses.replace(options or HeadOptions(), **given)
    options = options or HeadOptions()
    check_positive_size("chunk_rows", options.chunk_rows)
    check_positive_size("slice_classes", options.slice_classes)
    if options.walk not in (None, "vocab", "tokens"):
        raise InvalidArgumentError(f"walk must be None, 'vocab' or 'tokens', got {options.walk!r}")
    return options


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
    loss_dtype: Optional[torch.dtype] = None,
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
    walk: Optional[str] = None,
):
    """Drop-in for torch.nn.functional.linear_cross_entropy (PyTorch 2.13), also on older PyTorch:
    cross_entropy(linear(input, linear_weight, linear_bias), target, …) for input (…, H) and
    linear_weight (C, H), or input (N, H) and linear_weight (C, d1, …, dk, H), torch's K-dimensional
    loss over logits (N, C, d1, …, dk); linear_bias shaped like linear_weight without H. Gradients
    for input, linear_weight and linear_bias; the logits are never all in memory at once (the chunked-head
    engine, fastce/_head.py: walks, their rule and their memory).

    target: class indices shaped like the logits without C, or probabilities shaped like the logits.
    'none' returns the loss shaped like the target's class indices would be. ignore_index=None
    means -100, and may not be given with probabilities, as in torch.
    Args beyond torch's: z_loss, softcap, validate, return_lse and loss_dtype as in fastce.cross_entropy.
    options: fastce.HeadOptions(walk=, chunk_rows=, slice_classes=) to override the engine's rule (walk
    "vocab" or "tokens": how ∂W is made); torch's LinearCrossEntropyOptions is accepted for drop-in use and
    ignored (fastce always walks in chunks). chunk_size, vocab_chunk_size and walk: deprecated aliases of
    HeadOptions' chunk_rows, slice_classes and walk.
    A DTensor `linear_weight` sharded on dim 0 (a column-parallel head) runs fastce.distributed's
    vocabulary-parallel form on its mesh and returns a DTensor.
    """
    head_options = _head_options(options, chunk_size, vocab_chunk_size, walk, "linear_cross_entropy")
    if _is_dtensor(linear_weight) or _is_dtensor(input):
        from .distributed.dtensor import linear_cross_entropy as dtensor_linear_cross_entropy
        return dtensor_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=-100 if ignore_index is None else ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, validate=validate, return_lse=return_lse, options=head_options,
            loss_dtype=loss_dtype)
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    if ignore_index is not None:
        ignore_index = check_ignore_index(ignore_index, "linear_cross_entropy")
    n_classes = check_linear(input, linear_weight, linear_bias, target, ignore_index, torch_rules=True)
    ignore_index = -100 if ignore_index is None else ignore_index
    check_class_factor(weight, n_classes, input, "weight")
    check_not_differentiable(weight, "weight")
    check_z_loss_softcap(z_loss, softcap)
    _check_loss_dtype(loss_dtype)
    if head_options.walk == "vocab" and linear_weight.dim() > 2:
        raise InvalidArgumentError("walk='vocab' slices a contiguous class dimension: a K-dimensional "
                                   "linear_weight takes walk='tokens'")
    validate = validation_mode(validate, input.device)
    # a K-dimensional head with no positions (out_features holding 0) has no logits at all: the
    # reference's empty loss (NaN mean, 0 sum) and zero gradients, as torch's
    no_positions = linear_weight.shape[1:-1].numel() == 0
    if _runs_reference(input, target, n_classes, ignore_index, validate) or no_positions:
        return reference.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            return_lse=return_lse, loss_dtype=loss_dtype)
    spec = LossSpec(ignore_index, reduction, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap))
    _, _, linear, _ = _families()
    loss, lse = linear.run(input, linear_weight, linear_bias, target, weight, spec, walk=head_options.walk,
                           chunk_rows=head_options.chunk_rows, slice_classes=head_options.slice_classes,
                           validate=validate, out_dtype=loss_dtype or input.dtype, return_lse=return_lse)
    return (loss, lse) if return_lse else loss


# ---- binary (sigmoid) losses, DESIGN §7.1 ------------------------------------------------------


def _run_binary(loss, reduction, input, target, weight=None, pos_weight=None, alpha=-1.0, gamma=0.0):
    """The binary loss `loss` ("bce", "soft_margin", "focal") from the Triton kernels."""
    _, binary, _, _ = _families()
    return binary.run(input, target, weight, pos_weight, BinarySpec(loss, reduction, alpha, gamma))


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
    check_finite("alpha", float(alpha))
    check_finite("gamma", float(gamma), 0.0)
    if not uses_triton(inputs):
        return reference.sigmoid_focal_loss(inputs, targets, float(alpha), float(gamma), reduction)
    return _run_binary("focal", reduction, inputs, targets, alpha=float(alpha), gamma=float(gamma))


# ---------------------------------------------------------------------------------------------
# Token statistics for RL and post-training (DESIGN §7.2): per-token log-probabilities and entropy


def _check_token_call(function: str, ignore_index, validate, device) -> tuple:
    """(ignore_index as an int, the validation mode) of a token-statistics call, after cross_entropy's
    ignore_index rule."""
    ignore_index = check_ignore_index(ignore_index, function)
    validate = validation_mode(validate, device)
    return ignore_index, validate


def _validate_on_reference_path(target: Tensor, n_classes: int, ignore_index: int, validate: str) -> None:
    if validate == VALIDATE_SYNC:
        check_target_range(target, n_classes, ignore_index)
    elif validate == VALIDATE_DEVICE:
        assert_target_range_on_device(target, n_classes, ignore_index)


def token_logprobs(logits: Tensor, target: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False, validate: Union[bool, str] = True):
    """Per-token log-probability log softmax(logits / T)[target] and, with return_entropy, the entropy
    −Σ p log p of softmax(logits / T): what RL and distillation losses (GRPO, PPO, DPO) are built from.

    logits: (…, V), class dimension last, any floating dtype; target: class indices (…).
    Returns float32 tensors shaped like target (float64 for float64 logits), `logprob` or
    `(logprob, entropy)`: both 0 where target == ignore_index (with zero gradient). Both are
    differentiable; a backward through either or both is one pass over the logits. validate as in
    fastce.cross_entropy (False: a class index outside [0, V) gives NaN for its token, no check).
    """
    check_token_logits(logits)
    check_token_target(target, logits.shape[:-1], logits.device)
    check_temperature(temperature)
    ignore_index, validate = _check_token_call("token_logprobs", ignore_index, validate, logits.device)
    if not uses_triton(logits):
        _validate_on_reference_path(target, logits.shape[-1], ignore_index, validate)
        return reference.token_logprobs(logits, target, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy)
    *_, token_stats = _families()
    logprob, entropy = token_stats.run(logits, target, TokenStatsSpec(float(temperature), ignore_index, return_entropy),
                                       validate=validate)
    return (logprob, entropy) if return_entropy else logprob


def linear_token_logprobs(hidden: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Optional[Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, validate: Union[bool, str] = True, options=None,
                          chunk_size: Optional[int] = None):
    """token_logprobs(hidden @ linear_weight.T + linear_bias, target, …) for hidden (…, H),
    linear_weight (V, H), linear_bias (V), with gradients for all three, without ever holding the
    (…, V) logits (the chunked-head engine, fastce/_head.py: within 5% of the logits' bytes beyond
    inputs and gradients, where its floors allow). No host sync with validate=False.

    options: fastce.HeadOptions(chunk_rows=…) sets the rows per chunk (the backward's slices then hold as
    many logits); chunk_size is its deprecated alias.
    """
    head_options = _head_options(options, chunk_size, None, None, "linear_token_logprobs")
    check_linear(hidden, linear_weight, linear_bias, target, None)
    check_token_target(target, hidden.shape[:-1], hidden.device)
    check_temperature(temperature)
    ignore_index, validate = _check_token_call("linear_token_logprobs", ignore_index, validate,
                                               hidden.device)
    if not uses_triton(hidden):
        _validate_on_reference_path(target, linear_weight.shape[0], ignore_index, validate)
        return reference.linear_token_logprobs(hidden, linear_weight, target, linear_bias=linear_bias,
                                               temperature=temperature, ignore_index=ignore_index,
                                               return_entropy=return_entropy)
    *_, token_stats = _families()
    logprob, entropy = token_stats.run_linear(hidden, linear_weight, linear_bias, target,
                                              TokenStatsSpec(float(temperature), ignore_index, return_entropy),
                                              chunk_rows=head_options.chunk_rows, validate=validate)
    return (logprob, entropy) if return_entropy else logprob


def policy_gradient_loss(logits: Tensor, target: Tensor, advantages: Tensor, *, entropy_coef: float = 0.0,
                         temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                         return_stats: bool = False, validate: Union[bool, str] = True):
    """The on-policy policy-gradient loss (REINFORCE, GRPO with importance ratio 1):
    −(A·logprob + entropy_coef·H) per token, with logprob = log softmax(logits / T)[target] and H the
    entropy of softmax(logits / T), as in token_logprobs; 0 at tokens where target == ignore_index.

    logits: (…, V), class dimension last, any floating dtype; target: class indices (…); advantages:
    floating, broadcastable to target's shape (one per token, or (B, 1) for one per sequence), a
    constant (a tensor that requires grad is refused). reduction: "mean" (the sum over non-ignored
    tokens divided by their number, as cross_entropy's unweighted mean; NaN with a zero gradient when
    every token is ignored), "sum", or "none" (the per-token loss, shaped like target). The loss is
    float32 (float64 for float64 logits). With return_stats, returns (loss, logprob, entropy), the
    statistics detached, for logging. validate as in fastce.cross_entropy.

    Cost: for "mean" and "sum" the forward writes the logits' gradient in the pass that reads them (the
    advantages are known there), so a training step moves 2× the logits' bytes instead of
    token_logprobs' 3×; "none" computes the gradient in the backward (3×). No host sync with
    validate=False (or on CUDA).
    """
    check_token_logits(logits)
    check_policy_gradient(target, advantages, logits.shape[:-1], logits.device, reduction, temperature, entropy_coef,
                          "fastce.policy_gradient_loss")
    ignore_index, validate = _check_token_call("policy_gradient_loss", ignore_index, validate, logits.device)
    if not uses_triton(logits):
        _validate_on_reference_path(target, logits.shape[-1], ignore_index, validate)
        return reference.policy_gradient_loss(logits, target, advantages, entropy_coef=entropy_coef,
                                              temperature=temperature, ignore_index=ignore_index,
                                              reduction=reduction, return_stats=return_stats)
    *_, token_stats = _families()
    spec = PolicyGradientSpec(float(entropy_coef), float(temperature), ignore_index, reduction, return_stats)
    loss, logprob, entropy = token_stats.run_policy_gradient(logits, target, advantages, spec, validate=validate)
    return (loss, logprob, entropy) if return_stats else loss


# ---------------------------------------------------------------------------------------------
# Distillation (DESIGN §7.5): TRL's generalized JSD between a student's and a teacher's token distributions


def _distillation_family():
    from . import distillation  # imports Triton: loaded by the first call that runs the kernels
    return distillation


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                      beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                      reduction: str = "batchmean", num_classes: Optional[int] = None) -> Tensor:
    """The distillation loss of TRL's GKDTrainer.generalized_jsd_loss, class dimension last: with
    S = log_softmax(student_logits / T) and Q = log_softmax(teacher_logits / T),
    beta = 0: KL(teacher ‖ student) = Σ e^Q (Q − S); beta = 1: KL(student ‖ teacher) = Σ e^S (S − Q);
    0 < beta < 1: β·KL(teacher ‖ M) + (1−β)·KL(student ‖ M), M = log(β e^Q + (1−β) e^S).

    student_logits, teacher_logits: (…, V), any floating dtypes (the teacher may be wider, e.g. fp32 for a
    bf16 student), any strides; the teacher is detached (it may require grad: it gets none). target:
    labels shaped like the leading dims, or None; tokens whose label is ignore_index count 0.
    reduction: "batchmean" (the sum over kept tokens divided by their number, by the number of tokens
    without a target; NaN with a zero gradient when none is kept), "sum", "none" (per token, shaped like
    the leading dims), "mean" (divided by kept tokens × classes, as F.kl_div). num_classes=K compares
    the first K classes of both (a padded embedding; the student's other classes get a zero gradient),
    else both vocabularies must have the same size. The loss is float32 (float64 for float64 inputs).

    Where TRL's own function differs (fastce follows DESIGN §7.5; fastce.integrations.trl adapts): TRL
    returns 0 when every label is ignored (fastce: NaN, zero gradient), divides "batchmean" without
    labels by size(0), the batch of (B, T, V) logits (fastce: by the B·T tokens), returns the (kept, V)
    elements for "none" (fastce: one value per token), and gives NaN where the teacher's probability
    is 0 under beta = 0 (fastce: 0, as 0·log 0).

    Cost: a training step reads both logits once and writes the student's gradient once (≤ 3.05× one
    model's logits' bytes for rows of up to 4096 classes), no host sync.
    """
    n_classes = check_distillation_logits(student_logits, teacher_logits, target, num_classes)
    ignore_index = check_distillation_options("distillation_loss", beta, temperature, ignore_index, reduction)
    if not uses_triton(student_logits):
        return reference.distillation_loss(student_logits, teacher_logits, target, beta=beta,
                                           temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                                           num_classes=num_classes)
    spec = DistillationSpec(float(beta), float(temperature), ignore_index, reduction)
    return _distillation_family().run(student_logits, teacher_logits, target, spec, n_classes)


def linear_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                             teacher_weight: Tensor, target: Optional[Tensor] = None, *,
                             student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                             beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                             reduction: str = "batchmean", student_softcap: Optional[float] = None,
                             teacher_softcap: Optional[float] = None, student_logit_scale: float = 1.0,
                             teacher_logit_scale: float = 1.0, num_classes: Optional[int] = None,
                             validate: Union[bool, str] = True, chunk_size: Optional[int] = None) -> Tensor:
    """distillation_loss of both models' heads, student_hidden @ student_weight.T + student_bias and
    teacher_hidden @ teacher_weight.T + teacher_bias, without either's (…, V) logits in memory: both heads
    are walked together in chunks of rows by the chunked-head engine (fastce/_head.py), each chunk's logits
    in fp32 from the GEMM (no bf16 rounding before the softmax). Each model's logits x become
    softcap·tanh(logit_scale·x / softcap) before the temperature (Gemma's final_logit_softcapping, Cohere's
    and Granite's logit scale). Gradients for the student's hidden states, weight and bias (∂hidden and
    ∂W summed in fp32, rounded once); the teacher's tensors are detached and get no gradient buffer.

    Each head's tensors share one floating dtype (the two heads may differ), all on one device; hidden
    (…, H_s) and (…, H_t) with the same leading dims, weights (V_s, H_s) and (V_t, H_t); num_classes as
    distillation_loss's. Peak memory beyond inputs and gradients: within 10% of the student's logits'
    bytes where the engine's floors allow (docs/distillation.md). validate is accepted as in the other
    fused heads: the labels are only compared with ignore_index, so there is nothing to check on the
    device (no host sync either way). chunk_size sets the rows per chunk of the row walk.
    """
    validation_mode(validate, student_hidden.device if isinstance(student_hidden, Tensor) else torch.device("cpu"))
    n_classes = check_distillation_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                         teacher_bias, target, num_classes)
    ignore_index = check_distillation_options("linear_distillation_loss", beta, temperature, ignore_index, reduction)
    check_logit_transform("student", student_logit_scale, student_softcap)
    check_logit_transform("teacher", teacher_logit_scale, teacher_softcap)
    check_positive_size("chunk_size", chunk_size)
    spec = DistillationSpec(float(beta), float(temperature), ignore_index, reduction, float(student_logit_scale),
                            float(teacher_logit_scale), None if student_softcap is None else float(student_softcap),
                            None if teacher_softcap is None else float(teacher_softcap))
    if not uses_triton(student_hidden):
        return reference.linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias=student_bias,
            teacher_bias=teacher_bias, beta=beta, temperature=temperature, ignore_index=ignore_index,
            reduction=reduction, num_classes=num_classes, student_softcap=spec.student_softcap,
            teacher_softcap=spec.teacher_softcap, student_logit_scale=spec.student_logit_scale,
            teacher_logit_scale=spec.teacher_logit_scale)
    return _distillation_family().run_linear(student_hidden, student_weight, student_bias, teacher_hidden,
                                             teacher_weight, teacher_bias, target, spec, n_classes,
                                             chunk_rows=chunk_size)

"""Input checks shared by the Triton and the pure-PyTorch paths (pure torch, no Triton)."""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")

# How class indices are checked: "sync" raises IndexError naming the value, after one host sync;
# "device" asserts on the device without a sync (torch._assert_async, as torch's CUDA kernels
# assert; capture-safe); "none" checks nothing (an out-of-range index gives a NaN row).
VALIDATE_SYNC, VALIDATE_DEVICE, VALIDATE_NONE = "sync", "device", "none"


def validation_mode(validate, device: torch.device) -> str:
    """validate=True: on CUDA the device-side check (no host sync, as torch's CUDA kernels), on
    other devices the synchronous IndexError; "sync": the IndexError on every device; False: none."""
    if validate is True:
        return VALIDATE_DEVICE if device.type == "cuda" else VALIDATE_SYNC
    if validate is False:
        return VALIDATE_NONE
    if validate == VALIDATE_SYNC:
        return VALIDATE_SYNC
    raise InvalidArgumentError(f"validate must be True, False or 'sync', got {validate!r}")


def as_validation_mode(validate, device: torch.device) -> str:
    """validation_mode's answer, or `validate` itself when it is already a mode (as the families
    pass it on)."""
    if validate == VALIDATE_DEVICE or validate == VALIDATE_NONE:
        return validate
    return validation_mode(validate, device)


CLASS_INDEX_DTYPES = (torch.int64, torch.uint8)  # what torch's cross_entropy accepts


# Each error subclasses both the natural Python exception and the one torch raises for the same
# mistake, so code written against either keeps working.
class TargetDtypeError(TypeError, RuntimeError):
    pass


class InvalidArgumentError(ValueError, RuntimeError):
    pass


def scalar_type_name(dtype: torch.dtype) -> str:
    """torch's name for a dtype in its error messages: Long, Float, BFloat16, ..."""
    return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


def check_ignore_index(ignore_index, function: str = "cross_entropy") -> int:
    """ignore_index as an int: any integer (a Python or numpy int, an integer 0-d tensor), not a
    bool, float or None, as torch's argument parser takes it."""
    try:
        if isinstance(ignore_index, bool):
            raise TypeError
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"{function}(): argument 'ignore_index' must be int, not "
                        f"{type(ignore_index).__name__}") from None


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise InvalidArgumentError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def check_input(input: Tensor) -> int:
    """Returns the number of classes."""
    check_floating("input", input)
    if input.dim() == 0:
        raise InvalidArgumentError("input must have a class dimension: expected (C), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if n_classes == 0:
        raise InvalidArgumentError(f"input has no classes: shape {tuple(input.shape)}")
    return n_classes


def check_target_beside(target: Tensor, input: Tensor, input_is: str = "input is") -> None:
    """target is a tensor on the input's device."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise InvalidArgumentError(f"target is on {target.device} but {input_is} on {input.device}")


def check_probability_target(target: Tensor, input: Tensor, ignore_index: int, shaped: str,
                             ignore_index_default: int = -100) -> None:
    """Probabilities shaped like the input (`shaped` says how, for the message), without ignore_index."""
    if target.shape != input.shape:
        raise InvalidArgumentError(f"probability targets must be {shaped} {list(input.shape)}, got {list(target.shape)}")
    if ignore_index != ignore_index_default:
        raise InvalidArgumentError("ignore_index is not supported for floating point target")


def check_target(input: Tensor, target: Tensor, ignore_index: int, ignore_index_default: int = -100) -> None:
    """Shapes and dtypes of class-index or probability targets (no device sync)."""
    check_target_beside(target, input)
    if target.is_floating_point():
        check_probability_target(target, input, ignore_index, "shaped like the input", ignore_index_default)
        return
    if target.shape == input.shape and input.dim() > 0:
        raise TargetDtypeError(f"Expected floating point type for target with class probabilities, got "
                               f"{scalar_type_name(target.dtype)}")
    if target.dtype not in CLASS_INDEX_DTYPES:
        raise TargetDtypeError(
            f"expected target dtype to be Long or Byte, but got {scalar_type_name(target.dtype)} (class "
            "indices: int64 or uint8; class probabilities: a floating point tensor shaped like the input)")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size(())
    if target.shape != expected:
        if input.dim() > 1 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            raise InvalidArgumentError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]}).")
        raise InvalidArgumentError(
            f"Expected target size {list(expected)}, got {list(target.shape)} (input shape {list(input.shape)})")


def check_class_factor(factor: Optional[Tensor], n_classes: int, input: Tensor, name: str) -> None:
    """A (C,) floating tensor on the input's device, of any floating dtype (used in the compute
    dtype: torch requires class weights in the input's dtype, fastce takes e.g. fp32 weights for
    bf16 logits at their full precision)."""
    if factor is None:
        return
    if not isinstance(factor, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(factor).__name__}")
    if factor.dim() != 1 or factor.numel() != n_classes:
        raise InvalidArgumentError(
            f"{name} tensor should be defined either for all {n_classes} classes or no classes but got "
            f"{name} tensor of shape: {list(factor.shape)}")
    if not factor.is_floating_point():
        raise TargetDtypeError(f"{name} must be a floating point tensor, got {factor.dtype}")
    if factor.device != input.device:
        raise InvalidArgumentError(f"{name} is on {factor.device} but input is on {input.device}")


def check_target_range(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError naming the first class index outside [0, C) that is not ignore_index.

    The one check that needs the device's answer: a single host sync (skipped by validate=False).
    """
    if target.numel() == 0 or target.device.type == "meta":  # a meta tensor has no values to check
        return
    target = target.long()  # compared in uint8, ignore_index = -100 would match the class index 156
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bad.any():
        value = target[bad].reshape(-1)[0].item()
        raise IndexError(f"Target {value} is out of bounds.")


def out_of_range_message(n_classes: int, ignore_index: int) -> str:
    return (f"fastce: a class index (target) is outside [0, {n_classes}) and is not ignore_index "
            f"({ignore_index}); pass validate='sync' to have the IndexError naming it")


def assert_target_range_on_device(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """The range check of check_target_range without a host sync: an assertion on the device
    (on a GPU, a device-side assert that surfaces at the next synchronisation, as with torch's
    own CUDA kernels; on the CPU a RuntimeError at once)."""
    if target.numel() == 0 or target.device.type == "meta":
        return
    target = target.long()
    in_range = (target == ignore_index) | ((target >= 0) & (target < n_classes))
    torch._assert_async(in_range.all(), out_of_range_message(n_classes, ignore_index))


def logits_placeholder(like: Tensor, n_rows: int, n_classes: int) -> Tensor:
    """A (n_rows, n_classes) tensor of `like`'s dtype and device that owns a single element: it
    stands for logits that are never materialised, where only their shape, dtype and device count."""
    return like.new_empty(()).expand(n_rows, n_classes)


def check_floating(name: str, t, function: str = "") -> None:
    """`t` is a floating-point tensor (TypeError otherwise, naming it and, if given, the function)."""
    prefix = f"{function}: " if function else ""
    if not isinstance(t, Tensor):
        raise TypeError(f"{prefix}{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TargetDtypeError(f"{prefix}expected a floating point {name}, but got {t.dtype}")


def check_linear(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                 ignore_index: Optional[int], *, torch_rules: bool = False) -> int:
    """Shapes, dtypes and devices of a linear head's arguments (no device sync); returns C.

    As torch 2.13's F.linear_cross_entropy, with its messages: linear_weight (C, H); linear_bias
    (C); target class indices or, when shaped like the logits (…, C), probabilities. With
    torch_rules (fastce.linear_cross_entropy) also its K-dimensional loss, linear_weight
    (C, d1, …, dk, H) with input (N, H) and linear_bias (C, d1, …, dk), and its refusal of an
    ignore_index given (not None) with probabilities. Beyond torch, a 2-D linear_weight takes any
    input (…, H) (torch: 1 or 2 dimensions). All of one floating dtype and device.
    """
    for name, t in (("input", input), ("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        check_floating(name, t)
        if t.dtype != input.dtype or t.device != input.device:
            raise InvalidArgumentError(
                f"{name} is {t.dtype} on {t.device} but input is {input.dtype} on {input.device}: "
                "the linear layer needs one dtype and one device")
    if linear_weight.dim() < 2 or (linear_weight.dim() > 2 and not torch_rules):
        expected = "at least 2" if torch_rules else "2 (num_classes, in_features)"
        raise InvalidArgumentError(f"expected linear_weight with dimensionality {expected}, got {linear_weight.dim()}")
    out_features = tuple(linear_weight.shape[1:-1])
    if input.dim() == 0 or (out_features and input.dim() > 2):
        raise InvalidArgumentError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    in_features = linear_weight.shape[-1]
    if input.shape[-1] != in_features:
        raise InvalidArgumentError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {in_features}, respectively")
    n_classes = linear_weight.shape[0]
    if n_classes == 0:
        raise InvalidArgumentError(f"linear_weight has no classes: shape {list(linear_weight.shape)}")
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes, *out_features):
        raise InvalidArgumentError(
            f"expected linear_bias shape {(n_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise InvalidArgumentError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires batched "
            f"input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    logits_shape = input.shape[:-1] + (n_classes, *out_features)
    if torch_rules and target.shape == logits_shape and ignore_index is not None:
        raise InvalidArgumentError("ignore_index cannot be specified when target contains probabilities")
    # the logits torch's cross_entropy would see: (N, C, d1, …, dk), with (…) flattened to N
    n_rows = input.shape[:-1].numel()
    placeholder = input.new_empty(()).expand(n_rows, n_classes, *out_features)
    rows_target = target
    if target.shape == logits_shape:
        rows_target = target.reshape(placeholder.shape)
    elif target.shape == input.shape[:-1] + out_features:
        rows_target = target.reshape(placeholder.shape[:1] + placeholder.shape[2:])
    elif not out_features:
        raise InvalidArgumentError(
            f"expected target of shape {list(input.shape[:-1])} (class indices) or {list(logits_shape)} "
            f"(probabilities) for input {list(input.shape)}, got {list(target.shape)}")
    check_target(placeholder, rows_target, -100 if ignore_index is None else ignore_index)
    return n_classes


# ---- binary (sigmoid) losses, DESIGN §7.1 ------------------------------------------------------


def check_binary(function: str, input: Tensor, target: Tensor, *, same_shape: bool) -> None:
    """input a floating tensor; target on its device, floating and of its shape (same_shape, as
    BCE and torchvision's focal loss require) or any real dtype broadcastable to it (soft margin)."""
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{function}: {name} must be a Tensor, got {type(t).__name__}")
    if not input.is_floating_point():
        raise TargetDtypeError(f"{function}: expected a floating point input (logits), but got {input.dtype}")
    if target.device != input.device:
        raise InvalidArgumentError(f"{function}: target is on {target.device} but input is on {input.device}")
    if same_shape:
        if not target.is_floating_point():
            raise TargetDtypeError(
                f"{function}: expected a floating point target (labels in [0, 1]), but got {target.dtype}")
        if target.shape != input.shape:
            raise InvalidArgumentError(
                f"Target size ({target.shape}) must be the same as input size ({input.shape})")
        return
    if target.is_complex():
        raise TargetDtypeError(f"{function}: expected a real target (labels ±1), but got {target.dtype}")
    check_broadcastable(target, input, "target")


def check_broadcastable(factor: Optional[Tensor], input: Tensor, name: str) -> None:
    """`factor` (None, or a tensor on the input's device) broadcasts to the input's shape, as torch
    needs for BCE's weight and pos_weight."""
    if factor is None:
        return
    if not isinstance(factor, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(factor).__name__}")
    if factor.is_complex():
        raise TargetDtypeError(f"{name} must be a real tensor, got {factor.dtype}")
    if factor.device != input.device:
        raise InvalidArgumentError(f"{name} is on {factor.device} but input is on {input.device}")
    try:
        broadcast = torch.broadcast_shapes(factor.shape, input.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != input.shape:
        raise InvalidArgumentError(
            f"{name} of shape {list(factor.shape)} does not broadcast to the input's shape {list(input.shape)}")


def check_no_gradient_wanted(t: Optional[Tensor], function: str, argument: str) -> None:
    """torch's error for an argument its function is not differentiable in (checked in grad mode)."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"The function '{function}' is not differentiable with respect to argument "
                           f"'{argument}'. This input cannot have requires_grad True.")


def check_token_logits(logits: Tensor) -> None:
    """Floating logits (…, V) with the class dimension last and at least one class."""
    check_floating("logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise InvalidArgumentError(
            f"logits must have a class dimension (the last) of at least one class, got shape {list(logits.shape)}")


def check_token_target(target: Tensor, row_shape: torch.Size, device: torch.device) -> None:
    """Class indices (…) for per-token statistics of logits (…, V) (class dimension last): one per
    row, no probabilities (no device sync)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if target.dtype not in CLASS_INDEX_DTYPES:
        raise TargetDtypeError(f"expected target of class indices (Long or Byte), but got {target.dtype}")
    if target.device != device:
        raise InvalidArgumentError(f"target is on {target.device} but the logits are on {device}")
    if target.shape != row_shape:
        raise InvalidArgumentError(
            f"expected target of shape {list(row_shape)} (the logits' shape without the class dimension, which "
            f"is last), got {list(target.shape)}")


def check_advantages(advantages: Tensor, row_shape: torch.Size, device: torch.device) -> None:
    """Per-token advantages of a policy-gradient loss: a floating tensor on the logits' device that
    broadcasts to the target's shape (e.g. (B, 1) for one advantage per sequence of (B, T) tokens)."""
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a Tensor, got {type(advantages).__name__}")
    if not advantages.is_floating_point():
        raise TargetDtypeError(f"expected floating point advantages, but got {advantages.dtype}")
    if advantages.device != device:
        raise InvalidArgumentError(f"advantages are on {advantages.device} but the logits are on {device}")
    try:
        broadcast = torch.broadcast_shapes(advantages.shape, row_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != row_shape:
        raise InvalidArgumentError(
            f"advantages of shape {list(advantages.shape)} do not broadcast to the target's shape {list(row_shape)} "
            "(one per token, or e.g. (B, 1) for one per sequence)")


def check_policy_gradient(target: Tensor, advantages: Tensor, row_shape: torch.Size, device: torch.device,
                          reduction: str, temperature: float, entropy_coef: float, function: str) -> None:
    """The arguments of a policy-gradient loss beside its logits (…, V): class indices, advantages that
    broadcast to them and are constants (no gradient), the options (no device sync)."""
    check_token_target(target, row_shape, device)
    check_advantages(advantages, target.shape, device)
    check_reduction(reduction)
    check_temperature(temperature)
    check_finite("entropy_coef", float(entropy_coef))
    if advantages.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{function} does not differentiate with respect to advantages, which are constants "
                           "of the policy-gradient estimator: pass advantages.detach()")


# ---- scalar options ----------------------------------------------------------------------------


def check_finite(name: str, value: float, minimum: float = -math.inf) -> None:
    if not (math.isfinite(value) and value >= minimum):
        raise InvalidArgumentError(f"{name} must be a finite number >= {minimum}, got {value}")


def check_z_loss_softcap(z_loss: float, softcap: Optional[float]) -> None:
    check_finite("z_loss", z_loss)
    if softcap is not None:
        check_finite("softcap", softcap, 0.0)
        if softcap == 0:
            raise InvalidArgumentError("softcap must be positive (or None to disable soft-capping)")


def check_temperature(temperature: float) -> None:
    check_finite("temperature", float(temperature), 0.0)
    if temperature == 0:
        raise InvalidArgumentError("temperature must be positive")


def check_positive_size(name: str, size: Optional[int]) -> None:
    if size is not None and size < 1:
        raise InvalidArgumentError(f"{name} must be a positive number, got {size}")


def check_not_differentiable(factor: Optional[Tensor], name: str) -> None:
    """torch's cross_entropy refuses a class weight that requires grad rather than ignoring it."""
    if factor is not None and factor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"the derivative for '{name}' is not implemented: pass {name}.detach() "
                           f"(fastce, like torch.nn.functional.cross_entropy, does not train class {name}s)")


# ---- distillation, DESIGN §7.5 ------------------------------------------------------------------

DISTILLATION_REDUCTIONS = ("batchmean", "sum", "none", "mean")


def check_distillation_options(function: str, beta, temperature, ignore_index, reduction) -> int:
    """beta in [0, 1], temperature > 0, a known reduction; returns ignore_index as an int."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise InvalidArgumentError(f"{function}: beta must be a number in [0, 1] (0: KL(teacher ‖ student), "
                                   f"1: KL(student ‖ teacher), between: the generalized JSD), got {beta!r}")
    check_temperature(temperature)
    if reduction not in DISTILLATION_REDUCTIONS:
        raise ValueError(f"{function}: reduction must be one of {DISTILLATION_REDUCTIONS}, got {reduction!r}")
    return check_ignore_index(ignore_index, function)


def check_logit_transform(name: str, logit_scale, softcap) -> None:
    """A model's logit scale (finite, non-zero) and softcap (None or positive)."""
    check_finite(f"{name}_logit_scale", float(logit_scale))
    if logit_scale == 0:
        raise InvalidArgumentError(f"{name}_logit_scale must be non-zero")
    if softcap is not None:
        check_finite(f"{name}_softcap", float(softcap), 0.0)
        if softcap == 0:
            raise InvalidArgumentError(f"{name}_softcap must be positive (or None to disable soft-capping)")


def _check_shared_classes(function: str, student_classes: int, teacher_classes: int, num_classes) -> int:
    """K, the classes both models share: the same vocabulary, or the first num_classes of both."""
    if num_classes is None:
        if student_classes != teacher_classes:
            raise InvalidArgumentError(
                f"{function}: the student has {student_classes} classes and the teacher {teacher_classes}; pass "
                "num_classes=K to compare the first K classes of both (a padded embedding)")
        return student_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidArgumentError(f"{function}: num_classes must be a positive integer or None, got {num_classes!r}")
    if num_classes > min(student_classes, teacher_classes):
        raise InvalidArgumentError(
            f"{function}: num_classes={num_classes} exceeds a vocabulary (student {student_classes}, teacher "
            f"{teacher_classes} classes)")
    return num_classes


def _check_tokens(function: str, part: str, student: Tensor, teacher: Tensor, target: Optional[Tensor],
                  last: str) -> None:
    """Both models' tensors (…, X) have the same tokens (…), and the labels (class indices, as the token
    statistics' targets) are shaped like them, or None."""
    if teacher.shape[:-1] != student.shape[:-1]:
        raise InvalidArgumentError(
            f"{function}: student_{part} {list(student.shape)} and teacher_{part} {list(teacher.shape)} must "
            f"agree in every dimension but the last ({last})")
    if target is not None:
        check_token_target(target, student.shape[:-1], student.device)


def check_distillation_logits(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor],
                              num_classes) -> int:
    """Both models' logits (…, V) (class dimension last), floating, on one device, with the same leading
    shape; target labels shaped like the leading dims, or None. Returns K, the classes compared."""
    function = "distillation_loss"
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_floating(name, logits, function)
        if logits.dim() == 0 or logits.shape[-1] == 0:
            raise InvalidArgumentError(f"{function}: {name} must have a class dimension (the last) of at least one "
                                       f"class, got shape {list(logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise InvalidArgumentError(f"{function}: teacher_logits are on {teacher_logits.device} but student_logits "
                                   f"on {student_logits.device}")
    _check_tokens(function, "logits", student_logits, teacher_logits, target, "the classes")
    return _check_shared_classes(function, student_logits.shape[-1], teacher_logits.shape[-1], num_classes)


def check_distillation_heads(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                             teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                             target: Optional[Tensor], num_classes) -> int:
    """Two linear heads, hidden (…, H) with weight (V, H) and bias (V) or None each, all of one head's
    floating dtype, on one device, with the same leading shape; target labels or None. Returns K."""
    function = "linear_distillation_loss"
    heads = {"student": (student_hidden, student_weight, student_bias),
             "teacher": (teacher_hidden, teacher_weight, teacher_bias)}
    for model, (hidden, weight, bias) in heads.items():
        for part, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            name = f"{model}_{part}"
            if t is None and part == "bias":
                continue
            check_floating(name, t, function)
            if t.dtype != hidden.dtype or t.device != student_hidden.device:
                raise InvalidArgumentError(
                    f"{function}: {name} is {t.dtype} on {t.device} but {model}_hidden is {hidden.dtype} and "
                    f"student_hidden on {student_hidden.device}: a head needs one dtype, both one device")
        if hidden.dim() == 0 or weight.dim() != 2 or weight.shape[0] == 0 or hidden.shape[-1] != weight.shape[1]:
            raise InvalidArgumentError(
                f"{function}: expected {model}_hidden (…, H) and {model}_weight (V, H) with V ≥ 1, got "
                f"{list(hidden.shape)} and {list(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise InvalidArgumentError(f"{function}: expected {model}_bias of shape {[weight.shape[0]]}, got "
                                       f"{list(bias.shape)}")
    _check_tokens(function, "hidden", student_hidden, teacher_hidden, target, "the features")
    return _check_shared_classes(function, student_weight.shape[0], teacher_weight.shape[0], num_classes)

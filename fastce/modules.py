"""nn.Module front-ends: configuration only, the work is in fastce.functional."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import functional as F
from ._validation import InvalidArgumentError


def _options_set(module) -> list[str]:
    """extra_repr entries for the options a loss module has away from their defaults."""
    extras = []
    if module.label_smoothing:
        extras.append(f"label_smoothing={module.label_smoothing}")
    if module.z_loss:
        extras.append(f"z_loss={module.z_loss}")
    if module.softcap is not None:
        extras.append(f"softcap={module.softcap}")
    return extras


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (a subclass: same state_dict keys, same attributes),
    computed by fastce's kernels, with the extra options z_loss and softcap."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None,
                 validate: Union[bool, str] = True, size_average=None, reduce=None) -> None:
        # DESIGN §1's argument order; torch's deprecated size_average/reduce stay accepted by keyword
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.validate = validate  # as fastce.cross_entropy's

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                               self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap, validate=self.validate)

    def extra_repr(self) -> str:
        return ", ".join([f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}",
                          *_options_set(self)])


class FocalLoss(nn.Module):
    """Focal loss module; a tensor alpha is a buffer (saved in the state_dict, moved with .to())."""

    def __init__(self, gamma: float = 2.0, alpha: Union[None, float, Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, validate: Union[bool, str] = True) -> None:
        super().__init__()
        self.validate = validate  # as fastce.focal_loss's
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.focal_loss(input, target, self.gamma, self.alpha, self.ignore_index, self.reduction,
                            self.label_smoothing, validate=self.validate)

    def extra_repr(self) -> str:
        alpha = "tensor" if isinstance(self.alpha, torch.Tensor) else self.alpha
        return f"gamma={self.gamma}, alpha={alpha}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class LinearCrossEntropyLoss(nn.modules.loss._WeightedLoss):
    """Drop-in for torch.nn.LinearCrossEntropyLoss (PyTorch 2.13), also on older PyTorch: owns
    `linear` = nn.Linear(in_features, num_classes·prod(out_features), bias) and computes
    cross_entropy(linear(input), target) by fastce.linear_cross_entropy, without the logits. As
    torch's: the same arguments (out_features = (d1, …, dk) gives the K-dimensional loss over
    logits (N, C, d1, …, dk), with linear's weight and bias stored flat and reshaped in forward),
    attributes and state_dict keys (`linear.weight`, `linear.bias`, and the class `weight` as a
    buffer, as _WeightedLoss keeps it), plus the options z_loss, softcap and validate. `options` (torch's
    chunking options) is accepted and ignored.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 z_loss: float = 0.0, softcap: Optional[float] = None, validate: Union[bool, str] = True) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise InvalidArgumentError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise InvalidArgumentError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.validate = validate  # as fastce.linear_cross_entropy's
        self.linear = nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        head_shape = (self.num_classes, *self.out_features)
        linear_bias = None if self.linear.bias is None else self.linear.bias.reshape(head_shape)
        return F.linear_cross_entropy(input, self.linear.weight.reshape(*head_shape, self.linear.in_features), target,
                                      linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
                                      ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                      z_loss=self.z_loss, softcap=self.softcap, validate=self.validate)

    def extra_repr(self) -> str:
        extras = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                  f"out_features={self.out_features}", f"bias={self.linear.bias is not None}",
                  f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        return ", ".join(extras + _options_set(self))


# ---- binary (sigmoid) losses, DESIGN §7.1 ------------------------------------------------------


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """Drop-in for torch.nn.BCEWithLogitsLoss (a subclass: the same `weight` and `pos_weight`
    buffers, so state_dicts interchange), computed by fastce's kernel."""

    def __init__(self, weight: Optional[Tensor] = None, reduction: str = "mean", pos_weight: Optional[Tensor] = None,
                 *, size_average=None, reduce=None) -> None:
        # DESIGN §7.1's argument order; torch's deprecated size_average/reduce stay accepted by keyword
        super().__init__(weight, size_average, reduce, reduction, pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, self.reduction, self.pos_weight)


class SoftMarginLoss(nn.SoftMarginLoss):
    """Drop-in for torch.nn.SoftMarginLoss (a subclass), computed by fastce's kernel."""

    def __init__(self, reduction: str = "mean", *, size_average=None, reduce=None) -> None:
        super().__init__(size_average, reduce, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.soft_margin_loss(input, target, self.reduction)


class SigmoidFocalLoss(nn.Module):
    """torchvision.ops.sigmoid_focal_loss as a module (alpha < 0 disables alpha; default
    reduction "none", as torchvision's function)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


# ---- distillation, DESIGN §7.5 ------------------------------------------------------------------


class DistillationLoss(nn.Module):
    """fastce.distillation_loss as a module: forward(student_logits, teacher_logits, target=None)."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "batchmean") -> None:
        super().__init__()
        self.beta = beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return F.distillation_loss(student_logits, teacher_logits, target, beta=self.beta,
                                   temperature=self.temperature, ignore_index=self.ignore_index,
                                   reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")

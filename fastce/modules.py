"""nn.Module front-ends: configuration only, the work is in fastce.functional."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import functional as F


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (it is one: same arguments, same state_dict keys),
    computed by fastce's kernels, with the extra options z_loss and softcap."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: Optional[float] = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                               self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        if self.label_smoothing:
            extras.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            extras.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        return ", ".join(extras)


class FocalLoss(nn.Module):
    """Focal loss module; a tensor alpha is a buffer (saved in the state_dict, moved with .to())."""

    def __init__(self, gamma: float = 2.0, alpha: Union[None, float, Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
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
                            self.label_smoothing)

    def extra_repr(self) -> str:
        alpha = "tensor" if isinstance(self.alpha, torch.Tensor) else self.alpha
        return f"gamma={self.gamma}, alpha={alpha}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"

"""The Triton-free core every fastce module stands on: the option records of each loss family,
the dtype and shape rules, the reduction of per-row values and the dispatch rule (DESIGN §3).

It imports nothing of fastce, so the reference path, the checks and fastce.distributed can use it
on machines without Triton.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# ---- option records (hashable: they key the launch caches and travel into custom ops) ----------


class LossSpec(NamedTuple):
    """The scalar options of one softmax cross-entropy (or focal) loss call."""
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    gamma: float = 0.0
    focal: bool = False  # focal loss: "mean" divides by the non-ignored row count, not Σ w_y


class BinarySpec(NamedTuple):
    """The scalar options of one binary (sigmoid) loss call."""
    loss: str                # "bce", "soft_margin" or "focal"
    reduction: str = "mean"
    alpha: float = -1.0      # focal: < 0 disables alpha
    gamma: float = 0.0       # focal exponent


class TokenStatsSpec(NamedTuple):
    """The scalar options of one token-statistics call (log-probability and entropy)."""
    temperature: float = 1.0
    ignore_index: int = -100
    return_entropy: bool = False


class PolicyGradientSpec(NamedTuple):
    """The scalar options of one policy_gradient_loss call."""
    entropy_coef: float = 0.0
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    return_stats: bool = False

    @property
    def token_stats(self) -> TokenStatsSpec:
        """The statistics it computes: the entropy where the loss or the caller uses it."""
        return TokenStatsSpec(self.temperature, self.ignore_index, self.entropy_coef != 0 or self.return_stats)


class DistillationSpec(NamedTuple):
    """The scalar options of one distillation call (fastce.distillation_loss and its fused-head form):
    per model, logits x become softcap(scale·x)/T; beta picks the divergence (0: KL(teacher ‖ student),
    1: KL(student ‖ teacher), between: the generalized Jensen-Shannon divergence)."""
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "batchmean"
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: Optional[float] = None
    teacher_softcap: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class HeadOptions:
    """How a fused head (linear_cross_entropy, linear_token_logprobs and their vocabulary-parallel forms)
    walks its logits, overriding the engine's rule (fastce/_head.py) where given: `walk` "tokens" or
    "vocab" (how ∂W is made), `chunk_rows` rows per chunk of the row walk, `slice_classes` classes per
    slice of the vocabulary walk. Passed as `options=`, torch 2.13's slot for its chunking knobs."""
    walk: Optional[str] = None
    chunk_rows: Optional[int] = None
    slice_classes: Optional[int] = None


# ---- dtype and shape rules -----------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 inside for every input dtype, except that float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_dtype(input: Tensor, target: Tensor) -> torch.dtype:
    """The loss's dtype: the input's, or with probability targets torch's promotion of both
    (bf16 logits with fp32 probabilities give an fp32 loss, anything with fp64 an fp64 one)."""
    return torch.promote_types(input.dtype, target.dtype) if target.is_floating_point() else input.dtype


def binary_loss_dtype(loss: str, input: Tensor, target: Tensor) -> torch.dtype:
    """The dtype torch gives each loss: BCE returns the target's dtype (torch computes it in a
    buffer of the target's), soft margin the input's, torchvision's focal loss their promotion."""
    if loss == "bce":
        return target.dtype
    if loss == "soft_margin":
        return input.dtype
    return torch.promote_types(input.dtype, target.dtype)


def n_classes_of(logits: Tensor) -> int:
    """C of a (C), (N, C) or (N, C, d…) tensor (torch's class dimension)."""
    return logits.shape[0] if logits.dim() == 1 else logits.shape[1]


def row_shape(input: Tensor) -> torch.Size:
    """Shape of the per-row loss ('none' reduction): the input's shape without the class dim."""
    if input.dim() == 1:
        return torch.Size(())
    return input.shape[:1] + input.shape[2:]


def mergeable_stride(sizes, strides) -> Optional[int]:
    """Stride of dims `sizes` flattened into one, or None when they cannot be (without a copy)."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    for (_, outer), (n_inner, inner) in zip(dims, dims[1:]):
        if outer != inner * n_inner:
            return None
    return dims[-1][1] if dims else 1


def row_layout(t: Tensor) -> tuple[int, int, int, int]:
    """(inner_size, stride_outer, stride_inner, stride_class) of a (C), (N, C) or (N, C, d…) tensor.

    Row r lives at (r // inner_size)·stride_outer + (r % inner_size)·stride_inner; the trailing
    dims must be mergeable into one stride (kernel_layout copies a tensor where they are not).
    """
    return row_layout_of(tuple(t.shape), t.stride())


def row_layout_of(shape: tuple, strides: tuple) -> tuple[int, int, int, int]:
    """row_layout of a tensor of this shape and these strides."""
    if len(shape) == 1:
        return 1, 0, 0, strides[0]
    if len(shape) == 2:
        return 1, strides[0], 0, strides[1]
    inner_stride = mergeable_stride(shape[2:], strides[2:])
    assert inner_stride is not None, "trailing dims must be mergeable"
    inner_size = 1
    for size in shape[2:]:
        inner_size *= size
    return inner_size, strides[0], inner_stride, strides[1]


def kernel_layout(t: Tensor) -> Tensor:
    """The tensor itself when the kernels can address its rows with strides, else a copy: an
    (N, C, d1, …, dk) tensor is read in place (class dim strided) when d1…dk merge into one
    stride, as for contiguous and channels-last tensors; other layouts are copied once."""
    if t.dim() >= 3 and mergeable_stride(t.shape[2:], t.stride()[2:]) is None:
        return t.contiguous()
    return t


def per_row(upstream: Tensor) -> Tensor:
    """One upstream gradient per row, 1-D: a view where the rows merge, else a copy. Autograd hands
    out expanded (stride-0), transposed or sliced gradients: the kernels read it with its stride."""
    return upstream.reshape(-1)


# ---- reduction -----------------------------------------------------------------------------------


def reduce_rows(loss_rows: Tensor, reduction: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """The loss from per-row values already divided by the mean's divisor (so every reduction is a
    plain sum): 'none' reshaped, else their sum (NaN for the mean of nothing, as torch's 0/0)."""
    if reduction == "none":
        return loss_rows.reshape(shape).to(dtype)
    if reduction == "mean" and loss_rows.numel() == 0:
        return loss_rows.new_full((), float("nan"), dtype=dtype)
    return loss_rows.sum().to(dtype)


# ---- autograd -----------------------------------------------------------------------------------------


def once_differentiable(backward):
    """torch's once_differentiable (a clear error on a double backward through the gradient), without the
    no_grad context it enters at every call: a backward without create_graph=True runs in no-grad mode
    already, and then calls `backward` directly."""
    checked = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return checked(ctx, *grads)
        return backward(ctx, *grads)
    return wrapper


# ---- dispatch (DESIGN §3) ---------------------------------------------------------------------------

_TRITON_IMPORTABLE: Optional[bool] = None


def triton_importable() -> bool:
    """Whether Triton imports here (checked once; `import fastce` itself never needs it)."""
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        _TRITON_IMPORTABLE = False
        if importlib.util.find_spec("triton") is not None:
            try:
                import triton  # noqa: F401
                _TRITON_IMPORTABLE = True
            except ImportError:
                pass
    return _TRITON_IMPORTABLE


def interpreting() -> bool:
    """Whether Triton runs kernels on its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def uses_triton(input: Tensor) -> bool:
    """Whether a call on `input` runs the Triton kernels (else the pure-PyTorch reference)."""
    if input.is_cuda or (input.is_cpu and interpreting()):
        return triton_importable()
    return False

"""fastce: fused Triton cross-entropy for PyTorch with the full semantics of nn.CrossEntropyLoss.

    import fastce
    loss = fastce.cross_entropy(logits, target)          # like F.cross_entropy
    criterion = fastce.CrossEntropyLoss(label_smoothing=0.1)
    loss = fastce.sigmoid_focal_loss(logits, labels)     # like torchvision.ops.sigmoid_focal_loss

CUDA tensors run the Triton kernels; CPU tensors run them on Triton's interpreter when
TRITON_INTERPRET=1 is set before import, else the pure-PyTorch reference (fastce.reference).
Importing fastce never needs Triton or a GPU.
"""
from . import reference
from ._core import HeadOptions, LossSpec
from .functional import cross_entropy, focal_loss, linear_cross_entropy, uses_triton
from .modules import CrossEntropyLoss, FocalLoss, LinearCrossEntropyLoss
# binary (sigmoid) losses, DESIGN §7.1
from .functional import binary_cross_entropy_with_logits, sigmoid_focal_loss, soft_margin_loss
from .modules import BCEWithLogitsLoss, SigmoidFocalLoss, SoftMarginLoss
# per-token log-probabilities and entropy (RL), DESIGN §7.2
from .functional import linear_token_logprobs, policy_gradient_loss, token_logprobs
# distillation (forward KL, reverse KL, generalized JSD), DESIGN §7.5
from .functional import distillation_loss, linear_distillation_loss
from .modules import DistillationLoss

__version__ = "0.1.0"


def __getattr__(name):
    # The autograd Function imports Triton: load it on first use, so `import fastce` works without it.
    if name == "CrossEntropyFunction":
        from .softmax_losses import CrossEntropyFunction
        return CrossEntropyFunction
    raise AttributeError(f"module 'fastce' has no attribute {name!r}")


__all__ = ["cross_entropy", "focal_loss", "linear_cross_entropy", "CrossEntropyLoss", "FocalLoss",
           "LinearCrossEntropyLoss", "CrossEntropyFunction", "HeadOptions", "LossSpec", "reference", "uses_triton",
           "__version__"]
__all__ += ["binary_cross_entropy_with_logits", "soft_margin_loss", "sigmoid_focal_loss", "BCEWithLogitsLoss",
            "SoftMarginLoss", "SigmoidFocalLoss"]
__all__ += ["token_logprobs", "linear_token_logprobs", "policy_gradient_loss"]
__all__ += ["distillation_loss", "linear_distillation_loss", "DistillationLoss"]

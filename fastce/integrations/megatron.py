"""Megatron-core: fastce in place of megatron.core.tensor_parallel.vocab_parallel_cross_entropy.

    # before
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    # after
    from fastce.integrations.megatron import vocab_parallel_cross_entropy

Same arguments and result: [s, b, V/tp] logits (this rank's vocabulary slice; Megatron pads the
vocabulary to equal slices), [s, b] target, per-token float32 loss [s, b], the gradient of the
slice. Megatron-core need not be installed: only the default group comes from it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import distributed


def _tensor_parallel_group():
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None  # the world, as fastce.distributed's default
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_cross_entropy(vocab_parallel_logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                                 tp_group=None, *, validate: bool = False) -> Tensor:
    """Megatron-core's vocab_parallel_cross_entropy on fastce.distributed.

    label_smoothing ε as Megatron defines it: (1 − ε')·nll − ε'·mean_c log p_c with ε' = ε·K/(K − 1),
    i.e. fastce's (torch's) smoothing ε' over K classes. fastce takes K = V and the mean over the whole
    vocabulary; Megatron's code takes its slice's width and mean over the slice, so the two agree at
    tp = 1 and Megatron's smoothed loss differs between ranks beyond.
    tp_group: default Megatron's tensor-parallel group (the world without megatron-core).
    validate: fastce's checks (one host sync; Megatron does none, hence off by default). A target of
    -100 is ignored (loss and gradient 0), where Megatron relies on the caller's loss mask.
    """
    group = _tensor_parallel_group() if tp_group is None else tp_group
    if label_smoothing > 0:
        if not label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1) as in Megatron-core, got {label_smoothing}")
        world_size = torch.distributed.get_world_size(group)
        vocab_size = world_size * vocab_parallel_logits.shape[-1]
        label_smoothing = label_smoothing * vocab_size / (vocab_size - 1)
    return distributed.vocab_parallel_cross_entropy(
        vocab_parallel_logits, target, group=group, reduction="none", label_smoothing=label_smoothing,
        validate=validate, loss_dtype=torch.float32)

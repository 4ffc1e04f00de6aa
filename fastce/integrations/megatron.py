"""Megatron-core: fastce in place of megatron.core.tensor_parallel.vocab_parallel_cross_entropy, and of
the log-probability and entropy functions verl's Megatron workers call.

    # before
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from verl.utils.megatron.tensor_parallel import vocab_parallel_entropy, vocab_parallel_log_probs_from_logits
    # after
    from fastce.integrations.megatron import vocab_parallel_cross_entropy
    from fastce.integrations.megatron import vocab_parallel_entropy, vocab_parallel_log_probs_from_logits

Same arguments and result: [s, b, V/tp] logits (this rank's vocabulary slice; Megatron pads the
vocabulary to equal slices), [s, b] target, per-token float32 values [s, b], the gradient of the
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


def vocab_parallel_log_probs_from_logits(logits: Tensor, labels: Tensor, *, tp_group=None,
                                         validate: bool = False) -> Tensor:
    """verl's vocab_parallel_log_probs_from_logits (−Megatron's vocab_parallel_cross_entropy) on
    fastce.distributed.vocab_parallel_token_logprobs: log softmax(logits)[labels], float32, shaped like
    labels, for this rank's slice (…, V/tp) of the logits. Unlike Megatron's, the logits are not
    overwritten (verl clones them before when it needs them again), and a label of -100 gives 0.
    tp_group, validate as vocab_parallel_cross_entropy."""
    group = _tensor_parallel_group() if tp_group is None else tp_group
    return distributed.vocab_parallel_token_logprobs(logits, labels, group=group, validate=validate)


def vocab_parallel_entropy(vocab_parallel_logits: Tensor, *, tp_group=None, validate: bool = False) -> Tensor:
    """verl's vocab_parallel_entropy: the entropy of softmax(logits) per row (…), float32, from this
    rank's slice (…, V/tp), differentiable. Where the log-probabilities are wanted too, one call of
    fastce.distributed.vocab_parallel_token_logprobs(logits, labels, group=…, return_entropy=True) gives
    both from one read of the slice and two all-reduces (these two functions: two reads, four)."""
    group = _tensor_parallel_group() if tp_group is None else tp_group
    # the entropy's statistics come with a log-probability: of class 0, on every row, left unused
    labels = torch.zeros(vocab_parallel_logits.shape[:-1], dtype=torch.long, device=vocab_parallel_logits.device)
    _, entropy = distributed.vocab_parallel_token_logprobs(vocab_parallel_logits, labels, group=group,
                                                           return_entropy=True, validate=validate)
    return entropy

"""torchtitan: fastce in place of torchtitan.components.loss.cross_entropy_loss.

    # before
    from torchtitan.components.loss import cross_entropy_loss
    # after
    from fastce.integrations.torchtitan import cross_entropy_loss

torchtitan's contract: logits pred [T, V] (or [B, S, V]), labels [T] (or [B, S]), the float32 loss
summed over tokens with -100 ignored; the trainer divides it by the global number of valid tokens
(CrossEntropyLoss below does, as torchtitan's BaseLoss). pred may be a DTensor sharded on the class
dimension (loss parallel), this rank's local slice with its tensor-parallel group, or plain logits.
torchtitan need not be installed.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

import fastce

from .. import distributed
from ..distributed.dtensor import sharding_mesh_dim, slice_start, is_dtensor

IGNORE_INDEX = -100


def cross_entropy_loss(pred: Tensor, labels: Tensor, *, global_vocab_size: Optional[int] = None, group=None,
                       validate: bool = False) -> Tensor:
    """Sum of the per-token cross-entropy, float32, -100 ignored (torchtitan's cross_entropy_loss).

    pred: a DTensor sharded on its last (class) dimension; or this rank's slice of the vocabulary
    with `group`, the tensor-parallel group (slices split as torch.chunk: ceil(V/tp) classes each,
    V = global_vocab_size, default tp·V_r); or plain logits. The vocabulary-parallel paths read the
    slice as it is (no float32 copy); plain logits are upcast first, as torchtitan does.
    validate: fastce's checks (a host sync each call; off by default, as torchtitan has none).
    """
    if is_dtensor(labels):
        labels = labels.to_local()  # replicated over the tensor-parallel group
    if is_dtensor(pred):
        mesh = pred.device_mesh
        mesh_dim = sharding_mesh_dim(pred.placements, pred.dim() - 1, "pred")
        group, vocab_start = mesh.get_group(mesh_dim), slice_start(pred.shape[-1], mesh, mesh_dim)
        pred = pred.to_local()
    elif group is not None:
        world_size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        vocab_size = global_vocab_size or world_size * pred.shape[-1]
        vocab_start = min(vocab_size, -(-vocab_size // world_size) * rank)
    else:
        return fastce.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), labels.reshape(-1), reduction="sum",
                                    ignore_index=IGNORE_INDEX, validate=validate)
    return distributed.vocab_parallel_cross_entropy(
        pred, labels, group=group, vocab_start=vocab_start, ignore_index=IGNORE_INDEX, reduction="sum",
        validate=validate, loss_dtype=torch.float32)


class CrossEntropyLoss:
    """torchtitan's loss object: loss(pred, labels, global_valid_tokens) -> (sum / global_valid_tokens, {}).

    global_valid_tokens: the number of labels ≠ -100 over every data-parallel rank and gradient
    accumulation step (a device tensor: dividing by it needs no host sync); None returns the sum.
    """

    def __init__(self, *, global_vocab_size: Optional[int] = None, group=None, validate: bool = False):
        self.global_vocab_size, self.group, self.validate = global_vocab_size, group, validate

    def __call__(self, pred: Tensor, labels: Tensor, global_valid_tokens: Optional[Tensor] = None,
                 **kwargs: Any) -> tuple[Tensor, dict]:
        loss = cross_entropy_loss(pred, labels, global_vocab_size=self.global_vocab_size, group=self.group,
                                  validate=self.validate)
        if global_valid_tokens is not None:
            loss = loss / global_valid_tokens
        return loss, {}

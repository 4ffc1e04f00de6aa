"""DTensor inputs: fastce.cross_entropy / fastce.linear_cross_entropy on tensors sharded over a mesh.

torch's convention (`torch.distributed.tensor.parallel.loss_parallel`): logits sharded on the class
dimension (dim 1, or 0 for 1-D logits) on exactly one mesh dimension, the tensor-parallel one; other
mesh dimensions Replicate, or Shard on a batch dimension. The slices follow torch.chunk (the last
ones may be narrower, or empty). fastce runs fastce.distributed on the local shards with that mesh
dimension's process group and returns a DTensor placed as torch's loss_parallel places its loss:
'none' like the target, 'sum' and 'mean' Replicate on the tensor-parallel dimension and Partial (a
per-rank partial sum) on batch-sharded ones. Unlike torch, 'mean' also works on a
multi-dimensional mesh as long as no other mesh dimension shards the batch (a batch-sharded mean
needs the global count: use 'sum' and divide, as torchtitan does).

The linear form takes a head weight sharded on dim 0 (Shard(0): a column-parallel head) and input
replicated over the tensor-parallel dimension (a DTensor, or a plain tensor that every rank of it holds).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._validation import InvalidArgumentError


def is_dtensor(t) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def sharding_mesh_dim(placements, tensor_dim: int, what: str) -> int:
    """The one mesh dimension that shards `tensor_dim` (torch's "TP" dimension); the others must be
    Replicate or shard another dimension."""
    dims = [i for i, p in enumerate(placements) if p.is_shard(tensor_dim)]
    if len(dims) != 1:
        raise InvalidArgumentError(
            f"fastce: a DTensor {what} must be sharded on dimension {tensor_dim} by exactly one mesh dimension "
            f"(torch's loss_parallel convention), got placements {tuple(placements)}")
    for i, p in enumerate(placements):
        if i != dims[0] and not (p.is_shard() or p.is_replicate()):
            raise InvalidArgumentError(f"fastce: mesh dimension {i} of the {what} must be Shard or Replicate, got {p}")
    return dims[0]


def slice_start(size: int, mesh, mesh_dim: int) -> int:
    """Where this rank's shard of `size` classes begins (torch.chunk's split, as DTensor's Shard)."""
    chunk = -(-size // mesh.size(mesh_dim))
    return min(size, chunk * mesh.get_local_rank(mesh_dim))


def _rows_placements(placements, mesh_dim: int, removed_dim: int):
    """Placements of the per-row tensors (target, 'none' loss): Replicate on the tensor-parallel mesh
    dimension, other shards shifted past the removed tensor dimension."""
    from torch.distributed.tensor import Replicate, Shard
    out = []
    for i, p in enumerate(placements):
        if i == mesh_dim:
            out.append(Replicate())
        elif p.is_shard():
            if p.dim == removed_dim:
                raise InvalidArgumentError(f"fastce: mesh dimension {i} shards the dimension the loss removes ({p})")
            out.append(Shard(p.dim - 1) if p.dim > removed_dim else p)
        else:
            out.append(p)
    return tuple(out)


def _loss_placements(rows_placements, mesh_dim: int, reduction: str):
    from torch.distributed.tensor import Partial, Replicate
    if reduction == "none":
        return rows_placements
    if reduction == "mean" and any(p.is_shard() for p in rows_placements):
        raise NotImplementedError(
            "fastce: reduction='mean' of a DTensor whose batch is sharded over another mesh dimension needs the "
            "global count of rows; use reduction='sum' and divide by it (as torchtitan does)")
    return tuple(Replicate() if i == mesh_dim or p.is_replicate() else Partial() for i, p in enumerate(rows_placements))


def _local(t, placements, mesh, what: str) -> Optional[Tensor]:
    """The local tensor of `t` placed as `placements` (a DTensor must be; a plain tensor is taken as
    that local tensor only where nothing is sharded)."""
    if t is None:
        return None
    if is_dtensor(t):
        if tuple(t.placements) != tuple(placements) or t.device_mesh != mesh:
            raise InvalidArgumentError(f"fastce: the {what} DTensor must be placed {tuple(placements)} on the "
                                       f"logits' mesh, got {tuple(t.placements)}")
        return t.to_local()
    if any(p.is_shard() for p in placements):
        raise InvalidArgumentError(f"fastce: pass the {what} as a DTensor placed {tuple(placements)}: a plain tensor "
                                   "is ambiguous where the batch is sharded")
    return t


def _replicated(t: Optional[Tensor], mesh) -> Optional[Tensor]:
    from torch.distributed.tensor import Replicate
    if t is None or not is_dtensor(t):
        return t
    return t.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, *, z_loss, softcap,
                  inplace_backward, validate, return_lse, loss_dtype=None):
    """fastce.cross_entropy of a DTensor sharded on the class dimension (see the module docstring)."""
    from torch.distributed.tensor import DTensor
    from . import vocab_parallel_cross_entropy
    if inplace_backward or return_lse:
        raise NotImplementedError("fastce.cross_entropy of a DTensor: inplace_backward and return_lse are not supported")
    class_dim = 1 if input.dim() >= 2 else 0
    mesh, placements = input.device_mesh, input.placements
    mesh_dim = sharding_mesh_dim(placements, class_dim, "input")
    rows_placements = _rows_placements(placements, mesh_dim, class_dim)
    out_placements = _loss_placements(rows_placements, mesh_dim, reduction)
    if target is not None and is_dtensor(target) and target.dim() == input.dim():
        raise InvalidArgumentError("fastce: probability targets are not supported for DTensor logits (torch's "
                                   "loss_parallel has none either); pass class indices")
    loss = vocab_parallel_cross_entropy(
        input.to_local().movedim(class_dim, -1), _local(target, rows_placements, mesh, "target"),
        group=mesh.get_group(mesh_dim), vocab_start=slice_start(input.shape[class_dim], mesh, mesh_dim),
        weight=_replicated(weight, mesh), ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, validate=validate, loss_dtype=loss_dtype)
    return DTensor.from_local(loss, mesh, out_placements, run_check=False)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, reduction, ignore_index,
                         label_smoothing, z_loss, softcap, validate, return_lse, options, loss_dtype=None):
    """fastce.linear_cross_entropy with a head weight sharded on dim 0 (see the module docstring)."""
    from torch.distributed.tensor import DTensor, Replicate
    from . import linear_cross_entropy as vocab_parallel_linear_cross_entropy
    if return_lse:
        raise NotImplementedError("fastce.linear_cross_entropy of a DTensor head: return_lse is not supported")
    if not is_dtensor(linear_weight):
        raise InvalidArgumentError("fastce.linear_cross_entropy: with DTensor inputs, linear_weight must be a "
                                   "DTensor sharded on dim 0 (a column-parallel head)")
    mesh = linear_weight.device_mesh
    mesh_dim = sharding_mesh_dim(linear_weight.placements, 0, "linear_weight")
    if any(not p.is_replicate() for i, p in enumerate(linear_weight.placements) if i != mesh_dim):
        raise InvalidArgumentError("fastce: linear_weight must be Replicate on every mesh dimension but the one "
                                   f"that shards its rows, got {tuple(linear_weight.placements)}")
    if is_dtensor(input):
        input_placements = tuple(input.placements)
        if not input_placements[mesh_dim].is_replicate():
            raise InvalidArgumentError(f"fastce: the input must be Replicate on mesh dimension {mesh_dim} (where the "
                                       f"head is sharded), got {input_placements}")
        local_input = input.to_local()
    else:
        input_placements = (Replicate(),) * mesh.ndim
        local_input = input
    if any(p.is_shard() and p.dim >= input.dim() - 1 for p in input_placements):
        raise InvalidArgumentError(f"fastce: the input's feature dimension must not be sharded, got {input_placements}")
    rows_placements = input_placements  # the target and a 'none' loss are the input's rows
    local_bias = _local(linear_bias, linear_weight.placements, mesh, "linear_bias") if is_dtensor(linear_bias) \
        else linear_bias
    loss = vocab_parallel_linear_cross_entropy(
        local_input, linear_weight.to_local(), _local(target, rows_placements, mesh, "target"),
        group=mesh.get_group(mesh_dim), vocab_start=slice_start(linear_weight.shape[0], mesh, mesh_dim),
        linear_bias=local_bias, weight=_replicated(weight, mesh), ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, validate=validate, options=options,
        loss_dtype=loss_dtype)
    return DTensor.from_local(loss, mesh, _loss_placements(rows_placements, mesh_dim, reduction), run_check=False)

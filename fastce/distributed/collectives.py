"""Communication of fastce.distributed: plain torch.distributed collectives (NCCL, gloo, whatever
the group runs), the exchange that lets every rank agree on its arguments before any of them
computes (validate=True), and the schedule that keeps the ranks in step when one of them fails
while computing.

Why every rank must reach the same verdict: a rank that raises while the others go on into an
all-reduce leaves them waiting for it forever. So with validate=True each rank runs its local
checks, catches what they raise, and the ranks then swap one small table (one all-reduce of a
few int64 per rank, one host sync) that carries each rank's verdict and what must agree (rows,
target, class weights, options, slices); every rank reads the same table and raises the same
error, or none does.

After the exchange a rank can still fail on its own (a kernel, an allocation). Each pass of a call
(its forward, its backward) therefore declares its all-reduces up front (a Schedule: every rank
computes the same one from the agreed shapes); a rank whose work raises inside
Schedule.keeping_step() issues the all-reduces it has not reached, sending NaN, and then raises its
error. The others never wait: the NaN reaches every row of their results (the last value of each
summed message, a count, turns NaN too), and with validate=True they read that value after the
pass's last all-reduce (one host sync) and raise as well. A failure after a pass's last all-reduce
raises on its rank alone (nobody waits for it).
"""
from __future__ import annotations

import contextlib
import struct
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._validation import InvalidArgumentError


class Partition(NamedTuple):
    """Where this rank's slice of the class dimension lies in its group."""
    group: object             # the torch.distributed ProcessGroup
    rank: int                 # this process's rank in `group`
    world_size: int
    vocab_start: int          # first global class of the slice
    n_classes: int            # V_r, the slice's width
    vocab_size: Optional[int]  # V when the host knows it without communicating, else None


def resolve_group(group) -> tuple[object, int, int]:
    """(group, rank in it, its size); the world when `group` is None. Raises on this rank alone:
    a process outside the group has nobody to tell."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fastce.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group first (torchrun sets up its environment)")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise InvalidArgumentError(
            f"fastce.distributed: this process (global rank {dist.get_rank()}) is not a member of the group "
            "it was given; pass the tensor-parallel group this rank belongs to")
    return group, rank, dist.get_world_size(group)


def check_device(group, device: torch.device) -> None:
    """The group must have a backend for the tensors' device (NCCL has none for CPU tensors)."""
    device_types = getattr(group, "_device_types", None)
    if device_types is not None and device.type not in {d.type for d in device_types}:
        raise InvalidArgumentError(
            f"fastce.distributed: the group's backend ({dist.get_backend(group)}) cannot communicate {device.type} "
            f"tensors; pass tensors on {', '.join(sorted({d.type for d in device_types}))} or a group for {device.type}")


def exchange_device(group, t) -> torch.device:
    """Where the argument exchange's table lives: `t`'s device when the group can send it, else one
    it can (a rank whose tensors are unusable must still take part, to tell the others)."""
    device_types = [d.type for d in getattr(group, "_device_types", ())]
    if isinstance(t, Tensor) and (not device_types or t.device.type in device_types):
        return t.device
    if "cpu" in device_types:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(t: Tensor, group) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


# ---------------------------------------------------------------------------------------------
# The all-reduces of one pass, kept in step when a rank fails

MAX, SUM = "max", "sum"


class RankFailedError(RuntimeError):
    """Another rank of the group failed while computing this call (its own error is raised there)."""


class Schedule:
    """The all-reduces of one pass of a call, in the order every rank issues them: (MAX or SUM, number
    of values) each, of `dtype` on `device`. SUM messages end with a count (V, or anything finite) that
    only a failing rank's NaN makes NaN."""

    def __init__(self, group, messages: Sequence[tuple[str, int]], dtype: torch.dtype, device: torch.device):
        self.group, self.messages, self.dtype, self.device = group, list(messages), dtype, device
        self.issued = 0
        self.last_count: Optional[Tensor] = None

    def all_reduce(self, op: str, t: Tensor) -> None:
        expected = self.messages[self.issued] if self.issued < len(self.messages) else None
        # every rank computes the same schedule: a mismatch is fastce's bug, raised on every rank alike
        assert expected == (op, t.numel()), f"fastce.distributed: all-reduce {(op, t.numel())}, scheduled {expected}"
        self.issued += 1
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == MAX else dist.ReduceOp.SUM, group=self.group)
        if op == SUM and t.numel():
            self.last_count = t.view(-1)[-1:]

    @contextlib.contextmanager
    def keeping_step(self):
        """Runs the pass's work; where it raises, issues the rest of the schedule (NaN sent in each SUM,
        −inf in each MAX) before the error leaves, so that no rank waits for this one."""
        try:
            yield self
        except Exception:
            self._issue_rest()
            raise

    def _issue_rest(self) -> None:
        for op, numel in self.messages[self.issued:]:
            fill = float("nan") if op == SUM else float("-inf")
            self.all_reduce(op, torch.full((numel,), fill, dtype=self.dtype, device=self.device))

    def raise_if_a_rank_failed(self) -> None:
        """After the last all-reduce (validate=True): one host sync; RankFailedError on every rank
        that is still computing when another failed."""
        if self.last_count is not None and bool(torch.isnan(self.last_count).any()):
            raise RankFailedError("fastce.distributed: a rank of the group failed while computing this call (its "
                                  "error is raised there); no rank returns a result")


# ---------------------------------------------------------------------------------------------
# validate=True: one exchange of what must agree


def _fingerprint(t: Optional[Tensor]) -> tuple[int, int]:
    """Two int64 sums of a tensor's values (bit patterns for floats), one weighted by position, so
    that ranks holding different tensors see different numbers (wrap-around is deterministic)."""
    if t is None:
        return 0, 0
    flat = t.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.to(torch.float64).view(torch.int64)
    flat = flat.long()
    position = torch.arange(1, 2 * flat.numel() + 1, 2, device=flat.device, dtype=torch.int64)
    return flat.sum(), (flat * position).sum()


def _float_bits(value: Optional[float]) -> int:
    return -1 if value is None else struct.unpack("<q", struct.pack("<d", float(value)))[0]


_FIELDS = ("error", "rows", "classes", "start", "target_sum", "target_mix", "weight_sum", "weight_mix",
           "weight_numel", "dtype", "probabilities", "ignore_index", "reduction", "label_smoothing", "z_loss",
           "softcap", "temperature", "return_entropy", "entropy_coef", "advantages_sum", "advantages_mix")
# fields every rank must hold the same value of, with what a person is told when they do not
_MUST_AGREE = {
    "rows": "the number of rows (tokens) differs between ranks",
    "target_sum": "target differs between ranks: every rank must pass the same class indices",
    "target_mix": "target differs between ranks: every rank must pass the same class indices",
    "weight_sum": "weight differs between ranks: every rank must pass the same (V,) class weights",
    "weight_mix": "weight differs between ranks: every rank must pass the same (V,) class weights",
    "weight_numel": "weight differs between ranks: every rank must pass the same (V,) class weights",
    "dtype": "the logits' dtype differs between ranks",
    "probabilities": "some ranks pass class indices and others probabilities",
    "ignore_index": "ignore_index differs between ranks",
    "reduction": "reduction differs between ranks",
    "label_smoothing": "label_smoothing differs between ranks",
    "z_loss": "z_loss differs between ranks",
    "softcap": "softcap differs between ranks",
    "temperature": "temperature differs between ranks",
    "return_entropy": "return_entropy differs between ranks",
    "entropy_coef": "entropy_coef differs between ranks",
    "advantages_sum": "advantages differ between ranks: every rank must pass the same advantages",
    "advantages_mix": "advantages differ between ranks: every rank must pass the same advantages",
}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_REDUCTIONS = ("none", "mean", "sum")


class Arguments(NamedTuple):
    """What one rank was called with, as far as the ranks must agree on it (the token statistics'
    options last)."""
    logits: Tensor
    target: Tensor
    weight: Optional[Tensor]
    vocab_start: Optional[int]
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    temperature: float = 1.0
    return_entropy: bool = False
    entropy_coef: float = 0.0
    advantages: Optional[Tensor] = None  # one per row (broadcast), for policy_gradient_loss


def _describe(args: Arguments, n_rows: int) -> dict:
    prob = args.target.is_floating_point()
    target_sum, target_mix = _fingerprint(None if prob else args.target)  # probability slices differ by design
    weight_sum, weight_mix = _fingerprint(args.weight)
    advantages = None if args.advantages is None else args.advantages.expand(args.target.shape)
    advantages_sum, advantages_mix = _fingerprint(advantages)  # as broadcast: (B, 1) and (B, T) alike
    return dict(
        rows=n_rows, classes=args.logits.shape[-1], start=-1 if args.vocab_start is None else args.vocab_start,
        target_sum=target_sum, target_mix=target_mix, weight_sum=weight_sum, weight_mix=weight_mix,
        weight_numel=-1 if args.weight is None else args.weight.numel(),
        dtype=_DTYPES.index(args.logits.dtype) if args.logits.dtype in _DTYPES else len(_DTYPES),
        probabilities=int(prob), ignore_index=args.ignore_index, reduction=_REDUCTIONS.index(args.reduction),
        label_smoothing=_float_bits(args.label_smoothing), z_loss=_float_bits(args.z_loss),
        softcap=_float_bits(args.softcap), temperature=_float_bits(args.temperature),
        return_entropy=int(args.return_entropy), entropy_coef=_float_bits(args.entropy_coef),
        advantages_sum=advantages_sum, advantages_mix=advantages_mix)


def agree(group, rank: int, world_size: int, device: torch.device, args: Optional[Arguments], n_rows: int,
          local_error: Optional[BaseException]) -> int:
    """Exchanges each rank's verdict and arguments; raises the same error on every rank when any
    rank's arguments are wrong or the ranks' arguments disagree; else returns V, the number of
    classes of all slices together. One all-reduce and one host sync."""
    table = torch.zeros((world_size, len(_FIELDS)), dtype=torch.int64, device=device)
    if local_error is None:
        try:  # (what fails here, before the all-reduce, is this rank's verdict too)
            described = _describe(args, n_rows)
            table[rank, 1:] = torch.stack([torch.as_tensor(described[f], dtype=torch.int64, device=device)
                                           for f in _FIELDS[1:]])
        except Exception as error:  # noqa: BLE001 - raised below, after every rank has its verdict
            local_error = error
    if local_error is not None:
        table[rank] = 0
        table[rank, 0] = 1
    all_reduce_sum(table, group)
    rows = [dict(zip(_FIELDS, values)) for values in table.tolist()]
    failed = [r for r, row in enumerate(rows) if row["error"]]
    if failed:
        if local_error is not None:
            raise local_error
        raise InvalidArgumentError(
            f"fastce.distributed: rank(s) {failed} of the group rejected their arguments (the error is raised "
            f"there); no rank computed the loss")
    for field, message in _MUST_AGREE.items():
        values = [row[field] for row in rows]
        if len(set(values)) > 1:
            differing = [r for r, v in enumerate(values) if v != values[0]]
            raise InvalidArgumentError(f"fastce.distributed: {message} (rank 0 and rank(s) {differing} disagree)")
    return _tiled_vocab_size(rows)


def _tiled_vocab_size(rows: Sequence[dict]) -> int:
    """V, after checking that the slices tile [0, V) without gap or overlap."""
    widths = [row["classes"] for row in rows]
    if all(row["start"] == -1 for row in rows):
        if len(set(widths)) > 1:
            raise InvalidArgumentError(
                f"fastce.distributed: the ranks' slices have different widths {widths}: pass vocab_start "
                "(where each rank's slice begins) for uneven slices")
        starts = [r * widths[0] for r in range(len(rows))]
    elif any(row["start"] == -1 for row in rows):
        raise InvalidArgumentError("fastce.distributed: vocab_start must be given on every rank or on none")
    else:
        starts = [row["start"] for row in rows]
    end = 0
    for start, width in sorted(zip(starts, widths)):
        if start != end:
            raise InvalidArgumentError(
                f"fastce.distributed: the slices (vocab_start, width) {list(zip(starts, widths))} do not tile the "
                f"vocabulary: {'a gap' if start > end else 'an overlap'} at class {min(start, end)}")
        end = start + width
    weight_numel = rows[0]["weight_numel"]
    if weight_numel not in (-1, end):
        raise InvalidArgumentError(
            f"fastce.distributed: weight has {weight_numel} classes but the slices hold {end}; pass the full (V,) "
            "class weights on every rank")
    return end

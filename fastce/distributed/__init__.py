"""Vocabulary-parallel losses and token statistics over torch.distributed: tensor-parallel training.

    import fastce.distributed as fd
    loss = fd.vocab_parallel_cross_entropy(local_logits, target, group=tp_group)        # (…, V/tp) slice
    loss = fd.linear_cross_entropy(hidden, local_head_weight, target, group=tp_group)  # column-parallel head
    logprob, entropy = fd.vocab_parallel_token_logprobs(local_logits, target, group=tp_group,
                                                        return_entropy=True)            # RL statistics
    logprob = fd.linear_token_logprobs(hidden, local_head_weight, target, group=tp_group)
    loss = fd.policy_gradient_loss(local_logits, target, advantages, group=tp_group)

Each rank of `group` (default: the world) holds a slice of the class dimension (class dimension
last), consecutive slices in rank order unless `vocab_start` says where each begins. Every rank
gets what the single-device function (fastce.cross_entropy, fastce.token_logprobs, …) returns on the
concatenated logits, and the gradient of its own slice. Communication: two all-reduces per forward
(the row max; then one packed sum of the row statistics), none in the backward (the linear forms:
one of ∂input); no host sync with validate=False. DTensor users call fastce.cross_entropy /
fastce.linear_cross_entropy directly (see fastce/distributed/dtensor.py).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._core import HeadOptions, LossSpec, PolicyGradientSpec, TokenStatsSpec, compute_dtype
from .._validation import (
    CLASS_INDEX_DTYPES,
    InvalidArgumentError,
    TargetDtypeError,
    check_floating,
    check_ignore_index,
    check_label_smoothing,
    check_linear,
    check_not_differentiable,
    check_policy_gradient,
    check_positive_size,
    check_probability_target,
    check_reduction,
    check_target_beside,
    check_target_range,
    check_temperature,
    check_token_target,
    check_z_loss_softcap,
    logits_placeholder,
)
from .autograd import (
    SumGradientOverGroup,
    VocabParallelCrossEntropyFunction,
    VocabParallelTokenStatsFunction,
    forward_messages,
    per_rank_steps,
)
from .collectives import Arguments, Partition, RankFailedError, Schedule, agree, check_device, exchange_device, \
    resolve_group
from .spec import n_stats, token_loss_spec

__all__ = ["vocab_parallel_cross_entropy", "linear_cross_entropy", "vocab_parallel_token_logprobs",
           "linear_token_logprobs", "policy_gradient_loss", "RankFailedError"]

# what a local check raises: caught under validate=True so that every rank raises together
_ARGUMENT_ERRORS = (TypeError, ValueError, RuntimeError, IndexError)


def _check_logits(logits: Tensor) -> None:
    check_floating("logits", logits)
    if logits.dim() == 0:
        raise InvalidArgumentError("logits must have a class dimension (last): expected (…, V_r), got a 0-dim tensor")


def _check_logits_and_target(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    _check_logits(logits)
    check_target_beside(target, logits, "logits are")
    if target.is_floating_point():
        check_probability_target(target, logits, ignore_index, "this rank's slice, shaped like its logits")
        return
    if target.dtype not in CLASS_INDEX_DTYPES:
        raise TargetDtypeError(
            f"expected target dtype to be Long or Byte (global class indices) or the logits' floating point dtype "
            f"(this rank's slice of probabilities), but got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise InvalidArgumentError(
            f"expected target of shape {list(logits.shape[:-1])} (the logits' shape without the class dimension, "
            f"which is last), got {list(target.shape)}")


def _check_head(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                ignore_index: Optional[int]) -> None:
    """check_linear, also for this rank's slice of the head without classes (uneven slices, or a DTensor
    head with fewer rows than ranks)."""
    if not isinstance(linear_weight, Tensor) or linear_weight.dim() == 0 or linear_weight.shape[0]:
        check_linear(input, linear_weight, linear_bias, target, ignore_index)
        return
    check_linear(input, linear_weight.new_empty(()).expand(1, linear_weight.shape[-1]), None,
                 target[..., :1] if target.is_floating_point() else target, ignore_index)
    if linear_bias is not None and linear_bias.shape != (0,):
        raise InvalidArgumentError(f"expected linear_bias shape [0], got {list(linear_bias.shape)}")


def _head_logits(input, linear_weight) -> tuple[int, int, Tensor]:
    """(V_r, N, a placeholder for the (…, V_r) logits a column-parallel head would make): what the
    argument exchange describes, before input and linear_weight are checked."""
    n_local = linear_weight.shape[0] if isinstance(linear_weight, Tensor) and linear_weight.dim() else 0
    if not (isinstance(input, Tensor) and input.dim() > 0):
        return n_local, 0, input
    n_rows = input.shape[:-1].numel()
    return n_local, n_rows, logits_placeholder(input, n_rows, n_local).view(*input.shape[:-1], n_local)


def _check_weight(weight: Optional[Tensor], logits: Tensor, slice_end: int) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor or None, got {type(weight).__name__}")
    if weight.dim() != 1 or not weight.is_floating_point():
        raise InvalidArgumentError(f"weight must be the full (V,) floating point class weights, got "
                                   f"{weight.dtype} of shape {list(weight.shape)}")
    if weight.device != logits.device:
        raise InvalidArgumentError(f"weight is on {weight.device} but logits are on {logits.device}")
    if weight.numel() < slice_end:
        raise InvalidArgumentError(
            f"weight has {weight.numel()} classes but this rank's slice ends at class {slice_end}: pass the full "
            "(V,) class weights on every rank")
    check_not_differentiable(weight, "weight")


def _check_options(reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float]) -> None:
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    check_z_loss_softcap(z_loss, softcap)


def _partition(group, rank: int, world_size: int, args: Arguments, n_rows: int, check_local, validate: bool,
               function: str) -> tuple[Partition, Arguments]:
    """Runs this rank's checks (`check_local`, no sync) and, with validate, the exchange that makes
    every rank agree (raising the same error everywhere); returns where this rank's slice lies, and the
    arguments with vocab_start and ignore_index as ints."""
    local_error = None
    try:
        check_local()
        vocab_start = None if args.vocab_start is None else operator.index(args.vocab_start)
        if vocab_start is not None and vocab_start < 0:
            raise InvalidArgumentError(f"vocab_start must be a class index >= 0, got {vocab_start}")
        args = args._replace(vocab_start=vocab_start, ignore_index=check_ignore_index(args.ignore_index, function))
    except _ARGUMENT_ERRORS as error:
        if not validate:
            raise
        local_error = error
    n_classes = args.logits.shape[-1] if local_error is None else 0
    if validate:
        vocab_size = agree(group, rank, world_size, exchange_device(group, args.logits), args, n_rows, local_error)
        if vocab_size == 0:
            raise InvalidArgumentError("fastce.distributed: the logits have no classes on any rank")
    elif args.weight is not None:
        vocab_size = args.weight.numel()
    else:
        vocab_size = world_size * n_classes if args.vocab_start is None else None
    vocab_start = rank * n_classes if args.vocab_start is None else args.vocab_start
    return Partition(group, rank, world_size, vocab_start, n_classes, vocab_size), args


def _computed(compute: Callable, schedule: Schedule, part: Partition, args: Arguments, validate):
    """compute() (the call's forward, its all-reduces by `schedule`) kept in step with the other ranks: a
    failure here still issues the rest of the schedule (fastce/distributed/collectives.py); with validate,
    the class indices are checked first (the same verdict on every rank) and a rank that failed makes
    every rank raise after the last all-reduce."""
    with schedule.keeping_step():
        if validate and not args.target.is_floating_point():
            check_target_range(args.target, part.vocab_size, args.ignore_index)
        result = compute()
    if validate:
        schedule.raise_if_a_rank_failed()
    return result


def _forward_schedule(part: Partition, like: Tensor, messages: list) -> Schedule:
    return Schedule(part.group, messages, compute_dtype(like.dtype), like.device)


def _spec(ignore_index, reduction, label_smoothing, z_loss, softcap) -> LossSpec:
    return LossSpec(operator.index(ignore_index), reduction, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap))


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, *, group=None, vocab_start: Optional[int] = None,
                                 weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                                 validate: Union[bool, str] = True, loss_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Cross-entropy of logits split over the class dimension across the ranks of `group`.

    Args:
        logits: this rank's slice (…, V_r) of the logits, class dimension last.
        target: the global class indices (…), the same on every rank; or this rank's slice (…, V_r)
            of probability targets.
        group: the process group holding the slices (default: the world).
        vocab_start: where this rank's slice begins (default rank·V_r: equal slices); needed for
            uneven slices, on every rank.
        weight: the full (V,) class weights, the same on every rank.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as fastce.cross_entropy.
        validate: True or "sync": check, before computing, that every rank's arguments are sound and agree (same
            rows, target, weight and options; slices tiling [0, V); class indices in range), raising
            the same error on every rank (one extra all-reduce of a few int64 per rank, two host syncs),
            and raise on every rank when one fails while computing (one more host sync, after the last
            all-reduce: fastce/distributed/collectives.py). With False: no host sync, a bad class index
            gives NaN for its row, and a rank failing while computing gives NaN on the others.
        loss_dtype: dtype of the returned loss (default: the logits' dtype, as torch).

    Returns what fastce.cross_entropy returns on the concatenated logits (moved to torch's class
    dimension), on every rank; backward gives each rank the gradient of its own slice.
    """
    group, rank, world_size = resolve_group(group)
    args = Arguments(logits, target, weight, vocab_start, ignore_index, reduction, label_smoothing, z_loss, softcap)

    def check_local():
        _check_options(reduction, label_smoothing, z_loss, softcap)
        _check_logits_and_target(logits, target, ignore_index)
        check_device(group, logits.device)
        start = rank * logits.shape[-1] if vocab_start is None else operator.index(vocab_start)
        _check_weight(weight, logits, start + logits.shape[-1])

    n_rows = _rows_of(logits)
    part, args = _partition(group, rank, world_size, args, n_rows, check_local, validate,
                            "vocab_parallel_cross_entropy")
    spec = _spec(args.ignore_index, reduction, label_smoothing, z_loss, softcap)
    schedule = _forward_schedule(part, logits, forward_messages(n_rows, n_stats(spec, target.is_floating_point())))

    def compute():
        class_weight = None if weight is None else weight.detach().to(compute_dtype(logits.dtype)).contiguous()
        divisors = per_rank_steps(logits).mean_divisors(logits, target, class_weight, spec, part.vocab_size)
        return VocabParallelCrossEntropyFunction.apply(logits, target, class_weight, spec, part, divisors,
                                                       loss_dtype or logits.dtype, schedule)

    return _computed(compute, schedule, part, args, validate)


def _rows_of(logits) -> int:
    return logits.shape[:-1].numel() if isinstance(logits, Tensor) and logits.dim() else 0


def linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, group=None, vocab_start: Optional[int] = None,
    linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
    validate: Union[bool, str] = True, loss_dtype: Optional[torch.dtype] = None,
    options: Optional[HeadOptions] = None, chunk_size: Optional[int] = None,
) -> Tensor:
    """Cross-entropy of a column-parallel head: this rank holds rows [vocab_start, vocab_start + V_r)
    of the head (linear_weight (V_r, H), linear_bias (V_r)); input (…, H) is the same on every rank.

    Equals vocab_parallel_cross_entropy(input @ linear_weight.T + linear_bias, target, …) with
    gradients for input (summed over the group: one all-reduce of N·H values in the backward),
    linear_weight and linear_bias (this rank's rows), computed by the chunked-head engine's row walk
    (fastce/_head.py; options=fastce.HeadOptions(chunk_rows=…) overrides its rows per chunk, the same on
    every rank; chunk_size is a deprecated alias): neither the full logits nor this rank's slice of them
    exist at once. target: global class indices (…), or this rank's slice (…, V_r) of probabilities.
    Other arguments as vocab_parallel_cross_entropy; two all-reduces per chunk in the forward (the
    gradient, written in the forward, needs each chunk's global statistics).
    """
    if chunk_size is not None:  # the deprecated alias
        options = dataclasses.replace(options or HeadOptions(), chunk_rows=chunk_size)
    options = options or HeadOptions()
    group, rank, world_size = resolve_group(group)
    n_local, n_rows, logits_like = _head_logits(input, linear_weight)
    args = Arguments(logits_like, target, weight, vocab_start, ignore_index, reduction, label_smoothing, z_loss,
                     softcap)

    def check_local():
        _check_options(reduction, label_smoothing, z_loss, softcap)
        _check_head(input, linear_weight, linear_bias, target, ignore_index)
        check_device(group, input.device)
        check_positive_size("chunk_rows", options.chunk_rows)
        start = rank * n_local if vocab_start is None else operator.index(vocab_start)
        _check_weight(weight, input, start + n_local)

    part, args = _partition(group, rank, world_size, args, n_rows, check_local, validate, "linear_cross_entropy")
    spec = _spec(args.ignore_index, reduction, label_smoothing, z_loss, softcap)
    prob_target = target.is_floating_point()
    steps = per_rank_steps(input)
    if steps.__name__.endswith(".reference"):
        messages = forward_messages(n_rows, n_stats(spec, prob_target))
    else:
        from . import linear  # the Triton path's engine: Triton is optional for fastce.distributed
        chunk_rows = options.chunk_rows or linear.chunk_rows(n_rows, part.vocab_size, world_size, input.shape[-1],
                                                             input.dtype)
        messages = linear.cross_entropy_messages(n_rows, chunk_rows, spec, prob_target)
    schedule = _forward_schedule(part, input, messages)

    def compute():
        class_weight = None if weight is None else weight.detach().to(compute_dtype(input.dtype)).contiguous()
        rows_input = input.reshape(-1, input.shape[-1])
        rows_target = target.reshape(-1, n_local) if prob_target else target.reshape(-1)
        divisors = steps.mean_divisors(logits_like, target, class_weight, spec, part.vocab_size)
        if steps.__name__.endswith(".reference"):
            # the CPU path without Triton: this rank's slice of the logits, through torch's autograd
            logits = torch.nn.functional.linear(SumGradientOverGroup.apply(rows_input, group), linear_weight,
                                                linear_bias)
            return VocabParallelCrossEntropyFunction.apply(logits, rows_target, class_weight, spec, part, divisors,
                                                           loss_dtype or input.dtype, schedule)
        return linear.VocabParallelLinearCrossEntropyFunction.apply(
            rows_input, linear_weight, linear_bias, rows_target, class_weight, spec, part, divisors, chunk_rows,
            loss_dtype or input.dtype, schedule)

    loss = _computed(compute, schedule, part, args, validate)
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------
# Token statistics (DESIGN §7.6): fastce.token_logprobs, linear_token_logprobs and policy_gradient_loss


def _token_arguments(logits_like, target, vocab_start, ignore_index, temperature, return_entropy,
                     advantages=None, reduction="none", entropy_coef=0.0) -> Arguments:
    return Arguments(logits_like, target, None, vocab_start, ignore_index, reduction, 0.0, 0.0, None,
                     temperature, bool(return_entropy), entropy_coef, advantages)


def _token_statistics(logits: Tensor, target: Tensor, token: TokenStatsSpec, part: Partition, args: Arguments,
                      validate) -> tuple[Tensor, Tensor]:
    """(log-probability, entropy or empty), one per row, for checked arguments."""
    n_rows = logits.shape[:-1].numel()
    schedule = _forward_schedule(part, logits, forward_messages(n_rows, n_stats(token_loss_spec(token), False, token)))
    return _computed(lambda: VocabParallelTokenStatsFunction.apply(logits, target, token, part, schedule), schedule,
                     part, args, validate)


def _shaped(logprob: Tensor, entropy: Tensor, target: Tensor, return_entropy: bool):
    logprob = logprob.view(target.shape)
    return (logprob, entropy.view(target.shape)) if return_entropy else logprob


def vocab_parallel_token_logprobs(logits: Tensor, target: Tensor, *, group=None, vocab_start: Optional[int] = None,
                                  temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                                  validate: Union[bool, str] = True):
    """fastce.token_logprobs of logits split over the class dimension across the ranks of `group`:
    log softmax(logits / T)[target] and, with return_entropy, the entropy of softmax(logits / T).

    logits: this rank's slice (…, V_r), class dimension last; target: the global class indices (…), the
    same on every rank; group, vocab_start, validate as vocab_parallel_cross_entropy (validate also
    checks that temperature and return_entropy agree). Returns, on every rank, what
    fastce.token_logprobs returns on the concatenated logits: float32 tensors shaped like target
    (float64 for float64 logits), `logprob` or `(logprob, entropy)`, 0 where target == ignore_index;
    the backward through either or both gives each rank its slice's gradient (one read of the slice,
    one write of its gradient, no communication). The forward reads the slice once and all-reduces
    twice: the row max (N values), then Σexp without the target, the target's logit and, with
    return_entropy, Σ e^(z − max)(z − max) without it (2 or 3 values per row, and V).
    """
    group, rank, world_size = resolve_group(group)
    args = _token_arguments(logits, target, vocab_start, ignore_index, temperature, return_entropy)

    def check_local():
        _check_logits(logits)
        check_token_target(target, logits.shape[:-1], logits.device)
        check_temperature(temperature)
        check_device(group, logits.device)

    part, args = _partition(group, rank, world_size, args, _rows_of(logits), check_local, validate,
                            "vocab_parallel_token_logprobs")
    token = TokenStatsSpec(float(temperature), args.ignore_index, bool(return_entropy))
    logprob, entropy = _token_statistics(logits, target, token, part, args, validate)
    return _shaped(logprob, entropy, target, return_entropy)


def linear_token_logprobs(hidden: Tensor, linear_weight: Tensor, target: Tensor, *, group=None,
                          vocab_start: Optional[int] = None, linear_bias: Optional[Tensor] = None,
                          temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                          validate: Union[bool, str] = True, options: Optional[HeadOptions] = None):
    """fastce.linear_token_logprobs of a column-parallel head: this rank holds rows [vocab_start,
    vocab_start + V_r) of the head (linear_weight (V_r, H), linear_bias (V_r)); hidden (…, H) is the
    same on every rank.

    Equals vocab_parallel_token_logprobs(hidden @ linear_weight.T + linear_bias, target, …), with
    gradients for hidden (summed over the group: one all-reduce of N·H values in the backward),
    linear_weight and linear_bias (this rank's rows), by the chunked-head engine (fastce/_head.py):
    neither the logits nor this rank's slice of them exist at once. The forward walks chunks of rows
    for this rank's statistics and all-reduces twice for all of them; the backward walks rows or
    vocabulary slices by fastce.linear_token_logprobs' rule for this rank's slice
    (options=fastce.HeadOptions(chunk_rows=…) overrides the chunk; ranks may cut differently).
    """
    options = options or HeadOptions()
    group, rank, world_size = resolve_group(group)
    n_local, n_rows, logits_like = _head_logits(hidden, linear_weight)
    args = _token_arguments(logits_like, target, vocab_start, ignore_index, temperature, return_entropy)

    def check_local():
        _check_head(hidden, linear_weight, linear_bias, target, None)
        check_token_target(target, hidden.shape[:-1], hidden.device)
        check_temperature(temperature)
        check_device(group, hidden.device)
        check_positive_size("chunk_rows", options.chunk_rows)

    part, args = _partition(group, rank, world_size, args, n_rows, check_local, validate, "linear_token_logprobs")
    token = TokenStatsSpec(float(temperature), args.ignore_index, bool(return_entropy))
    rows_hidden, rows_target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if not per_rank_steps(hidden).__name__.endswith(".reference"):
        from . import linear  # the Triton path's engine: Triton is optional for fastce.distributed
        walks = linear.token_walks(n_rows, n_local, hidden.shape[-1], hidden.dtype, options.chunk_rows)
        schedule = _forward_schedule(part, hidden, forward_messages(n_rows, n_stats(token_loss_spec(token), False,
                                                                                     token)))
        logprob, entropy = _computed(
            lambda: linear.VocabParallelLinearTokenStatsFunction.apply(rows_hidden, linear_weight, linear_bias,
                                                                       rows_target, token, part, schedule, walks),
            schedule, part, args, validate)
        return _shaped(logprob, entropy, target, return_entropy)
    # the CPU path without Triton: this rank's slice of the logits, through torch's autograd
    logits = torch.nn.functional.linear(SumGradientOverGroup.apply(rows_hidden, group), linear_weight, linear_bias)
    return _shaped(*_token_statistics(logits, rows_target, token, part, args, validate), target, return_entropy)


def policy_gradient_loss(logits: Tensor, target: Tensor, advantages: Tensor, *, group=None,
                         vocab_start: Optional[int] = None, entropy_coef: float = 0.0, temperature: float = 1.0,
                         ignore_index: int = -100, reduction: str = "mean", return_stats: bool = False,
                         validate: Union[bool, str] = True):
    """fastce.policy_gradient_loss of logits split over the class dimension across the ranks of `group`:
    −(A·logprob + entropy_coef·H) per token, 0 at ignored tokens, reduced as `reduction` says ("mean"
    over the non-ignored tokens, NaN with a zero gradient when there are none).

    advantages: floating, broadcastable to target's shape (one per token, or (B, 1) for one per
    sequence), the same on every rank, a constant. Other arguments as vocab_parallel_token_logprobs
    (validate also checks that the advantages, entropy_coef and reduction agree). Returns, on every rank,
    what fastce.policy_gradient_loss returns on the concatenated logits (with return_stats,
    (loss, logprob, entropy), the statistics detached); the backward gives each rank its slice's
    gradient. Unlike the single-device form, the gradient is written in the backward (it needs the
    global statistics, known after the forward's second all-reduce): a training step moves 3× the
    slice's bytes, the forward's two all-reduces and none in the backward.
    """
    group, rank, world_size = resolve_group(group)
    args = _token_arguments(logits, target, vocab_start, ignore_index, temperature, True, advantages, reduction,
                            entropy_coef)

    def check_local():
        _check_logits(logits)
        check_policy_gradient(target, advantages, logits.shape[:-1], logits.device, reduction, temperature,
                              entropy_coef, "fastce.distributed.policy_gradient_loss")
        check_device(group, logits.device)

    part, args = _partition(group, rank, world_size, args, _rows_of(logits), check_local, validate,
                            "policy_gradient_loss")
    spec = PolicyGradientSpec(float(entropy_coef), float(temperature), args.ignore_index, reduction, bool(return_stats))
    logprob, entropy = _token_statistics(logits, target, spec.token_stats, part, args, validate)
    logprob, entropy = logprob.view(target.shape), entropy.view(target.shape) if entropy.numel() else None
    # ℓ = −(A·logprob + c·H) per token: N values, by torch (autograd hands the token statistics' backward
    # the upstream gradients −A·g and −c·g)
    per_token = -advantages.detach().to(logprob.dtype) * logprob
    if spec.entropy_coef != 0:
        per_token = per_token - spec.entropy_coef * entropy
    valid = target.long() != spec.ignore_index  # (in uint8, −100 would be the class index 156)
    per_token = torch.where(valid, per_token, 0.0)
    if reduction == "mean":
        loss = per_token.sum() / valid.sum()  # a device scalar: no host sync
    else:
        loss = per_token.sum() if reduction == "sum" else per_token
    if not return_stats:
        return loss
    return loss, logprob.detach(), entropy.detach()

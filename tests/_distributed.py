"""Process-group tests of fastce.distributed: cases run by spawned gloo ranks on the CPU.

Spawning costs seconds (every rank imports torch and Triton), so tests/test_distributed.py spawns
one group per world size and runs every case of that size inside it; each case then becomes one
pytest test reading its verdict. A hang (ranks that stop agreeing on which collective comes next)
fails every case left, at the spawn's timeout, instead of blocking the suite.

Every rank builds the same full inputs from the case's seed and keeps its slice; the oracles are
fastce.cross_entropy / fastce.linear_cross_entropy on the concatenated inputs in one process and
fastce.reference in float64.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import tempfile
import time
import traceback
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

CASES: dict[str, tuple[Callable, tuple[int, ...]]] = {}


def case(*world_sizes: int):
    """Registers a case run by every rank of a group of each of `world_sizes`."""
    def register(fn):
        CASES[fn.__name__] = (fn, world_sizes)
        return fn
    return register


def case_names(world_size: int) -> list[str]:
    return [name for name, (_, sizes) in CASES.items() if world_size in sizes]


# ---------------------------------------------------------------------------------------------
# Spawning


def run_group(world_size: int, names: list[str], timeout: float) -> dict[str, list[Optional[str]]]:
    """Runs the cases in a fresh gloo group of `world_size` processes; for each case, each rank's
    traceback (None where it passed). Processes still running after `timeout` seconds are killed."""
    context = multiprocessing.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="fastce-dist-")
    processes = [context.Process(target=_worker, args=(rank, world_size, folder, names)) for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    results = {name: [] for name in names}
    for rank, process in enumerate(processes):
        path = os.path.join(folder, f"rank{rank}.json")
        done = json.load(open(path)) if os.path.exists(path) else {}
        why = (f"rank {rank} still running after {timeout:.0f} s (a hang)" if rank in hung
               else f"rank {rank} exited with code {process.exitcode} before this case")
        for name in names:
            results[name].append(done[name] if name in done else why)
    return results


def _worker(rank: int, world_size: int, folder: str, names: list[str]) -> None:
    # as pytest's filter (pyproject.toml): the interpreter evaluates masked-off lanes too
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    done = {}
    for name in names:
        torch.manual_seed(zlib.crc32(name.encode()))  # the same inputs on every rank
        try:
            CASES[name][0](Rank(rank, world_size))
            done[name] = None
        except BaseException:  # noqa: BLE001 - the verdict travels to the parent as text
            done[name] = traceback.format_exc()
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(done, f)  # after each case: a later hang still reports the earlier ones
    dist.destroy_process_group()


class Rank(NamedTuple):
    rank: int
    world_size: int

    def slices(self, n_classes: int, uneven: bool) -> list[tuple[int, int]]:
        """(start, width) of every rank: equal widths, or uneven ones (one rank empty with 4 ranks)."""
        if not uneven:
            width = n_classes // self.world_size
            return [(r * width, width) for r in range(self.world_size)]
        shares = {2: [8, 5], 4: [5, 0, 3, 6]}[self.world_size]
        widths = [n_classes * s // sum(shares) for s in shares]
        widths[0] += n_classes - sum(widths)
        starts = [sum(widths[:r]) for r in range(self.world_size)]
        return list(zip(starts, widths))


# ---------------------------------------------------------------------------------------------
# Helpers of the cases


@contextmanager
def reference_path():
    """CPU tensors without the interpreter: fastce's pure-PyTorch path (dispatch reads the variable per call)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        os.environ["TRITON_INTERPRET"] = saved if saved is not None else "1"


def assert_same_on_every_rank(value: Tensor, what: str) -> None:
    flat = value.detach().double().reshape(-1).nan_to_num(nan=1e300)
    high, low = flat.clone(), -flat
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    assert torch.equal(high, flat) and torch.equal(-low, flat), f"{what} differs between ranks"


# torch.distributed's collectives as fastce.profiling names them (c10d's operators), by kind
_COLLECTIVE_KINDS = {"allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce",
                     "allgather_": "all_gather", "_allgather_base_": "all_gather",
                     "allgather_coalesced_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
                     "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
                     "reduce_scatter_tensor_coalesced_": "reduce_scatter", "broadcast_": "broadcast",
                     "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "gather_": "gather",
                     "scatter_": "scatter", "reduce_": "reduce", "send": "send", "recv_": "recv", "barrier": "barrier"}


def collective_calls(measurement) -> dict[str, int]:
    """{kind: calls} of the collectives in a measurement ({"all_reduce": 2}: two all-reduces, nothing else)."""
    calls: dict[str, int] = {}
    for name, op in measurement.ops.items():
        if name in _COLLECTIVE_KINDS:
            calls[_COLLECTIVE_KINDS[name]] = calls.get(_COLLECTIVE_KINDS[name], 0) + op.calls
    return calls


def collectives(measurement) -> int:
    return sum(collective_calls(measurement).values())


def expect_error(error_type, match: str, fn) -> None:
    try:
        fn()
    except error_type as error:
        assert match in str(error), f"expected {match!r} in {error!r}"
        return
    raise AssertionError(f"no {error_type.__name__} ({match!r})")


def random_grad_output(loss: Tensor) -> Tensor:
    if loss.dim() == 0:
        return torch.tensor(0.5 + torch.rand(()).item(), dtype=loss.dtype)
    return torch.randn(loss.shape, dtype=torch.float64).to(loss.dtype)


def _full_inputs(rows_shape, n_classes, dtype, probs, ignore_frac, weighted):
    from _support import make_weight
    logits = (torch.randn(*rows_shape, n_classes, dtype=torch.float64) * 2).to(dtype)
    if probs:
        target = torch.softmax(torch.randn(*rows_shape, n_classes, dtype=torch.float64) * 2, -1).to(dtype)
    else:
        target = torch.randint(0, n_classes, rows_shape)
        target[torch.rand(rows_shape) < ignore_frac] = -100
    weight = make_weight(n_classes) if weighted else None
    return logits, target, weight


def check_vocab_parallel(ctx: Rank, rows_shape=(7,), n_classes=13, dtype=torch.float32, *, uneven=False,
                         probs=False, ignore_frac=0.3, weighted=False, grad=True, **options):
    """Loss on every rank and each slice's gradient against fastce.cross_entropy on the whole logits
    (one process) and fastce.reference in float64."""
    import fastce
    import fastce.distributed as fd
    from _support import assert_close_dtype
    if not uneven:
        n_classes -= n_classes % ctx.world_size
    logits, target, weight = _full_inputs(rows_shape, n_classes, dtype, probs, ignore_frac, weighted)
    start, width = ctx.slices(n_classes, uneven)[ctx.rank]
    kwargs = dict(options, weight=weight, vocab_start=start if uneven else None)
    local = logits[..., start:start + width].clone().requires_grad_(grad)
    local_target = target[..., start:start + width] if probs else target
    loss = fd.vocab_parallel_cross_entropy(local, local_target, **kwargs)
    grad_output = random_grad_output(loss)

    def single_process(x, weight, reference):
        rows, t = x.reshape(-1, n_classes), target.reshape(-1, n_classes) if probs else target.reshape(-1)
        fn = fastce.reference.cross_entropy if reference else fastce.cross_entropy
        out = fn(rows, t.double() if reference and probs else t, weight, **options)
        return out.reshape(rows_shape) if options.get("reduction") == "none" else out

    whole = logits.clone().requires_grad_(grad)
    whole64 = logits.double().requires_grad_(grad)
    expected = single_process(whole, weight, reference=False)
    expected64 = single_process(whole64, None if weight is None else weight.double(), reference=True)
    assert loss.dtype == dtype
    assert_close_dtype(loss, expected64, dtype, "loss vs float64")
    assert_close_dtype(loss, expected.double(), dtype, "loss vs fastce.cross_entropy")
    assert_same_on_every_rank(loss, "loss")
    # float64 stays float64, scalar options included (a float32 ε, z or s would be off by ~1e-8)
    float64_close = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else None
    if float64_close:
        torch.testing.assert_close(loss, expected64.detach(), **float64_close)
    if grad:
        loss.backward(grad_output)
        expected.backward(grad_output)
        expected64.backward(grad_output.double())
        assert local.grad.dtype == dtype and local.grad.shape == local.shape
        if float64_close:
            torch.testing.assert_close(local.grad, whole64.grad[..., start:start + width], **float64_close)
        assert_close_dtype(local.grad, whole64.grad[..., start:start + width], dtype, "slice gradient vs float64")
        assert_close_dtype(local.grad, whole.grad[..., start:start + width].double(), dtype,
                           "slice gradient vs fastce.cross_entropy")
    return loss


def _head_inputs(ctx: Rank, n_rows: int, in_features: int, n_classes: int, uneven, bias: bool):
    """(V, hidden, head weight, head bias or None, target with ignored rows) of a column-parallel head."""
    if not uneven:
        n_classes -= n_classes % ctx.world_size
    hidden = torch.randn(n_rows, in_features, dtype=torch.float64).float()
    head = torch.randn(n_classes, in_features, dtype=torch.float64).float()
    head_bias = torch.randn(n_classes, dtype=torch.float64).float() if bias else None
    target = torch.randint(0, n_classes, (n_rows,))
    target[torch.rand(n_rows) < 0.3] = -100
    return n_classes, hidden, head, head_bias, target


def check_linear(ctx: Rank, n_rows=7, in_features=5, n_classes=13, *, uneven=False, bias=True, weighted=False,
                 chunk_size=None, count=False, **options):
    """fastce.distributed.linear_cross_entropy against fastce.linear_cross_entropy of the whole head:
    the loss, ∂input (summed over the group), ∂W and ∂b of this rank's rows."""
    import fastce
    import fastce.distributed as fd
    from fastce.profiling import measure
    from _support import assert_close_dtype, make_weight
    n_classes, hidden, head, head_bias, target = _head_inputs(ctx, n_rows, in_features, n_classes, uneven, bias)
    weight = make_weight(n_classes) if weighted else None
    start, width = ctx.slices(n_classes, uneven)[ctx.rank]
    leaves = [t.clone().requires_grad_() if t is not None else None
              for t in (hidden, head[start:start + width], None if head_bias is None else head_bias[start:start + width])]
    with measure() as forward:
        loss = fd.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], weight=weight,
                                       vocab_start=start if uneven else None, chunk_size=chunk_size, validate=False,
                                       **options)
    grad_output = random_grad_output(loss)
    with measure() as backward:
        loss.backward(grad_output)
    whole = [t.clone().requires_grad_() if t is not None else None for t in (hidden, head, head_bias)]
    expected = fastce.linear_cross_entropy(whole[0], whole[1], target, linear_bias=whole[2], weight=weight, **options)
    expected.backward(grad_output)
    assert_close_dtype(loss, expected.double(), torch.float32, "linear loss")
    assert_same_on_every_rank(loss, "linear loss")
    assert_close_dtype(leaves[0].grad, whole[0].grad.double(), torch.float32, "∂input")
    assert_close_dtype(leaves[1].grad, whole[1].grad[start:start + width].double(), torch.float32, "∂W slice")
    if bias:
        assert_close_dtype(leaves[2].grad, whole[2].grad[start:start + width].double(), torch.float32, "∂b slice")
    if count:
        chunks = -(-n_rows // (chunk_size or n_rows))
        assert collectives(forward) == 2 * chunks, forward.report()
        assert collectives(backward) == 1, backward.report()  # ∂input summed over the group
        assert forward.syncs == 0 and backward.syncs == 0


# ---------------------------------------------------------------------------------------------
# Cases: every reduction and option, against one process


@case(2)
def every_reduction_and_option_equal_slices(ctx):
    for reduction in ("none", "mean", "sum"):
        for options in (dict(), dict(weighted=True), dict(label_smoothing=0.2), dict(z_loss=0.01),
                        dict(softcap=3.0), dict(weighted=True, label_smoothing=0.1, z_loss=0.02, softcap=2.5)):
            check_vocab_parallel(ctx, reduction=reduction, **options)


@case(2, 4)
def every_reduction_uneven_slices_with_all_options(ctx):
    for reduction in ("none", "mean", "sum"):
        check_vocab_parallel(ctx, n_classes=29, uneven=True, reduction=reduction, weighted=True,
                             label_smoothing=0.15, z_loss=0.01, softcap=4.0)


@case(2)
def probability_targets(ctx):
    for reduction in ("none", "mean", "sum"):
        check_vocab_parallel(ctx, probs=True, reduction=reduction, weighted=True, label_smoothing=0.1, z_loss=0.01)
    check_vocab_parallel(ctx, probs=True, uneven=True)


@case(2)
def megatron_shaped_rows_and_other_dtypes(ctx):
    check_vocab_parallel(ctx, rows_shape=(3, 2), reduction="none", label_smoothing=0.1)  # [s, b, V/tp]
    check_vocab_parallel(ctx, dtype=torch.bfloat16, weighted=True, label_smoothing=0.1)
    check_vocab_parallel(ctx, dtype=torch.float16, reduction="sum")
    check_vocab_parallel(ctx, dtype=torch.float64, z_loss=0.1, softcap=3.0, label_smoothing=0.1, weighted=True)


@case(2)
def ignored_rows_masked_vocabulary_and_no_grad(ctx):
    loss = check_vocab_parallel(ctx, ignore_frac=1.0)  # every row ignored: NaN mean, zero gradient
    assert loss.isnan()
    check_vocab_parallel(ctx, ignore_frac=1.0, reduction="sum")
    check_vocab_parallel(ctx, grad=False, weighted=True, label_smoothing=0.2)
    # a whole slice of −inf logits (masked vocabulary) on one rank
    import fastce
    import fastce.distributed as fd
    from _support import assert_close_dtype
    logits = torch.randn(4, 10)
    logits[:, :5] = float("-inf")
    target = torch.tensor([5, 9, 7, -100])
    start = 5 * ctx.rank
    local = logits[:, start:start + 5].clone().requires_grad_()
    loss = fd.vocab_parallel_cross_entropy(local, target, z_loss=0.01)
    loss.backward()
    whole = logits.clone().requires_grad_()
    expected = fastce.reference.cross_entropy(whole.double(), target, z_loss=0.01)
    expected.backward()
    assert_close_dtype(loss, expected, torch.float32, "masked loss")
    assert_close_dtype(local.grad, whole.grad[:, start:start + 5].double(), torch.float32, "masked gradient")


@case(2)
def slices_longer_than_one_tile(ctx):
    check_vocab_parallel(ctx, rows_shape=(2,), n_classes=2 * 70001 + 1, uneven=True, ignore_frac=0.0,
                         label_smoothing=0.1)


@case(2, 4)
def two_all_reduces_forward_none_backward_no_sync(ctx):
    import fastce.distributed as fd
    from fastce.profiling import measure
    for options in (dict(), dict(weight=torch.rand(8 * ctx.world_size) + 0.5, label_smoothing=0.1, z_loss=0.1,
                                 softcap=5.0)):
        logits = torch.randn(6, 8, requires_grad=True)
        target = torch.randint(0, 8 * ctx.world_size, (6,))
        with measure() as forward:
            loss = fd.vocab_parallel_cross_entropy(logits, target, validate=False, **options)
        with measure() as backward:
            loss.backward()
        assert collectives(forward) == 2, forward.report()
        assert collectives(backward) == 0, backward.report()
        assert forward.syncs == 0 and backward.syncs == 0
        # the two messages: N maxima, then N·K + 1 statistics (K = 2, or 3 with smoothing)
        n_stats = 2 + ("label_smoothing" in options)
        assert forward.ops["allreduce_"].read == 4 * (6 + 6 * n_stats + 1), forward.report()
        with measure() as validated:
            fd.vocab_parallel_cross_entropy(logits.detach(), target, **options)
        assert collectives(validated) == 3  # + the argument exchange


@case(2)
def bad_class_index_without_validation_is_nan(ctx):
    import fastce.distributed as fd
    logits = torch.randn(3, 4, requires_grad=True)
    target = torch.tensor([1, 8, -100])  # 8 is past V = 8
    loss = fd.vocab_parallel_cross_entropy(logits, target, reduction="none", validate=False)
    assert loss[1].isnan() and loss[0].isfinite() and loss[2] == 0
    loss.sum().backward()
    assert logits.grad[1].isnan().all() and logits.grad[0].isfinite().all() and (logits.grad[2] == 0).all()


# ---------------------------------------------------------------------------------------------
# Cases: the pure-PyTorch path (CPU without the interpreter)


@case(2)
def reference_path_every_reduction(ctx):
    with reference_path():
        for reduction in ("none", "mean", "sum"):
            check_vocab_parallel(ctx, reduction=reduction, weighted=True, label_smoothing=0.1, z_loss=0.01,
                                 softcap=3.0, uneven=True)
        check_vocab_parallel(ctx, probs=True, label_smoothing=0.2)
        check_linear(ctx, reduction="sum", label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------
# Cases: the column-parallel head


@case(2, 4)
def linear_every_reduction(ctx):
    for reduction in ("none", "mean", "sum"):
        check_linear(ctx, reduction=reduction, uneven=True, weighted=True, label_smoothing=0.1, z_loss=0.01,
                     softcap=4.0)


@case(2)
def linear_chunks_and_collectives(ctx):
    check_linear(ctx, n_rows=9, chunk_size=4, count=True)
    check_linear(ctx, n_rows=9, chunk_size=4, bias=False, reduction="none")


# ---------------------------------------------------------------------------------------------
# Cases: bad input gives the same clear error on every rank


@case(2, 4)
def disagreeing_arguments_raise_on_every_rank(ctx):
    import fastce.distributed as fd
    from fastce._validation import InvalidArgumentError, TargetDtypeError
    logits = torch.randn(4, 6)
    target = torch.tensor([0, 3, 5, -100])
    shifted = target.clone()
    shifted[0] = 1 if ctx.rank == ctx.world_size - 1 else 0
    expect_error(InvalidArgumentError, "target differs between ranks",
                 lambda: fd.vocab_parallel_cross_entropy(logits, shifted))
    expect_error(InvalidArgumentError, "do not tile",
                 lambda: fd.vocab_parallel_cross_entropy(logits, target, vocab_start=3 * ctx.rank))
    narrow = logits[:, : 6 - (ctx.rank == 0)]
    expect_error(InvalidArgumentError, "different widths", lambda: fd.vocab_parallel_cross_entropy(narrow, target))
    expect_error(InvalidArgumentError, "reduction differs",
                 lambda: fd.vocab_parallel_cross_entropy(logits, target, reduction="sum" if ctx.rank else "mean"))
    expect_error(IndexError, "Target 99 is out of bounds",
                 lambda: fd.vocab_parallel_cross_entropy(logits, torch.tensor([0, 99, 1, 2])))
    # one rank's own mistake: it raises its error, the others say which rank it was
    wrong_dtype = target.int() if ctx.rank == 1 else target
    if ctx.rank == 1:
        expect_error(TargetDtypeError, "expected target dtype", lambda: fd.vocab_parallel_cross_entropy(logits, wrong_dtype))
    else:
        expect_error(InvalidArgumentError, "rank(s) [1] of the group rejected their arguments",
                     lambda: fd.vocab_parallel_cross_entropy(logits, wrong_dtype))
    # tensors the group's backend cannot send (gloo: CPU, CUDA)
    expect_error(InvalidArgumentError, "cannot communicate meta tensors",
                 lambda: fd.vocab_parallel_cross_entropy(logits.to("meta"), target.to("meta")))
    # the group still works
    check_vocab_parallel(ctx)


@case(2, 4)
def a_group_this_rank_is_not_in(ctx):
    import fastce
    import fastce.distributed as fd
    from fastce._validation import InvalidArgumentError
    from _support import assert_close_dtype
    members = list(range(ctx.world_size // 2))
    group = dist.new_group(members)  # a collective: every rank creates it
    logits = torch.randn(5, 12)
    target = torch.randint(0, 12, (5,))
    width = 12 // len(members)
    if ctx.rank in members:
        local = logits[:, ctx.rank * width:(ctx.rank + 1) * width]
        loss = fd.vocab_parallel_cross_entropy(local, target, group=group)
        assert_close_dtype(loss, fastce.reference.cross_entropy(logits.double(), target), torch.float32, "subgroup")
    else:
        expect_error(InvalidArgumentError, "not a member of the group",
                     lambda: fd.vocab_parallel_cross_entropy(logits[:, :width], target, group=group))
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Cases: DTensor (torch's loss_parallel convention)


def _dtensor_against_torch(mesh, placements, full: Tensor, target, tp_dim: int, *, torch_too=True, **options):
    """fastce.cross_entropy of a DTensor against the float64 reference of the whole tensor, and
    against torch's loss_parallel (placements included) where torch can run the case."""
    import torch.nn.functional as F
    import fastce
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel
    from _support import assert_close_dtype
    target_placements = [Replicate() if i == tp_dim else p for i, p in enumerate(placements)]
    dtarget = distribute_tensor(target, mesh, target_placements)
    ours = distribute_tensor(full, mesh, placements).detach().requires_grad_()
    loss = fastce.cross_entropy(ours, dtarget, **options)
    grad_output = None
    if loss.dim():  # a scalar backpropagates its own ones (Partial on batch-sharded dims: per rank)
        grad_output = distribute_tensor(torch.rand(loss.shape) + 0.5, mesh, [Replicate()] * mesh.ndim)
        grad_output = grad_output.redistribute(mesh, loss.placements)
    loss.backward(grad_output)
    assert tuple(ours.grad.placements) == tuple(placements)
    if torch_too:
        theirs = distribute_tensor(full, mesh, placements).detach().requires_grad_()
        with loss_parallel():
            expected = F.cross_entropy(theirs, dtarget, **options)
            expected.backward(grad_output)
        assert tuple(loss.placements) == tuple(expected.placements), (loss.placements, expected.placements)
        assert_close_dtype(loss.to_local(), expected.to_local().double(), torch.float32, "DTensor loss vs torch")
        assert_close_dtype(ours.grad.to_local(), theirs.grad.to_local().double(), torch.float32,
                           "DTensor gradient vs torch")
    if all(p.is_replicate() or i == tp_dim for i, p in enumerate(placements)):
        whole = full.double().requires_grad_()
        weight = options.get("weight")
        expected64 = fastce.reference.cross_entropy(whole, target, **dict(options, weight=None if weight is None
                                                                          else weight.double()))
        expected64.backward(None if grad_output is None else grad_output.full_tensor().double())
        assert_close_dtype(loss.full_tensor(), expected64, torch.float32, "DTensor loss vs float64")
        assert_close_dtype(ours.grad.full_tensor(), whole.grad, torch.float32, "DTensor gradient vs float64")


@case(2, 4)
def dtensor_sharded_on_the_class_dimension(ctx):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    for n_classes in (12, 13, 5):  # equal, torch.chunk-uneven, an empty shard with 4 ranks (torch fails there)
        torch_too = -(-n_classes // ctx.world_size) * (ctx.world_size - 1) < n_classes
        target = torch.randint(0, n_classes, (6,))
        ignored = torch.where(torch.arange(6) == 1, -100, target)
        for reduction in ("none", "mean", "sum"):
            _dtensor_against_torch(mesh, [Shard(1)], torch.randn(6, n_classes), ignored, 0, reduction=reduction,
                                   torch_too=torch_too)
            # (torch's loss_parallel backward fails on class weights with ignored rows: weights apart)
            _dtensor_against_torch(mesh, [Shard(1)], torch.randn(6, n_classes), target, 0, reduction=reduction,
                                   weight=torch.rand(n_classes) + 0.5, torch_too=torch_too)
    _dtensor_against_torch(mesh, [Shard(1)], torch.randn(3, 10, 4), torch.randint(0, 10, (3, 4)), 0,
                           reduction="none")  # (N, C, d): the class dimension strided


@case(4)
def dtensor_on_a_two_dimensional_mesh(ctx):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for reduction in ("none", "sum"):
        _dtensor_against_torch(mesh, [Shard(0), Shard(1)], torch.randn(6, 11), torch.randint(0, 11, (6,)), 1,
                               reduction=reduction)


@case(2)
def dtensor_with_options_torch_lacks(ctx):
    import fastce
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from _support import assert_close_dtype
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    full, target = torch.randn(5, 9), torch.randint(0, 9, (5,))
    options = dict(label_smoothing=0.2, z_loss=0.01, softcap=3.0)
    logits = distribute_tensor(full, mesh, [Shard(1)])
    expected = fastce.reference.cross_entropy(full.double(), target, **options)
    loss = fastce.cross_entropy(logits, target, **options)
    assert_close_dtype(loss.full_tensor(), expected, torch.float32, "DTensor with smoothing, z-loss, softcap")
    module_loss = fastce.CrossEntropyLoss(label_smoothing=0.2, z_loss=0.01, softcap=3.0)(logits, target)
    assert_close_dtype(module_loss.full_tensor(), expected, torch.float32, "fastce.CrossEntropyLoss of a DTensor")
    from fastce._validation import InvalidArgumentError
    expect_error(InvalidArgumentError, "probability targets are not supported",
                 lambda: fastce.cross_entropy(logits, distribute_tensor(torch.rand(5, 9), mesh, [Shard(1)])))
    expect_error(NotImplementedError, "no DTensor", lambda: fastce.focal_loss(logits, target))


@case(2, 4)
def dtensor_column_parallel_head(ctx):
    import fastce
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from _support import assert_close_dtype
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    hidden, head, bias = torch.randn(7, 5), torch.randn(11, 5), torch.randn(11)
    target = torch.randint(0, 11, (7,))
    dhidden = distribute_tensor(hidden, mesh, [Replicate()]).detach().requires_grad_()
    dhead = distribute_tensor(head, mesh, [Shard(0)]).detach().requires_grad_()
    dbias = distribute_tensor(bias, mesh, [Shard(0)]).detach().requires_grad_()
    loss = fastce.linear_cross_entropy(dhidden, dhead, target, linear_bias=dbias, label_smoothing=0.1)
    loss.backward()
    whole = [t.clone().requires_grad_() for t in (hidden, head, bias)]
    expected = fastce.linear_cross_entropy(whole[0], whole[1], target, linear_bias=whole[2], label_smoothing=0.1)
    expected.backward()
    assert tuple(loss.placements) == (Replicate(),)
    assert_close_dtype(loss.full_tensor(), expected.double(), torch.float32, "DTensor linear loss")
    for ours, theirs, what in zip((dhidden, dhead, dbias), whole, ("∂input", "∂W", "∂b")):
        assert_close_dtype(ours.grad.full_tensor(), theirs.grad.double(), torch.float32, what)


# ---------------------------------------------------------------------------------------------
# Cases: adapters


@case(2)
def megatron_adapter(ctx):
    from fastce.integrations.megatron import vocab_parallel_cross_entropy
    from _support import assert_close_dtype
    seq, batch, n_classes, eps = 3, 2, 10, 0.1
    logits = torch.randn(seq, batch, n_classes, dtype=torch.float64).to(torch.bfloat16)
    target = torch.randint(0, n_classes, (seq, batch))
    width = n_classes // ctx.world_size
    local = logits[..., ctx.rank * width:(ctx.rank + 1) * width].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, label_smoothing=eps)
    assert loss.dtype == torch.float32 and loss.shape == (seq, batch)
    # Megatron's formula over the whole vocabulary: (1 − ε')·nll − ε'·mean log p, ε' = ε·V/(V − 1)
    whole = logits.double().requires_grad_()
    log_p = whole.log_softmax(-1)
    smoothing = eps * n_classes / (n_classes - 1)
    expected = -(1 - smoothing) * log_p.gather(-1, target[..., None])[..., 0] - smoothing * log_p.mean(-1)
    assert_close_dtype(loss, expected, torch.float32, "Megatron loss")
    grad_output = torch.randn(seq, batch)
    loss.backward(grad_output)
    expected.backward(grad_output.double())
    assert_close_dtype(local.grad, whole.grad[..., ctx.rank * width:(ctx.rank + 1) * width], torch.bfloat16,
                       "Megatron gradient")


@case(2)
def torchtitan_adapter(ctx):
    import fastce
    from fastce.integrations.torchtitan import CrossEntropyLoss, cross_entropy_loss
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from _support import assert_close_dtype
    tokens, n_classes = 8, 13
    logits = torch.randn(tokens, n_classes, dtype=torch.float64).to(torch.bfloat16)
    labels = torch.randint(0, n_classes, (tokens,))
    labels[:3] = -100
    expected = fastce.reference.cross_entropy(logits.double(), labels, reduction="sum")
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    chunk = -(-n_classes // ctx.world_size)  # torchtitan's split: ceil(V/tp) classes per rank
    local = logits[:, ctx.rank * chunk:(ctx.rank + 1) * chunk]
    sums = [cross_entropy_loss(distribute_tensor(logits, mesh, [Shard(1)]), labels),
            cross_entropy_loss(local, labels, global_vocab_size=n_classes, group=dist.group.WORLD),
            cross_entropy_loss(logits, labels)]
    for loss in sums:
        assert loss.dtype == torch.float32 and not fastce.distributed.dtensor.is_dtensor(loss)
        assert_close_dtype(loss, expected, torch.float32, "torchtitan sum")
    global_valid_tokens = (labels != -100).sum() * 3  # e.g. three data-parallel ranks
    scaled, metrics = CrossEntropyLoss(global_vocab_size=n_classes, group=dist.group.WORLD)(
        local, labels, global_valid_tokens)
    assert metrics == {}
    assert_close_dtype(scaled, expected / global_valid_tokens, torch.float32, "torchtitan scaled")


# ---------------------------------------------------------------------------------------------
# Token statistics (DESIGN §7.6): against fastce.token_logprobs / linear_token_logprobs /
# policy_gradient_loss on the concatenated logits (one process) and fastce.reference in float64


def token_slices(ctx: Rank, n_classes: int, uneven) -> list[tuple[int, int]]:
    """Rank.slices, or with uneven="empty" every class on the last rank (the others hold none)."""
    if uneven == "empty":
        return [(0, 0)] * (ctx.world_size - 1) + [(0, n_classes)]
    return ctx.slices(n_classes, uneven)


def _token_loss(outputs, weights):
    """Σ w·output over the outputs that have a weight (the upstream gradients of the statistics)."""
    return sum((w.to(o.dtype) * o).sum() for w, o in zip(weights, outputs) if w is not None)


def _low_precision_roundings(dtype) -> int:
    # two gradients, each computed in fp32 and rounded once, may lie an ulp apart
    return 2 if dtype in (torch.bfloat16, torch.float16) else 1


def check_token_stats(ctx: Rank, rows_shape=(7,), n_classes=29, dtype=torch.float32, *, uneven=False,
                      temperature=1.0, ignore_frac=0.3, outputs="both"):
    """fd.vocab_parallel_token_logprobs on every rank and each slice's gradient of Σ w·logprob + v·entropy
    (the outputs named by `outputs`: "logprob" alone, without return_entropy; "entropy" alone; "both")
    against fastce.token_logprobs on the concatenated logits and fastce.reference in float64."""
    import fastce
    import fastce.distributed as fd
    from _support import assert_close_dtype
    if not uneven:
        n_classes -= n_classes % ctx.world_size
    logits, target, _ = _full_inputs(rows_shape, n_classes, dtype, False, ignore_frac, False)
    start, width = token_slices(ctx, n_classes, uneven)[ctx.rank]
    return_entropy = outputs != "logprob"
    weights = [torch.randn(rows_shape, dtype=torch.float64) if outputs in (name, "both") else None
               for name in ("logprob", "entropy")]

    def run(fn, x, **kwargs):
        leaf = x.detach().clone().requires_grad_()
        out = fn(leaf, target, temperature=temperature, return_entropy=return_entropy, **kwargs)
        out = out if return_entropy else (out, None)
        _token_loss(out, weights).backward()
        return out, leaf.grad

    (logprob, entropy), grad = run(fd.vocab_parallel_token_logprobs, logits[..., start:start + width],
                                   vocab_start=start if uneven else None)
    one_process, one_grad = run(fastce.token_logprobs, logits)
    exact, exact_grad = run(fastce.reference.token_logprobs, logits.double())
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ignored = target == -100
    for name, ours, one, want in zip(("logprob", "entropy"), (logprob, entropy), one_process, exact):
        if ours is None:
            continue
        assert ours.dtype == out_dtype and ours.shape == target.shape, name
        assert_close_dtype(ours, want, out_dtype, f"{name} vs float64")
        assert_close_dtype(ours, one.double(), out_dtype, f"{name} vs fastce.token_logprobs")
        assert_same_on_every_rank(ours, name)
        assert torch.equal(ours[ignored], torch.zeros_like(ours[ignored])), f"{name} at ignored tokens"
    assert grad.dtype == dtype and grad.shape == (*rows_shape, width)
    assert_close_dtype(grad, exact_grad[..., start:start + width], dtype, "slice gradient vs float64")
    assert_close_dtype(grad, one_grad[..., start:start + width].double(), dtype,
                       "slice gradient vs fastce.token_logprobs", roundings=_low_precision_roundings(dtype))
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    return logprob, entropy


def check_linear_token_stats(ctx: Rank, n_rows=7, in_features=5, n_classes=13, *, uneven=False, bias=True,
                             temperature=0.8, outputs="both", chunk_rows=None, count=False):
    """fd.linear_token_logprobs against fastce.linear_token_logprobs of the whole head and fastce.reference
    in float64: both outputs, ∂hidden (summed over the group), ∂W and ∂b of this rank's rows; with
    `count`, two all-reduces in the forward whatever the chunks, one of ∂hidden in the backward."""
    import fastce
    import fastce.distributed as fd
    from fastce.profiling import measure
    from _support import assert_close_dtype
    n_classes, hidden, head, head_bias, target = _head_inputs(ctx, n_rows, in_features, n_classes, uneven, bias)
    start, width = token_slices(ctx, n_classes, uneven)[ctx.rank]
    return_entropy = outputs != "logprob"
    weights = [torch.randn(n_rows, dtype=torch.float64) if outputs in (name, "both") else None
               for name in ("logprob", "entropy")]

    def run(fn, tensors, **kwargs):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
        with measure() as forward:
            out = fn(leaves[0], leaves[1], target, linear_bias=leaves[2], temperature=temperature,
                     return_entropy=return_entropy, **kwargs)
        out = out if return_entropy else (out, None)
        with measure() as backward:
            _token_loss(out, weights).backward()
        return out, [None if t is None else t.grad for t in leaves], (forward, backward)

    rows = slice(start, start + width)
    options = fastce.HeadOptions(chunk_rows=chunk_rows) if chunk_rows else None
    mine = (hidden, head[rows], None if head_bias is None else head_bias[rows])
    ours, grads, (forward, backward) = run(fd.linear_token_logprobs, mine, vocab_start=start if uneven else None,
                                           options=options, validate=False)
    one_process, one_grads, _ = run(fastce.linear_token_logprobs, (hidden, head, head_bias))
    exact, exact_grads, _ = run(fastce.reference.linear_token_logprobs,
                                [None if t is None else t.double() for t in (hidden, head, head_bias)])
    for name, out, one, want in zip(("logprob", "entropy"), ours, one_process, exact):
        if out is None:
            continue
        assert out.dtype == torch.float32 and out.shape == target.shape, name
        assert_close_dtype(out, want, torch.float32, f"linear {name} vs float64")
        assert_close_dtype(out, one.double(), torch.float32, f"linear {name} vs fastce.linear_token_logprobs")
        assert_same_on_every_rank(out, f"linear {name}")
    parts = (slice(None), rows, rows)
    for what, grad, one, want, part in zip(("∂hidden", "∂W slice", "∂b slice"), grads, one_grads, exact_grads,
                                           parts):
        if grad is None:
            continue
        assert_close_dtype(grad, want[part], torch.float32, f"{what} vs float64")
        assert_close_dtype(grad, one[part].double(), torch.float32, f"{what} vs fastce.linear_token_logprobs")
    if count:
        assert collective_calls(forward) == {"all_reduce": 2}, forward.report()
        assert collective_calls(backward) == {"all_reduce": 1}, backward.report()  # ∂hidden over the group
        assert backward.ops["allreduce_"].read == 4 * n_rows * in_features, backward.report()
        assert forward.syncs == 0 and backward.syncs == 0


def check_policy_gradient(ctx: Rank, rows_shape=(3, 4), n_classes=23, dtype=torch.float32, *, uneven=False,
                          per_sequence=True, ignore_frac=0.3, **options):
    """fd.policy_gradient_loss (advantages (B, 1) broadcast over each sequence's tokens, or one per token)
    against fastce.policy_gradient_loss on the concatenated logits and fastce.reference in float64: the
    loss, the statistics of return_stats and the slice's gradient for a random upstream gradient."""
    import fastce
    import fastce.distributed as fd
    from _support import assert_close_dtype
    if not uneven:
        n_classes -= n_classes % ctx.world_size
    logits, target, _ = _full_inputs(rows_shape, n_classes, dtype, False, ignore_frac, False)
    advantages = torch.randn(rows_shape[:1] + (1,) if per_sequence else rows_shape, dtype=torch.float64).float()
    start, width = token_slices(ctx, n_classes, uneven)[ctx.rank]

    def run(fn, x, grad_output=None, **kwargs):
        leaf = x.detach().clone().requires_grad_()
        loss, logprob, entropy = fn(leaf, target, advantages.to(x.dtype if x.dtype == torch.float64 else
                                                                torch.float32), return_stats=True,
                                    **options, **kwargs)
        if grad_output is None:
            grad_output = random_grad_output(loss)
        loss.backward(grad_output.to(loss.dtype))
        return (loss, logprob, entropy), leaf.grad, grad_output

    ours, grad, grad_output = run(fd.policy_gradient_loss, logits[..., start:start + width],
                                  vocab_start=start if uneven else None)
    one_process, one_grad, _ = run(fastce.policy_gradient_loss, logits, grad_output)
    exact, exact_grad, _ = run(fastce.reference.policy_gradient_loss, logits.double(), grad_output)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, out, one, want in zip(("loss", "logprob", "entropy"), ours, one_process, exact):
        assert out.dtype == out_dtype and out.shape == one.shape, name
        assert not out.requires_grad or name == "loss"
        assert_close_dtype(out, want, out_dtype, f"policy {name} vs float64")
        assert_close_dtype(out, one.double(), out_dtype, f"policy {name} vs fastce.policy_gradient_loss")
        assert_same_on_every_rank(out, f"policy {name}")
    assert grad.dtype == dtype and grad.shape == (*rows_shape, width)
    assert_close_dtype(grad, exact_grad[..., start:start + width], dtype, "policy slice gradient vs float64")
    assert_close_dtype(grad, one_grad[..., start:start + width].double(), dtype,
                       "policy slice gradient vs fastce.policy_gradient_loss", roundings=2)
    return ours[0]


@case(2, 4)
def token_statistics_against_one_process(ctx):
    for outputs in ("logprob", "entropy", "both"):
        check_token_stats(ctx, outputs=outputs)
    check_token_stats(ctx, uneven=True, temperature=0.7)  # with 4 ranks, one of them holds no class
    check_token_stats(ctx, uneven="empty", temperature=1.3, outputs="entropy")
    check_token_stats(ctx, rows_shape=(3, 2), dtype=torch.bfloat16, temperature=0.6)  # [s, b, V/tp]
    check_token_stats(ctx, dtype=torch.float64, uneven=True, temperature=0.9)  # to float64's accuracy


@case(2)
def token_statistics_dtypes_ignored_tokens_and_masked_vocabulary(ctx):
    check_token_stats(ctx, dtype=torch.bfloat16, uneven=True, outputs="entropy")
    check_token_stats(ctx, dtype=torch.float16, outputs="logprob")
    check_token_stats(ctx, ignore_frac=1.0)  # every token ignored: zeros, zero gradient
    check_token_stats(ctx, rows_shape=(2,), n_classes=2 * 4100 + 3, uneven=True, ignore_frac=0.0)  # > one tile
    # a whole slice of −inf logits (a masked vocabulary) on one rank
    import fastce
    import fastce.distributed as fd
    from _support import assert_close_dtype
    logits = torch.randn(3, 10)
    logits[:, :5] = float("-inf")
    target = torch.tensor([5, 9, -100])
    local = logits[:, 5 * ctx.rank:5 * (ctx.rank + 1)].clone().requires_grad_()
    logprob, entropy = fd.vocab_parallel_token_logprobs(local, target, return_entropy=True)
    (logprob.sum() + entropy.sum()).backward()
    whole = logits.double().requires_grad_()
    want = fastce.reference.token_logprobs(whole, target, return_entropy=True)
    (want[0].sum() + want[1].sum()).backward()
    assert_close_dtype(logprob, want[0], torch.float32, "masked logprob")
    assert_close_dtype(entropy, want[1], torch.float32, "masked entropy")
    assert_close_dtype(local.grad, whole.grad[:, 5 * ctx.rank:5 * (ctx.rank + 1)], torch.float32, "masked gradient")


@case(2, 4)
def linear_token_statistics(ctx):
    check_linear_token_stats(ctx, uneven=True, chunk_rows=3, count=True)  # three chunks, two all-reduces
    check_linear_token_stats(ctx, bias=False, outputs="entropy")
    check_linear_token_stats(ctx, uneven="empty", outputs="logprob", temperature=1.0)


@case(2, 4)
def policy_gradient_loss_with_broadcast_advantages(ctx):
    for reduction in ("mean", "sum", "none"):
        check_policy_gradient(ctx, reduction=reduction, entropy_coef=0.05, temperature=0.8, uneven=True)
    check_policy_gradient(ctx, per_sequence=False, reduction="sum")
    check_policy_gradient(ctx, dtype=torch.bfloat16, reduction="mean", entropy_coef=0.1)
    loss = check_policy_gradient(ctx, ignore_frac=1.0, reduction="mean")  # every token ignored
    assert loss.isnan()


@case(2)
def token_statistics_on_the_reference_path(ctx):
    with reference_path():
        check_token_stats(ctx, dtype=torch.float64, uneven=True, temperature=0.7)
        check_token_stats(ctx, dtype=torch.bfloat16, outputs="entropy")
        check_token_stats(ctx, uneven="empty", outputs="both")
        check_linear_token_stats(ctx, uneven=True)
        check_linear_token_stats(ctx, uneven="empty", bias=False)
        check_policy_gradient(ctx, reduction="mean", entropy_coef=0.05, uneven=True)


@case(2, 4)
def token_statistics_two_all_reduces_forward_none_backward_no_sync(ctx):
    import fastce.distributed as fd
    from fastce.profiling import measure
    n_rows, width = 6, 8
    target = torch.randint(0, width * ctx.world_size, (n_rows,))
    target[1] = -100
    for return_entropy in (False, True):
        logits = torch.randn(n_rows, width, requires_grad=True)
        with measure() as forward:
            out = fd.vocab_parallel_token_logprobs(logits, target, temperature=0.8, return_entropy=return_entropy,
                                                   validate=False)
        with measure() as backward:
            (out[0].sum() + out[1].sum() if return_entropy else out.sum()).backward()
        # the row max, then one message; nothing else (a third all-reduce or an all-gather fails here)
        assert collective_calls(forward) == {"all_reduce": 2}, forward.report()
        assert collective_calls(backward) == {}, backward.report()
        assert forward.syncs == 0 and backward.syncs == 0
        # N maxima, then Σexp without the target, the target logit (and E) per row, and V
        n_stats = 2 + return_entropy
        assert forward.ops["allreduce_"].read == 4 * (n_rows + n_rows * n_stats + 1), forward.report()
        with measure() as validated:
            fd.vocab_parallel_token_logprobs(logits.detach(), target, return_entropy=return_entropy)
        assert collective_calls(validated) == {"all_reduce": 3}  # + the argument exchange
    logits = torch.randn(n_rows, width, requires_grad=True)
    with measure() as forward:
        loss = fd.policy_gradient_loss(logits, target, torch.randn(n_rows), entropy_coef=0.1, validate=False)
    with measure() as backward:
        loss.backward()
    assert collective_calls(forward) == {"all_reduce": 2} and collective_calls(backward) == {}
    assert forward.syncs == 0 and backward.syncs == 0


@case(2, 4)
def token_statistics_bad_input_raises_on_every_rank(ctx):
    import fastce.distributed as fd
    from fastce._validation import InvalidArgumentError, TargetDtypeError
    logits = torch.randn(4, 6)
    target = torch.tensor([0, 3, 5, -100])
    last = ctx.rank == ctx.world_size - 1
    advantages = torch.ones(4)
    expect_error(InvalidArgumentError, "temperature differs between ranks",
                 lambda: fd.vocab_parallel_token_logprobs(logits, target, temperature=0.5 if last else 1.0))
    expect_error(InvalidArgumentError, "return_entropy differs between ranks",
                 lambda: fd.vocab_parallel_token_logprobs(logits, target, return_entropy=last))
    expect_error(IndexError, "Target 99 is out of bounds",
                 lambda: fd.vocab_parallel_token_logprobs(logits, torch.tensor([0, 99, 1, 2])))
    shifted = torch.where(torch.arange(4) == 0, int(last), target)
    expect_error(InvalidArgumentError, "target differs between ranks",
                 lambda: fd.policy_gradient_loss(logits, shifted, advantages))
    expect_error(InvalidArgumentError, "advantages differ between ranks",
                 lambda: fd.policy_gradient_loss(logits, target, advantages * (1 + last)))
    expect_error(InvalidArgumentError, "entropy_coef differs between ranks",
                 lambda: fd.policy_gradient_loss(logits, target, advantages, entropy_coef=0.1 * last))
    expect_error(InvalidArgumentError, "reduction differs between ranks",
                 lambda: fd.policy_gradient_loss(logits, target, advantages, reduction="sum" if last else "mean"))
    # one advantage per sequence on one rank, the same values broadcast on the others: they agree
    fd.policy_gradient_loss(logits.view(2, 2, 6), target.view(2, 2),
                            torch.ones(2, 1) if last else torch.ones(2, 2), validate=True)
    hidden, head = torch.randn(5, 3)[:4 + last], torch.randn(6, 3)
    expect_error(InvalidArgumentError, "the number of rows (tokens) differs between ranks",
                 lambda: fd.linear_token_logprobs(hidden, head, torch.zeros(4 + last, dtype=torch.long)))
    # one rank's own mistake: it raises its error, the others say which rank it was
    culprit = f"rank(s) [{ctx.world_size - 1}] of the group rejected their arguments"
    probabilities = torch.rand(4, 6)  # (drawn on every rank: the random streams stay alike)
    for error, match, call in (
            (InvalidArgumentError, "temperature must be positive",
             lambda: fd.vocab_parallel_token_logprobs(logits, target, temperature=0.0 if last else 1.0)),
            (TargetDtypeError, "expected target of class indices",
             lambda: fd.vocab_parallel_token_logprobs(logits, probabilities if last else target)),
            (InvalidArgumentError, "do not broadcast",
             lambda: fd.policy_gradient_loss(logits, target, torch.ones(3) if last else advantages)),
            (RuntimeError, "does not differentiate with respect to advantages",
             lambda: fd.policy_gradient_loss(logits, target, advantages.clone().requires_grad_(last)))):
        if last:
            expect_error(error, match, call)
        else:
            expect_error(InvalidArgumentError, culprit, call)
    # the group still works
    check_token_stats(ctx)


@case(2)
def megatron_token_statistics_adapter(ctx):
    """verl's Megatron workers' vocab_parallel_log_probs_from_logits and vocab_parallel_entropy."""
    from fastce.integrations.megatron import vocab_parallel_entropy, vocab_parallel_log_probs_from_logits
    from _support import assert_close_dtype
    seq, batch, n_classes = 3, 2, 10
    logits = torch.randn(seq, batch, n_classes, dtype=torch.float64).to(torch.bfloat16)
    labels = torch.randint(0, n_classes, (seq, batch))
    width = n_classes // ctx.world_size
    mine = slice(ctx.rank * width, (ctx.rank + 1) * width)
    expected = {vocab_parallel_log_probs_from_logits: lambda x: x.log_softmax(-1).gather(-1, labels[..., None])[..., 0],
                vocab_parallel_entropy: lambda x: -(x.softmax(-1) * x.log_softmax(-1)).sum(-1)}
    for function, formula in expected.items():
        local = logits[..., mine].clone().requires_grad_()
        before = local.detach().clone()
        out = function(local, labels) if function is vocab_parallel_log_probs_from_logits else function(local)
        assert out.dtype == torch.float32 and out.shape == (seq, batch), function.__name__
        assert torch.equal(local.detach(), before), "the logits must not be modified (Megatron's are)"
        grad_output = torch.randn(seq, batch)
        out.backward(grad_output)
        whole = logits.double().requires_grad_()
        want = formula(whole)
        want.backward(grad_output.double())
        assert_close_dtype(out, want, torch.float32, function.__name__)
        assert_close_dtype(local.grad, whole.grad[..., mine], torch.bfloat16, f"{function.__name__} gradient")


# ---------------------------------------------------------------------------------------------
# Cases of issue 23 (tests/test_regressions.py also runs each in a group of its own). Last in this file:
# before a fix, a rank left waiting in a collective takes the group down, and every case after it.


class _FailOnceAfterTheExchange(TorchDispatchMode):
    """On this rank, the first torch operator run after the `after`-th collective of the call (1: the
    argument exchange of validate=True) raises, once, as a kernel or an allocation failing there would.
    A dispatch mode (public torch API), so it holds whatever fastce's internals look like."""

    MESSAGE = "injected failure after the argument exchange"

    def __init__(self, after: int = 1):
        super().__init__()
        self.after, self.collectives, self.failed = after, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.collectives += 1
        elif self.collectives >= self.after and not self.failed:
            self.failed = True
            raise RuntimeError(self.MESSAGE)
        return func(*args, **(kwargs or {}))


def _error_chain(error: BaseException) -> str:
    text = []
    while error is not None:
        text.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- ".join(text)


@case(2)
def a_rank_failing_after_the_argument_exchange_fails_every_rank(ctx):
    """A rank whose computation fails right after the ranks agreed on their arguments (at the first torch
    operator after the exchange, whatever it is): every rank raises, none is left waiting in a collective,
    and the group's next call works; both forms, on the kernels and on the pure-PyTorch path."""
    import fastce
    import fastce.distributed as fd
    from _support import assert_close_dtype
    failing_rank = ctx.world_size - 1
    n_classes = 6 * ctx.world_size
    logits = torch.randn(5, n_classes)
    hidden, head = torch.randn(5, 4), torch.randn(n_classes, 4)
    target = torch.randint(0, n_classes, (5,))
    width = n_classes // ctx.world_size
    mine = slice(ctx.rank * width, (ctx.rank + 1) * width)
    calls = {
        "vocab_parallel_cross_entropy": lambda: fd.vocab_parallel_cross_entropy(logits[:, mine], target),
        "linear_cross_entropy": lambda: fd.linear_cross_entropy(hidden, head[mine], target),
    }
    for path, name in itertools.product(("kernels", "reference"), calls):
        where = f"{path}, {name}, rank {failing_rank} failing after the exchange"
        mode = _FailOnceAfterTheExchange() if ctx.rank == failing_rank else nullcontext()
        with reference_path() if path == "reference" else nullcontext():
            try:
                with mode:
                    calls[name]()
            except Exception as error:  # noqa: BLE001 - any exception is a report; the failing rank's names it
                if ctx.rank == failing_rank:
                    assert _FailOnceAfterTheExchange.MESSAGE in _error_chain(error), f"{where}: {_error_chain(error)}"
            else:
                raise AssertionError(f"{where}: rank {ctx.rank} returned a loss")
            if ctx.rank == failing_rank:
                assert mode.failed, f"{where}: the injected failure did not happen"
            # the ranks' collectives are still in step: the next call gives the whole logits' loss
            assert_close_dtype(fd.vocab_parallel_cross_entropy(logits[:, mine], target),
                               fastce.reference.cross_entropy(logits.double(), target), torch.float32,
                               f"{where}: the next call")


@case(2)
def empty_slice_on_the_reference_path(ctx):
    """Item 3: a rank holding no classes (slices of widths (0, V) and (V, 0)) on the pure-PyTorch path (and
    on the kernels, which handle it): every rank returns the loss of the whole logits and its slice's
    gradient, for both forms, against fastce.reference in float64."""
    import fastce
    import fastce.distributed as fd
    from _support import assert_close_dtype
    n_rows, n_classes, in_features = 5, 7, 4
    logits = torch.randn(n_rows, n_classes, dtype=torch.float64).float()
    hidden = torch.randn(n_rows, in_features, dtype=torch.float64).float()
    head = torch.randn(n_classes, in_features, dtype=torch.float64).float()
    bias = torch.randn(n_classes, dtype=torch.float64).float()
    target = torch.randint(0, n_classes, (n_rows,))
    target[1] = -100
    for path in ("kernels", "reference"):
        for empty_rank in range(ctx.world_size):
            owner = 1 - empty_rank
            mine = slice(0, n_classes if ctx.rank == owner else 0)
            where = f"{path}, rank {empty_rank} empty"
            with (reference_path() if path == "reference" else nullcontext()):
                local = logits[:, mine].clone().requires_grad_()
                loss = fd.vocab_parallel_cross_entropy(local, target, vocab_start=0, reduction="sum")
                grad_output = torch.tensor(1.3)
                loss.backward(grad_output)
                leaves = [t.clone().requires_grad_() for t in (hidden, head[mine], bias[mine])]
                linear_loss = fd.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                                      vocab_start=0, reduction="sum")
                linear_loss.backward(grad_output)
            whole = logits.double().requires_grad_()
            expected = fastce.reference.cross_entropy(whole, target, reduction="sum")
            expected.backward(grad_output.double())
            assert_close_dtype(loss, expected, torch.float32, f"{where}: loss")
            assert_close_dtype(local.grad, whole.grad[:, mine], torch.float32, f"{where}: slice gradient")
            heads = [t.double().requires_grad_() for t in (hidden, head, bias)]
            expected = fastce.reference.linear_cross_entropy(heads[0], heads[1], target, linear_bias=heads[2],
                                                             reduction="sum")
            expected.backward(grad_output.double())
            assert_close_dtype(linear_loss, expected, torch.float32, f"{where}: linear loss")
            for what, ours, theirs in zip(("∂input", "∂W slice", "∂b slice"), leaves,
                                          (heads[0].grad, heads[1].grad[mine], heads[2].grad[mine])):
                assert_close_dtype(ours.grad, theirs, torch.float32, f"{where}: {what}")

"""What each rank of a tensor-parallel group moves and sends for one training step of the loss.

    python -m bench.distributed_bytes [--world-size 2] [--tokens 64] [--vocab 32768] [--dtype bfloat16]

Spawns a gloo group on the CPU and counts, on every rank, with fastce.profiling: bytes read and
written by kernels (Triton on the interpreter, torch operators), the peak of live tensor bytes, host
syncs, and the collectives with their message bytes. Providers: fastce.distributed,
Megatron-core's vocab_parallel_cross_entropy (when megatron-core imports),
and the baseline that all-gathers the logits and runs fastce.cross_entropy on them. Prints a
markdown table (rank 0's counts; every rank moves the same amounts). torch's loss_parallel is not
counted: fastce.profiling sees a DTensor's global operators, not what each rank runs.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import warnings

import torch
import torch.distributed as dist

COLLECTIVES = ("allreduce", "allgather", "_allgather", "reduce_scatter", "broadcast")


def _collectives(measurement) -> tuple[int, int]:
    """(count, bytes of their results: the reduced tensor of an all-reduce, the gathered one of an
    all-gather) of the collectives in a measurement."""
    ops = [op for name, op in measurement.ops.items() if name.startswith(COLLECTIVES)]
    return sum(op.calls for op in ops), sum(op.write for op in ops)


def _providers(group, world_size: int, rank: int):
    import fastce
    import fastce.distributed as fd

    def fastce_distributed(local, target):
        return fd.vocab_parallel_cross_entropy(local, target, group=group, validate=False)

    def all_gather_logits(local, target):
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.detach().contiguous(), group=group)
        whole = torch.cat(parts, -1).requires_grad_()
        loss = fastce.cross_entropy(whole, target, validate=False)
        return _GatheredSlice.apply(local, whole, loss, rank)

    providers = {"fastce.distributed": fastce_distributed, "all-gather + fastce": all_gather_logits}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)

        def megatron(local, target):
            return vocab_parallel_cross_entropy(local, target).mean()
        providers["Megatron-core"] = megatron
    except Exception as error:  # noqa: BLE001 - a missing peer is reported, not fatal
        print(f"(Megatron-core not measured: {type(error).__name__}: {error})")
    return providers


class _GatheredSlice(torch.autograd.Function):
    """The baseline's backward: the gathered logits' gradient, cut back to this rank's slice."""

    @staticmethod
    def forward(ctx, local, whole, loss, rank):
        ctx.save_for_backward(whole, loss)
        ctx.rank, ctx.width = rank, local.shape[-1]
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        whole, loss = ctx.saved_tensors
        with torch.enable_grad():
            (whole_grad,) = torch.autograd.grad(loss, whole, grad)
        return whole_grad[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None, None, None


def _measure(rank: int, world_size: int, store: str, tokens: int, vocab: int, dtype: str, queue) -> None:
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    from fastce.profiling import measure
    torch.manual_seed(0)
    width = vocab // world_size
    logits = (torch.randn(tokens, vocab) * 2).to(getattr(torch, dtype))
    target = torch.randint(0, vocab, (tokens,))
    local = logits[:, rank * width:(rank + 1) * width].contiguous()
    rows = []
    for name, provider in _providers(dist.group.WORLD, world_size, rank).items():
        x = local.clone().requires_grad_()
        with measure() as forward:
            loss = provider(x, target)
        with measure() as backward:
            loss.backward()
        counts = [(_collectives(m), m.total_bytes, m.peak_bytes, m.syncs) for m in (forward, backward)]
        rows.append((name, counts))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    store = os.path.join(tempfile.mkdtemp(), "store")
    processes = [context.Process(target=_measure, args=(rank, args.world_size, store, args.tokens, args.vocab,
                                                        args.dtype, queue)) for rank in range(args.world_size)]
    for process in processes:
        process.start()
    rows = queue.get(timeout=900)
    for process in processes:
        process.join()
    slice_bytes = args.tokens * (args.vocab // args.world_size) * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"\nper rank, tp = {args.world_size}, N = {args.tokens} tokens, V = {args.vocab} ({args.dtype}); "
          f"moved and peak as multiples of the rank's logits slice ({slice_bytes} B)\n")
    print("| provider | forward: collectives, their bytes / token | backward: collectives | moved fwd+bwd | "
          "peak fwd | syncs |")
    print("|---|---|---|---|---|---|")
    for name, ((fwd_coll, fwd_moved, fwd_peak, fwd_syncs), (bwd_coll, bwd_moved, _, bwd_syncs)) in rows:
        print(f"| {name} | {fwd_coll[0]}, {fwd_coll[1] / args.tokens:.1f} B | {bwd_coll[0]} | "
              f"{(fwd_moved + bwd_moved) / slice_bytes:.2f}× | "
              f"{fwd_peak / slice_bytes:.2f}× | {fwd_syncs + bwd_syncs} |")


if __name__ == "__main__":
    main()

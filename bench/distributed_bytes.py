"""What each rank of a tensor-parallel group moves and sends for one training step of the loss.

    python -m bench.distributed_bytes [--op cross_entropy|token_stats] [--world-size 2] [--tokens 64]
                                      [--vocab 32768] [--dtype bfloat16]

Spawns a gloo group on the CPU and counts, on every rank, with fastce.profiling: bytes read and
written by kernels (Triton on the interpreter, torch operators), the peak of live tensor bytes, host
syncs, and the collectives with their message bytes. Providers, for --op cross_entropy (the mean
loss): fastce.distributed.vocab_parallel_cross_entropy, Megatron-core's vocab_parallel_cross_entropy
(when megatron-core imports), and the baseline that all-gathers the logits and runs
fastce.cross_entropy on them; for --op token_stats (log-probabilities and entropy, a backward through
both with per-token weights, as an RL loss): fastce.distributed.vocab_parallel_token_logprobs, verl's
vocab_parallel_log_probs_from_logits + vocab_parallel_entropy (when verl and megatron-core import),
and the all-gather of the logits with fastce.token_logprobs. Prints a markdown table (rank 0's
counts; every rank moves the same amounts). torch's loss_parallel is not counted: fastce.profiling
sees a DTensor's global operators, not what each rank runs.
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


def _ring_share(name: str, world_size: int) -> float:
    """Bytes a rank sends, per byte of a collective's result, by the ring algorithm (NCCL's, gloo's): an
    all-reduce sends 2(tp − 1)/tp of its message, an all-gather (tp − 1)/tp of what it gathers (its own
    slice to each other rank), a reduce-scatter and a broadcast (tp − 1)/tp."""
    return 2 * (world_size - 1) / world_size if name.startswith("allreduce") else (world_size - 1) / world_size


def _collectives(measurement, world_size: int) -> tuple[int, int, float]:
    """(count, bytes of their results: the reduced tensor of an all-reduce, the gathered one of an
    all-gather, bytes each rank sends by the ring algorithm) of the collectives in a measurement."""
    ops = [(name, op) for name, op in measurement.ops.items() if name.startswith(COLLECTIVES)]
    return (sum(op.calls for _, op in ops), sum(op.write for _, op in ops),
            sum(op.write * _ring_share(name, world_size) for name, op in ops))


def _gathered(local, group, world_size: int):
    """The logits of every rank's slice, concatenated (the baseline's all-gather), as a leaf."""
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, -1).requires_grad_()


def _rl_loss(logprob, entropy, weights):
    # what an RL loss asks of the statistics: an upstream gradient per token into each
    return (logprob * weights[0]).sum() + (entropy * weights[1]).sum()


def _token_providers(group, world_size: int, rank: int, weights):
    import fastce
    import fastce.distributed as fd

    def fastce_distributed(local, target):
        return _rl_loss(*fd.vocab_parallel_token_logprobs(local, target, group=group, return_entropy=True,
                                                          validate=False), weights)

    def all_gather_logits(local, target):
        whole = _gathered(local, group, world_size)
        loss = _rl_loss(*fastce.token_logprobs(whole, target, return_entropy=True, validate=False), weights)
        return _GatheredSlice.apply(local, (whole, loss), rank)

    def verl():
        from verl.utils.megatron.tensor_parallel import vocab_parallel_entropy, vocab_parallel_log_probs_from_logits

        def provider(local, target):  # verl's workers clone the logits: Megatron's cross-entropy overwrites them
            return _rl_loss(vocab_parallel_log_probs_from_logits(local.clone(), target),
                            vocab_parallel_entropy(local), weights)
        return provider

    providers = {"fastce.distributed": fastce_distributed, "all-gather + fastce": all_gather_logits}
    return {**providers, **_megatron_peer("verl + Megatron-core", world_size, verl)}


def _megatron_peer(name: str, world_size: int, make) -> dict:
    """{name: make()} where megatron-core (and what `make` imports) is installed, its tensor-parallel group
    the world; else nothing, and a note."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state
            provider = make()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
        return {name: provider}
    except Exception as error:  # noqa: BLE001 - a missing peer is reported, not fatal
        print(f"({name} not measured: {type(error).__name__}: {error})")
        return {}


def _providers(group, world_size: int, rank: int):
    import fastce
    import fastce.distributed as fd

    def fastce_distributed(local, target):
        return fd.vocab_parallel_cross_entropy(local, target, group=group, validate=False)

    def all_gather_logits(local, target):
        whole = _gathered(local, group, world_size)
        loss = fastce.cross_entropy(whole, target, validate=False)
        return _GatheredSlice.apply(local, (whole, loss), rank)

    def megatron():
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        return lambda local, target: vocab_parallel_cross_entropy(local, target).mean()

    providers = {"fastce.distributed": fastce_distributed, "all-gather + fastce": all_gather_logits}
    return {**providers, **_megatron_peer("Megatron-core", world_size, megatron)}


class _GatheredSlice(torch.autograd.Function):
    """The baseline's backward: the gathered logits' gradient, cut back to this rank's slice. (The
    gathered logits and their loss come in a tuple, so that autograd does not walk the loss's graph a
    second time.)"""

    @staticmethod
    def forward(ctx, local, whole_and_loss, rank):
        ctx.whole, ctx.loss = whole_and_loss
        ctx.rank, ctx.width = rank, local.shape[-1]
        return ctx.loss.detach()

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            (whole_grad,) = torch.autograd.grad(ctx.loss, ctx.whole, grad)
        return whole_grad[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None, None


def _measure(rank: int, world_size: int, store: str, op: str, tokens: int, vocab: int, dtype: str, queue) -> None:
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    from fastce.profiling import measure
    torch.manual_seed(0)
    width = vocab // world_size
    logits = (torch.randn(tokens, vocab) * 2).to(getattr(torch, dtype))
    target = torch.randint(0, vocab, (tokens,))
    local = logits[:, rank * width:(rank + 1) * width].contiguous()
    rows = []
    if op == "token_stats":
        weights = torch.randn(2, tokens)
        providers = _token_providers(dist.group.WORLD, world_size, rank, weights)
    else:
        providers = _providers(dist.group.WORLD, world_size, rank)
    for name, provider in providers.items():
        x = local.clone().requires_grad_()
        with measure() as forward:
            loss = provider(x, target)
        with measure() as backward:
            loss.backward()
        counts = [(_collectives(m, world_size), m.total_bytes, m.peak_bytes, m.syncs) for m in (forward, backward)]
        rows.append((name, counts))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("cross_entropy", "token_stats"), default="cross_entropy")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    store = os.path.join(tempfile.mkdtemp(), "store")
    processes = [context.Process(target=_measure, args=(rank, args.world_size, store, args.op, args.tokens,
                                                        args.vocab, args.dtype, queue))
                 for rank in range(args.world_size)]
    for process in processes:
        process.start()
    rows = queue.get(timeout=900)
    for process in processes:
        process.join()
    slice_bytes = args.tokens * (args.vocab // args.world_size) * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"\n{args.op}, per rank, tp = {args.world_size}, N = {args.tokens} tokens, V = {args.vocab} ({args.dtype}); "
          f"moved and peak as multiples of the rank's logits slice ({slice_bytes} B)\n")
    print("| provider | forward: collectives, their bytes / token | sent per rank / token (ring) | "
          "backward: collectives | moved fwd+bwd | peak fwd | syncs |")
    print("|---|---|---|---|---|---|---|")
    for name, ((fwd_coll, fwd_moved, fwd_peak, fwd_syncs), (bwd_coll, bwd_moved, _, bwd_syncs)) in rows:
        print(f"| {name} | {fwd_coll[0]}, {fwd_coll[1] / args.tokens:.1f} B | "
              f"{(fwd_coll[2] + bwd_coll[2]) / args.tokens:.1f} B | {bwd_coll[0]} | "
              f"{(fwd_moved + bwd_moved) / slice_bytes:.2f}× | "
              f"{fwd_peak / slice_bytes:.2f}× | {fwd_syncs + bwd_syncs} |")


if __name__ == "__main__":
    main()

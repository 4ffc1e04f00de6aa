"""fastce.token_logprobs / linear_token_logprobs / policy_gradient_loss on a CUDA GPU: correctness
against float64 (and against torch in the input's dtype), torch.compile, and timings against a copy
of the logits, the torch expressions RL trainers use and Liger's fused linear GRPO (when
importable). A few minutes on an H100/H200.

    python -m bench.gpu_token_stats              # on a GPU; python -m bench.gpu_run runs it as one stage
    python -m bench.gpu_token_stats --dry-run    # the same code at tiny sizes on the CPU
                                                 # (Triton interpreter; times mean nothing)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

DRY_RUN = "--dry-run" in sys.argv
os.environ["TRITON_INTERPRET"] = "1" if DRY_RUN else "0"  # before triton is imported

import torch  # noqa: E402

import fastce  # noqa: E402
from bench.providers import _chunked_entropy, _log_softmax_gather, _selective_log_softmax  # noqa: E402
from fastce import reference  # noqa: E402

DEVICE = "cpu" if DRY_RUN else "cuda"
# (tokens, vocabulary, dtype, temperature) of the logits checks; (tokens, hidden, vocabulary, dtype,
# chunk_size) of the linear ones; the timed shapes
LOGITS_CHECKS = ([(9, 300, torch.bfloat16, 0.7), (3, 5000, torch.float32, 1.3)] if DRY_RUN else
                 [(257, 32000, torch.bfloat16, 0.7), (8, 151936, torch.bfloat16, 1.0), (64, 50257, torch.float32, 1.3),
                  (300, 203, torch.float16, 1.0), (16, 262144, torch.float32, 0.9)])
LINEAR_CHECKS = ([(40, 16, 300, torch.bfloat16, 8)] if DRY_RUN else
                 [(1000, 256, 32000, torch.bfloat16, 200), (513, 128, 50257, torch.float32, None),
                  (2048, 512, 8192, torch.float16, 300)])
TIMED_LOGITS = (256, 2048) if DRY_RUN else (16384, 128256)
TIMED_LINEAR = (256, 32, 512) if DRY_RUN else (8192, 4096, 128256)
SEQUENCE = 256  # tokens per sequence of the trainers' expressions and Liger's GRPO


def relative(actual, exact):
    return ((actual.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(fn, leaves, target, weights, **kwargs):
    """fn(*leaves, target, return_entropy=True) and the leaves' gradients of Σ w_lp·logprob + w_H·entropy."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    logprob, entropy = fn(*leaves, target, return_entropy=True, **kwargs)
    (logprob * weights[0].to(logprob.dtype) + entropy * weights[1].to(entropy.dtype)).sum().backward()
    return logprob.detach(), entropy.detach(), [t.grad for t in leaves]


def check(fast, exact_fn, leaves, target, **kwargs):
    """Errors of fastce, and of the same computation in torch in the input's dtype, against float64."""
    weights = [torch.randn(len(target), device=DEVICE) for _ in range(2)]
    got = outputs_and_grads(fast, leaves, target, weights, **kwargs)
    exact = outputs_and_grads(exact_fn, [t.double() for t in leaves], target, [w.double() for w in weights], **kwargs)
    same_dtype = outputs_and_grads(exact_fn, leaves, target, weights, **kwargs)
    ignored = target == -100
    zero = all(bool((t[ignored] == 0).all()) for t in (got[0], got[1])) and bool((got[2][0][ignored] == 0).all())
    errors = [f"logprob {relative(got[0], exact[0]):.1e}", f"entropy {relative(got[1], exact[1]):.1e}"]
    errors += [f"grad{i} {relative(a, c):.1e} (torch {relative(b, c):.1e})"
               for i, (a, b, c) in enumerate(zip(got[2], same_dtype[2], exact[2]))]
    return " ".join(errors) + f", ignored tokens all zero: {zero}"


def policy_check(x, target, temperature):
    """Errors of policy_gradient_loss ('mean': the gradient written in the forward) against float64,
    beside the same computation in torch on the input's dtype."""
    advantages = torch.randn(len(target), device=DEVICE)

    def loss_and_grad(fn, logits, adv):
        leaf = logits.detach().clone().requires_grad_()
        loss = fn(leaf, target, adv, entropy_coef=0.01, temperature=temperature)
        loss.backward()
        return loss.detach(), leaf.grad

    got = loss_and_grad(fastce.policy_gradient_loss, x, advantages)
    exact = loss_and_grad(reference.policy_gradient_loss, x.double(), advantages.double())
    same_dtype = loss_and_grad(reference.policy_gradient_loss, x, advantages)
    zero = bool((got[1][target == -100] == 0).all())
    return (f"loss {relative(got[0], exact[0]):.1e} grad {relative(got[1], exact[1]):.1e} "
            f"(torch {relative(same_dtype[1], exact[1]):.1e}), ignored tokens all zero: {zero}")


def timed_ms(fn, grad_to_none=()):
    if DRY_RUN:  # wall-clock of one call: the script runs, the number means nothing
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, grad_to_none=list(grad_to_none), return_mode="median")


@contextmanager
def peak_above_start():
    """Yields a list that receives the peak bytes allocated above the start (GPU only; 0 on the CPU)."""
    result = []
    if DRY_RUN:
        yield result
        result.append(0)
        return
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    yield result
    result.append(torch.cuda.max_memory_allocated() - start)


def correctness():
    print("== correctness (largest error relative to the largest |float64| value)")
    for n, v, dtype, temperature in LOGITS_CHECKS:
        x = (torch.randn(n, v, device=DEVICE) * 3).to(dtype)
        target = torch.randint(0, v, (n,), device=DEVICE)
        target[::7] = -100
        print(f"token_logprobs N={n} V={v} {dtype} T={temperature}:",
              check(fastce.token_logprobs, reference.token_logprobs, [x], target, temperature=temperature))
        print(f"policy_gradient_loss N={n} V={v} {dtype} T={temperature}:", policy_check(x, target, temperature))
    for n, h, v, dtype, chunk in LINEAR_CHECKS:
        leaves = [torch.randn(n, h, device=DEVICE).to(dtype), (torch.randn(v, h, device=DEVICE) * h ** -0.5 * 2).to(dtype),
                  torch.randn(v, device=DEVICE).to(dtype)]
        target = torch.randint(0, v, (n,), device=DEVICE)
        target[::5] = -100

        def fast(hidden, weight, bias, t, **kwargs):
            return fastce.linear_token_logprobs(hidden, weight, t, linear_bias=bias, chunk_size=chunk, **kwargs)

        def exact(hidden, weight, bias, t, **kwargs):
            return reference.linear_token_logprobs(hidden, weight, t, linear_bias=bias, **kwargs)

        print(f"linear_token_logprobs N={n} H={h} V={v} {dtype} chunk_size={chunk}:",
              check(fast, exact, leaves, target, temperature=0.8))


def compiled_matches_eager():
    torch._dynamo.reset()
    x, hidden = torch.randn(64, 1000, device=DEVICE), torch.randn(64, 32, device=DEVICE)
    weight = torch.randn(1000, 32, device=DEVICE) * 0.2
    target = torch.randint(0, 1000, (64,), device=DEVICE)

    def loss_fn(x, hidden, weight):
        logprob, entropy = fastce.token_logprobs(x, target, temperature=0.9, return_entropy=True)
        linear_logprob, linear_entropy = fastce.linear_token_logprobs(hidden, weight, target, return_entropy=True,
                                                                      chunk_size=16)
        policy_loss = fastce.policy_gradient_loss(x, target, logprob.detach(), entropy_coef=0.1)
        return (logprob * 0.3 - entropy).sum() + (linear_logprob - 0.1 * linear_entropy).sum() + policy_loss

    results = []
    backend = "aot_eager" if DRY_RUN else "inductor"
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend=backend)):
        leaves = [t.clone().requires_grad_() for t in (x, hidden, weight)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    print(f"== torch.compile(fullgraph, {backend}) against eager, largest differences:",
          " ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(*results)))


def logits_timings():
    n, v = TIMED_LOGITS
    x = (torch.randn(n, v, device=DEVICE) * 2).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), device=DEVICE)
    advantage = torch.randn(n, device=DEVICE)
    logits_bytes = x.numel() * x.element_size()
    print(f"== token_logprobs, bf16 N={n} V={v} ({logits_bytes / 1e9:.2f} GB of logits); "
          "GB/s over the bytes each must move")
    copy_ms = timed_ms(lambda: torch.empty_like(x).copy_(x))
    print(f"copy of the logits: {copy_ms:.3f} ms, {2 * logits_bytes / copy_ms / 1e6:.0f} GB/s")
    forward_ms = timed_ms(lambda: fastce.token_logprobs(x, target, return_entropy=True))
    print(f"fastce forward (reads 1x): {forward_ms:.3f} ms, {logits_bytes / forward_ms / 1e6:.0f} GB/s")
    leaf = x.clone().requires_grad_()

    def step(stats):
        def run():
            logprob, entropy = stats(leaf)
            (-(advantage * logprob) - 0.01 * entropy).mean().backward()
        return run

    def fused_step():
        fastce.policy_gradient_loss(leaf, target, advantage, entropy_coef=0.01).backward()

    # (name, the step, the logits' bytes fastce's form moves)
    steps = [("fastce token_logprobs", step(lambda t: fastce.token_logprobs(t, target, return_entropy=True)), "3x"),
             ("fastce policy_gradient_loss", fused_step, "2x"),
             ("torch log_softmax(fp32).gather + entropy", step(lambda t: _log_softmax_gather(t, target)), ""),
             ("trainers (TRL-style, in bf16)", step(lambda t: (_selective_log_softmax(t, target, SEQUENCE),
                                                               _chunked_entropy(t))), "")]
    for name, run, moves in steps:
        with peak_above_start() as peak:
            ms = timed_ms(run, grad_to_none=[leaf])
        moved = f"; it moves {moves} the logits' bytes, the copy 2x" if moves else ""
        print(f"{name} forward+backward: {ms:.3f} ms ({ms / copy_ms:.2f}x the copy's time{moved}), "
              f"peak above the inputs {peak[0] / 1e9:.2f} GB")


def linear_timings():
    n, h, v = TIMED_LINEAR
    hidden = torch.randn(n, h, device=DEVICE).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=DEVICE) * h ** -0.5).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, v, (n,), device=DEVICE)
    advantage = torch.randn(n, device=DEVICE)
    inputs_bytes, logits_bytes = (hidden.numel() + weight.numel()) * 2, n * v * 2
    gemm_ms = timed_ms(lambda: hidden @ weight.t())
    print(f"== linear_token_logprobs, bf16 N={n} H={h} V={v}; one logits GEMM {gemm_ms:.3f} ms; "
          "peaks beyond inputs and gradients, as % of the logits' bytes")

    def fastce_step(entropy):
        def run():
            out = fastce.linear_token_logprobs(hidden, weight, target, return_entropy=entropy)
            logprob, bonus = (out[0], 0.01 * out[1].mean()) if entropy else (out, 0.0)
            (-(advantage * logprob).mean() - bonus).backward()
        return run

    def trainers():
        (-(advantage * _selective_log_softmax(hidden @ weight.t(), target, SEQUENCE)).mean()).backward()

    steps = {"fastce": fastce_step(False), "fastce with entropy": fastce_step(True),
             "trainers (materialised logits)": trainers}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="cispo", epsilon_high=5.0,
                                        compiled=False)
        sequences = target.view(-1, SEQUENCE)
        steps["liger fused linear GRPO"] = lambda: grpo(hidden.view(*sequences.shape, -1), weight, sequences,
                                                        torch.ones_like(sequences),
                                                        advantage.view(sequences.shape)[:, 0])[0].backward()
    except ImportError as error:
        print("liger: not importable here:", error)
    for name, run in steps.items():
        with peak_above_start() as peak:
            ms = timed_ms(run, grad_to_none=[hidden, weight])
        beyond = peak[0] - inputs_bytes  # the two gradients, which every step must hold
        print(f"{name} forward+backward: {ms:.3f} ms ({ms / gemm_ms:.2f} logits GEMMs), "
              f"peak beyond inputs and gradients {max(beyond, 0) / logits_bytes * 100:.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    parser.parse_args()
    assert fastce.uses_triton(torch.empty(0, device=DEVICE)), "no Triton for this device"
    print(torch.__version__, torch.cuda.get_device_name() if not DRY_RUN else "CPU (Triton interpreter)")
    torch.manual_seed(0)
    start = time.time()
    correctness()
    compiled_matches_eager()
    logits_timings()
    linear_timings()
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

"""python -m bench.gpu_linear --out DIR: the fused linear head on a GPU, in one call.

1. checks: fastce.linear_cross_entropy (both walks, "mean" and "none", the options) against float64
   at N = 1024, H = 256, V = 8192 in bf16 and fp32, eagerly, and compiled for each walk and
   reduction in one of the dtypes;
2. memory and time of a training step (forward + backward) in bf16 at N = 2048, H = 256,
   V = 8192 and at Llama-3-8B's head (N = 8192, H = 4096, V = 128256): peak memory beyond the
   inputs and their gradients (torch.cuda.max_memory_allocated) as a share of the logits'
   bytes, and the median time of a step, for fastce eager and compiled, F.linear then
   F.cross_entropy (what torch 2.13's options=None runs), torch's chunked path (torch >= 2.13)
   and Liger-Kernel's fused linear cross-entropy (its CUDA path);
3. the loss of each at N = 1024, H = 64, V = 32000 in bf16 against float64.

DIR gets gpu_linear.md and gpu_linear.json, written after every part (a run cut short keeps what
it measured). --dry-run runs the same code at tiny sizes on the CPU (the interpreter; its times
say nothing about a GPU; bf16 checks only), so that CI keeps this script working.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import use_best_device

ON_GPU = use_best_device()  # before anything imports triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastce  # noqa: E402
from fastce import reference  # noqa: E402

from .suite import environment  # noqa: E402

CHECK_SHAPE = (1024, 256, 8192)
STEP_SHAPES = ((2048, 256, 8192), (8192, 4096, 128256))
LOSS_SHAPE = (1024, 64, 32000)
DRY_CHECK_SHAPE, DRY_STEP_SHAPES, DRY_LOSS_SHAPE = (24, 8, 200), ((32, 8, 256),), (16, 4, 300)

# compiled too: each walk and reduction once across the two dtypes (Inductor compiles slowly)
COMPILED_CHECKS = {(torch.bfloat16, "vocab", "mean"), (torch.bfloat16, "tokens", "none"),
                   (torch.float32, "vocab", "none"), (torch.float32, "tokens", "mean")}

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _inputs(shape, dtype, device, requires_grad=True, seed=0):
    n_rows, hidden, n_classes = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n_rows, hidden, generator=generator, device=device).to(dtype)
    w = (torch.randn(n_classes, hidden, generator=generator, device=device) / hidden ** 0.5).to(dtype)
    target = torch.randint(0, n_classes, (n_rows,), generator=generator, device=device)
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), target


def _relative(actual, expected) -> float:
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def checks(shape, device, backend: str, dtypes=(torch.bfloat16, torch.float32)) -> List[dict]:
    """Max relative error of loss and gradients against float64, per case."""
    rows = []
    n_classes = shape[2]
    weight = torch.rand(n_classes, device=device) + 0.5
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=30.0)
    for dtype in dtypes:
        for walk in ("vocab", "tokens"):
            for reduction in ("mean", "none"):
                for compiled in (False, True) if (dtype, walk, reduction) in COMPILED_CHECKS else (False,):
                    x, w, target = _inputs(shape, dtype, device)
                    target[::9] = -100
                    fn = fastce.linear_cross_entropy
                    if compiled:
                        torch._dynamo.reset()
                        fn = torch.compile(fn, fullgraph=True, backend=backend)
                    loss = fn(x, w, target, reduction=reduction, walk=walk, validate=False, **options)
                    grad_output = torch.rand_like(loss) + 0.5
                    loss.backward(grad_output)
                    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
                    expected = reference.linear_cross_entropy(x64, w64, target, reduction=reduction,
                                                              **dict(options, weight=weight.double()))
                    expected.backward(grad_output.double())
                    errors = [_relative(a, e) for a, e in ((loss, expected), (x.grad, x64.grad), (w.grad, w64.grad))]
                    rows.append(dict(dtype=str(dtype)[6:], walk=walk, reduction=reduction, compiled=compiled,
                                     loss=errors[0], grad_input=errors[1], grad_weight=errors[2]))
    return rows


def providers(backend: str) -> Dict[str, Optional[Loss]]:
    def fastce_eager(x, w, t):
        return fastce.linear_cross_entropy(x, w, t, validate=False)

    def materialised(x, w, t):
        return F.cross_entropy(F.linear(x, w), t)

    found: Dict[str, Optional[Loss]] = {"fastce": fastce_eager, "fastce compiled": None,
                                        "F.linear + F.cross_entropy": materialised, "torch chunked": None,
                                        "liger": None}
    found["fastce compiled"] = torch.compile(fastce_eager, fullgraph=True, backend=backend)
    if hasattr(F, "linear_cross_entropy"):
        chunked = torch.nn.LinearCrossEntropyOptions()
        found["torch chunked"] = lambda x, w, t: F.linear_cross_entropy(x, w, t, options=chunked)
    with contextlib.suppress(Exception):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        found["liger"] = lambda x, w, t: liger(w, x, t)
    return found


def _synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


def step(loss: Loss, shape, device, repeats: int) -> dict:
    """Peak beyond inputs and gradients (share of the logits' bytes) and median step time."""
    x, w, target = _inputs(shape, torch.bfloat16, device)
    for _ in range(2):  # compilation and first-call setup
        loss(x, w, target).backward()
        x.grad = w.grad = None
    _synchronize()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    loss(x, w, target).backward()
    _synchronize()
    grads = (x.numel() + w.numel()) * 2
    peak = torch.cuda.max_memory_allocated() - before - grads if ON_GPU else float("nan")
    times = []
    for _ in range(repeats):
        x.grad = w.grad = None
        _synchronize()
        start = time.perf_counter()
        loss(x, w, target).backward()
        _synchronize()
        times.append(time.perf_counter() - start)
    n_rows, hidden, n_classes = shape
    return dict(peak_share=peak / (n_rows * n_classes * 2), peak_mb=peak / 2**20,
                ms=1e3 * statistics.median(times), tflops=6 * n_rows * hidden * n_classes / statistics.median(times) / 1e12)


def losses(shape, device) -> Dict[str, List[float]]:
    x, w, target = _inputs(shape, torch.bfloat16, device, requires_grad=False)
    exact = F.cross_entropy(F.linear(x.double(), w.double()), target).item()
    return {name: [fn(x, w, target).float().item(), exact]
            for name, fn in providers("eager").items() if fn is not None and name != "fastce compiled"}


def _write(out: Path, results: dict) -> None:
    (out / "gpu_linear.json").write_text(json.dumps(results, indent=1))
    lines = [f"# fastce linear head on {results['environment'].get('device')}", ""]
    if "checks" in results:
        lines += ["| dtype | walk | reduction | compiled | loss | ∂input | ∂W |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['walk']} | {r['reduction']} | {r['compiled']} | {r['loss']:.1e} | "
                  f"{r['grad_input']:.1e} | {r['grad_weight']:.1e} |" for r in results["checks"]]
    for shape, cells in results.get("steps", {}).items():
        lines += ["", f"Training step, bf16, N, H, V = {shape}:", "",
                  "| provider | peak beyond inputs+grads | ms | TFLOP/s (6NHV) |", "|---|---|---|---|"]
        lines += [f"| {name} | {c['peak_share']:.1%} ({c['peak_mb']:.0f} MiB) | {c['ms']:.2f} | {c['tflops']:.0f} |"
                  if "ms" in c else f"| {name} | {c['error']} | | |" for name, c in cells.items()]
    if "losses" in results:
        lines += ["", f"Loss, bf16, N, H, V = {results['loss_shape']}:", "", "| provider | loss | float64 |",
                  "|---|---|---|"]
        lines += [f"| {name} | {v:.4f} | {e:.4f} |" for name, (v, e) in results["losses"].items()]
    (out / "gpu_linear.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (interpreter)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Inductor, as users compile; a dry run takes aot_eager (the same graphs, compiled in seconds)
    backend = "aot_eager" if args.dry_run else "inductor"
    device = "cuda" if ON_GPU and not args.dry_run else "cpu"
    check_shape, step_shapes, loss_shape = ((DRY_CHECK_SHAPE, DRY_STEP_SHAPES, DRY_LOSS_SHAPE) if args.dry_run
                                            else (CHECK_SHAPE, STEP_SHAPES, LOSS_SHAPE))
    results = {"environment": environment(ON_GPU), "loss_shape": loss_shape}
    results["checks"] = checks(check_shape, device, backend, (torch.bfloat16,) if args.dry_run else
                               (torch.bfloat16, torch.float32))
    _write(args.out, results)
    results["steps"] = {}
    for shape in step_shapes:
        cells = results["steps"][str(shape)] = {}
        for name, fn in providers(backend).items():
            if fn is None:
                continue
            torch._dynamo.reset()
            try:
                cells[name] = step(fn, shape, device, repeats=1 if args.dry_run else 5)
            except Exception as error:  # one provider's failure (out of memory, say) must not stop the rest
                cells[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            if ON_GPU:
                torch.cuda.empty_cache()
        _write(args.out, results)
    results["losses"] = losses(loss_shape, device)
    _write(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

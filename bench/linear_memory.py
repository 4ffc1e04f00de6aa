"""python -m bench.linear_memory: what a linear cross-entropy training step holds, counted on the CPU.

For each shape (tokens N, hidden H, vocabulary V) and dtype: the peak bytes of a forward + backward
beyond the inputs and their gradients, as a share of the full logits' bytes (N·V·b, what
materialising them costs), and the GEMM flops as a multiple of the 6·N·H·V a training step needs, for

* fastce.linear_cross_entropy, eager and compiled (torch.compile, Inductor);
* torch 2.13's F.linear_cross_entropy with its default options=None (the logits materialised)
  and with LinearCrossEntropyOptions() (its chunked path);
* Liger-Kernel's LigerFusedLinearCrossEntropyLoss, twice. On CPU tensors it takes its CPU code
  path: each chunk's logits come from `@` (a fresh buffer, not one reused buffer) and each chunk's
  ∂W product is added to the bf16 ∂W through a temporary the size of W. "liger (CUDA branches)"
  runs its CUDA code path on the same tensors: its three device tests (`device.type == "cuda"`,
  compute capability ≥ 8) are rewritten to true in a copy of its own source for the measurement
  (liger_cuda_branches), so it writes each chunk's logits into one buffer and adds ∂W in place, in
  bf16, as it does on an H100.

Counted by fastce.profiling.count_allocations (the CPU allocator, so also inside custom ops and
compiled graphs). The Triton kernels (fastce's and Liger's) are launched as no-ops: a kernel
allocates nothing (its launcher does, in torch), and the interpreter would take hours at these
shapes; what the kernels compute is tested at small shapes (tests/test_linear_cross_entropy.py).

Then the loss of each at N = 1024, H = 64, V = 32000 in bf16, computed for real (forward only),
against float64 (torch's chunked path sums the loss in bf16), and the error of ∂W in bf16 at a small
shape with many chunks (Liger's CUDA path sums ∂W across chunks in bf16).

Writes bench/results/cpu-interpreter/linear_memory.md (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from . import use_best_device

use_best_device()  # the interpreter, before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastce  # noqa: E402
from fastce import linear  # noqa: E402
from fastce.profiling import count_allocations  # noqa: E402

from .providers import liger_cuda_branches  # noqa: E402

# (N, H, V): the Llama-3-8B ratio 2H/V ≈ 6% at a size the CPU can count, and the two shapes the
# issue measured the old design at (25% and 100% of the logits in bf16)
SHAPES = ((2048, 256, 8192), (4096, 256, 32000), (1024, 256, 32000))
LLAMA_3_8B = (8192, 4096, 128256)
LOSS_CHECK = (1024, 64, 32000)
# small enough for the interpreter; Liger cuts it into 32 chunks of 32 rows, fastce into 16
GRADIENT_CHECK = (1024, 64, 2048)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OUT = Path(__file__).resolve().parent / "results" / "cpu-interpreter" / "linear_memory.md"

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def providers() -> Dict[str, Optional[Loss]]:
    """name -> loss(hidden, weight, target), or None where the provider cannot be imported."""
    def fastce_eager(x, w, t):
        return fastce.linear_cross_entropy(x, w, t, validate=False)

    found: Dict[str, Optional[Loss]] = {
        "fastce": fastce_eager,
        "fastce compiled": torch.compile(fastce_eager, fullgraph=True),
        "torch (options=None)": None, "torch chunked": None, "liger (CPU path)": None,
        "liger (CUDA branches)": None,
    }
    if hasattr(F, "linear_cross_entropy"):
        found["torch (options=None)"] = F.linear_cross_entropy
        chunked = torch.nn.LinearCrossEntropyOptions()
        found["torch chunked"] = lambda x, w, t: F.linear_cross_entropy(x, w, t, options=chunked)
    with contextlib.suppress(ImportError):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        found["liger (CPU path)"] = lambda x, w, t: liger(w, x, t)  # weight first

        def liger_cuda(x, w, t):
            with liger_cuda_branches():
                return liger(w, x, t)
        found["liger (CUDA branches)"] = liger_cuda
    return found


@contextlib.contextmanager
def kernels_as_no_ops() -> Iterator[None]:
    from triton.runtime.interpreter import GridExecutor
    launch = GridExecutor.__call__
    GridExecutor.__call__ = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        GridExecutor.__call__ = launch


def _inputs(n_rows: int, hidden: int, n_classes: int, dtype: torch.dtype, requires_grad: bool = True):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, hidden, generator=generator).to(dtype).requires_grad_(requires_grad)
    w = (torch.randn(n_classes, hidden, generator=generator) / hidden ** 0.5).to(dtype)
    return x, w.requires_grad_(requires_grad), torch.randint(0, n_classes, (n_rows,), generator=generator)


def step_cost(loss: Loss, n_rows: int, hidden: int, n_classes: int, dtype: torch.dtype) -> Tuple[float, float]:
    """(peak beyond inputs and gradients / the logits' bytes, GEMM flops / 6NHV) of a training step,
    after a first call (compilation and first-call setup are not a step's memory)."""
    x, w, target = _inputs(n_rows, hidden, n_classes, dtype)
    with kernels_as_no_ops():
        loss(x, w, target).backward()
        x.grad = w.grad = None
        with count_allocations() as counted:
            loss(x, w, target).backward()
    gradients = (x.numel() + w.numel()) * dtype.itemsize
    logits = n_rows * n_classes * dtype.itemsize
    return (counted.peak_bytes - gradients) / logits, counted.gemm_flops / (6 * n_rows * hidden * n_classes)


def _eager(found: Dict[str, Optional[Loss]]) -> Dict[str, Loss]:
    """The installed providers that run eagerly (compiled, fastce computes what it computes eagerly)."""
    return {name: loss for name, loss in found.items() if loss is not None and name != "fastce compiled"}


def loss_errors(found: Dict[str, Optional[Loss]], n_rows: int, hidden: int,
                n_classes: int) -> Dict[str, Tuple[float, float]]:
    """name -> (bf16 loss, float64 loss) at one shape, the kernels computing (forward only)."""
    x, w, target = _inputs(n_rows, hidden, n_classes, torch.bfloat16, requires_grad=False)
    exact = F.cross_entropy(F.linear(x.double(), w.double()), target).item()
    return {name: (loss(x, w, target).float().item(), exact) for name, loss in _eager(found).items()}


def weight_gradient_errors(found: Dict[str, Optional[Loss]], n_rows: int, hidden: int,
                           n_classes: int) -> Dict[str, float]:
    """name -> max |∂W − ∂W_float64| / max |∂W_float64| of a bf16 training step, the kernels computing."""
    x, w, target = _inputs(n_rows, hidden, n_classes, torch.bfloat16)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.cross_entropy(F.linear(x64, w64), target).backward()
    errors = {}
    for name, loss in _eager(found).items():
        w.grad = None
        loss(x, w, target).backward()
        errors[name] = ((w.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).item()
    return errors


def table(shapes=SHAPES, dtypes=DTYPES, loss_check=LOSS_CHECK, gradient_check=GRADIENT_CHECK) -> str:
    """The report, in markdown."""
    found = providers()
    names = list(found)
    lines = ["| N | H | V | dtype | logits | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for (n_rows, hidden, n_classes), (dtype_name, dtype) in ((s, d) for s in shapes for d in dtypes.items()):
        cells = []
        for name in names:
            if found[name] is None:
                cells.append("not installed")
                continue
            torch._dynamo.reset()
            peak, flops = step_cost(found[name], n_rows, hidden, n_classes, dtype)
            cells.append(f"{peak:.1%} ({flops:.2f}× flops)")
        logits_mb = n_rows * n_classes * dtype.itemsize / 2**20
        lines.append(f"| {n_rows} | {hidden} | {n_classes} | {dtype_name} | {logits_mb:.0f} MiB | "
                     + " | ".join(cells) + " |")
    n_rows, hidden, n_classes = LLAMA_3_8B
    plan = linear.make_plan(n_rows, n_classes, hidden, torch.bfloat16)
    formula = linear.working_memory_bytes(n_rows, n_classes, hidden, torch.bfloat16, plan)
    lines += ["", f"fastce at Llama-3-8B's head (N = {n_rows}, H = {hidden}, V = {n_classes}, bf16), by "
              f"fastce.linear.working_memory_bytes (the counted buffers' formula): {formula / 2**20:.0f} MiB, "
              f"{formula / (n_rows * n_classes * 2):.2%} of the {n_rows * n_classes * 2 / 2**30:.2f} GiB logits "
              f"({plan.walk} walk, {plan.chunk_rows}-row chunks, {plan.slice_classes}-class slices)."]
    if loss_check:
        lines += ["", f"Loss at N = {loss_check[0]}, H = {loss_check[1]}, V = {loss_check[2]}, bf16 inputs "
                  "(forward, computed), against float64:", "", "| provider | loss | float64 | relative error |",
                  "|---|---|---|---|"]
        for name, (value, exact) in loss_errors(found, *loss_check).items():
            lines.append(f"| {name} | {value:.4f} | {exact:.4f} | {abs(value - exact) / exact:.1e} |")
    if gradient_check:
        lines += ["", f"∂W of a training step at N = {gradient_check[0]}, H = {gradient_check[1]}, "
                  f"V = {gradient_check[2]}, bf16 inputs (computed), against float64 (max error / max |∂W|):", "",
                  "| provider | ∂W error |", "|---|---|"]
        errors = weight_gradient_errors(found, *gradient_check)
        lines += [f"| {name} | {error:.1e} |" for name, error in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help=f"markdown file (default: {OUT})")
    args = parser.parse_args(argv)
    report = table()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

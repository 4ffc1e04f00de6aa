"""python -m bench.gpu_run --out DIR: everything a GPU session must answer, in one call.

1. checks: the compiled kernels against a float64 reference at real sizes (N = 8192 tokens,
   V = 32000 … 262144), every launch path (one CTA per row, a cluster of CTAs per row, rows
   streamed in tiles, several rows per program, K-dimensional inputs), bf16/fp16/fp32, both
   gradient paths (written in the forward for "mean", recomputed in the backward for "none"),
   each option once. One process per dtype, so Triton compiles in parallel; the compiled test
   suite (TRITON_INTERPRET=0 pytest) runs beside them.
2. timings: the training step (forward+backward) of fastce on each launch path against
   F.cross_entropy, torch.compile of it and Liger-Kernel (when importable), at bf16, N = 8192;
   then linear cross-entropy at Llama-3-8B's head, K-dimensional (segmentation) inputs, a small
   vocabulary and the no-grad forward. Median of triton.testing.do_bench over inputs rotated
   beyond twice the L2, the device-to-device copy of the same bytes timed in the same run, peak
   memory above the inputs.
3. in the time left, the fused linear head (bench.gpu_linear: both walks against float64, peak
   memory and time of a step against torch and Liger), then the token statistics
   (bench.gpu_token_stats);
4. a one-screen summary printed last; DIR gets summary.md, results.json, checks.json,
   checks.log, pytest.log, gpu_linear.md/.json/.log and token_stats.log.

Everything runs within --budget-s seconds (work left when it runs out is listed as not run).
--dry-run runs the same code at tiny sizes on the CPU (Triton interpreter, wall-clock times
that say nothing about a GPU) so that CI keeps this script working.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from . import use_best_device

ON_GPU = use_best_device()  # before anything imports triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastce  # noqa: E402
from fastce import reference  # noqa: E402

from .cases import DTYPES  # noqa: E402
from .suite import environment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Launch paths: "default" is the launch rule (rows above fastce._launch.SINGLE_PASS_MAX_CLASSES
# are streamed); the opt-in cluster path was removed until a GPU shows it pays.
DEFAULT_PATH = "default"


def launch_paths(n_classes: int) -> List[str]:
    """The launch paths that launch rows of n_classes differently."""
    return [DEFAULT_PATH]


@contextmanager
def launch_path(path: str):
    saved = os.environ.pop("FASTCE_CLUSTER", None)
    if path != DEFAULT_PATH:
        os.environ["FASTCE_CLUSTER"] = path
    try:
        yield
    finally:
        os.environ.pop("FASTCE_CLUSTER", None)
        if saved is not None:
            os.environ["FASTCE_CLUSTER"] = saved


@dataclass(frozen=True)
class Sizes:
    tokens: int
    vocabs: Sequence[int]
    small_vocab: int
    kdim: Sequence[int]             # (N, C, d1, d2): segmentation-shaped logits
    option_vocabs: Sequence[int]    # where each option is checked once per launch path
    linear: Sequence[int]           # (N, H, V)
    small_vocab_tokens: int
    binary: Sequence[tuple]         # shapes of the binary losses' logits (detection, multi-label)


GPU_SIZES = Sizes(tokens=8192, vocabs=(32000, 50257, 128256, 151936, 262144), small_vocab=256,
                  kdim=(16, 19, 512, 512), option_vocabs=(50257, 151936), linear=(8192, 4096, 128256),
                  small_vocab_tokens=65536, binary=((16, 900, 91), (4096, 10000)))
# Tiny, but on the same launch paths as the GPU sizes (the interpreter follows the Hopper rule).
DRY_SIZES = Sizes(tokens=4, vocabs=(300, 9000), small_vocab=19, kdim=(2, 3, 4, 5),
                  option_vocabs=(300, 9000), linear=(16, 32, 300), small_vocab_tokens=64,
                  binary=((2, 3, 5), (7, 300)))

# Relative error (of the norm, and of the largest element against the reference's largest) that
# passes: a few roundings of the output dtype; fp32 outputs are exact to far below this. An output
# may also be off by twice what rounding the float64 reference to its dtype costs (fp16 gradients
# of a "mean" over many rows underflow, in torch too).
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}


# ---- checks against float64 ---------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    dtype: str
    shape: tuple
    path: str = DEFAULT_PATH
    reduction: str = "mean"
    option: str = "plain"

    @property
    def name(self) -> str:
        path = "" if self.path == DEFAULT_PATH else f" FASTCE_CLUSTER={self.path}"
        return f"{self.dtype} {'x'.join(map(str, self.shape))} {self.reduction} {self.option}{path}"


# option -> (fastce function, its keyword arguments); tensors are made per check by _option_kwargs
OPTIONS = ("weight", "label_smoothing", "z_loss", "softcap", "focal", "prob_targets", "upstream_grad",
           "inplace_backward")


def checks_for(dtype: str, sizes: Sizes) -> List[Check]:
    checks = []
    for vocab in sizes.vocabs:
        for path in launch_paths(vocab):
            checks += [Check(dtype, (sizes.tokens, vocab), path, reduction) for reduction in ("mean", "none")]
    for shape in ((sizes.small_vocab_tokens, sizes.small_vocab), tuple(sizes.kdim)):
        checks += [Check(dtype, shape, DEFAULT_PATH, reduction) for reduction in ("mean", "none")]
    if dtype == "bf16":  # each option once on every launch path of the option vocabularies
        for vocab in sizes.option_vocabs:
            for path in launch_paths(vocab):
                checks += [Check(dtype, (sizes.tokens, vocab), path, "mean", option) for option in OPTIONS]
        checks += [Check(dtype, tuple(sizes.kdim), DEFAULT_PATH, "mean", option)
                   for option in ("weight", "label_smoothing")]
    return checks


def _random_target(shape: tuple, n_classes: int, device: str) -> torch.Tensor:
    """Class indices with about 5% of the rows ignored (-100)."""
    target_shape = (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, n_classes, target_shape, device=device)
    return target.masked_fill(torch.rand(target_shape, device=device) < 0.05, -100)


def _inputs(check: Check, device: str):
    """Logits (leaf, requiring grad), target, the fastce call's keyword arguments and the
    reference's, and the upstream gradient."""
    dtype, n_classes = DTYPES[check.dtype], check.shape[1]
    logits = (torch.randn(check.shape, device=device) * 3).to(dtype).requires_grad_()
    target = _random_target(check.shape, n_classes, device)
    kwargs, function = {}, "cross_entropy"
    if check.option == "weight":
        kwargs["weight"] = torch.rand(n_classes, device=device) + 0.5
    elif check.option == "label_smoothing":
        kwargs["label_smoothing"] = 0.1
    elif check.option == "z_loss":
        kwargs["z_loss"] = 1e-3
    elif check.option == "softcap":
        kwargs["softcap"] = 4.0
    elif check.option == "focal":
        function = "focal_loss"
        kwargs.update(gamma=2.0, alpha=torch.rand(n_classes, device=device))
    elif check.option == "prob_targets":
        target = torch.softmax(torch.randn(check.shape, device=device), dim=1).to(dtype)
    row_shape = target.shape if not target.is_floating_point() else (check.shape[0],) + tuple(check.shape[2:])
    if check.reduction == "none":
        grad_output = torch.randn(row_shape, device=device).to(dtype)
    elif check.option == "upstream_grad":
        grad_output = torch.tensor(0.37, device=device).to(dtype)
    else:
        grad_output = None
    return logits, target, function, kwargs, grad_output


def _reference_loss_rows(function: str, x: torch.Tensor, target: torch.Tensor, kwargs: Dict) -> torch.Tensor:
    exact = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    return getattr(reference, function)(x, target.double() if target.is_floating_point() else target,
                                        reduction="none", **exact)


def _mean_divisor(function: str, target: torch.Tensor, kwargs: Dict) -> torch.Tensor:
    """What "mean" divides the summed rows by (DESIGN.md §2)."""
    if target.is_floating_point():
        return torch.tensor(float(target.numel() // target.shape[1]), dtype=torch.float64, device=target.device)
    valid = target != -100
    if function == "focal_loss" or "weight" not in kwargs:
        return valid.sum().double()
    weight = kwargs["weight"].double()
    return torch.where(valid, weight[target.clamp_min(0)], 0.0).sum()


class ErrorSum:
    """Relative error of a tensor against its float64 reference, accumulated chunk by chunk, and
    the error of the reference itself rounded to the tensor's dtype (the best any output can do)."""

    def __init__(self):
        self.sums = {"got": [0.0, 0.0], "rounded": [0.0, 0.0]}  # Σ diff², max |diff|
        self.ref_sq = self.max_ref = 0.0
        self.finite = True

    def add(self, got: torch.Tensor, want: torch.Tensor) -> None:
        self.finite &= bool(torch.isfinite(got).all())
        want = want.double()
        for name, value in (("got", got.double()), ("rounded", want.to(got.dtype).double())):
            diff = (value - want).abs()
            self.sums[name][0] += float((diff * diff).sum())
            self.sums[name][1] = max(self.sums[name][1], float(diff.max()) if diff.numel() else 0.0)
        self.ref_sq += float((want * want).sum())
        self.max_ref = max(self.max_ref, float(want.abs().max()) if want.numel() else 0.0)

    def relative(self, of: str = "got") -> float:
        if of == "got" and not self.finite:
            return float("nan")
        diff_sq, max_diff = self.sums[of]
        return max((diff_sq / max(self.ref_sq, 1e-300)) ** 0.5, max_diff / max(self.max_ref, 1e-300))

    def passes(self, tolerance: float) -> bool:
        return self.relative() <= max(tolerance, 2 * self.relative("rounded"))  # NaN fails


def run_check(check: Check, device: str) -> Dict[str, object]:
    """fastce on the whole tensor; the float64 reference chunk by chunk along dim 0 (rows are
    independent, so each chunk's reference gradient is the full one's slice)."""
    logits, target, function, kwargs, grad_output = _inputs(check, device)
    with launch_path(check.path):
        call_kwargs = dict(kwargs, reduction=check.reduction)
        if check.option == "inplace_backward":
            loss = fastce.cross_entropy(logits.clone(), target, inplace_backward=True, **call_kwargs)
        else:
            loss = getattr(fastce, function)(logits, target, **call_kwargs)
        loss.backward(grad_output)
    if check.reduction == "mean":
        divisor = _mean_divisor(function, target, kwargs)
        upstream = (1.0 if grad_output is None else float(grad_output)) / divisor
    loss_error, grad_error = ErrorSum(), ErrorSum()
    total = torch.zeros((), dtype=torch.float64, device=device)
    chunk = max(1, (1 << 25) // (logits[0].numel()))
    for start in range(0, check.shape[0], chunk):
        rows = slice(start, start + chunk)
        x = logits.detach()[rows].double().requires_grad_()
        loss_rows = _reference_loss_rows(function, x, target[rows], kwargs)
        weights = upstream if check.reduction == "mean" else grad_output[rows].double()
        (loss_rows * weights).sum().backward()
        grad_error.add(logits.grad[rows], x.grad)
        if check.reduction == "none":
            loss_error.add(loss[rows], loss_rows.detach())
        else:
            total += loss_rows.detach().sum()
    if check.reduction == "mean":
        loss_error.add(loss.reshape(1), (total / divisor).reshape(1))
    errors = {"loss_rel_err": loss_error.relative(), "grad_rel_err": grad_error.relative(),
              "grad_rounding_err": grad_error.relative("rounded")}
    passed = loss_error.passes(TOLERANCE[check.dtype]) and grad_error.passes(TOLERANCE[check.dtype])
    return {"check": check.name, **asdict(check), **errors, "passed": passed}


# The binary (sigmoid) losses: fastce's function, the reference's, and their keyword arguments.
BINARY_LOSSES = {
    "bce": ("binary_cross_entropy_with_logits", {}),
    "bce pos_weight weight": ("binary_cross_entropy_with_logits", {"pos_weight": "last", "weight": "last"}),
    "soft_margin": ("soft_margin_loss", {}),
    "sigmoid_focal": ("sigmoid_focal_loss", {"alpha": 0.25, "gamma": 2.0}),
}


@dataclass(frozen=True)
class BinaryCheck:
    dtype: str
    shape: tuple
    loss: str
    reduction: str

    @property
    def name(self) -> str:
        return f"{self.dtype} {'x'.join(map(str, self.shape))} {self.reduction} {self.loss}"


def binary_checks_for(dtype: str, sizes: Sizes) -> List[BinaryCheck]:
    return [BinaryCheck(dtype, tuple(shape), loss, reduction) for shape in sizes.binary for loss in BINARY_LOSSES
            for reduction in ("mean", "none")]


def run_binary_check(check: BinaryCheck, device: str) -> Dict[str, object]:
    """The whole tensor against the float64 reference (elementwise losses need no chunking at
    these sizes), the gradient under a random upstream gradient."""
    function, options = BINARY_LOSSES[check.loss]
    dtype = DTYPES[check.dtype]
    x = (torch.randn(check.shape, device=device) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 2, check.shape, device=device)
    target = (labels * 2 - 1 if function == "soft_margin_loss" else labels).to(dtype)
    kwargs = {k: torch.rand(check.shape[-1], device=device) + 0.5 if v == "last" else v for k, v in options.items()}
    loss = getattr(fastce, function)(x, target, reduction=check.reduction, **kwargs)
    grad_output = torch.randn_like(loss)
    loss.backward(grad_output)
    exact = x.detach().double().requires_grad_()
    kwargs64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    want = getattr(reference, function)(exact, target.double(), reduction=check.reduction, **kwargs64)
    want.backward(grad_output.double())
    loss_error, grad_error = ErrorSum(), ErrorSum()
    loss_error.add(loss.reshape(-1), want.detach().reshape(-1))
    grad_error.add(x.grad, exact.grad)
    tolerance = TOLERANCE[check.dtype]
    return {"check": check.name, **asdict(check), "option": check.loss, "path": DEFAULT_PATH,
            "loss_rel_err": loss_error.relative(), "grad_rel_err": grad_error.relative(),
            "grad_rounding_err": grad_error.relative("rounded"),
            "passed": loss_error.passes(tolerance) and grad_error.passes(tolerance)}


def run_checks(dtype: str, sizes: Sizes, deadline: float, out_file: Path) -> None:
    device = "cuda" if ON_GPU else "cpu"
    results = []
    checks = [(check, run_binary_check) for check in binary_checks_for(dtype, sizes)]
    checks += [(check, run_check) for check in checks_for(dtype, sizes)]
    for check, run in checks:
        if time.time() > deadline:
            results.append({"check": check.name, **asdict(check), "passed": None, "note": "not run: budget"})
            continue
        try:
            results.append(run(check, device))
        except Exception as error:  # one failure must not hide the other checks
            results.append({"check": check.name, **asdict(check), "passed": False,
                            "note": f"{type(error).__name__}: {error}"[:400]})
        finally:
            if ON_GPU:
                torch.cuda.empty_cache()
        out_file.write_text(json.dumps(results, indent=1))


# ---- timings -------------------------------------------------------------------------------------

class Clock:
    """Median time, device copy time and peak memory: on the GPU as bench.gpu measures them; on
    the CPU (dry run) from the wall clock, to exercise the code only."""

    def median_ms(self, step: Callable[[], None], grad_to_none: List[torch.Tensor]) -> float:
        if ON_GPU:
            from . import gpu
            return gpu.median_ms(step, grad_to_none)
        times = []
        for _ in range(3):
            for tensor in grad_to_none:
                tensor.grad = None
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def copy_ms(self, nbytes: int) -> float:
        if ON_GPU:
            from . import gpu
            return gpu.copy_ms(nbytes)
        source = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8)
        return self.median_ms(lambda: torch.empty_like(source).copy_(source), [])

    def peak_bytes(self, step: Callable[[], None]) -> Optional[int]:
        if not ON_GPU:
            return None
        from . import gpu
        return gpu.peak_bytes(step)

    def copies(self, nbytes: int) -> int:
        if not ON_GPU:
            return 1
        from . import gpu
        return gpu.copies_for(nbytes)


@dataclass(frozen=True)
class Timing:
    """One measured operation: ``make(device, seed)`` builds random inputs (a dict whose floating
    tensors that require grad are the leaves); ``providers`` map a name to a factory of
    ``loss(inputs)``, called when its turn comes (torch.compile's starts from a clean cache)."""
    name: str
    make: Callable[[str, int], Dict[str, torch.Tensor]]
    providers: Dict[str, Callable[[], Callable]]
    floor_bytes: int
    backward: bool = True
    flops: int = 0


def _generator(device: str, seed: int) -> torch.Generator:
    """Every provider gets the same inputs, so their losses can be compared."""
    return torch.Generator(device).manual_seed(seed)


def _logits_maker(shape, dtype, requires_grad=True):
    def make(device, seed):
        generator = _generator(device, seed)
        logits = torch.randn(shape, device=device, generator=generator).to(dtype).requires_grad_(requires_grad)
        target_shape = (shape[0],) + tuple(shape[2:])
        return {"logits": logits, "target": torch.randint(0, shape[1], target_shape, device=device, generator=generator)}
    return make


def _fastce_on(path: str):
    def loss(x):
        with launch_path(path):
            return fastce.cross_entropy(x["logits"], x["target"])
    return lambda: loss


def _compiled(fn):
    def build():
        torch.compiler.reset()
        return torch.compile(fn, dynamic=False)
    return build


def _liger(module_name: str, call: Callable) -> Dict[str, Callable[[], Callable]]:
    """Liger-Kernel's module, when importable (a GPU session brings it along as a wheel)."""
    try:
        import liger_kernel.transformers as liger
    except Exception:
        return {}

    def build():
        module = getattr(liger, module_name)()
        return lambda x: call(module, x)
    return {"liger": build}


def _torch_cross_entropy(x):
    return F.cross_entropy(x["logits"], x["target"])


def _torch_linear_cross_entropy(x):
    return F.cross_entropy(F.linear(x["hidden"], x["weight"]).float(), x["target"])


def _logits_providers(paths: Sequence[str], liger: bool = True) -> Dict[str, Callable[[], Callable]]:
    providers = {f"fastce[{path}]": _fastce_on(path) for path in paths}
    providers["torch F.cross_entropy"] = lambda: _torch_cross_entropy
    if liger:  # Liger takes (N, C) logits only
        providers.update(_liger("LigerCrossEntropyLoss", lambda module, x: module(x["logits"], x["target"])))
    if ON_GPU:  # inductor on the CPU needs minutes of C++ builds and says nothing here
        providers["torch.compile(F.cross_entropy)"] = _compiled(_torch_cross_entropy)
    return providers


def _binary_maker(shape, dtype):
    def make(device, seed):
        generator = _generator(device, seed)
        logits = torch.randn(shape, device=device, generator=generator).to(dtype).requires_grad_()
        labels = torch.randint(0, 2, shape, device=device, generator=generator).to(dtype)
        return {"logits": logits, "target": labels}
    return make


def _binary_providers(function: str) -> Dict[str, Callable[[], Callable]]:
    """fastce beside what users run: torch's function, or torchvision's focal loss written out
    (the reference's, as its documentation defines it), eager and compiled."""
    def call(module):
        return lambda x: getattr(module, function)(x["logits"], x["target"], reduction="mean")
    baseline = call(F) if hasattr(F, function) else call(reference)
    providers = {"fastce": lambda: call(fastce),
                 "torch" if hasattr(F, function) else "reference (torchvision's formula)": lambda: baseline}
    if ON_GPU:
        providers["torch.compile"] = _compiled(baseline)
    return providers


def timings_for(sizes: Sizes) -> List[Timing]:
    bf16, item = torch.bfloat16, 2
    n = sizes.tokens
    timings = [Timing(f"training step bf16 N={n} V={v}", _logits_maker((n, v), bf16),
                      _logits_providers(launch_paths(v)), 2 * n * v * item) for v in sizes.vocabs]
    n_lin, h, v = sizes.linear

    def make_linear(device, seed):
        generator = _generator(device, seed)
        return {"hidden": torch.randn(n_lin, h, device=device, generator=generator).to(bf16).requires_grad_(),
                "weight": (torch.randn(v, h, device=device, generator=generator) * h ** -0.5).to(bf16).requires_grad_(),
                "target": torch.randint(0, v, (n_lin,), device=device, generator=generator)}

    linear = {"fastce": lambda: lambda x: fastce.linear_cross_entropy(x["hidden"], x["weight"], x["target"]),
              "torch F.linear + F.cross_entropy (fp32 logits)": lambda: _torch_linear_cross_entropy}
    linear.update(_liger("LigerFusedLinearCrossEntropyLoss",
                         lambda module, x: module(x["weight"], x["hidden"], x["target"])))
    if ON_GPU:
        linear["torch.compile(F.linear + F.cross_entropy)"] = _compiled(_torch_linear_cross_entropy)
    timings.append(Timing(f"linear cross-entropy bf16 N={n_lin} H={h} V={v}", make_linear, linear,
                          2 * (n_lin + v) * h * item, flops=6 * n_lin * h * v))
    kdim = tuple(sizes.kdim)
    timings.append(Timing(f"K-dimensional training step bf16 {'x'.join(map(str, kdim))}",
                          _logits_maker(kdim, bf16), _logits_providers([DEFAULT_PATH], liger=False),
                          2 * torch.Size(kdim).numel() * item))
    small = (sizes.small_vocab_tokens, sizes.small_vocab)
    timings.append(Timing(f"training step bf16 N={small[0]} V={small[1]}", _logits_maker(small, bf16),
                          _logits_providers([DEFAULT_PATH]), 2 * small[0] * small[1] * item))
    for shape, function in zip(sizes.binary, ("sigmoid_focal_loss", "binary_cross_entropy_with_logits")):
        timings.append(Timing(f"{function} training step bf16 {'x'.join(map(str, shape))}",
                              _binary_maker(tuple(shape), bf16), _binary_providers(function),
                              (2 + 1) * torch.Size(shape).numel() * item))  # read x and t, write ∂x
    v_fwd = sizes.vocabs[-1]
    timings.append(Timing(f"no-grad forward bf16 N={n} V={v_fwd}", _logits_maker((n, v_fwd), bf16, False),
                          {f"fastce[{path}]": _fastce_on(path) for path in launch_paths(v_fwd)}
                          | {"torch F.cross_entropy": lambda: _torch_cross_entropy},
                          n * v_fwd * item, backward=False))
    return timings


def _leaves(inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    return [t for t in inputs.values() if t.is_floating_point() and t.requires_grad]


def measure_provider(timing: Timing, loss_fn: Callable, clock: Clock, device: str,
                     copy_ms: float) -> Dict[str, object]:
    first = timing.make(device, 0)
    input_bytes = sum(t.numel() * t.element_size() for t in _leaves(first) or [first["logits"]])
    copies = [first] + [timing.make(device, seed) for seed in range(1, clock.copies(input_bytes))]
    calls = iter(range(1 << 62))

    def step():
        inputs = copies[next(calls) % len(copies)]
        loss = loss_fn(inputs)
        if timing.backward:
            loss.backward()
        return loss

    loss_value = float(step().detach().float())  # the first call also compiles
    grad_leaves = [t for inputs in copies for t in _leaves(inputs)]
    median = clock.median_ms(step, grad_leaves)
    for tensor in grad_leaves:
        tensor.grad = None
    del copies[1:], grad_leaves
    peak = clock.peak_bytes(step)
    seconds = median * 1e-3
    return {"median_ms": median, "gbps": timing.floor_bytes / seconds / 1e9, "vs_copy": median / copy_ms,
            "peak_mb": None if peak is None else peak / 1e6, "loss": loss_value,
            "tflops": timing.flops / seconds / 1e12 if timing.flops else None}


def run_timings(sizes: Sizes, deadline: float) -> List[Dict[str, object]]:
    """Every (operation, provider) row, torch.compile's last: its compilations take the longest,
    so a run short of time loses those first. Rows come back in the operations' order."""
    device = "cuda" if ON_GPU else "cpu"
    clock = Clock()
    jobs = [(index, timing, name, factory) for timing in timings_for(sizes)
            for index, (name, factory) in enumerate(timing.providers.items())]
    jobs.sort(key=lambda job: job[2].startswith("torch.compile"))
    copy_times: Dict[int, float] = {}
    rows = {}
    for index, timing, name, factory in jobs:
        row = {"operation": timing.name, "provider": name}
        if time.time() > deadline:
            rows[timing.name, index] = dict(row, status="not run: budget")
            continue
        try:
            if timing.floor_bytes not in copy_times:
                copy_times[timing.floor_bytes] = clock.copy_ms(timing.floor_bytes)
            row["copy_ms"] = copy_times[timing.floor_bytes]
            row.update(status="ok", **measure_provider(timing, factory(), clock, device, row["copy_ms"]))
        except Exception as error:  # an error or OOM in one provider must not hide the others
            row["status"] = f"error: {type(error).__name__}: {error}"[:300]
        finally:
            if ON_GPU:
                torch.cuda.empty_cache()
        rows[timing.name, index] = row
        print(f"  {timing.name} | {name} | {row.get('median_ms', row['status'])}", flush=True)
    order = [timing.name for timing in timings_for(sizes)]
    return [rows[key] for key in sorted(rows, key=lambda key: (order.index(key[0]), key[1]))]


# ---- the session: checks and test suite in parallel, then timings, then the summary -------------

# GPU scripts run as stages of the session, in this order, each in the time left:
# (module, its log, whether it takes --out for files of its own)
STAGES = (("bench.gpu_linear", "gpu_linear.log", True), ("bench.gpu_token_stats", "token_stats.log", False))


def run_stage(module: str, log_name: str, takes_out: bool, out: Path, deadline: float, dry_run: bool) -> str:
    """`python -m module` until the deadline; its output, also written to out/log_name."""
    seconds = deadline - time.time()
    if seconds < 10:
        return "not run: budget"
    command = ([sys.executable, "-m", module] + (["--dry-run"] if dry_run else [])
               + (["--out", str(out)] if takes_out else []))
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=seconds)
        printed = result.stdout + (f"\nexit {result.returncode}: {result.stderr[-2000:]}" if result.returncode else "")
    except subprocess.TimeoutExpired as stopped:
        printed = (stopped.stdout or b"").decode() + f"\nstopped at the budget ({seconds:.0f} s)"
    (out / log_name).write_text(printed)
    return printed.strip()


def start_check_processes(dtypes: Sequence[str], dry_run: bool, deadline: float, work: Path):
    processes = {}
    for dtype in dtypes:
        command = [sys.executable, "-m", "bench.gpu_run", "--checks-only", dtype,
                   "--deadline", str(deadline), "--out", str(work)] + (["--dry-run"] if dry_run else [])
        processes[dtype] = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)
    return processes


def start_test_suite(out: Path, seconds: float) -> Optional[subprocess.Popen]:
    """The compiled test suite beside the checks (GPU only: CI runs it on the interpreter)."""
    if not ON_GPU:
        return None
    env = dict(os.environ, TRITON_INTERPRET="0")
    workers = ["-n", "6"] if _importable("xdist") else []
    command = ["timeout", str(int(seconds)), sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               *workers, "tests"]
    log = open(out / "pytest.log", "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def launch_verdicts(timings: List[Dict]) -> List[str]:
    """Per operation timed on several launch paths: the fastest, and by how much."""
    by_operation: Dict[str, List[Dict]] = {}
    for row in timings:
        if row["provider"].startswith("fastce[") and row["status"] == "ok":
            by_operation.setdefault(row["operation"], []).append(row)
    lines = ["## Launch paths (FASTCE_CLUSTER: default = the launch rule)"]
    for operation, rows in by_operation.items():
        if len(rows) > 1:
            rows = sorted(rows, key=lambda r: r["median_ms"])
            lines.append(f"- {operation}: fastest {rows[0]['provider']}, "
                         + ", ".join(f"{r['provider']} {r['median_ms'] / rows[0]['median_ms']:.2f}×" for r in rows[1:]))
    return lines


def summary(env: Dict[str, object], checks: List[Dict], timings: List[Dict], suite_line: str) -> str:
    lines = [f"# GPU session: {env['device']}",
             f"torch {env['torch']} | triton {env['triton']} | fastce {env['fastce']} | "
             f"commit {env['git_commit']} | {env['date']}", ""]
    ran = [c for c in checks if c["passed"] is not None]
    failed = [c for c in ran if not c["passed"]]
    worst = {}
    for c in ran:
        if "grad_rel_err" in c:
            worst[c["dtype"]] = max(worst.get(c["dtype"], 0.0), c["loss_rel_err"], c["grad_rel_err"])
    lines.append(f"## Checks against float64: {len(ran) - len(failed)}/{len(ran)} passed "
                 f"({len(checks) - len(ran)} not run); worst relative error by dtype: "
                 + ", ".join(f"{d} {e:.1e} (tol {TOLERANCE[d]:.0e})" for d, e in sorted(worst.items())))
    for c in failed:
        lines.append(f"- FAILED {c['check']}: loss {_fmt(c.get('loss_rel_err'), '.1e')} "
                     f"grad {_fmt(c.get('grad_rel_err'), '.1e')} {c.get('note', '')}")
    lines += ["", f"## Compiled test suite: {suite_line}", "", *launch_verdicts(timings), "", "## Timings (median ms; × copy = time / copy of the same bytes)",
              "", "| operation | provider | ms | GB/s | × copy | peak MB | TFLOP/s | loss | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in timings:
        lines.append(f"| {r['operation']} | {r['provider']} | {_fmt(r.get('median_ms'), '.3f')} | "
                     f"{_fmt(r.get('gbps'), '.0f')} | {_fmt(r.get('vs_copy'), '.2f')} | "
                     f"{_fmt(r.get('peak_mb'), '.0f')} | {_fmt(r.get('tflops'), '.0f')} | "
                     f"{_fmt(r.get('loss'), '.4f')} | {r['status']} |")
    return "\n".join(lines)


def session(out: Path, budget_s: float, dry_run: bool) -> int:
    sizes = DRY_SIZES if dry_run else GPU_SIZES
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    env = environment(ON_GPU)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['git_commit']}", flush=True)
    check_deadline = start + 0.4 * budget_s
    work = Path(tempfile.mkdtemp(prefix="fastce-checks-"))
    suite = start_test_suite(out, 0.45 * budget_s)
    processes = start_check_processes(tuple(DTYPES), dry_run, check_deadline, work)
    logs = {dtype: process.communicate()[0] for dtype, process in processes.items()}
    (out / "checks.log").write_text("".join(f"== {dtype}\n{log}\n" for dtype, log in logs.items()))
    checks = []
    for dtype in DTYPES:
        path = work / f"checks-{dtype}.json"
        if path.exists():
            checks += json.loads(path.read_text())
        else:
            checks.append({"check": f"{dtype} checks", "dtype": dtype, "passed": False,
                           "note": "the check process wrote nothing: " + logs[dtype][-300:]})
    shutil.rmtree(work, ignore_errors=True)
    suite_line = "not run (dry run: CI runs the suite on the interpreter)"
    if suite is not None:
        code = suite.wait()
        tail = (out / "pytest.log").read_text().strip().splitlines()
        suite_line = (tail[-1] if tail else "no output") + (" (stopped at its time limit)" if code == 124 else "")
    print(f"checks and test suite done at {time.time() - start:.0f} s", flush=True)
    timings = run_timings(sizes, start + budget_s)
    stages = {stage[0]: run_stage(*stage, out, start + budget_s, dry_run) for stage in STAGES}
    (out / "checks.json").write_text(json.dumps(checks, indent=1))
    (out / "results.json").write_text(json.dumps({"environment": env, "timings": timings,
                                                  "test_suite": suite_line, "stages": stages}, indent=1))
    text = summary(env, checks, timings, suite_line) + "".join(
        f"\n\n## {module}\n\n{printed}" for module, printed in stages.items())
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text)
    return 0 if all(c["passed"] is not False for c in checks) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.md, results.json, checks.json")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU interpreter (what CI runs)")
    parser.add_argument("--checks-only", choices=tuple(DTYPES), help=argparse.SUPPRESS)  # one check process
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not ON_GPU and not args.dry_run:
        parser.error("no CUDA GPU here: use --dry-run (tiny sizes on the Triton interpreter)")
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if args.checks_only:
        run_checks(args.checks_only, sizes, args.deadline, args.out / f"checks-{args.checks_only}.json")
        return 0
    return session(args.out, args.budget_s, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())

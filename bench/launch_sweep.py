"""python -m bench.launch_sweep --out DIR: time the fused kernel under every launch configuration
worth trying, to set the launch rule (fastce/_launch.py) from measurements.

For each shape: the training-step kernel alone (forward writing the gradient, as "mean" does)
under each candidate (rows per program, tile, warps): one tile holding the whole row, or rows
streamed in tiles; several rows per program for small rows. Beside them, the device-to-device
copy of the same bytes (read the logits, write the gradient), the launch rule's own choice, and
the other parts of a default call: the mean's divisor, the target validation, and the whole
fastce.cross_entropy forward+backward. Triton compiles every candidate first, in parallel
processes (its disk cache serves the timing process), so the timings stay inside a short lease.

--dry-run runs a few candidates at tiny sizes on the CPU interpreter (CI keeps it working).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from . import use_best_device

ON_GPU = use_best_device()  # before anything imports triton

import torch  # noqa: E402

import fastce  # noqa: E402
from fastce import _launch, softmax_losses  # noqa: E402
from fastce._core import LossSpec  # noqa: E402
from fastce._launch import RowLaunchConfig  # noqa: E402
from fastce._validation import check_target_range  # noqa: E402

from .gpu_run import Clock  # noqa: E402
from .suite import environment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPILE_PROCESSES = 8


@dataclass(frozen=True)
class Shape:
    dims: tuple  # logits shape, class dimension 1

    @property
    def n_classes(self) -> int:
        return self.dims[1]

    @property
    def n_rows(self) -> int:
        return torch.Size(self.dims).numel() // self.n_classes

    @property
    def label(self) -> str:
        return "x".join(map(str, self.dims))


GPU_SHAPES = [Shape((8192, v)) for v in (8192, 16384, 32000, 50257, 128256, 262144)] + [
    Shape((16384, 4096)), Shape((65536, 256)), Shape((16, 19, 512, 512))]
DRY_SHAPES = [Shape((4, 300)), Shape((4, 9000)), Shape((8, 19)), Shape((2, 3, 4, 5))]


def candidates(shape: Shape, dry_run: bool) -> List[RowLaunchConfig]:
    """Launch configurations to time: the launch rule's, and the alternatives around it."""
    block = 1 << max(shape.n_classes - 1, 0).bit_length()
    rule = _launch.row_launch_config(shape.n_rows, shape.n_classes)
    if dry_run:
        return [rule] + ([RowLaunchConfig(1, min(block, 4096), 4)] if block > 4096 else [])
    configs = []
    if block <= 256 and shape.dims[2:]:  # K-dimensional: many short strided rows per program
        configs += [RowLaunchConfig(rows, block, warps) for rows in (16, 64, 256, 1024) for warps in (1, 2, 4, 8)]
    elif block <= 4096:  # short contiguous rows: several per program
        configs += [RowLaunchConfig(rows, block, warps) for rows in (1, 2, 4, 8, 16, 64)
                    if rows * block <= 16384 for warps in (2, 4, 8, 16) if warps * 32 <= rows * block]
    else:
        if block <= _launch.SINGLE_PASS_MAX_CLASSES:  # the whole row in one program's registers
            configs += [RowLaunchConfig(1, block, warps) for warps in (8, 16, 32)]
        configs += [RowLaunchConfig(1, tile, warps) for tile in (1024, 2048, 4096, 8192, 16384, 32768) if tile < block
                    for warps in {1024: (2, 4), 2048: (2, 4, 8), 4096: (4, 8, 16), 8192: (4, 8, 16),
                                  16384: (8, 16), 32768: (16, 32)}[tile]]
    return [rule] + [c for c in configs if c != rule]


def make_tensors(shape: Shape, device: str, seed: int):
    generator = torch.Generator(device).manual_seed(seed)
    logits = torch.randn(shape.dims, device=device, generator=generator).to(torch.bfloat16)
    target_shape = (shape.dims[0],) + tuple(shape.dims[2:])
    target = torch.randint(0, shape.n_classes, target_shape, device=device, generator=generator)
    return logits, target, torch.empty_like(logits)


def kernel_step(shape: Shape, config: RowLaunchConfig, copies):
    """The training-step kernel alone: forward, gradient written for an upstream gradient of 1."""
    spec = LossSpec(reduction="mean")
    logits, target, _ = copies[0]
    n_programs = softmax_losses.n_forward_programs(logits) if config is None else -(-target.numel() // config.rows)
    stats = softmax_losses.statistics(logits, target, None, spec, "none", n_programs)
    loss = logits.new_empty(())
    lse = logits.new_empty(target.shape, dtype=torch.float32)
    calls = iter(range(1 << 62))

    def step():
        logits, target, grad = copies[next(calls) % len(copies)]
        stats[3:4].zero_()  # the counter of the loss's reduction on the device
        softmax_losses.launch_forward(logits, target, None, spec, stats, loss=loss, lse=lse, grad=grad, reduce=True,
                                      config=config)
    return step


def compile_all(shapes: Sequence[Shape], dry_run: bool, worker: int, workers: int) -> None:
    """Launch this worker's share of the candidates once, so that Triton's disk cache holds them."""
    device = "cuda" if ON_GPU else "cpu"
    jobs = [(shape, config) for shape in shapes for config in candidates(shape, dry_run)]
    tensors = {}
    for shape, config in jobs[worker::workers]:
        if shape not in tensors:
            tensors.clear()
            tensors[shape] = [make_tensors(shape, device, 0)]
        try:
            kernel_step(shape, config, tensors[shape])()
        except Exception as error:  # the timing process reports it
            print(f"{shape.label} {config}: {type(error).__name__}: {error}"[:300], flush=True)


def time_shape(shape: Shape, dry_run: bool, clock: Clock) -> List[Dict[str, object]]:
    device = "cuda" if ON_GPU else "cpu"
    nbytes = 2 * torch.Size(shape.dims).numel() * 2  # bf16 logits read, gradient written
    copies = [make_tensors(shape, device, seed) for seed in range(clock.copies(nbytes))]
    copy_ms = clock.copy_ms(nbytes)
    rule = _launch.row_launch_config(shape.n_rows, shape.n_classes)
    rows = []

    def record(part: str, step, **extra):
        row = {"shape": shape.label, "part": part, "copy_ms": copy_ms, **extra}
        try:
            step()
            row["ms"] = clock.median_ms(step, [])
            row["vs_copy"] = row["ms"] / copy_ms
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        rows.append(row)

    for config in candidates(shape, dry_run):
        record("kernel", kernel_step(shape, config, copies), config=config._asdict(), rule=config == rule)
    logits, target, _ = copies[0]
    spec = LossSpec(reduction="mean")
    record("mean divisor", lambda: softmax_losses.statistics(logits, target, None, spec, "none"))
    record("validation", lambda: check_target_range(target, shape.n_classes, -100))
    leaf = logits.detach().requires_grad_()

    def full_call():
        fastce.cross_entropy(leaf, target).backward()
    record("fastce.cross_entropy fwd+bwd", full_call)

    def unvalidated_call():
        fastce.cross_entropy(leaf, target, validate=False).backward()
    record("fastce.cross_entropy fwd+bwd validate=False", unvalidated_call)
    record("fastce.cross_entropy no-grad forward", lambda: fastce.cross_entropy(logits, target))
    leaf.grad = None
    return rows


def profile_call(shape: Shape, calls: int = 30) -> str:
    """Where the host time of a default forward+backward goes: cProfile's top functions, then
    torch.profiler's operators and kernels."""
    import cProfile
    import io
    import pstats
    device = "cuda" if ON_GPU else "cpu"
    logits, target, _ = make_tensors(shape, device, 0)
    leaf = logits.requires_grad_()

    def call():
        fastce.cross_entropy(leaf, target).backward()
        leaf.grad = None
    call()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    if ON_GPU:
        torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if ON_GPU else [])
    with torch.profiler.profile(activities=activities) as traced:
        for _ in range(5):
            call()
    table = traced.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return f"## {shape.label}: cProfile of {calls} calls\n{text.getvalue()}\n## torch.profiler, 5 calls\n{table}\n"


def summary(env: Dict[str, object], rows: List[Dict[str, object]]) -> str:
    lines = [f"# Launch sweep: {env['device']}", f"torch {env['torch']} | triton {env['triton']} | "
             f"commit {env['git_commit']} | {env['date']}", "",
             "| shape | copy ms | rule: rows/block/warps | rule ms (× copy) | best: rows/block/warps | best ms (× copy) "
             "| divisor ms | validation ms | full call ms | validate=False | no-grad forward |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(row["shape"] for row in rows):
        mine = [row for row in rows if row["shape"] == label]
        kernels = [row for row in mine if row["part"] == "kernel" and "ms" in row]
        part = {row["part"]: row.get("ms") for row in mine if row["part"] != "kernel"}
        if not kernels:
            lines.append(f"| {label} | | no kernel ran | | | | | | |")
            continue
        best = min(kernels, key=lambda row: row["ms"])
        rule = next((row for row in kernels if row["rule"]), None)

        def cfg(row):
            c = row["config"]
            return f"{c['rows']}/{c['block_size']}/{c['num_warps']}"

        def ms(row):
            return f"{row['ms']:.3f} ({row['vs_copy']:.2f})"
        lines.append(f"| {label} | {mine[0]['copy_ms']:.3f} | {cfg(rule) if rule else '-'} | {ms(rule) if rule else '-'} | "
                     f"{cfg(best)} | {ms(best)} | " + " | ".join(
                         "" if part.get(p) is None else f"{part[p]:.3f}"
                         for p in ("mean divisor", "validation", "fastce.cross_entropy fwd+bwd",
                                   "fastce.cross_entropy fwd+bwd validate=False",
                                   "fastce.cross_entropy no-grad forward")) + " |")
    errors = [row for row in rows if "error" in row]
    lines += [f"- error {row['shape']} {row['part']} {row.get('config', '')}: {row['error']}" for row in errors]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU interpreter")
    parser.add_argument("--shapes", nargs="+", help="only these shapes (labels such as 8192x32000)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the host side of a default call on each shape (profile.txt)")
    parser.add_argument("--compile-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not ON_GPU and not args.dry_run:
        parser.error("no CUDA GPU here: use --dry-run")
    shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
    if args.shapes:
        shapes = [shape for shape in shapes if shape.label in args.shapes]
    workers = COMPILE_PROCESSES if ON_GPU else 1
    if args.compile_worker is not None:
        compile_all(shapes, args.dry_run, args.compile_worker, workers)
        return 0
    start = time.time()
    compilers = [subprocess.Popen([sys.executable, "-m", "bench.launch_sweep", "--out", str(args.out),
                                   "--compile-worker", str(worker), "--shapes", *[s.label for s in shapes]]
                                  + (["--dry-run"] if args.dry_run else []),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for worker in range(workers)]
    compile_log = "".join(process.communicate()[0] for process in compilers)
    print(f"compiled in {time.time() - start:.0f} s", flush=True)
    env = environment(ON_GPU)
    clock = Clock()
    rows = []
    for shape in shapes:
        rows += time_shape(shape, args.dry_run, clock)
        print(f"  {shape.label} done at {time.time() - start:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps({"environment": env, "rows": rows,
                                                     "compile_log": compile_log[-20000:]}, indent=1))
    if args.profile:
        (args.out / "profile.txt").write_text("".join(profile_call(shape) for shape in shapes))
    text = summary(env, rows)
    (args.out / "sweep.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

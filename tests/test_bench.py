"""The benchmark suite runs on the CPU (Triton interpreter) and writes what it promises."""
import contextlib
import csv
import dataclasses
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from bench.cases import Case, make_inputs
from bench.gpu import gpu_metrics
from bench.passes import max_relative_error
from bench.providers import PROVIDERS, NotRun
from bench.suite import usable_providers
from fastce.profiling import interpreter_active

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT_FIELDS = ("device", "torch", "triton", "fastce", "git_commit", "date")


def run_bench(*args, timeout=300):
    # CPU mode even on a GPU machine: this is what CI runs
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    # every operation × provider on the interpreter: about 100 s of CPU time, more on a shared machine
    printed = run_bench("-m", "bench", "--quick", "--no-progress", "--out", str(out), timeout=400).stdout
    return out, printed, json.loads((out / "results.json").read_text())


def test_quick_mode_has_a_row_per_available_provider(quick_run):
    out, printed, saved = quick_run
    rows = saved["rows"]
    available = set(PROVIDERS) - set(saved["skipped_providers"])
    assert {"fastce", "fastce-reference"} <= available
    assert {row["provider"] for row in rows} == available
    providers_by_case = defaultdict(list)
    for row in rows:
        providers_by_case[row["op"], row["pass"], row["tokens"], row["vocab"]].append(row["provider"])
    for providers in providers_by_case.values():  # each case: every available provider, once
        assert sorted(providers) == sorted(available)
    measured = {row["provider"] for row in rows if row["status"] == "ok"}
    assert {"fastce", "fastce-reference"} <= measured
    assert all(row["note"] for row in rows if row["status"] != "ok")
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert "CPU: Triton interpreter — bytes/peak/syncs only, no timings" in printed
    for name in saved["skipped_providers"]:
        assert f"skipped {name}: " in printed


def test_quick_mode_reports_bytes_peak_and_syncs_not_timings(quick_run):
    _, _, saved = quick_run
    for row in saved["rows"]:
        assert all(row[field] for field in ENVIRONMENT_FIELDS)
        assert "median_ms" not in row
        if row["status"] != "ok":
            continue
        # nothing can move less than the floor: read the inputs (and write their gradients)
        assert row["moved_x"] >= row["floor_x"] * 0.999, row
        assert row["distinct_x"] <= row["moved_x"]
        assert row["peak_bytes"] >= 0 and row["syncs"] >= 0 and row["launches"] >= 1
        assert row["max_rel_err"] < 0.05, row  # bf16 inputs: a wrong kernel shows here


def test_quick_mode_writes_the_plot(quick_run):
    out, _, _ = quick_run
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "| provider |" in (out / "results.md").read_text()


def test_pytest_benchmark_json_feeds_the_same_report(tmp_path):
    saved = tmp_path / "benchmark.json"
    run_bench("-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
              "-k", "cross_entropy-forward-bf16-N16-V256-mean", f"--benchmark-json={saved}")
    benchmarks = json.loads(saved.read_text())["benchmarks"]
    assert {b["extra_info"]["provider"] for b in benchmarks} >= {"fastce", "fastce-reference"}
    out = tmp_path / "report"
    printed = run_bench("-m", "bench", "--from-pytest-benchmark", str(saved), "--out", str(out)).stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == len(benchmarks) and all(row["status"] == "ok" for row in rows)
    assert "fastce" in printed and (out / "results.png").exists()


def test_gpu_numbers_follow_from_the_median():
    case = Case("linear_cross_entropy", "forward+backward", "bf16", tokens=4096, vocab=32000, hidden=4096)
    assert case.floor_bytes == 2 * (4096 + 32000) * 4096 * 2  # read h and W, write their gradients
    metrics = gpu_metrics(case, time_ms=2.0, copy_time_ms=1.0, peak=123)
    assert metrics["gbps"] == pytest.approx(case.floor_bytes / 2e-3 / 1e9)
    assert metrics["vs_copy"] == 2.0 and metrics["peak_bytes"] == 123
    assert metrics["tflops"] == pytest.approx(6 * 4096 * 4096 * 32000 / 2e-3 / 1e12)
    logits = Case("cross_entropy", "forward", "fp32", tokens=8, vocab=10)
    assert logits.floor_bytes == 8 * 10 * 4 and gpu_metrics(logits, 1.0, 1.0, 0)["tflops"] is None


# ---- Cut Cross-Entropy: a bench-peers provider, which CI does not install ----------------------

SMALL_LINEAR = Case("linear_cross_entropy", "forward", "fp32", tokens=64, vocab=512, hidden=32)


@pytest.fixture
def cut_cross_entropy():
    pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy is not installed (a bench peer)")
    return PROVIDERS["cut-cross-entropy"]


def test_cut_cross_entropy_says_why_it_does_not_run(cut_cross_entropy):
    _, skipped = usable_providers([cut_cross_entropy], on_gpu=False)
    assert "libdevice.log1p" in skipped["cut-cross-entropy"]
    if interpreter_active():  # the reason holds: its kernel fails there (if not, revisit the reason)
        from triton.runtime.errors import InterpreterError
        loss = cut_cross_entropy.load()["linear_cross_entropy"](SMALL_LINEAR)
        with pytest.raises(InterpreterError):
            loss(make_inputs(SMALL_LINEAR, "cpu"))
    with pytest.raises(NotRun, match="bf16 or fp16"):
        cut_cross_entropy.loss_fn(dataclasses.replace(SMALL_LINEAR, pass_="forward+backward"), on_gpu=True)


@pytest.mark.skipif(interpreter_active() or not torch.cuda.is_available(),
                    reason="Cut Cross-Entropy's kernels need a GPU without TRITON_INTERPRET (see its cpu_blind_reason)")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cut_cross_entropy_matches_the_reference(cut_cross_entropy, reduction):
    case = dataclasses.replace(SMALL_LINEAR, reduction=reduction)
    assert max_relative_error(case, cut_cross_entropy.loss_fn(case, on_gpu=True), "cuda") < 1e-4


# ---- token operations: the trainers' expressions and Liger's fused linear GRPO --------------------

@pytest.mark.parametrize("op, provider", [("token_logprobs", "torch"),
                                          ("policy_gradient_loss", "torch"),
                                          ("policy_gradient_loss", "fastce"),
                                          ("linear_token_logprobs", "torch"),
                                          ("linear_token_logprobs", "liger")])
def test_token_operation_peers_compute_the_same_loss(op, provider):
    if provider == "liger":
        pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed (a bench peer)")
    case = Case(op, "forward+backward", "fp32", tokens=48, vocab=300, hidden=16 if op.startswith("linear") else 0)
    assert max_relative_error(case, PROVIDERS[provider].loss_fn(case, on_gpu=False), "cpu") < 1e-5
    with pytest.raises(NotRun, match="reduction='none'") if provider == "liger" else contextlib.nullcontext():
        PROVIDERS[provider].loss_fn(dataclasses.replace(case, reduction="none"), on_gpu=False)


@pytest.mark.parametrize("op", ["distillation_loss", "linear_distillation_loss"])
@pytest.mark.parametrize("provider", ["torch", "fastce", "liger"])
def test_distillation_peers_compute_the_same_loss(op, provider):
    if provider == "liger":
        pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed (a bench peer)")
    case = Case(op, "forward+backward", "fp32", tokens=24, vocab=300, hidden=16 if op.startswith("linear") else 0)
    assert max_relative_error(case, PROVIDERS[provider].loss_fn(case, on_gpu=False), "cpu") < 1e-5
    with pytest.raises(NotRun, match="reduction='none'") if provider == "liger" else contextlib.nullcontext():
        PROVIDERS[provider].loss_fn(dataclasses.replace(case, reduction="none"), on_gpu=False)


# ---- bench.linear_memory: the fused heads' memory, Liger's CUDA branches forced on CPU tensors ----

def test_liger_cuda_branches_change_its_allocations_and_not_its_answer():
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (a bench peer)")
    from bench.linear_memory import providers, step_cost
    found = providers()
    cpu_path, cuda_path = found["liger (CPU path)"], found["liger (CUDA branches)"]
    # the CUDA branches reuse one logits buffer and add ∂W in place: less held than the CPU path
    shape = (256, 32, 1024, torch.bfloat16)
    assert step_cost(cuda_path, *shape)[0] < step_cost(cpu_path, *shape)[0]
    x = torch.randn(96, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 300, (96,))
    results = []
    for loss in (cpu_path, cuda_path):
        x.grad = w.grad = None
        value = loss(x, w, target)
        value.backward()
        results.append((value.detach(), x.grad, w.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_linear_memory_report_has_every_provider_and_check():
    from bench.linear_memory import providers, table
    report = table(shapes=((128, 16, 512),), loss_check=(64, 16, 300), gradient_check=(64, 16, 300))
    for name, loss in providers().items():
        if loss is not None:
            rows = [line for line in report.splitlines() if line.startswith(f"| {name} |")]
            # the loss and ∂W checks run each provider eagerly (compiled, it computes the same)
            assert len(rows) == (0 if name == "fastce compiled" else 2), name
    assert "∂W error" in report and "Llama-3-8B" in report

"""The GPU session scripts (bench.gpu_run, bench.launch_sweep) in their --dry-run mode: the same
code at tiny sizes on the interpreter, so that a session with a GPU finds them working."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, out):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", module, "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """One dry run of the whole session: (its folder, what it printed)."""
    out = tmp_path_factory.mktemp("gpu_run")
    return out, _run("bench.gpu_run", out)


def test_gpu_run_checks_every_launch_path_and_times_every_provider(gpu_run):
    tmp_path, printed = gpu_run
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert {check["dtype"] for check in checks} == {"bf16", "fp16", "fp32"}
    assert {check["path"] for check in checks} == {"default"}  # streamed and one tile (the cluster path is gone)
    assert {check["option"] for check in checks} >= {"plain", "weight", "focal", "prob_targets", "inplace_backward"}
    assert all(check["passed"] for check in checks), [c for c in checks if not c["passed"]]
    timings = json.loads((tmp_path / "results.json").read_text())["timings"]
    fastce_rows = [row for row in timings if row["provider"].startswith("fastce")]
    assert fastce_rows and all(row["status"] == "ok" for row in fastce_rows), fastce_rows
    assert printed.rstrip().endswith((tmp_path / "summary.md").read_text().rstrip().splitlines()[-1])
    token_stats = (tmp_path / "token_stats.log").read_text()  # bench.gpu_token_stats, one stage of the run
    token_checks = [line for line in token_stats.splitlines() if "ignored tokens all zero" in line]
    # token_logprobs and policy_gradient_loss on two logits shapes, linear_token_logprobs on one
    assert len(token_checks) == 5 and all(line.endswith("True") for line in token_checks), token_stats
    assert token_stats.rstrip().splitlines()[-1].startswith("done in"), token_stats


def test_launch_sweep_times_the_rule_beside_its_alternatives(tmp_path):
    _run("bench.launch_sweep", tmp_path)
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    kernels = [row for row in rows if row["part"] == "kernel"]
    assert all("ms" in row for row in kernels), [row for row in kernels if "ms" not in row]
    assert sum(row["rule"] for row in kernels) == len({row["shape"] for row in rows})  # the rule once per shape
    assert {"mean divisor", "validation", "fastce.cross_entropy fwd+bwd"} <= {row["part"] for row in rows}


def test_gpu_linear_checks_both_walks_and_steps_every_provider(gpu_run):
    tmp_path, _ = gpu_run  # bench.gpu_linear, one stage of the session
    printed = (tmp_path / "gpu_linear.log").read_text()
    results = json.loads((tmp_path / "gpu_linear.json").read_text())
    checks = results["checks"]
    assert {(c["walk"], c["reduction"], c["compiled"]) for c in checks} == {
        ("vocab", "mean", True), ("tokens", "none", True), *((w, r, False) for w in ("vocab", "tokens")
                                                              for r in ("mean", "none"))}
    assert all(c["grad_weight"] < 2e-2 and c["grad_input"] < 2e-2 for c in checks), checks
    (cells,) = results["steps"].values()
    assert {"fastce", "fastce compiled", "F.linear + F.cross_entropy"} <= set(cells)
    assert all("ms" in cell for cell in cells.values()), cells
    assert abs(results["losses"]["fastce"][0] - results["losses"]["fastce"][1]) < 0.05
    assert "Training step" in printed

"""The kernels compile for an H100 (sm_90) with the real GPU compiler, on a machine without a GPU.

The interpreter accepts code that the compiler rejects (loop-carried type changes, unsupported
ops); this catches that in CI. It also holds the launch rule to its promises, read from what the
compiler produces for what the launchers launch (tools/sm90_compile.py prints the full table):
no register spills where a program's tile fits its register budget; global loads and stores of
the logits, probabilities and gradient as wide as the layout allows (16 bytes: one 128-bit
vector per thread and access) wherever alignment allows it (rows of a multiple of 16 elements,
PyTorch's aligned allocations), also for tiles of several rows and for (N, C, d…) inputs; and
float scalar options received as float64.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKED = ["training step, V=4096", "streamed training step, V=32k", "streamed training step, V=256k",
           "no-grad forward, V=4096", "streamed no-grad forward, V=128k",
           "small V=256, rows per program", "K-dim (8, 21, 64, 64), rows per program",
           "K-dim channels-last (8, 32, 64, 64)", "probability targets, V=4096", "focal, V=1000",
           "'mean' backward with an lse gradient, V=4096", "float64, V=1000", "inplace rescale, V=32k",
           "class-index pass, 16x512x512 targets", "vocabulary-parallel cross-entropy, V/tp=32k",
           "vocabulary-parallel token statistics, V/tp=32k"]

SCRIPT = f"""
import json, sys
sys.path.insert(0, "tools")
import sm90_compile as tool
variants = [v for v in tool.VARIANTS if v.name in {CHECKED!r}]
print(json.dumps([dict(c._asdict(), widths={{k: {{kind: sorted(w) for kind, w in v.items()}}
                                             for k, v in c.widths.items()}})
                  for c in tool.compile_all(variants)]))
"""

# rows of a multiple of 16 elements and unit class stride (or unit row stride for (N, C, d…)):
# every access to a row-sized tile can be a 16-byte vector
ALIGNED = ["training step, V=4096", "streamed training step, V=32k", "streamed training step, V=256k",
           "no-grad forward, V=4096", "streamed no-grad forward, V=128k", "small V=256, rows per program",
           "K-dim (8, 21, 64, 64), rows per program", "K-dim channels-last (8, 32, 64, 64)",
           "probability targets, V=4096", "'mean' backward with an lse gradient, V=4096", "inplace rescale, V=32k"]
TILE_ACCESSES = {"logits_ptr": "ld", "grad_ptr": "st"}  # and probabilities: target_ptr's loads

# every tile within its register budget: all but float64 (twice the registers per value)
SPILLS_ALLOWED = {"float64, V=1000": None}


def _compiled_by(script: str, timeout: int = 600) -> str:
    """What `script` prints, run in a process without the interpreter (the real compiler's)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_kernels_compile_for_hopper_with_wide_accesses_and_no_spills_where_the_tile_fits():
    compiled = json.loads(_compiled_by(SCRIPT))
    assert {c["variant"] for c in compiled} == set(CHECKED)
    for c in compiled:
        what = f"{c['variant']}: {c['kernel']}"
        assert 0 < c["registers"] <= 255, what
        if c["variant"] not in SPILLS_ALLOWED:
            assert c["stack"] == 0, f"{what} spills {c['stack']} B per thread"
        elif SPILLS_ALLOWED[c["variant"]] is not None:
            assert c["stack"] <= SPILLS_ALLOWED[c["variant"]], what
        if c["kernel"] == "cross_entropy_fwd_kernel":
            # label_smoothing, z_loss, softcap, gamma: float64 parameters, fp64 kernels compute with fp64 values
            assert c["fp64_params"] == 4, what
        if c["kernel"] in ("vocab_parallel_stats_kernel", "vocab_parallel_grad_kernel"):
            # softcap and 1/T (and label_smoothing, z_loss in the gradient) as float64; the slice read, and its
            # gradient written, in 16-byte vectors
            assert c["fp64_params"] == (2 if c["kernel"] == "vocab_parallel_stats_kernel" else 4), what
            assert c["widths"]["logits_ptr"]["ld"] == [16], f"{what}: {c['widths']}"
            if "grad_ptr" in c["widths"]:
                assert c["widths"]["grad_ptr"]["st"] == [16], f"{what}: {c['widths']}"
        if c["variant"] in ALIGNED and c["kernel"] in ("cross_entropy_fwd_kernel", "scale_kernel"):
            tile = dict(TILE_ACCESSES, **({"target_ptr": "ld"} if "probability" in c["variant"] else {}))
            for pointer, kind in tile.items():
                if pointer in c["widths"] and c["widths"][pointer][kind]:
                    assert c["widths"][pointer][kind] == [16], f"{what}: {pointer} {kind} widths {c['widths'][pointer]}"
            assert c["widths"]["logits_ptr" if "logits_ptr" in c["widths"] else "grad_ptr"]["ld"], what


def test_distillation_kernels_compile_without_spills():
    # the distillation kernels' launches (logits form, fused-head chunks and slices) and the engine's
    # exact-sum kernels: each within its register budget, no stack
    printed = _compiled_by("import sys; sys.path.insert(0, 'tools'); import sm90_compile as tool\n"
                           "for name, *_, registers, stack in tool.compile_distillation(tool.distillation_variants()):\n"
                           "    print(f'{name}|{registers}|{stack}')", timeout=900)
    rows = [line.split("|") for line in printed.splitlines()]
    assert len(rows) == 13, printed
    for name, registers, stack in rows:
        assert 0 < int(registers) <= 255 and int(stack) == 0, f"{name}: {registers} registers, {stack} B of stack"

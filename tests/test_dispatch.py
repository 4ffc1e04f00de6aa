"""Where code runs (DESIGN §3), checked in fresh interpreters so the environment is real."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPARE_WITH_TORCH = """
    import torch, torch.nn.functional as F
    x = torch.randn(6, 9, requires_grad=True); t = torch.tensor([0, 8, -100, 3, 3, 1])
    loss = fastce.cross_entropy(x, t, label_smoothing=0.1); loss.backward()
    x2 = x.detach().requires_grad_(); F.cross_entropy(x2, t, label_smoothing=0.1).backward()
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), t, label_smoothing=0.1))
    torch.testing.assert_close(x.grad, x2.grad)
"""


def _run(env_updates: dict, *snippets: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_updates)
    result = subprocess.run([sys.executable, "-c", "\n".join(textwrap.dedent(s) for s in snippets)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cpu_without_interpreter_uses_the_reference():
    out = _run({}, """
        import torch, fastce
        print(fastce.uses_triton(torch.empty(1)))
        """, COMPARE_WITH_TORCH)
    assert out.strip() == "False"


def test_cpu_with_interpreter_uses_the_kernels():
    out = _run({"TRITON_INTERPRET": "1"}, """
        import torch, fastce
        print(fastce.uses_triton(torch.empty(1)))
        """, COMPARE_WITH_TORCH)
    assert out.strip() == "True"


def test_import_and_cpu_path_work_without_triton():
    out = _run({"TRITON_INTERPRET": "1"}, """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch, fastce
        print(fastce.uses_triton(torch.empty(1)))
        """, COMPARE_WITH_TORCH, """
        m = fastce.CrossEntropyLoss(); m(x.detach(), t)
        fastce.focal_loss(x.detach(), t)
        """)
    assert out.strip() == "False"


def test_import_does_not_initialise_cuda():
    out = _run({"TRITON_INTERPRET": "1"}, """
        import torch, fastce
        print(torch.cuda.is_initialized())
        """)
    assert out.strip() == "False"

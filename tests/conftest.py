"""Run every test on the real Triton kernels: on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time, unless the caller chose otherwise (e.g. TRITON_INTERPRET=0 on a GPU box).
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["kernels", "reference"])
def path(request, monkeypatch):
    """Run a test on the Triton kernels (the interpreter here) and on the pure-PyTorch path (what
    a CPU without the interpreter runs)."""
    if request.param == "reference":
        import fastce
        monkeypatch.setattr(fastce.functional, "uses_triton", lambda input: False)
    return request.param

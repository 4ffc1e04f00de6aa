"""Run every test on the real Triton kernels: on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time, unless the caller chose otherwise (e.g. TRITON_INTERPRET=0 on a GPU box).
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from _support import DEVICE  # noqa: E402


def _patch_the_language_once_per_launch():
    """Speed: Triton's interpreter patches triton.language again at every call of a @triton.jit
    helper inside a kernel (inspecting hundreds of members each time), although the launch has
    usually patched the same module objects already; skip a repeat for modules patched in this
    launch. Nothing is interpreted differently. (A Triton without these internals keeps its own
    behaviour.)"""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        patch_lang, scope = interpreter._patch_lang, interpreter._LangPatchScope
        run_grid = interpreter.GridExecutor.__call__
    except (ImportError, AttributeError):
        return
    launch = {"running": 0, "patched": set()}  # ids of the language modules patched in the running launch

    def patch_once(fn):
        langs = {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}
        if launch["running"] and langs <= launch["patched"]:
            return scope()  # nothing to undo
        if launch["running"]:
            launch["patched"] |= langs
        return patch_lang(fn)

    def run_grid_once(self, *args, **kwargs):
        launch["running"] += 1
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            launch["running"] -= 1
            launch["patched"] = set()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = run_grid_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()


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

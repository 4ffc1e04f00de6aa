"""fastce's benchmark suite: ``python -m bench`` (see bench/README.md), or
``pytest bench/ --benchmark-only``."""
import os


def use_best_device() -> bool:
    """True when a CUDA GPU is present. Otherwise the Triton kernels must run on the
    interpreter, which has to be chosen before triton is first imported: call this first."""
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return on_gpu

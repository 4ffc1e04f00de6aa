"""Run cases × providers on the GPU (timings) or the CPU interpreter (bytes), one row each."""
from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch

from fastce.profiling import interpreter_active

from . import interpreter
from .cases import Case
from .passes import check_case, max_relative_error
from .providers import NotRun, Provider

Row = Dict[str, object]
REPO = Path(__file__).resolve().parents[1]


def environment(on_gpu: bool) -> Row:
    """What every row records: where, with which versions, from which commit, when."""
    if on_gpu:
        from . import gpu
        device = gpu.device_name()
    else:
        runner = "Triton interpreter" if interpreter_active() else "no Triton interpreter (TRITON_INTERPRET=0)"
        device = f"CPU ({platform.processor() or platform.machine()}), {runner}"
    return {
        "mode": "gpu" if on_gpu else "cpu-interpreter",
        "device": device,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastce": _fastce_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fastce_version() -> str:
    import fastce
    return getattr(fastce, "__version__", "unknown")


def _git_commit() -> str:
    """The checkout's commit, or FASTCE_GIT_COMMIT where it is set: a GPU machine gets a copy of
    the working tree whose .git may be older than the tree."""
    if os.environ.get("FASTCE_GIT_COMMIT"):
        return os.environ["FASTCE_GIT_COMMIT"]
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def usable_providers(providers: Iterable[Provider], on_gpu: bool) -> Tuple[List[Provider], Dict[str, str]]:
    """The providers that can be measured here, and a note for each of the others."""
    usable, skipped = [], {}
    for provider in providers:
        try:
            ops = provider.load()
        except NotRun as note:
            skipped[provider.name] = str(note)
            continue
        if not on_gpu and set(ops) <= set(provider.cpu_blind_ops):
            skipped[provider.name] = f"not measured on CPU: {provider.cpu_blind_reason}"
            continue
        usable.append(provider)
    return usable, skipped


def new_row(case: Case, provider: Provider, env: Row) -> Row:
    return {**case.as_dict(), "provider": provider.name, "status": "ok", "note": "", **env}


def value_check(case: Case, provider: Provider, on_gpu: bool) -> float:
    """The provider's largest relative error against the float64 reference, on a few tokens."""
    small = check_case(case)
    return max_relative_error(small, provider.loss_fn(small, on_gpu), "cuda" if on_gpu else "cpu")


def run(cases: List[Case], providers: List[Provider], on_gpu: bool, progress: bool = True) -> List[Row]:
    """One row per (case, provider): status "ok" with its numbers, "n/a" with a note when the
    provider lacks the operation, "error" or "out of memory"."""
    from tqdm import tqdm

    env = environment(on_gpu)
    copy_times: Dict[int, float] = {}  # GPU: bytes floor -> time of a copy moving them
    rows = []
    pairs = list(itertools.product(cases, providers))
    for case, provider in tqdm(pairs, disable=not progress, unit="run", desc="bench"):
        row = new_row(case, provider, env)
        try:
            row["max_rel_err"] = value_check(case, provider, on_gpu)
            row.update(_measure(case, provider.loss_fn(case, on_gpu), on_gpu, copy_times))
        except NotRun as note:
            row.update(status="n/a", note=str(note))
        except torch.cuda.OutOfMemoryError:
            row.update(status="out of memory")
        except Exception as error:  # one provider failing must not hide the others' results
            row.update(status="error", note=f"{type(error).__name__}: {error}"[:300])
        finally:
            if on_gpu:
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _measure(case: Case, loss_fn, on_gpu: bool, copy_times: Dict[int, float]) -> Row:
    if not on_gpu:
        return interpreter.measure_case(case, loss_fn)
    from . import gpu
    if case.floor_bytes not in copy_times:
        copy_times[case.floor_bytes] = gpu.copy_ms(case.floor_bytes)
    return gpu.measure_case(case, loss_fn, copy_times[case.floor_bytes])

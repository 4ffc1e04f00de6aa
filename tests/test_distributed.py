"""fastce.distributed on real process groups: gloo on the CPU, 2 and 4 ranks (tests/_distributed.py
holds the cases). One spawn per world size runs all of that size's cases; each case is a test here."""
import pytest

import _distributed

# Every rank imports torch and Triton (seconds) and runs its cases on the interpreter; a group whose
# ranks stop agreeing on the next collective hangs, and is killed at this bound.
GROUP_TIMEOUT_S = 420

_RESULTS = {}


def _results(world_size: int) -> dict:
    if world_size not in _RESULTS:
        _RESULTS[world_size] = _distributed.run_group(world_size, _distributed.case_names(world_size), GROUP_TIMEOUT_S)
    return _RESULTS[world_size]


@pytest.mark.parametrize("world_size, name", [(w, n) for w in (2, 4) for n in _distributed.case_names(w)])
def test_case(world_size, name):
    failures = [f"rank {rank}:\n{error}" for rank, error in enumerate(_results(world_size)[name]) if error]
    assert not failures, "\n".join(failures)

"""The packed row statistics of one vocabulary-parallel call, shared by both per-rank paths."""
from __future__ import annotations

from .._core import LossSpec


def n_stats(spec: LossSpec, prob_target: bool) -> int:
    """Statistics per row in the packed sum: S, Y or T, T_m (probabilities), U (smoothing)."""
    return 2 + int(prob_target) + int(spec.label_smoothing > 0)

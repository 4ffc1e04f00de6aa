"""The options of one vocabulary-parallel call, shared by both per-rank paths (no Triton needed)."""
from __future__ import annotations

from typing import NamedTuple, Optional


class VocabParallelSpec(NamedTuple):
    """Scalar options: the cross-entropy fields of fastce.ops.LossSpec (that module needs Triton,
    and the CPU path must run without it)."""
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None

    def n_stats(self, prob_target: bool) -> int:
        """Statistics per row in the packed sum: S, Y or T, T_m (probabilities), U (smoothing)."""
        return 2 + int(prob_target) + int(self.label_smoothing > 0)

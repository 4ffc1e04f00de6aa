"""The packed row statistics of one vocabulary-parallel call, shared by both per-rank paths.

A call computes a loss (`spec`, a LossSpec) or the token statistics (`token`, a TokenStatsSpec, with
`spec` the loss whose negated rows are the log-probabilities: token_loss_spec's)."""
from __future__ import annotations

from typing import Optional

from .._core import LossSpec, TokenStatsSpec


def token_loss_spec(token: TokenStatsSpec) -> LossSpec:
    """−log p_y per row: the cross-entropy of an unweighted, unsmoothed row, reduction 'none'."""
    return LossSpec(ignore_index=token.ignore_index, reduction="none")


def has_entropy(token: Optional[TokenStatsSpec]) -> bool:
    return token is not None and token.return_entropy


def n_stats(spec: LossSpec, prob_target: bool, token: Optional[TokenStatsSpec] = None) -> int:
    """Statistics per row in the packed sum: S, Y or T, T_m (probabilities), U (smoothing), E (the
    token statistics' entropy, which come without probabilities or smoothing: E and U share the last
    slot's place)."""
    return 2 + int(prob_target) + int(spec.label_smoothing > 0) + int(has_entropy(token))


def inv_temperature(token: Optional[TokenStatsSpec]) -> float:
    return 1.0 if token is None else 1.0 / token.temperature

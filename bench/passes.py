"""How one pass (forward, backward, forward+backward) of a loss is run, and checked."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from .cases import Case, leaves, make_inputs
from .providers import PROVIDERS, LossFn

CHECK_TOKENS = 32  # the value check runs on few tokens: a float64 reference of big shapes is costly


def backward(loss: torch.Tensor, inputs: Dict[str, torch.Tensor], retain_graph: bool = False) -> None:
    """Backward with the case's upstream gradient: random for 'none', the default for 'mean'."""
    loss.backward(inputs.get("grad_output"), retain_graph=retain_graph)


@dataclass
class Step:
    """One call of the pass, cycling over input copies (so caches do not flatter anyone).
    ``grad_leaves`` must have their .grad reset to None between calls."""
    run: Callable[[], None]
    grad_leaves: List[torch.Tensor]


def make_step(case: Case, loss_fn: LossFn, copies: Sequence[Dict[str, torch.Tensor]],
              reusable: bool = True) -> Step:
    """``reusable=False``: each copy is used once, so a backward may free its graph as
    training does (what peak-memory measurements want)."""
    grad_leaves = [t for inputs in copies for t in leaves(inputs)]
    if case.pass_ == "forward":
        cycle = itertools.cycle(copies)
        return Step(lambda: loss_fn(next(cycle)), grad_leaves)
    if case.pass_ == "forward+backward":
        cycle = itertools.cycle(copies)

        def forward_backward():
            inputs = next(cycle)
            backward(loss_fn(inputs), inputs)
        return Step(forward_backward, grad_leaves)
    # backward alone: the forward graphs are built once, outside the step
    graphs = itertools.cycle([(loss_fn(inputs), inputs) for inputs in copies])

    def backward_only():
        loss, inputs = next(graphs)
        backward(loss, inputs, retain_graph=reusable)
    return Step(backward_only, grad_leaves)


def check_case(case: Case) -> Case:
    """What the value check runs: the same case on CHECK_TOKENS tokens at most."""
    return dataclasses.replace(case, tokens=min(case.tokens, CHECK_TOKENS))


def max_relative_error(case: Case, loss_fn: LossFn, device: str) -> float:
    """Largest error of the loss, and of every gradient when the pass has a backward, against
    the fastce-reference provider (fastce.reference) run in float64 on the same inputs, relative
    to the reference's largest magnitude."""
    inputs = make_inputs(case, device)
    exact = {name: t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
             for name, t in inputs.items()}
    got, want = loss_fn(inputs), PROVIDERS["fastce-reference"].load()[case.op](case)(exact)
    pairs = [(got, want)]
    if case.needs_grad:
        backward(got, inputs)
        backward(want, exact)
        pairs += [(inputs[name].grad, exact[name].grad) for name in inputs if inputs[name].requires_grad]
    return max(_relative(actual, expected) for actual, expected in pairs)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))

"""Shared helpers for the fastce test suite: input factories, the one per-dtype tolerance
table, comparison against the float64 reference, gradients with a chosen grad_output, and a
kernel-launch counter.

Every test compares fastce with ``fastce.reference`` evaluated on float64 copies of the very
same (already rounded) inputs, so the only error allowed is fastce's own: fp32 arithmetic
inside, and one rounding of the result to the input's dtype.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from fastce import _launch, reference

# where the tests run the kernels: the GPU where there is one, else the CPU (the interpreter)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ----------------------------------------------------------------------------------------
# Dtypes and the tolerance table (the ONE table used by every test file)
# ----------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOW_PRECISION = [torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]


@dataclass(frozen=True)
class Tol:
    rtol: float  # relative to each element of the expected value
    atol: float  # relative to the largest finite |expected| of the whole tensor
    floor: float = 0.0  # absolute: the dtype's subnormal spacing (fp16 cannot do better)


# fastce computes in fp32, except that float64 inputs stay float64 (fastce.reference's
# compute_dtype, which the kernels follow, scalar arguments included), so float64 results are
# held to float64 accuracy (a few hundred ulps, for sums over a few hundred classes).
# Low-precision results are rounded once, to nearest-even (the kernels round bf16 by hand, since
# the interpreter would truncate): at most half an ulp, i.e. the unit roundoff u of the dtype
# (bf16: 2^-8 of the value, fp16: 2^-11), with 1% on top for the fp32 error before the rounding.
# The atol term (relative to the largest element) covers cancellation in the target-class
# gradient p_y*S - w_y*q_y, where torch's own fp32 result is off by ~3e-6 of the largest element
# (measured).  Torch's own CPU bf16 gradients are ~2.5e-2 off (measured); fastce must do better.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
TOLERANCES = {
    torch.float64: Tol(rtol=1e-12, atol=1e-12),
    torch.float32: Tol(rtol=1e-5, atol=1e-5),
    torch.float16: Tol(rtol=1.01 * UNIT_ROUNDOFF[torch.float16], atol=1e-5, floor=2.0 ** -24),
    torch.bfloat16: Tol(rtol=1.01 * UNIT_ROUNDOFF[torch.bfloat16], atol=1e-5),
}

# torch.autograd.gradcheck settings (float64 inputs): torch's defaults.
GRADCHECK = dict(eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=0.0)


def tol(dtype: torch.dtype) -> Tol:
    return TOLERANCES[dtype]


def assert_close_dtype(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "",
                       roundings: int = 1, slack: Optional[Tensor] = None) -> None:
    """Compare ``actual`` (fastce's output) with ``expected`` (float64 reference) at the
    tolerance of ``dtype``, for a result rounded ``roundings`` times to it.  NaN and ±inf must
    sit in the same places; finite elements must satisfy
    |a - e| <= roundings * rtol |e| + max(atol * max|e|, floor) (+ ``slack``, elementwise, if given)."""
    assert isinstance(actual, Tensor), f"{what}: expected a Tensor, got {type(actual)}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN pattern differs: actual has {int(nan_a.sum())} NaN, expected {int(nan_e.sum())}"
        f" (first mismatch at {torch.nonzero(nan_a != nan_e)[:3].tolist()})")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{what}: ±inf pattern differs"
    fin = torch.isfinite(e)
    if not fin.any():
        return
    a, e = a[fin], e[fin]
    t = tol(dtype)
    scale = e.abs().max().item()
    bound = roundings * t.rtol * e.abs() + max(t.atol * scale, t.floor)
    if slack is not None:
        bound = bound + slack.detach().to("cpu", torch.float64).expand(fin.shape)[fin]
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound)))
        raise AssertionError(
            f"{what} [{dtype}]: {int(bad.sum())}/{e.numel()} elements out of tolerance "
            f"(rtol={t.rtol}, atol={t.atol}*{scale:.3g}); worst: actual={a[i].item():.9g} "
            f"expected={e[i].item():.9g} |diff|={err[i].item():.3g}")


# ----------------------------------------------------------------------------------------
# Input factories
# ----------------------------------------------------------------------------------------

def class_dim(shape: Sequence[int]) -> int:
    return 0 if len(shape) == 1 else 1


def target_shape(shape: Sequence[int]) -> tuple:
    """Target shape for hard targets: the input's shape without the class dim."""
    if len(shape) == 1:
        return ()
    return (shape[0],) + tuple(shape[2:])


def make_logits(shape, dtype=torch.float32, device="cpu", *, scale: float = 2.0,
                layout: str = "contiguous") -> Tensor:
    """Random logits of ``shape`` (class dim at 1, or 0 for 1-D) in a given memory layout:

    contiguous   : ordinary
    transposed   : a (C, N) buffer transposed (2-D only): row stride 1, class stride N
    sliced       : every other class of a wider buffer, offset by one (non-unit class stride)
    channels_last: (N, d1.., C) buffer permuted to (N, C, d1..) (class stride 1 for K-dim)
    spatial_step : every other position of d1 in a longer buffer (K-dim; d1.. do not merge)
    permuted     : (N, d1, C, d2..) buffer permuted to (N, C, d1, d2..) (K-dim, k >= 2)
    """
    shape = tuple(shape)
    if layout == "contiguous":
        x = torch.randn(shape, device=device, dtype=torch.float64) * scale
        return x.to(dtype)
    if layout == "transposed":
        assert len(shape) == 2
        return (torch.randn(shape[::-1], device=device, dtype=torch.float64) * scale).to(dtype).t()
    if layout == "sliced":
        cd = class_dim(shape)
        wide = list(shape)
        wide[cd] = 2 * shape[cd] + 1
        buf = (torch.randn(wide, device=device, dtype=torch.float64) * scale).to(dtype)
        return buf.narrow(cd, 1, 2 * shape[cd]).unflatten(cd, (shape[cd], 2)).select(cd + 1, 0)
    if layout == "channels_last":
        assert len(shape) >= 3
        perm_shape = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        buf = (torch.randn(perm_shape, device=device, dtype=torch.float64) * scale).to(dtype)
        return buf.movedim(-1, 1)
    if layout == "spatial_step":
        assert len(shape) >= 3
        long = list(shape)
        long[2] = 2 * shape[2]
        buf = (torch.randn(long, device=device, dtype=torch.float64) * scale).to(dtype)
        return buf[:, :, ::2]
    if layout == "permuted":
        assert len(shape) >= 4
        perm_shape = (shape[0], shape[2], shape[1]) + tuple(shape[3:])
        buf = (torch.randn(perm_shape, device=device, dtype=torch.float64) * scale).to(dtype)
        return buf.transpose(1, 2)
    raise ValueError(layout)


def make_targets(shape, device="cpu", *, ignore_frac: float = 0.0, ignore_index: int = -100,
                 dtype=torch.int64) -> Tensor:
    """Random class indices for an input of ``shape``; a fraction ``ignore_frac`` of them set
    to ``ignore_index`` (at least one when ignore_frac > 0 and there is more than one row)."""
    C = shape[class_dim(shape)]
    tshape = target_shape(shape)
    t = torch.randint(0, max(C, 1), tshape, device=device, dtype=torch.int64)
    if ignore_frac > 0 and t.numel() > 0:
        mask = torch.rand(tshape, device=device) < ignore_frac
        if t.numel() > 1 and not mask.any():
            mask.view(-1)[0] = True
        if ignore_frac >= 1.0:
            mask[...] = True
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t.to(dtype)


def make_probs(shape, dtype=torch.float32, device="cpu") -> Tensor:
    """Probability targets: same shape as the input, a distribution over the class dim."""
    cd = class_dim(shape)
    return torch.softmax(torch.randn(shape, device=device, dtype=torch.float64) * 2, dim=cd).to(dtype)


def make_inputs(shape, dtype=torch.float32, device="cpu", *, ignore_frac: float = 0.0,
                ignore_index: int = -100, probs: bool = False, scale: float = 2.0,
                layout: str = "contiguous"):
    """(logits, target) for ``shape``: hard targets with a fraction ignored, or probabilities."""
    x = make_logits(shape, dtype, device, scale=scale, layout=layout)
    if probs:
        return x, make_probs(shape, dtype, device)
    return x, make_targets(shape, device, ignore_frac=ignore_frac, ignore_index=ignore_index)


def make_weight(C: int, device="cpu", dtype=torch.float32) -> Tensor:
    """Positive class weights, far from 1 so that forgetting them is visible."""
    return (torch.rand(C, device=device, dtype=torch.float64) * 2.0 + 0.1).to(dtype)


def as64(t):
    """A float64 copy of a floating tensor (other things unchanged), detached."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.detach().to(torch.float64)
    return t


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------

GRAD_OUTPUT_MODES = ["default", "random"]


def random_grad_output(out: Tensor, mode: str = "random") -> Optional[Tensor]:
    """None for mode 'default' on a scalar (plain .backward()); otherwise a random tensor
    shaped like ``out``; for a scalar, a random value in [0.5, 2] that is never 1."""
    if mode == "default":
        return None if out.dim() == 0 else torch.ones_like(out)
    if out.dim() == 0:
        v = 0.5 + 1.5 * torch.rand(()).item()
        if abs(v - 1.0) < 0.05:
            v = 1.7
        return torch.tensor(v, dtype=out.dtype, device=out.device)
    return torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)


def grads(fn: Callable, inputs: Sequence, grad_output: Optional[Tensor] = None, *,
          mode: Optional[str] = None, wrt: Sequence[int] = (0,), retain_graph: bool = False):
    """Run ``out = fn(*leaves)`` on fresh leaf copies of ``inputs`` (those at positions
    ``wrt`` require grad), backpropagate ``grad_output`` (or, with ``mode``, a grad_output
    drawn by random_grad_output; None means plain ``.backward()``) and return
    (out, grad_output, [grad of each input in wrt]).  A tuple output uses its first item."""
    leaves = []
    for i, t in enumerate(inputs):
        if isinstance(t, Tensor):
            t = clone_keep_strides(t)
            if i in wrt:
                t.requires_grad_(True)
        leaves.append(t)
    out = fn(*leaves)
    if isinstance(out, tuple):
        out = out[0]
    if mode is not None:
        grad_output = random_grad_output(out, mode)
    if grad_output is None:
        out.backward()
    else:
        out.backward(grad_output)
    return out.detach(), grad_output, [leaves[i].grad for i in wrt]


def clone_keep_strides(t: Tensor) -> Tensor:
    """A detached copy with exactly ``t``'s sizes and strides (Tensor.clone() makes sliced,
    non-dense tensors contiguous, which would hide the layout from the code under test)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t.detach())
    return out


def reference_grads(ref_fn: Callable, inputs: Sequence, grad_output: Optional[Tensor], *,
                    wrt: Sequence[int] = (0,)):
    """grads() for the reference, on float64 copies of every floating input."""
    ins64 = [as64(t) for t in inputs]
    go = None if grad_output is None else grad_output.detach().to(torch.float64)
    out, _, gs = grads(ref_fn, ins64, go, wrt=wrt)
    return out, gs


def check_loss_and_grad(fast_fn: Callable, ref_fn: Callable, inputs: Sequence,
                        dtype: torch.dtype, mode: str = "random", what: str = "", *,
                        wrt: Sequence[int] = (0,), grad_roundings: int = 1):
    """fast_fn(*inputs) vs ref_fn(*float64 copies): the loss's value and dtype (= input
    dtype), and the gradient (value and dtype) of each input in ``wrt`` under the same
    grad_output, rounded ``grad_roundings`` times to its dtype.  Returns (loss, grads)."""
    out, go, gs = grads(fast_fn, inputs, mode=mode, wrt=wrt)
    ref_out, ref_gs = reference_grads(ref_fn, inputs, go, wrt=wrt)
    assert out.dtype == dtype, f"{what}: loss dtype {out.dtype}, input dtype {dtype}"
    assert_close_dtype(out, ref_out, dtype, f"{what} loss")
    for i, g, rg in zip(wrt, gs, ref_gs):
        assert g is not None, f"{what}: no gradient for input {i}"
        assert g.dtype == inputs[i].dtype, f"{what}: grad dtype {g.dtype} != input dtype {inputs[i].dtype}"
        assert g.shape == inputs[i].shape, f"{what}: grad shape {tuple(g.shape)}"
        assert_close_dtype(g, rg, inputs[i].dtype, f"{what} grad[{i}]", roundings=grad_roundings)
    return out, gs


def _paired_fns(name: str, factor_name: str, factor: Optional[Tensor], **kw):
    """(fastce.<name>, reference.<name>) as functions of (input, target) with the given keyword
    arguments; the reference gets a float64 copy of the per-class factor."""
    import fastce

    fast_fn, ref_fn = getattr(fastce, name), getattr(reference, name)
    factor64 = as64(factor)

    def fast(x, t):
        return fast_fn(x, t, **{factor_name: factor}, **kw)

    def ref(x, t):
        return ref_fn(x, t, **{factor_name: factor64}, **kw)

    return fast, ref


def ce_fns(weight: Optional[Tensor] = None, **kw):
    """(fastce.cross_entropy, reference.cross_entropy) with class weights ``weight``."""
    return _paired_fns("cross_entropy", "weight", weight, **kw)


def focal_fns(alpha=None, **kw):
    """(fastce.focal_loss, reference.focal_loss) with per-class factors ``alpha``."""
    return _paired_fns("focal_loss", "alpha", alpha, **kw)


# ----------------------------------------------------------------------------------------
# Kernel launches
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def count_kernel_launches():
    """Count fastce's Triton kernel launches inside the block, interpreted or compiled.

    Yields a list that receives the name of each launched kernel. Every fastce kernel is launched
    through ``fastce._launch.Launch``, which logs to ``launch_log``; counting there (rather than at
    ``JITFunction.run``) also sees the GPU's direct launches, which bypass Triton's launch path."""
    launched, saved = [], _launch.launch_log
    _launch.launch_log = launched
    try:
        yield launched
    finally:
        _launch.launch_log = saved


def snapshot(*tensors):
    """Clones of the tensors (None passes through) to compare with ``assert_unchanged``."""
    return [t.detach().clone() if isinstance(t, Tensor) else t for t in tensors]


def assert_unchanged(tensors: Iterable, snaps: Iterable, what: str = "") -> None:
    """Each tensor is bit-identical to its snapshot."""
    for i, (t, s) in enumerate(zip(tensors, snaps)):
        if not isinstance(t, Tensor):
            continue
        assert bitwise_equal(t, s), f"{what}: caller's tensor {i} was modified"


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))

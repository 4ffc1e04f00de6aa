"""fastce.focal_loss against the float64 reference (DESIGN §2 "Focal loss")."""
import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce import reference

from _support import (REDUCTIONS, GRADCHECK, assert_close_dtype, check_loss_and_grad,
                      focal_fns, grads, make_inputs, make_logits,
                      make_probs, make_targets, make_weight)

GAMMAS = [0.0, 0.5, 2.0, 3.0]


def _alpha(kind, C, device, dtype=torch.float32):
    if kind is None:
        return None
    if kind == "float":
        return 0.25
    return make_weight(C, device, torch.float64 if dtype == torch.float64 else torch.float32)


# ------------------------------------------------------------------------------------------
# The oracle: reference.focal_loss equals its formula and, at gamma = 0, torch's CE
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_formula(gamma, reduction):
    x, t = make_inputs((20, 6), torch.float64, ignore_frac=0.25)
    alpha = make_weight(6, dtype=torch.float64)
    valid = t != -100
    ts = torch.where(valid, t, 0)
    logp = torch.log_softmax(x, -1).gather(1, ts[:, None]).squeeze(1)
    rows = torch.where(valid, -alpha[ts] * (1 - logp.exp()) ** gamma * logp, 0 * logp)
    expect = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum()}[reduction]
    got = reference.focal_loss(x, t, gamma=gamma, alpha=alpha, reduction=reduction)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_gamma0_is_cross_entropy(reduction):
    x, t = make_inputs((15, 7), torch.float64, ignore_frac=0.3)
    torch.testing.assert_close(
        reference.focal_loss(x, t, gamma=0.0, reduction=reduction, label_smoothing=0.2),
        F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.2), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# fastce.focal_loss
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [None, "float", "tensor"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal(device, gamma, alpha, reduction):
    """Smoothing and ignored rows on; loss and gradient vs the reference."""
    x, t = make_inputs((29, 11), torch.float32, device, ignore_frac=0.25)
    fast, ref = focal_fns(_alpha(alpha, 11, device), gamma=gamma, reduction=reduction,
                          label_smoothing=0.1)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", f"gamma={gamma} alpha={alpha}")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_hard_no_smoothing(device, gamma, ignore_index, reduction):
    x, t = make_inputs((17, 9), torch.float32, device, ignore_frac=0.3, ignore_index=ignore_index)
    fast, ref = focal_fns(_alpha("tensor", 9, device), gamma=gamma, reduction=reduction,
                          ignore_index=ignore_index)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "no smoothing")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_float64_gradient(device, gamma, reduction):
    """Analytic gradient vs autograd of the reference, on float64 inputs."""
    x, t = make_inputs((13, 8), torch.float64, device, ignore_frac=0.2)
    fast, ref = focal_fns(_alpha("tensor", 8, device, torch.float64), gamma=gamma,
                          reduction=reduction, label_smoothing=0.15)
    check_loss_and_grad(fast, ref, [x, t], torch.float64, "random", "float64")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_gradcheck(device, gamma):
    x, t = make_inputs((3, 4), torch.float64, device, ignore_frac=0.3)
    x.requires_grad_(True)
    alpha = _alpha("tensor", 4, device, torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: fastce.focal_loss(a, t, gamma=gamma, alpha=alpha, reduction="none",
                                    label_smoothing=0.1), (x,), **GRADCHECK)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gamma0_is_cross_entropy(device, reduction, label_smoothing):
    """gamma = 0, alpha = None reproduces cross-entropy (also 'mean' over non-ignored rows)."""
    x, t = make_inputs((21, 10), torch.float32, device, ignore_frac=0.3)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    out_f, go, (g_f,) = grads(lambda a, b: fastce.focal_loss(a, b, gamma=0.0, **kw), [x, t], mode="random")
    out_c, _, (g_c,) = grads(lambda a, b: fastce.cross_entropy(a, b, **kw), [x, t], go)
    out_t, _, (g_t,) = grads(lambda a, b: F.cross_entropy(a, b, **kw), [x.double(), t],
                             None if go is None else go.double())
    assert_close_dtype(out_f, out_t, torch.float32, "focal(gamma=0) vs torch")
    assert_close_dtype(g_f, g_t, torch.float32, "focal(gamma=0) grad vs torch")
    assert_close_dtype(out_f, out_c.double(), torch.float32, "focal(gamma=0) vs fastce CE")
    assert_close_dtype(g_f, g_c.double(), torch.float32, "grad focal(gamma=0) vs fastce CE")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_focal_dtypes(device, dtype, reduction):
    x, t = make_inputs((12, 70), dtype, device, ignore_frac=0.2)
    fast, ref = focal_fns(_alpha("tensor", 70, device, dtype), gamma=2.0, reduction=reduction,
                          label_smoothing=0.05)
    check_loss_and_grad(fast, ref, [x, t], dtype, "random", f"focal {dtype}")


@pytest.mark.parametrize("shape", [(9,), (2, 6, 5), (2, 4, 3, 2)], ids=["1d", "3d", "4d"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_shapes(device, shape, reduction):
    C = shape[0 if len(shape) == 1 else 1]
    x = make_logits(shape, torch.float32, device)
    t = make_targets(shape, device, ignore_frac=0.2 if len(shape) > 1 else 0.0)
    fast, ref = focal_fns(_alpha("tensor", C, device), gamma=2.0, reduction=reduction)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", f"focal {shape}")


def test_focal_non_contiguous(device):
    x = make_logits((2, 7, 3, 4), torch.float32, device, layout="channels_last")
    t = make_targets((2, 7, 3, 4), device, ignore_frac=0.2)
    fast, ref = focal_fns(0.5, gamma=1.5, reduction="mean", label_smoothing=0.1)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "focal channels_last")
    xt = make_logits((9, 13), torch.float32, device, layout="transposed")
    tt = make_targets((9, 13), device)
    check_loss_and_grad(fast, ref, [xt, tt], torch.float32, "random", "focal transposed")


def test_focal_non_contiguous_target_and_alpha(device):
    x = make_logits((9, 13), torch.float32, device)
    t = torch.stack([make_targets((9, 13), device, ignore_frac=0.2)] * 2, 1)[:, 0]
    alpha = make_weight(26, device)[::2]
    assert not t.is_contiguous() and not alpha.is_contiguous()
    fast, ref = focal_fns(alpha, gamma=2.0, reduction="none", label_smoothing=0.1)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "strided target, alpha")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_probability_targets(device, reduction):
    """q as for cross-entropy: probability targets work too ('mean' over all rows)."""
    x = make_logits((10, 8), torch.float32, device)
    q = make_probs((10, 8), torch.float32, device)
    fast, ref = focal_fns(_alpha("tensor", 8, device), gamma=2.0, reduction=reduction,
                          label_smoothing=0.1)
    check_loss_and_grad(fast, ref, [x, q], torch.float32, "random", "focal probs")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("gap", [25.0, -90.0], ids=["p_to_1", "p_to_0"])
def test_focal_stable_extreme_probabilities(device, gamma, gap):
    """p_target -> 1 (rounds to 1 in fp32) and p_target -> 0 (subnormal in fp32) in the first
    three rows, ordinary rows after: finite loss and gradient, equal to the float64 reference."""
    x, t = make_inputs((6, 12), torch.float32, device, scale=0.5)
    x[torch.arange(3), t[:3]] += gap
    fast, ref = focal_fns(None, gamma=gamma, reduction="none")
    out, gs = check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", f"gap={gap}")
    assert torch.isfinite(out).all() and torch.isfinite(gs[0]).all()


def test_focal_masked_vocabulary(device):
    """-inf logits for non-target classes (no smoothing) add nothing: the loss and gradient
    are those of the unmasked columns alone, and the masked columns' gradient is 0.  (The
    reference's autograd gives NaN there, so it is evaluated on the unmasked slice.)"""
    C, masked = 300, 200
    x = make_logits((4, C), torch.float32, device)
    x[:, :masked] = float("-inf")
    t = masked + torch.randint(0, C - masked, (4,), device=device)
    alpha = _alpha("tensor", C, device)
    fast, _ = focal_fns(alpha, gamma=2.0, reduction="none")
    out, go, (g,) = grads(fast, [x, t], mode="random")
    _, ref_slice = focal_fns(alpha[masked:], gamma=2.0, reduction="none")
    ref_out, _, (rg,) = grads(ref_slice, [x[:, masked:].double(), t - masked], go.double())
    assert_close_dtype(out, ref_out, torch.float32, "masked loss")
    assert torch.equal(g[:, :masked], torch.zeros_like(g[:, :masked])), "masked columns' gradient"
    assert_close_dtype(g[:, masked:], rg, torch.float32, "unmasked columns' gradient")


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_certain_rows(device, gamma):
    """p = 1 exactly (C = 1, or every other logit -inf): loss 0 and gradient 0, no NaN from
    (1 - p)^(gamma - 1) at u = 0."""
    x1 = make_logits((4, 1), torch.float32, device).requires_grad_(True)
    t1 = torch.zeros(4, dtype=torch.long, device=device)
    x2 = torch.full((3, 5), float("-inf"), device=device)
    x2[:, 2] = 1.0
    x2.requires_grad_(True)
    t2 = torch.full((3,), 2, device=device)
    for x, t, ls in ((x1, t1, 0.1), (x2, t2, 0.0)):
        loss = fastce.focal_loss(x, t, gamma=gamma, reduction="sum", label_smoothing=ls)
        loss.backward(torch.tensor(1.5, device=device))
        assert loss.item() == 0.0
        assert torch.equal(x.grad, torch.zeros_like(x.grad)), x.grad


def test_focal_all_ignored_and_empty(device):
    x = make_logits((5, 6), torch.float32, device).requires_grad_(True)
    t = torch.full((5,), -100, device=device)
    loss = fastce.focal_loss(x, t)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert fastce.focal_loss(x, t, reduction="sum").item() == 0.0
    e = make_logits((0, 6), torch.float32, device)
    te = torch.zeros(0, dtype=torch.long, device=device)
    assert torch.isnan(fastce.focal_loss(e, te))
    assert fastce.focal_loss(e, te, reduction="sum").item() == 0.0
    assert fastce.focal_loss(e, te, reduction="none").shape == (0,)

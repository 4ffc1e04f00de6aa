"""Numerics that other kernels got wrong (DESIGN §2): -inf logits, p - 1 in bf16, C = 1,
C across block sizes and past the single-pass limit, many rows per program, huge logits; on the
kernels and on the pure-PyTorch path alike."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce import reference

from _support import (DTYPES, assert_close_dtype, ce_fns, check_loss_and_grad, focal_fns, grads,
                      make_logits, make_targets, make_weight, tol)

NEG_INF = float("-inf")

pytestmark = pytest.mark.usefixtures("path")  # every case on the kernels and on the pure-PyTorch path


# ------------------------------------------------------------------------------------------
# -inf logits
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("extra", [dict(), dict(z_loss=1e-2), dict(softcap=10.0)], ids=["plain", "zloss", "softcap"])
def test_masked_leading_blocks(device, reduction, extra):
    """C = 5000 with the first 4096 columns -inf (masked vocabulary): no NaN anywhere.
    Row 2 has only its target finite (p = 1: loss 0, gradient 0)."""
    C, masked = 5000, 4096
    x = make_logits((3, C), torch.float32, device)
    x[:, :masked] = NEG_INF
    t = masked + torch.randint(0, C - masked, (3,), device=device)
    x[2, masked:] = NEG_INF
    x[2, t[2]] = 1.5
    fast, ref = ce_fns(make_weight(C, device), reduction=reduction, **extra)
    out, (g,) = check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "masked vocabulary")
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    if "softcap" not in extra and "z_loss" not in extra and reduction == "none":
        assert out[2].item() == pytest.approx(0.0, abs=1e-6)
        assert g[2].abs().max().item() <= 1e-6


def test_masked_columns_scattered(device):
    """-inf in scattered columns and in the last (partial) block."""
    C = 3001
    x = make_logits((5, C), torch.float32, device)
    mask = torch.rand(5, C, device=device) < 0.7
    mask[:, -50:] = True
    t = make_targets((5, C), device)
    mask[torch.arange(5), t] = False
    x[mask] = NEG_INF
    fast, ref = ce_fns(None, reduction="none")
    out, (g,) = check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "scattered -inf")
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("C", [7, 3000])
def test_row_all_neg_inf_as_torch(device, C):
    """A row that is -inf everywhere gives what torch gives (NaN when counted, 0 when ignored);
    the other rows are unaffected."""
    x = make_logits((4, C), torch.float32, device)
    t = make_targets((4, C), device)
    x[1] = NEG_INF
    x[3] = NEG_INF
    t[3] = -100
    xx = x.clone().requires_grad_(True)
    loss = fastce.cross_entropy(xx, t, reduction="none")
    expect = F.cross_entropy(x.double(), t, reduction="none")
    assert_close_dtype(loss, expect, torch.float32, "all -inf row")
    loss.backward(torch.tensor([1.0, 0.0, 1.0, 0.0], device=device))
    x64 = x.double().requires_grad_(True)
    F.cross_entropy(x64, t, reduction="none").backward(
        torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64, device=device))
    for r in (0, 2):
        assert_close_dtype(xx.grad[r], x64.grad[r], torch.float32, f"row {r} gradient")


def test_target_logit_neg_inf_as_torch(device):
    """The target class masked: loss +inf as torch, finite gradient p - onehot."""
    x = make_logits((3, 9), torch.float32, device)
    t = torch.tensor([2, 5, 0], device=device)
    x[1, 5] = NEG_INF
    fast, ref = ce_fns(None, reduction="none")
    out, _ = check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "target -inf")
    assert out[1].item() == math.inf
    assert out[1].item() == F.cross_entropy(x.double(), t, reduction="none")[1].item()


# ------------------------------------------------------------------------------------------
# p - 1 for the target class in low precision
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p_target", [0.999, 0.9999])
def test_confident_target_gradient(device, path, dtype, p_target):
    """p ~ 0.999: p - 1 must be computed in fp32 and rounded once (bf16 p - 1 is garbage).
    The loss, and the kernels' gradient, are checked against the fp64 reference at the dtype's
    tolerance; the pure-PyTorch path forms p - 1 from an fp32 p as torch does, so its gradient
    is held to torch's accuracy. Both are no worse than torch."""
    N, C = 4, 100
    x = torch.zeros(N, C, dtype=torch.float64)
    t = torch.randint(0, C, (N,))
    x[torch.arange(N), t] = math.log(p_target * (C - 1) / (1 - p_target))
    x = (x + 0.01 * torch.randn(N, C, dtype=torch.float64)).to(dtype).to(device)
    t = t.to(device)
    # 'sum': the gradient is p - q itself (with 'mean' the fp16 values would be subnormal)
    fast, ref = ce_fns(None, reduction="sum")
    out, _, (g,) = grads(fast, [x, t])
    ref_out, _, (rg,) = grads(ref, [x.double(), t])
    assert_close_dtype(out, ref_out, dtype, "confident target loss")
    rows = torch.arange(N, device=device)
    gt, rgt = g[rows, t].double(), rg[rows, t]
    assert (rgt < 0).all()
    rel = ((gt - rgt).abs() / rgt.abs()).max().item()
    if path == "kernels":
        assert_close_dtype(g, rg, dtype, "confident target gradient")
        assert rel <= tol(dtype).rtol, f"target-class gradient off by {rel:.3g} relative"
    # not worse than torch's own low-precision result
    _, _, (tg,) = grads(lambda a, b: F.cross_entropy(a, b, reduction="sum"), [x, t])
    torch_rel = ((tg[rows, t].double() - rgt).abs() / rgt.abs()).max().item()
    assert rel <= max(torch_rel, 2 ** -8), (rel, torch_rel)


# ------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 1), (1,), (2, 1, 3)], ids=["2d", "1d", "3d"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_single_class(device, shape, reduction):
    """C = 1: log p = 0, loss 0 and gradient 0 for every row (also with smoothing/weights)."""
    x = make_logits(shape, torch.float32, device)
    t = make_targets(shape, device, ignore_frac=0.3 if len(shape) > 1 else 0.0)
    fast, ref = ce_fns(make_weight(1, device), reduction=reduction, label_smoothing=0.2, z_loss=0.0)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "C=1")


@pytest.mark.parametrize("C", [3, 17])
@pytest.mark.parametrize("N", [37, 130])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_many_rows_per_program(device, C, N, reduction):
    """Small C: kernels that pack several rows per program must mask the last partial group."""
    x = make_logits((N, C), torch.float32, device)
    t = make_targets((N, C), device, ignore_frac=0.2)
    fast, ref = ce_fns(make_weight(C, device), reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", f"N={N} C={C}")


@pytest.mark.parametrize("row_path", ["cluster", "streamed"])
@pytest.mark.parametrize("case", ["random_smooth_weight", "masked_leading_zloss", "focal"])
def test_past_single_cta_limit(device, monkeypatch, row_path, case):
    """C = 70000, 2 rows, on both paths for long rows (streamed in tiles by default, or held by
    a Hopper cluster with FASTCE_CLUSTER=1): plain, with the first 65536 columns of a row -inf,
    and focal loss (whose streamed path takes an extra pass)."""
    if row_path == "cluster":
        monkeypatch.setenv("FASTCE_CLUSTER", "1")
    C = 70000
    x = make_logits((2, C), torch.float32, device)
    t = torch.tensor([C - 1, 65536 + 123], device=device)
    if case == "random_smooth_weight":
        t[0] = 5
        fast, ref = ce_fns(make_weight(C, device), reduction="none", label_smoothing=0.1, softcap=3.0)
    elif case == "focal":
        fast, ref = focal_fns(make_weight(C, device), gamma=2.0, reduction="mean")
    else:
        x[1, :65536] = NEG_INF
        fast, ref = ce_fns(None, reduction="mean", z_loss=1e-2)
    out, (g,) = check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", case)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


# ------------------------------------------------------------------------------------------
# Magnitudes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 1e4), (torch.bfloat16, 1e30)],
                         ids=["fp32", "fp16", "bf16"])
def test_huge_logits(device, dtype, scale):
    """exp must never see an unshifted logit: no inf/NaN at the top of each dtype's range."""
    x = (torch.randn(6, 40, dtype=torch.float64).clamp(-2, 2) * scale).to(dtype).to(device)
    t = make_targets((6, 40), device, ignore_frac=0.2)
    fast, ref = ce_fns(None, reduction="none", label_smoothing=0.1)
    out, (g,) = check_loss_and_grad(fast, ref, [x, t], dtype, "random", "huge logits")
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


def test_fp16_sum_does_not_overflow_internally(device):
    """Smoothing sums -log p over all classes: huge in fp16 (torch's CPU fp16 overflows here);
    fastce accumulates in fp32 and only the final value is rounded."""
    x = (torch.randn(37, 1000, dtype=torch.float64) * 3).to(torch.float16).to(device)
    t = make_targets((37, 1000), device)
    fast, ref = ce_fns(None, reduction="sum", label_smoothing=0.1)
    out, (g,) = check_loss_and_grad(fast, ref, [x, t], torch.float16, "random", "fp16 sum")
    assert torch.isfinite(out)


def test_lse_is_fp32_accurate_in_bf16(device):
    """The loss is computed in fp32 and rounded once: bf16 'none' losses are within one
    rounding of the fp64 value, even where lse and the target logit nearly cancel."""
    x = make_logits((64, 500), torch.bfloat16, device, scale=4.0)
    t = x.float().argmax(1)  # confident rows: loss = lse - x_t is small, cancellation-prone
    loss = fastce.cross_entropy(x, t, reduction="none")
    expect = reference.cross_entropy(x.double(), t, reduction="none")
    rel = ((loss.double() - expect).abs() / expect.abs()).max().item()
    assert rel <= 2 ** -8, f"relative error {rel:.3g} exceeds one bf16 rounding"


# ------------------------------------------------------------------------------------------
# The tolerance table itself
# ------------------------------------------------------------------------------------------

def test_tolerance_table_is_fair_and_can_fail():
    """torch's own fp32 results pass the fp32 entry (the table is not tighter than fp32
    rounding), and for every dtype a result off by 4 rtol is rejected (it can fail)."""
    x = make_logits((37, 300), torch.float32, scale=3.0)
    t = make_targets((37, 300), ignore_frac=0.2)
    w = make_weight(300)
    kw = dict(weight=w, label_smoothing=0.1)
    for reduction in ("none", "mean"):
        go = torch.rand(37) + 0.5 if reduction == "none" else torch.tensor(1.3)
        out, _, (g,) = grads(lambda a, b: F.cross_entropy(a, b, reduction=reduction, **kw), [x, t], go)
        ref_out, _, (rg,) = grads(lambda a, b: F.cross_entropy(a, b, reduction=reduction, weight=w.double(),
                                                               label_smoothing=0.1), [x.double(), t], go.double())
        assert_close_dtype(out, ref_out, torch.float32, "torch fp32 loss")
        assert_close_dtype(g, rg, torch.float32, "torch fp32 grad")
    for dtype in DTYPES:
        expected = torch.randn(50, dtype=torch.float64)
        assert_close_dtype(expected * (1 + 0.5 * tol(dtype).rtol), expected, dtype, "within")
        with pytest.raises(AssertionError):
            assert_close_dtype(expected * (1 + 4 * tol(dtype).rtol), expected, dtype, "perturbed")
        nan_where_finite = expected.clone()
        nan_where_finite[3] = float("nan")
        with pytest.raises(AssertionError):
            assert_close_dtype(nan_where_finite, expected, dtype, "NaN")


# ------------------------------------------------------------------------------------------
# Offsets past 2^31 elements (DESIGN §5.2): huge strides over a lazily committed buffer
# ------------------------------------------------------------------------------------------

OFFSET_CASES = {
    # name: (shape, strides); every case reaches 2^31 elements or more past the base pointer
    "row_stride_2^31": ((2, 5), (2**31, 1)),
    "class_stride_2^30": ((2, 3), (1, 2**30)),
    "kdim_inner_stride_2^31": ((1, 4, 2), (8, 1, 2**31)),
}


@pytest.mark.parametrize("case", list(OFFSET_CASES), ids=list(OFFSET_CASES))
def test_offsets_beyond_int32(device, case):
    """Rows or classes 2^31 elements apart must be addressed with 64-bit offsets.  The bf16
    buffer is 4 GiB of address space, but only the pages holding the few elements are touched."""
    shape, strides = OFFSET_CASES[case]
    x = torch.empty_strided(shape, strides, dtype=torch.bfloat16, device=device)
    x.copy_(torch.randn(shape, dtype=torch.float64, device=device).to(torch.bfloat16))
    t = make_targets(shape, device)
    for reduction in ("none", "mean"):
        leaf = x.detach().requires_grad_(True)
        loss = fastce.cross_entropy(leaf, t, reduction=reduction, label_smoothing=0.1)
        go = torch.rand(loss.shape, device=device).to(torch.bfloat16) + 0.5
        (g,) = torch.autograd.grad(loss, leaf, go)
        x64 = x.double().requires_grad_(True)
        ref = reference.cross_entropy(x64, t, reduction=reduction, label_smoothing=0.1)
        (rg,) = torch.autograd.grad(ref, x64, go.double())
        assert_close_dtype(loss, ref, torch.bfloat16, f"{case} {reduction} loss")
        assert_close_dtype(g, rg, torch.bfloat16, f"{case} {reduction} grad")

"""fastce.cross_entropy against the float64 reference: every argument of
torch.nn.functional.cross_entropy, plus z_loss, softcap and return_lse (DESIGN §1-2)."""
import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce import reference

from _support import (DTYPES, GRADCHECK, REDUCTIONS, as64, assert_close_dtype, bitwise_equal,
                      ce_fns, check_loss_and_grad, count_kernel_launches, focal_fns, grads, make_inputs,
                      make_logits, make_probs, make_targets, make_weight, random_grad_output, reference_grads)

# Named argument sets: each exercises a different part of the semantics.
CONFIGS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore=True),
    "smooth": dict(label_smoothing=0.1),
    "weight_smooth_ignore": dict(weight=True, ignore=True, label_smoothing=0.25),
}

SHAPES = {
    "1d": (7,),
    "2d": (37, 17),
    "3d": (3, 5, 4),
    "4d": (2, 6, 3, 2),
}


def _case(shape, config, dtype=torch.float32, device="cpu", ignore_index=-100, **extra):
    """Inputs and fn pair for a config: returns (x, t, fast, ref)."""
    C = shape[0 if len(shape) == 1 else 1]
    ignore = config.get("ignore", False) and len(shape) > 1
    x, t = make_inputs(shape, dtype, device, ignore_frac=0.3 if ignore else 0.0,
                       ignore_index=ignore_index)
    w = make_weight(C, device, dtype) if config.get("weight") else None
    fast, ref = ce_fns(w, ignore_index=ignore_index,
                       label_smoothing=config.get("label_smoothing", 0.0), **extra)
    return x, t, fast, ref


# ------------------------------------------------------------------------------------------
# The oracle itself is trusted because it equals torch in float64, feature by feature.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("config", list(CONFIGS.values()) + [dict(probs=True, weight=True, label_smoothing=0.2)],
                         ids=list(CONFIGS) + ["probs_weight_smooth"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_torch_float64(shape, config, reduction):
    C = shape[0 if len(shape) == 1 else 1]
    ignore = config.get("ignore", False) and len(shape) > 1
    x, t = make_inputs(shape, torch.float64, ignore_frac=0.3 if ignore else 0.0,
                       probs=config.get("probs", False))
    w = make_weight(C, dtype=torch.float64) if config.get("weight") else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=config.get("label_smoothing", 0.0))
    _, go, (g_ref,) = grads(lambda a, b: reference.cross_entropy(a, b, **kw), [x, t], mode="random")
    out_t, _, (g_t,) = grads(lambda a, b: F.cross_entropy(a, b, **kw), [x, t], go)
    out_ref = reference.cross_entropy(x, t, **kw)
    torch.testing.assert_close(out_ref, out_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ref, g_t, rtol=1e-10, atol=1e-12)


def test_reference_zloss_softcap_match_their_definitions():
    """z_loss adds z*lse^2 averaged over non-ignored rows; softcap replaces x by s*tanh(x/s)."""
    x, t = make_inputs((9, 11), torch.float64, ignore_frac=0.3)
    valid = t != -100
    z, s = 0.3, 4.0
    lse = torch.logsumexp(x, -1)
    expect = F.cross_entropy(x, t) + z * (lse[valid] ** 2).mean()
    torch.testing.assert_close(reference.cross_entropy(x, t, z_loss=z), expect, rtol=1e-12, atol=0)
    xs = s * torch.tanh(x / s)
    for red in REDUCTIONS:
        torch.testing.assert_close(reference.cross_entropy(x, t, reduction=red, softcap=s),
                                   F.cross_entropy(xs, t, reduction=red), rtol=1e-12, atol=0)
    per_row = F.cross_entropy(x, t, reduction="none") + torch.where(valid, z * lse ** 2, 0 * lse)
    torch.testing.assert_close(reference.cross_entropy(x, t, reduction="none", z_loss=z), per_row,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(reference.cross_entropy(x, t, reduction="sum", z_loss=z), per_row.sum(),
                               rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------
# Dispatch: CPU tensors under TRITON_INTERPRET=1 (and CUDA tensors) run the Triton kernels.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name", ["cross_entropy", "focal_loss"])
def test_triton_kernels_run(device, loss_name):
    x, t = make_inputs((5, 13), torch.float32, device)
    x.requires_grad_(True)
    with count_kernel_launches() as launched:
        getattr(fastce, loss_name)(x, t).backward()
    assert len(launched) >= 1, f"{loss_name} ran no Triton kernel (DESIGN §3)"


def test_is_autograd_function(device):
    assert issubclass(fastce.CrossEntropyFunction, torch.autograd.Function)
    x, t = make_inputs((4, 6), torch.float32, device)
    x.requires_grad_(True)
    loss = fastce.cross_entropy(x, t)
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    names = {type(n).__name__ for n in seen}
    assert any("CrossEntropyFunction" in n for n in names), names


# ------------------------------------------------------------------------------------------
# Hard targets: shapes x argument sets x reductions, loss and gradient
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hard_targets(device, shape, config, reduction):
    x, t, fast, ref = _case(shape, config, device=device, reduction=reduction)
    check_loss_and_grad(fast, ref, [x, t], x.dtype, "random", f"{shape} {config} {reduction}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("config", ["plain", "weight_smooth_ignore"])
def test_scalar_default_grad_output(device, reduction, config):
    """loss.backward() with the implicit grad_output of 1."""
    x, t, fast, ref = _case((11, 9), CONFIGS[config], device=device, reduction=reduction)
    check_loss_and_grad(fast, ref, [x, t], x.dtype, "default", config)


@pytest.mark.parametrize("ignore_index", [-1, 0, 3, 1000])
def test_custom_ignore_index(device, ignore_index):
    x, t, fast, ref = _case((23, 8), dict(ignore=True, weight=True), device=device,
                            ignore_index=ignore_index, reduction="mean")
    assert (t == ignore_index).any()
    check_loss_and_grad(fast, ref, [x, t], x.dtype, "random", f"ignore_index={ignore_index}")
    # the ignored rows really are ignored: same result as when they are dropped
    keep = t != ignore_index
    sub = fastce.cross_entropy(x[keep], t[keep], ignore_index=ignore_index)
    full = fastce.cross_entropy(x, t, ignore_index=ignore_index)
    torch.testing.assert_close(full, sub, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("C", [1, 2, 3, 17, 100, 1000, 4099])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_num_classes(device, C, reduction):
    """C = 1, C not a power of two, C above one block of a multi-block kernel."""
    x, t, fast, ref = _case((5, C), CONFIGS["weight_smooth_ignore"], device=device, reduction=reduction)
    check_loss_and_grad(fast, ref, [x, t], x.dtype, "random", f"C={C}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config", ["plain", "weight_smooth_ignore"])
def test_dtypes(device, dtype, reduction, config):
    """Loss and gradient come back in the input's dtype, within that dtype's tolerance."""
    x, t, fast, ref = _case((13, 300), CONFIGS[config], dtype=dtype, device=device, reduction=reduction)
    check_loss_and_grad(fast, ref, [x, t], dtype, "random", f"{dtype} {config}")


@pytest.mark.parametrize("shape,layout", [
    ((9, 21), "transposed"),
    ((9, 21), "sliced"),
    ((21,), "sliced"),
    ((2, 7, 3, 4), "channels_last"),
    ((2, 7, 3, 4), "sliced"),
    ((3, 5, 6), "channels_last"),
    ((2, 6, 4, 3), "spatial_step"),
    ((2, 6, 4, 3), "permuted"),
])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_non_contiguous(device, shape, layout, reduction):
    x = make_logits(shape, torch.float32, device, layout=layout)
    assert not x.is_contiguous()
    t = make_targets(shape, device, ignore_frac=0.2 if len(shape) > 1 else 0.0)
    C = shape[0 if len(shape) == 1 else 1]
    fast, ref = ce_fns(make_weight(C, device), reduction=reduction, label_smoothing=0.1)
    # the gradient is checked on a non-contiguous leaf of the same layout
    out, go, (g,) = grads(fast, [x, t], mode="random")
    assert g.shape == x.shape
    ref_out, _, (rg,) = grads(ref, [as64(x), t], None if go is None else go.double())
    assert_close_dtype(out, ref_out, torch.float32, f"{layout} loss")
    assert_close_dtype(g, rg, torch.float32, f"{layout} grad")
    # and equals the result on a contiguous copy
    torch.testing.assert_close(fast(x.contiguous(), t), fast(x, t), rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("case", ["hard_2d", "hard_kdim", "probs_transposed"])
def test_non_contiguous_target(device, case):
    """Targets are views too: every-other-element class indices, a (C, N) probability buffer
    transposed.  (Compared with torch via the reference on the same values.)"""
    if case == "hard_2d":
        x = make_logits((10, 6), torch.float32, device)
        t = make_targets((10, 6), device, ignore_frac=0.2)
        t = torch.stack([torch.randint(0, 6, (10,), device=device), t], 1)[:, 1]
    elif case == "hard_kdim":
        x = make_logits((2, 6, 5), torch.float32, device)
        t = torch.stack([make_targets((2, 6, 5), device), make_targets((2, 6, 5), device)], -1)[..., 0]
    else:
        x = make_logits((10, 6), torch.float32, device)
        t = make_probs((10, 6), torch.float32, device).t().contiguous().t()
    assert not t.is_contiguous()
    fast, ref = ce_fns(make_weight(6, device), reduction="none", label_smoothing=0.05)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "strided target")


def test_non_contiguous_weight(device):
    x, t = make_inputs((10, 6), torch.float32, device, ignore_frac=0.2)
    w = make_weight(12, device)[::2]
    assert not w.is_contiguous()
    for reduction in REDUCTIONS:
        fast, ref = ce_fns(w, reduction=reduction, label_smoothing=0.1)
        check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", f"strided weight {reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_uint8_targets(device, reduction):
    x, t = make_inputs((12, 9), torch.float32, device)
    a = fastce.cross_entropy(x, t.to(torch.uint8), reduction=reduction)
    b = reference.cross_entropy(x.double(), t, reduction=reduction)
    assert_close_dtype(a, b, torch.float32, "uint8 target")


# ------------------------------------------------------------------------------------------
# Probability targets
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (10, 13), (2, 5, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets(device, shape, weight, label_smoothing, reduction):
    C = shape[0 if len(shape) == 1 else 1]
    x = make_logits(shape, torch.float32, device)
    q = make_probs(shape, torch.float32, device)
    w = make_weight(C, device) if weight else None
    fast, ref = ce_fns(w, reduction=reduction, label_smoothing=label_smoothing)
    check_loss_and_grad(fast, ref, [x, q], torch.float32, "random", "probs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_probability_targets_low_precision(device, dtype):
    x = make_logits((8, 50), dtype, device)
    q = make_probs((8, 50), dtype, device)
    fast, ref = ce_fns(make_weight(50, device, dtype), label_smoothing=0.1)
    check_loss_and_grad(fast, ref, [x, q], dtype, "random", "probs low precision")


# ------------------------------------------------------------------------------------------
# Edge cases of the reductions
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)])
def test_all_rows_ignored(device, weight, shape):
    """'mean' -> NaN (0/0) with an all-zero gradient; 'sum' -> 0; 'none' -> zeros (as torch)."""
    x = make_logits(shape, torch.float32, device)
    t = torch.full(shape[:1] + shape[2:], -100, dtype=torch.long, device=device)
    w = make_weight(shape[1], device) if weight else None
    for reduction in REDUCTIONS:
        xx = x.clone().requires_grad_(True)
        loss = fastce.cross_entropy(xx, t, weight=w, reduction=reduction, label_smoothing=0.1)
        expect = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
        assert_close_dtype(loss, expect.double(), torch.float32, reduction)
        if reduction == "mean":
            assert torch.isnan(loss)
        loss.backward(random_grad_output(loss))
        assert xx.grad is not None and torch.equal(xx.grad, torch.zeros_like(x)), reduction


@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0)])
def test_empty_batch(device, shape):
    """NaN for 'mean', 0 for 'sum', an empty tensor for 'none' (as torch); backward works."""
    x = make_logits(shape, torch.float32, device)
    t = make_targets(shape, device)
    for reduction in REDUCTIONS:
        xx = x.clone().requires_grad_(True)
        loss = fastce.cross_entropy(xx, t, reduction=reduction)
        expect = F.cross_entropy(x, t, reduction=reduction)
        assert loss.shape == expect.shape and loss.dtype == expect.dtype
        assert torch.equal(torch.isnan(loss), torch.isnan(expect))
        if reduction == "sum":
            assert loss.item() == 0.0
        if reduction == "mean":
            assert torch.isnan(loss).item()
        loss.sum().backward()
        assert xx.grad is not None and xx.grad.shape == x.shape


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)])
def test_zero_weight_at_every_target_is_nan_as_torch(device, label_smoothing, shape):
    """'mean' divides by Σ w_y = 0: the loss is NaN (torch's 0/0; the smoothing term alone would
    give inf), and so is the gradient, except at ignored rows (0), exactly where torch has them."""
    x, t = make_inputs(shape, torch.float32, device, ignore_frac=0.3)
    w = make_weight(5, device)
    w[t[t != -100]] = 0.0
    fast, ref = ce_fns(w, label_smoothing=label_smoothing)
    out, _, (g,) = grads(fast, [x, t])
    theirs, _, (tg,) = grads(lambda a, b: F.cross_entropy(a, b, weight=w, label_smoothing=label_smoothing), [x, t])
    assert torch.isnan(out) and torch.isnan(theirs)
    assert torch.equal(torch.isnan(g), torch.isnan(tg)) and torch.equal(g[~torch.isnan(tg)], tg[~torch.isnan(tg)])
    ref_out, (rg,) = reference_grads(ref, [x, t], None)
    assert torch.isnan(ref_out) and torch.equal(torch.isnan(rg), torch.isnan(tg))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weight_of_another_dtype_is_used_at_full_precision(device, reduction):
    """torch refuses class weights of another dtype than the input's; fastce takes them (documented)
    and uses them at fp32 precision: fp32 weights of 1/3 for bf16 logits are not rounded to bf16."""
    x, t = make_inputs((16, 40), torch.bfloat16, device, ignore_frac=0.2)
    weight = torch.full((40,), 1 / 3, device=device)
    fast, ref = ce_fns(weight, reduction=reduction, label_smoothing=0.1)
    check_loss_and_grad(fast, ref, [x, t], torch.bfloat16, "random", "fp32 weight, bf16 logits")


PROMOTIONS = [(torch.float32, torch.float64), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
              (torch.bfloat16, torch.float16), (torch.float64, torch.float32)]


@pytest.mark.parametrize("input_dtype,target_dtype", PROMOTIONS, ids=lambda d: str(d).removeprefix("torch."))
def test_probability_targets_follow_torch_type_promotion(device, input_dtype, target_dtype):
    """The loss takes torch's promotion of input and target (computed in float64 when that is
    float64); the gradient keeps the input's dtype."""
    x = make_logits((6, 11), input_dtype, device)
    q = make_probs((6, 11), target_dtype, device)
    loss_dtype = torch.nn.functional.cross_entropy(x, q).dtype
    assert loss_dtype == torch.promote_types(input_dtype, target_dtype)
    fast, ref = ce_fns(None, label_smoothing=0.1)
    out, _, (g,) = grads(fast, [x, q], torch.tensor(0.75, dtype=loss_dtype, device=device))
    ref_out, (rg,) = reference_grads(ref, [x, q], torch.tensor(0.75, dtype=loss_dtype, device=device))
    assert out.dtype == loss_dtype and g.dtype == input_dtype
    assert_close_dtype(out, ref_out, loss_dtype, "promoted loss")
    assert_close_dtype(g, rg, input_dtype, "gradient")


def test_weighted_mean_divisor(device):
    """The 'mean' divides by the sum of the target classes' weights, not by N."""
    x, t = make_inputs((40, 4), torch.float32, device, ignore_frac=0.2)
    w = torch.tensor([0.1, 1.0, 3.0, 7.0], device=device)
    fast = fastce.cross_entropy(x, t, weight=w)
    valid = t != -100
    per_row = fastce.cross_entropy(x, t, weight=w, reduction="none")
    expect = per_row.double().sum() / w.double()[t[valid]].sum()
    assert_close_dtype(fast, expect, torch.float32, "weighted mean")
    assert_close_dtype(fast, F.cross_entropy(x.double(), t, weight=w.double()), torch.float32, "vs torch")


# ------------------------------------------------------------------------------------------
# z_loss, softcap, return_lse
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("z_loss,softcap", [(1e-2, None), (0.0, 3.0), (0.1, 5.0)])
@pytest.mark.parametrize("config", ["plain", "weight_smooth_ignore"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zloss_softcap(device, z_loss, softcap, config, reduction):
    x, t, fast, ref = _case((19, 33), CONFIGS[config], device=device, reduction=reduction,
                            z_loss=z_loss, softcap=softcap)
    x = x * 3  # large enough that soft-capping bends the logits
    check_loss_and_grad(fast, ref, [x, t], x.dtype, "random", f"z={z_loss} s={softcap}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_zloss_softcap_dtypes(device, dtype):
    x, t, fast, ref = _case((9, 130), CONFIGS["weight_smooth_ignore"], dtype=dtype, device=device,
                            z_loss=0.05, softcap=4.0)
    check_loss_and_grad(fast, ref, [x, t], dtype, "random", f"zloss softcap {dtype}")


def test_softcap_padded_lanes(device):
    """C not a multiple of the block: padded lanes must not enter the lse after tanh(-inf)=-1."""
    x, t, fast, ref = _case((3, 1000), CONFIGS["plain"], device=device, reduction="none",
                            softcap=2.0, z_loss=0.1)
    check_loss_and_grad(fast, ref, [x, t], x.dtype, "random", "softcap padding")


def test_zloss_probability_targets(device):
    x = make_logits((6, 10), torch.float32, device)
    q = make_probs((6, 10), torch.float32, device)
    for reduction in REDUCTIONS:
        fast, ref = ce_fns(None, reduction=reduction, z_loss=0.2, softcap=3.0)
        check_loss_and_grad(fast, ref, [x, q], torch.float32, "random", f"zloss probs {reduction}")


@pytest.mark.parametrize("shape", [(17, 40), (2, 9, 3), (40,)])
@pytest.mark.parametrize("softcap", [None, 6.0])
def test_return_lse(device, shape, softcap):
    x, t = make_inputs(shape, torch.float32, device, ignore_frac=0.2)
    out = fastce.cross_entropy(x, t, reduction="none", return_lse=True, softcap=softcap)
    assert isinstance(out, tuple) and len(out) == 2
    loss, lse = out
    ref_loss, ref_lse = reference.cross_entropy(x.double(), t, reduction="none", return_lse=True,
                                                softcap=softcap)
    assert_close_dtype(loss, ref_loss, torch.float32, "loss")
    assert lse.shape == ref_lse.shape
    valid = t != -100
    assert_close_dtype(lse[valid], ref_lse[valid], torch.float32, "lse")
    # loss unchanged by asking for the lse, and still differentiable
    torch.testing.assert_close(fastce.cross_entropy(x, t, reduction="none", softcap=softcap), loss)
    xx = x.clone().requires_grad_(True)
    l2, _ = fastce.cross_entropy(xx, t, reduction="mean", return_lse=True, softcap=softcap)
    l2.backward()
    _, _, (rg,) = grads(lambda a, b: reference.cross_entropy(a, b, softcap=softcap), [x.double(), t])
    assert_close_dtype(xx.grad, rg, torch.float32, "grad with return_lse")


FLOAT64_OPTIONS = {
    "smoothing": ("cross_entropy", dict(label_smoothing=0.1)),
    "smoothing_probs": ("cross_entropy", dict(label_smoothing=0.3, probs=True)),
    "z_loss": ("cross_entropy", dict(z_loss=1e-3)),
    "softcap": ("cross_entropy", dict(softcap=3.7)),
    "focal_gamma": ("focal_loss", dict(gamma=1.7, label_smoothing=0.05)),
}


@pytest.mark.parametrize("case", list(FLOAT64_OPTIONS), ids=list(FLOAT64_OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_float64_stays_float64_for_every_scalar_option(device, case, reduction):
    """Scalar options reach the fp64 kernels as fp64: results to fp64 accuracy (an fp32 ε/C, z,
    s or γ would be ~1e-8 off), loss and gradient."""
    name, kw = FLOAT64_OPTIONS[case]
    kw = dict(kw)
    x, t = make_inputs((7, 33), torch.float64, device, scale=3.0, probs=kw.pop("probs", False))
    fast, ref = (ce_fns if name == "cross_entropy" else focal_fns)(None, reduction=reduction, **kw)
    check_loss_and_grad(fast, ref, [x, t], torch.float64, "random", case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use", ["loss_and_lse", "lse_only"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_return_lse_is_differentiable(device, dtype, reduction, use, softcap):
    """A z-loss built from the returned lse trains: ∂lse/∂x = p (through the soft-cap), folded
    into the loss's gradient pass, 0 at ignored rows (where the returned lse is 0)."""
    x, t = make_inputs((11, 37), dtype, device, ignore_frac=0.2)
    weight = make_weight(37, device, dtype)

    def with_lse_term(fn, w):
        def total(a, b):
            loss, lse = fn(a, b, w, reduction=reduction, label_smoothing=0.1, softcap=softcap, return_lse=True)
            z_term = 1e-2 * (lse.float() ** 2).sum()
            return z_term if use == "lse_only" else loss.float().sum() * 0.75 + z_term
        return total

    out, _, (g,) = grads(with_lse_term(fastce.cross_entropy, weight), [x, t])
    ref_out, (rg,) = reference_grads(with_lse_term(reference.cross_entropy, as64(weight)), [x, t], None)
    assert_close_dtype(out, ref_out, dtype, "loss with an lse term")
    assert_close_dtype(g, rg, dtype, "gradient with an lse term")


# ------------------------------------------------------------------------------------------
# gradcheck (float64, tiny shapes)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(reduction="mean"),
    dict(reduction="none", label_smoothing=0.2, weight=True, ignore=True),
    dict(reduction="sum", z_loss=0.1, softcap=2.0, weight=True),
    dict(reduction="mean", probs=True, label_smoothing=0.1),
], ids=["plain", "none_smooth_weight_ignore", "sum_zloss_softcap", "probs"])
def test_gradcheck(device, kw):
    kw = dict(kw)
    probs = kw.pop("probs", False)
    ignore = kw.pop("ignore", False)
    w = make_weight(4, device, torch.float64) if kw.pop("weight", False) else None
    x, t = make_inputs((3, 4), torch.float64, device, probs=probs, ignore_frac=0.3 if ignore else 0)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fastce.cross_entropy(a, t, weight=w, **kw), (x,),
                                    **GRADCHECK)


# ------------------------------------------------------------------------------------------
# Precision where a formula would cancel, and gradients rounded once
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name", ["cross_entropy", "focal_loss"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_confident_rows_keep_their_digits(device, loss_name, label_smoothing):
    """p_y = 1 − 2e-6 in fp32: −log p_y comes from log1p of the non-target sum (log of s = 1 + 2e-6
    keeps two digits), and the focal gradient at the target from 1 − p_y summed on its own."""
    N, C = 6, 1000
    x = torch.randn(N, C, dtype=torch.float64)
    t = torch.randint(0, C, (N,))
    x[torch.arange(N), t] = 20.0
    x, t = x.float().to(device), t.to(device)
    kw = dict(reduction="none", label_smoothing=label_smoothing)
    fast, ref = ce_fns(None, **kw) if loss_name == "cross_entropy" else focal_fns(None, gamma=2.0, **kw)
    out, go, (g,) = grads(fast, [x, t], mode="random")
    ref_out, (rg,) = reference_grads(ref, [x, t], go)
    assert_close_dtype(out, ref_out, torch.float32, f"confident {loss_name} loss")
    assert_close_dtype(g, rg, torch.float32, f"confident {loss_name} gradient")
    rows = torch.arange(N, device=device)
    rel = ((g[rows, t].double() - rg[rows, t]) / rg[rows, t]).abs().max().item()
    assert rel <= 1e-5, f"target-class gradient off by {rel:.3g} relative"


def test_softcap_keeps_relative_precision_of_small_logits(device):
    """s·tanh(x/s) for |x| ≪ s must equal x to fp32 precision: with s = 1e4, tanh as
    1 − 2/(e^(2u) + 1) is off by an ulp of 1, i.e. 6e-4 absolute in x', which a confident row's
    loss and gradient (e^(x'_c − x'_y) ≈ 5e-5) show at once."""
    x = make_logits((5, 40), torch.float32, device, scale=0.5) - 5.0
    t = make_targets((5, 40), device)
    x[torch.arange(5, device=device), t] = 5.0
    fast, ref = ce_fns(None, reduction="none", softcap=1e4)
    check_loss_and_grad(fast, ref, [x, t], torch.float32, "random", "softcap of small logits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_low_precision_gradient_is_rounded_once_for_any_upstream_gradient(device, dtype, reduction):
    """The forward's gradient is for an upstream gradient of 1; another one (gradient accumulation's
    1/k, a loss scale) rewrites it from the logits, so each element is within half an ulp of the
    fp64 value (scaling the stored gradient would round it twice)."""
    x, t = make_inputs((16, 300), dtype, device, ignore_frac=0.1)
    fast, ref = ce_fns(make_weight(300, device, dtype), reduction=reduction, label_smoothing=0.1)
    for grad_output in (0.37, 3.0, 1.0):
        go = torch.tensor(grad_output, dtype=dtype, device=device)
        out, _, (g,) = grads(fast, [x, t], go)
        _, (rg,) = reference_grads(ref, [x, t], go)
        assert_close_dtype(g, rg, dtype, f"grad for upstream {grad_output}")


# ------------------------------------------------------------------------------------------
# Determinism, no hidden mutation, inplace_backward, retain_graph
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fn", ["cross_entropy", "focal_loss"])
def test_deterministic(device, reduction, fn):
    """Same inputs: bitwise identical loss and gradient (no atomics-order dependence)."""
    x, t, fast, _ = _case((37, 700), CONFIGS["weight_smooth_ignore"], device=device, reduction=reduction,
                          z_loss=1e-3)
    if fn == "focal_loss":
        def fast(a, b):
            return fastce.focal_loss(a, b, gamma=2.0, alpha=0.5, reduction=reduction, label_smoothing=0.1)
    runs = []
    for _ in range(2):
        xx = x.clone().requires_grad_(True)
        loss = fast(xx, t)
        loss.backward(torch.ones_like(loss) * 0.75)
        runs.append((loss.detach(), xx.grad))
    assert bitwise_equal(runs[0][0], runs[1][0])
    assert bitwise_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("probs", [False, True])
def test_does_not_modify_inputs(device, dtype, probs):
    x, t = make_inputs((8, 30), dtype, device, ignore_frac=0.2, probs=probs)
    w = make_weight(30, device, dtype)
    x.requires_grad_(True)
    before = [x.detach().clone(), t.clone(), w.clone()]
    loss = fastce.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=0.01)
    loss.backward()
    assert x.grad is not None
    for a, b in zip([x.detach(), t, w], before):
        assert bitwise_equal(a, b), "caller's tensor modified"


def _inplace_setup(device, dtype=torch.float32):
    h = make_logits((10, 8), dtype, device)
    W = make_logits((8, 25), dtype, device)
    t = make_targets((10, 25), device, ignore_frac=0.2)
    return h, W, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_same_gradient(device, reduction, dtype):
    """inplace_backward=True: same loss and d loss / d logits as the default (both checked
    against the fp64 reference), and the logits' storage ends up holding that gradient."""
    x, t = make_inputs((10, 25), dtype, device, ignore_frac=0.2)
    w = make_weight(25, device, dtype)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=0.01)
    x64 = x.double().requires_grad_(True)
    ref = reference.cross_entropy(x64, t, weight=w.double(), **kw_without_weight(kw))
    go = torch.linspace(0.5, 1.5, ref.numel(), device=device).reshape(ref.shape).to(dtype)
    ref.backward(go.double())
    for inplace in (False, True):
        leaf = x.clone().requires_grad_(True)
        logits = leaf * 1.0  # non-leaf logits (as the output of a model); passes grad through
        loss = fastce.cross_entropy(logits, t, inplace_backward=inplace, **kw)
        loss.backward(go)
        what = "inplace" if inplace else "default"
        assert_close_dtype(loss, ref.detach(), dtype, f"{what} loss")
        # in place, the forward's gradient (for upstream 1) is all that is left to scale by the
        # upstream gradient: rounded twice, where the default rewrites it from the logits once
        assert_close_dtype(leaf.grad, x64.grad, dtype, f"{what} grad", roundings=2 if inplace else 1)
        if inplace:
            assert_close_dtype(logits.detach(), x64.grad, dtype, "overwritten logits", roundings=2)
        else:
            assert bitwise_equal(logits.detach(), x), "default mode modified the logits"


def kw_without_weight(kw):
    return {k: v for k, v in kw.items() if k != "weight"}


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_through_matmul(device, reduction):
    """In a model: logits = h @ W; the parameters' gradients match the default mode."""
    h, W, t = _inplace_setup(device)
    grads_by_mode = []
    for inplace in (False, True):
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss = fastce.cross_entropy(hh @ WW, t, reduction=reduction, inplace_backward=inplace)
        loss.backward(torch.full_like(loss, 0.7))
        grads_by_mode.append((hh.grad, WW.grad))
    for a, b in zip(*grads_by_mode):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("view", ["flatten_view", "column_slice"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_on_a_view(device, view, reduction):
    """The usual language-model call, cross_entropy(logits.view(-1, V), y.view(-1)), passes a
    view of a non-leaf; inplace_backward=True must work there as well (same gradient)."""
    B, T, H, V = 2, 3, 4, 7
    h = make_logits((B, T, H), torch.float32, device)
    W = make_logits((H, V + 2), torch.float32, device)
    y = make_targets((B * T, V), device, ignore_frac=0.2)
    results = []
    for inplace in (False, True):
        hh = h.clone().requires_grad_(True)
        full = hh @ W  # (B, T, V + 2), non-leaf
        if view == "flatten_view":
            logits = full[..., :V].contiguous().view(-1, V)
        else:
            logits = full.view(-1, V + 2)[:, 1:V + 1]
        loss = fastce.cross_entropy(logits, y, reduction=reduction, inplace_backward=inplace)
        loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=device).reshape(loss.shape))
        results.append(hh.grad)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_inplace_backward_second_backward_raises(device):
    h, W, t = _inplace_setup(device)
    hh = h.clone().requires_grad_(True)
    loss = fastce.cross_entropy(hh @ W, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_inplace_backward_error_messages(device):
    """A leaf that requires grad cannot take its own gradient in place: a clear error; the
    second backward's error names the option."""
    x, t = make_inputs((5, 7), torch.float32, device)
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError):
        fastce.cross_entropy(leaf, t, inplace_backward=True).backward()
    logits = x.clone().requires_grad_(True) * 1.0
    loss = fastce.cross_entropy(logits, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


def test_inplace_backward_without_grad_leaves_logits(device):
    """No gradient wanted (no_grad, or logits without requires_grad): nothing is overwritten."""
    x, t = make_inputs((6, 9), torch.float32, device)
    before = x.clone()
    loss = fastce.cross_entropy(x, t, inplace_backward=True)
    assert bitwise_equal(x, before)
    xr = x.clone().requires_grad_(True) * 1.0
    with torch.no_grad():
        loss2 = fastce.cross_entropy(xr, t, inplace_backward=True)
    assert bitwise_equal(xr.detach(), before)
    expect = reference.cross_entropy(x.double(), t)
    assert_close_dtype(loss, expect, torch.float32, "loss")
    assert_close_dtype(loss2, expect, torch.float32, "loss under no_grad")


@pytest.mark.parametrize("inplace_backward", [False, True], ids=["default", "inplace"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4)])
@pytest.mark.parametrize("downstream", ["sum", "mean", "transposed", "strided"])
def test_none_grad_output_layouts(device, shape, downstream, inplace_backward):
    """'none' losses feed arbitrary graphs: expanded (from .sum()), transposed or sliced
    grad_outputs must be read with their strides (also by inplace_backward's rescale)."""
    x, t = make_inputs(shape, torch.float32, device, ignore_frac=0.2)

    def head(loss):
        if downstream == "sum":
            return loss.sum()
        if downstream == "mean":
            return loss.mean()
        if downstream == "transposed":
            m = loss.reshape(loss.shape[0], -1)
            return (m.t() * torch.arange(1.0, m.numel() + 1, device=device).reshape(m.t().shape)).sum()
        return loss.reshape(-1)[::2].sum() * 3

    weight = make_weight(5, device)
    fast, ref = ce_fns(weight, reduction="none", label_smoothing=0.1)
    if inplace_backward:  # on non-leaf logits, as inplace_backward requires
        def fast(a, b):
            return fastce.cross_entropy(a * 1.0, b, weight, reduction="none", label_smoothing=0.1,
                                        inplace_backward=True)
    out, _, (g,) = grads(lambda a, b: head(fast(a, b)), [x, t])
    ref_out, _, (rg,) = grads(lambda a, b: head(ref(a, b)), [x.double(), t])
    assert_close_dtype(out, ref_out, torch.float32, f"{downstream} loss")
    assert_close_dtype(g, rg, torch.float32, f"{downstream} grad")


@pytest.mark.parametrize("inplace_backward", [False, True], ids=["default", "inplace"])
def test_none_strided_upstream_gradient(device, inplace_backward):
    """A sliced grad_output handed straight to backward is read with its stride."""
    x, t = make_inputs((6, 9), torch.float32, device, ignore_frac=0.2)
    go = torch.randn(12, device=device)[::2]
    leaf = x.clone().requires_grad_(True)
    fastce.cross_entropy(leaf * 1.0, t, reduction="none", inplace_backward=inplace_backward).backward(go)
    x64 = x.double().requires_grad_(True)
    reference.cross_entropy(x64, t, reduction="none").backward(go.double())
    assert_close_dtype(leaf.grad, x64.grad, torch.float32, "strided upstream grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_accumulates(device, reduction):
    x, t, fast, ref = _case((12, 20), CONFIGS["weight_smooth_ignore"], device=device, reduction=reduction)
    xx = x.clone().requires_grad_(True)
    loss = fast(xx, t)
    go1, go2 = random_grad_output(loss), random_grad_output(loss)
    loss.backward(go1, retain_graph=True)
    first = xx.grad.clone()
    loss.backward(go2)
    _, _, (r1,) = grads(ref, [x.double(), t], go1.double())
    _, _, (r2,) = grads(ref, [x.double(), t], go2.double())
    assert_close_dtype(first, r1, torch.float32, "first backward")
    assert_close_dtype(xx.grad, r1 + r2, torch.float32, "accumulated")
    assert bitwise_equal(xx.detach(), x), "default mode modified the logits"


def test_no_grad_forward(device):
    x, t, fast, ref = _case((7, 30), CONFIGS["weight_smooth_ignore"], device=device, reduction="none")
    with torch.no_grad():
        out = fast(x, t)
    assert not out.requires_grad
    assert_close_dtype(out, ref(x.double(), t), torch.float32, "no_grad")
    # and a no-grad input simply gives a loss without grad_fn
    assert fast(x, t).grad_fn is None

"""Bad input (DESIGN §2): a clear Python exception raised before any kernel runs, with the
caller's tensors left bit-identical; validate=False never reads out of bounds."""
import os

import numpy as np
import pytest
import torch

import fastce
from fastce import reference

from _support import (assert_close_dtype, assert_unchanged, count_kernel_launches, grads,
                      make_logits, make_probs, make_targets, make_weight, snapshot)

C = 5


def _hard(device, shape=(4, C)):
    return make_logits(shape, torch.float32, device), make_targets(shape, device)


def _call(fn_name, x, t, **kw):
    if fn_name == "cross_entropy":
        return fastce.cross_entropy(x, t, **kw)
    if fn_name == "focal_loss":
        return fastce.focal_loss(x, t, **kw)
    if fn_name == "CrossEntropyLoss":
        return fastce.CrossEntropyLoss(**kw)(x, t)
    if fn_name == "FocalLoss":
        return fastce.FocalLoss(**kw)(x, t)
    raise ValueError(fn_name)


FUNCTIONS = ["cross_entropy", "focal_loss", "CrossEntropyLoss", "FocalLoss"]


def _expect_clean_error(exc_types, fn_name, x, t, match=None, **kw):
    """The call raises one of exc_types, launches no kernel, leaves every tensor as it was,
    and the exception is a plain Python one with a readable message."""
    if exc_types is IndexError and x.is_cuda:
        # on CUDA the default check is a device-side assertion, which would end the process's CUDA
        # context; the IndexError is what validate="sync" gives there
        kw.setdefault("validate", "sync")
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    tensors = [x, t] + [v for v in kw.values() if isinstance(v, torch.Tensor)]
    before = snapshot(*tensors)
    with count_kernel_launches() as launched:
        with pytest.raises(exc_types) as info:
            _call(fn_name, x, t, **kw)
    assert not launched, f"kernel(s) {launched} ran before the input was rejected"
    assert_unchanged(tensors, before, "after a rejected call")
    assert x.grad is None
    msg = str(info.value)
    assert len(msg) >= 10, f"unhelpful message: {msg!r}"
    assert not type(info.value).__module__.startswith("triton"), type(info.value)
    if match is not None:
        assert match in msg, f"{match!r} not in message {msg!r}"
    return info.value


# ------------------------------------------------------------------------------------------
# Target out of [0, C) and not ignore_index -> IndexError naming the value
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("bad", [C, 123, -7, -1])
def test_target_out_of_range(device, fn_name, bad):
    x, t = _hard(device)
    t[2] = bad
    _expect_clean_error(IndexError, fn_name, x, t, match=str(bad))


def test_target_out_of_range_kdim_and_1d(device):
    x, t = _hard(device, (2, C, 3))
    t[1, 2] = 77
    _expect_clean_error(IndexError, "cross_entropy", x, t, match="77")
    x1 = make_logits((C,), torch.float32, device)
    _expect_clean_error(IndexError, "cross_entropy", x1, torch.tensor(42, device=device), match="42")


def test_out_of_range_next_to_ignored_rows(device):
    """A custom ignore_index is allowed; a different out-of-range value still is not."""
    x, t = _hard(device, (6, C))
    t[0] = -1
    fastce.cross_entropy(x, t, ignore_index=-1)  # fine
    t[3] = -100  # out of range now that ignore_index is -1
    _expect_clean_error(IndexError, "cross_entropy", x, t, match="-100", ignore_index=-1)


# ------------------------------------------------------------------------------------------
# Shapes, dtypes, arguments
# ------------------------------------------------------------------------------------------

SHAPE_MISMATCH = {
    "batch": ((4, C), (3,)),
    "kdim_spatial": ((2, C, 3), (2, 4)),
    "kdim_rank": ((2, C, 3), (2,)),
    "2d_target_for_2d_input": ((4, C), (4, 1)),
}


@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("case", list(SHAPE_MISMATCH), ids=list(SHAPE_MISMATCH))
def test_shape_mismatch(device, fn_name, case):
    xs, ts = SHAPE_MISMATCH[case]
    x = make_logits(xs, torch.float32, device)
    t = torch.zeros(ts, dtype=torch.long, device=device)
    _expect_clean_error((ValueError, RuntimeError), fn_name, x, t)


def test_probability_target_shape_mismatch(device):
    x = make_logits((4, C), torch.float32, device)
    q = make_probs((4, C + 1), torch.float32, device)
    _expect_clean_error((ValueError, RuntimeError), "cross_entropy", x, q)


def test_weight_shape_mismatch(device):
    x, t = _hard(device)
    _expect_clean_error((ValueError, RuntimeError), "cross_entropy", x, t, weight=make_weight(C - 2, device))


def test_shape_checks_stay_with_validate_false(device):
    """validate=False drops only the checks that need a host sync."""
    x = make_logits((4, C), torch.float32, device)
    t = torch.zeros(3, dtype=torch.long, device=device)
    _expect_clean_error((ValueError, RuntimeError), "cross_entropy", x, t, validate=False)
    _expect_clean_error(ValueError, "cross_entropy", x, torch.zeros(4, dtype=torch.long, device=device),
                        validate=False, reduction="avg")


@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("tdtype", [torch.int32, torch.int16, torch.int8, torch.bool, torch.float32],
                         ids=str)
def test_wrong_target_dtype(device, fn_name, tdtype):
    """Class indices must be int64 or uint8 (as torch); a float target must be input-shaped."""
    x, t = _hard(device)
    _expect_clean_error((TypeError, ValueError, RuntimeError), fn_name, x, t.to(tdtype))


def test_uint8_and_int64_accepted(device):
    x, t = _hard(device)
    a = fastce.cross_entropy(x, t)
    b = fastce.cross_entropy(x, t.to(torch.uint8))
    assert_close_dtype(a, reference.cross_entropy(x.double(), t), torch.float32, "int64")
    assert_close_dtype(b, reference.cross_entropy(x.double(), t), torch.float32, "uint8")


@pytest.mark.parametrize("fn_name", ["cross_entropy", "CrossEntropyLoss"])
@pytest.mark.parametrize("ignore_index", [0, -1, 3])
def test_probability_targets_with_ignore_index(device, fn_name, ignore_index):
    x = make_logits((4, C), torch.float32, device)
    q = make_probs((4, C), torch.float32, device)
    _expect_clean_error((ValueError, RuntimeError), fn_name, x, q, ignore_index=ignore_index)


def test_probability_targets_default_ignore_index_fine(device):
    x = make_logits((4, C), torch.float32, device)
    q = make_probs((4, C), torch.float32, device)
    out = fastce.cross_entropy(x, q, ignore_index=-100)
    assert_close_dtype(out, reference.cross_entropy(x.double(), q.double()), torch.float32, "probs")


@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("reduction", ["avg", "elementwise_mean", "MEAN", None])
def test_unknown_reduction(device, fn_name, reduction):
    x, t = _hard(device)
    _expect_clean_error(ValueError, fn_name, x, t, reduction=reduction)


@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("label_smoothing", [-0.1, -1e-6, 1.0001, 2.0])
def test_label_smoothing_out_of_range(device, fn_name, label_smoothing):
    x, t = _hard(device)
    _expect_clean_error((ValueError, RuntimeError), fn_name, x, t, label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 1.0])
def test_label_smoothing_bounds_accepted(device, label_smoothing):
    x, t = _hard(device)
    out = fastce.cross_entropy(x, t, label_smoothing=label_smoothing)
    assert_close_dtype(out, reference.cross_entropy(x.double(), t, label_smoothing=label_smoothing),
                       torch.float32, f"label_smoothing={label_smoothing}")


def test_probability_targets_out_of_range_smoothing(device):
    x = make_logits((4, C), torch.float32, device)
    q = make_probs((4, C), torch.float32, device)
    _expect_clean_error((ValueError, RuntimeError), "cross_entropy", x, q, label_smoothing=-0.5)


OTHER_BAD = {
    "int_logits": lambda x, t: ("cross_entropy", x.long(), t, {}),
    "0d_logits": lambda x, t: ("cross_entropy", x[0, 0], t[0], {}),
    "int_weight": lambda x, t: ("cross_entropy", x, t, dict(weight=torch.ones(C, dtype=torch.long, device=x.device))),
    "2d_weight": lambda x, t: ("cross_entropy", x, t, dict(weight=torch.ones(1, C, device=x.device))),
    "nan_label_smoothing": lambda x, t: ("cross_entropy", x, t, dict(label_smoothing=float("nan"))),
    "zero_softcap": lambda x, t: ("cross_entropy", x, t, dict(softcap=0.0)),
    "negative_softcap": lambda x, t: ("cross_entropy", x, t, dict(softcap=-2.0)),
    "alpha_wrong_shape": lambda x, t: ("focal_loss", x, t, dict(alpha=torch.rand(C - 1, device=x.device))),
    # torch refuses to treat class weights as trainable; fastce neither ignores them silently
    "weight_requires_grad": lambda x, t: ("cross_entropy", x, t,
                                          dict(weight=torch.rand(C, device=x.device, requires_grad=True))),
    "alpha_requires_grad": lambda x, t: ("focal_loss", x, t,
                                         dict(alpha=torch.rand(C, device=x.device, requires_grad=True))),
}


@pytest.mark.parametrize("case", list(OTHER_BAD), ids=list(OTHER_BAD))
def test_other_bad_arguments(device, case):
    """Beyond the list in DESIGN §2: still a clear exception before any kernel runs."""
    x, t = _hard(device)
    fn_name, x, t, kw = OTHER_BAD[case](x, t)
    _expect_clean_error((ValueError, TypeError, RuntimeError), fn_name, x, t, **kw)


def test_kernel_counter_sees_launches(device):
    """Positive control for the 'no kernel ran' checks above."""
    x, t = _hard(device)
    with count_kernel_launches() as launched:
        fastce.cross_entropy(x, t)
    assert launched


# ------------------------------------------------------------------------------------------
# What torch says, torch's way (found by fuzzing fastce against torch)
# ------------------------------------------------------------------------------------------

TORCH_REFUSES = {
    # name: (input shape, make the target from the input, keyword arguments)
    "long_target_shaped_like_input": ((4, C), lambda x: torch.zeros(x.shape, dtype=torch.long), {}),
    "int32_target": ((4, C), lambda x: torch.zeros(4, dtype=torch.int32), {}),
    "weight_of_another_length": ((4, C), lambda x: torch.zeros(4, dtype=torch.long), dict(weight=torch.ones(3))),
    "out_of_range": ((4, C), lambda x: torch.tensor([0, 1, C, 2]), {}),
    "uint8_index_equal_to_ignore_index_mod_256": ((4, C), lambda x: torch.tensor([0, 1, 156, 2], dtype=torch.uint8),
                                                  {}),
    "batch_size": ((4, C), lambda x: torch.zeros(3, dtype=torch.long), {}),
    "probabilities_with_ignore_index": ((4, C), lambda x: torch.rand(x.shape), dict(ignore_index=1)),
    "label_smoothing_above_1": ((4, C), lambda x: torch.zeros(4, dtype=torch.long), dict(label_smoothing=1.5)),
    "reduction": ((4, C), lambda x: torch.zeros(4, dtype=torch.long), dict(reduction="avg")),
    "ignore_index_none": ((4, C), lambda x: torch.zeros(4, dtype=torch.long), dict(ignore_index=None)),
    "ignore_index_float": ((4, C), lambda x: torch.zeros(4, dtype=torch.long), dict(ignore_index=1.5)),
    "ignore_index_bool": ((4, C), lambda x: torch.zeros(4, dtype=torch.long), dict(ignore_index=True)),
    "ignore_index_float_tensor": ((4, C), lambda x: torch.zeros(4, dtype=torch.long),
                                  dict(ignore_index=torch.tensor(2.0))),
}


@pytest.mark.parametrize("case", list(TORCH_REFUSES), ids=list(TORCH_REFUSES))
def test_refuses_what_torch_refuses_with_torch_words(device, case):
    """The exception is (a subclass of) torch's, and its message starts with torch's own words
    (argument-parser messages name the argument and the type, in torch's form)."""
    shape, make_target, kw = TORCH_REFUSES[case]
    x = make_logits(shape, torch.float32, device)
    t = make_target(x).to(device)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with pytest.raises(Exception) as theirs:  # on the CPU: torch's CUDA kernels assert on the device instead
        torch.nn.functional.cross_entropy(x.cpu(), t.cpu(), **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                               for k, v in kw.items()})
    ours = _expect_clean_error(type(theirs.value), "cross_entropy", x, t, **kw)
    expected = str(theirs.value).replace("cross_entropy_loss(): ", "cross_entropy(): ").replace(" (position 5)", "")
    assert str(ours).startswith(expected), (str(ours), str(theirs.value))


@pytest.mark.parametrize("ignore_index", [torch.tensor(2), np.int64(2), np.int32(-100)], ids=repr)
def test_ignore_index_accepts_any_integer_as_torch(device, ignore_index):
    x, t = _hard(device, (6, C))
    t[1] = 2
    expected = torch.nn.functional.cross_entropy(x.double(), t, ignore_index=ignore_index)
    assert_close_dtype(fastce.cross_entropy(x, t, ignore_index=ignore_index), expected, torch.float32, "ignore_index")


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_meta_tensors_with_validation(probs, reduction):
    """Meta tensors have no values to validate: the loss's shape and dtype, as torch's."""
    x = torch.empty(4, C, 3, device="meta", requires_grad=True)
    t = torch.empty(4, C, 3, device="meta") if probs else torch.empty(4, 3, dtype=torch.long, device="meta")
    ours = fastce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    theirs = torch.nn.functional.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    assert ours.device.type == "meta" and (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)


# ------------------------------------------------------------------------------------------
# validate=True on CUDA: a device-side assertion, no host sync; "sync" opts into the IndexError
# ------------------------------------------------------------------------------------------

def test_validation_modes_per_device():
    from fastce._validation import validation_mode
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [validation_mode(v, cpu) for v in (True, "sync", False)] == ["sync", "sync", "none"]
    assert [validation_mode(v, cuda) for v in (True, "sync", False)] == ["device", "sync", "none"]
    with pytest.raises(ValueError, match="validate"):
        validation_mode("yes", cpu)


@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("fn_name", ["cross_entropy", "focal_loss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_device_side_check(device, monkeypatch, path, fn_name, reduction):
    """What validate=True does with CUDA tensors, run on this device: valid targets pass with
    no host sync; an out-of-range one fails the assertion (on the CPU at once, and the caller's
    tensors are left as they were; on a GPU see test_cuda_device_side_assert)."""
    from fastce.profiling import measure
    monkeypatch.setattr(fastce.functional, "validation_mode", lambda validate, device: "device")
    if path == "reference":
        monkeypatch.setattr(fastce.functional, "uses_triton", lambda input: False)
    x, t = _hard(device, (6, C))
    t[1] = -100
    with measure() as m:
        loss = _call(fn_name, x, t, reduction=reduction)
    assert m.syncs == 0, m.report()
    assert_close_dtype(loss, getattr(reference, fn_name)(x.double(), t, reduction=reduction), torch.float32, "loss")
    if x.is_cuda:
        return  # a failed device-side assertion would end this process's CUDA context
    t[4] = C + 2
    before = snapshot(x, t)
    with pytest.raises(RuntimeError, match=f"outside \\[0, {C}\\) and is not ignore_index"):
        _call(fn_name, x, t, reduction=reduction)
    assert_unchanged([x, t], before)


CUDA_DEVICE_SIDE_ASSERT = """
import torch, fastce
x = torch.randn(64, 1000, device="cuda", requires_grad=True)
target = torch.randint(0, 1000, (64,), device="cuda")
graph, static_loss = torch.cuda.CUDAGraph(), None
for _ in range(2):  # warm up, then capture: the default check never syncs, so capture works
    loss = fastce.cross_entropy(x, target)
with torch.cuda.graph(graph):
    static_loss = fastce.cross_entropy(x, target)
graph.replay()
torch.testing.assert_close(static_loss, torch.nn.functional.cross_entropy(x, target))
target[5] = 1000
loss = fastce.cross_entropy(x, target)  # returns: the failure is on the device
print("returned", flush=True)
torch.cuda.synchronize()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device-side assert needs a GPU (the CPU runs "
                    "the same check in test_device_side_check, where it raises at once)")
def test_cuda_device_side_assert():
    """On CUDA, validate=True needs no host sync (a CUDA graph captures it) and an out-of-range
    index fails as torch's own CUDA kernels do: the call returns, and the next synchronisation
    raises "device-side assert triggered"."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CUDA_DEVICE_SIDE_ASSERT], capture_output=True, text=True,
                            env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "returned" in result.stdout, result.stderr[-2000:]
    assert result.returncode != 0 and "device-side assert" in result.stderr, result.stderr[-2000:]


def test_sync_opts_into_the_index_error(device):
    x, t = _hard(device)
    t[2] = 77
    _expect_clean_error(IndexError, "cross_entropy", x, t, match="77", validate="sync")


# ------------------------------------------------------------------------------------------
# validate=False: out-of-range targets give NaN for that row, never a crash
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["C", "C+3", 10**9, -7, -(2**40)])
@pytest.mark.parametrize("num_classes", [C, 3000])
def test_validate_false_out_of_range_is_nan_row(device, bad, num_classes):
    x, t = _hard(device, (6, num_classes))
    bad = {"C": num_classes, "C+3": num_classes + 3}.get(bad, bad)
    t[2] = bad
    t[4] = -100
    xx = x.clone().requires_grad_(True)
    loss = fastce.cross_entropy(xx, t, reduction="none", validate=False)
    assert loss.shape == (6,)
    assert torch.isnan(loss[2]), f"row with target {bad} gave {loss[2].item()}, not NaN"
    ok = torch.ones(6, dtype=torch.bool, device=device)
    ok[2] = False
    ref = reference.cross_entropy(x.double(), t, reduction="none")
    assert_close_dtype(loss.detach()[ok], ref[ok], torch.float32, "other rows")
    # backward does not crash either, and the other rows' gradients are right
    go = torch.rand(6, device=device)
    loss.backward(go)
    _, _, (rg,) = grads(lambda a, b: reference.cross_entropy(a, b, reduction="none"), [x.double(), t],
                        go.double())
    assert_close_dtype(xx.grad[ok], rg[ok], torch.float32, "other rows' gradient")
    # and with 'mean' the bad row makes the loss NaN instead of reading garbage
    assert torch.isnan(fastce.cross_entropy(x, t, validate=False))

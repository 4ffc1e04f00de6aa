"""fastce.CrossEntropyLoss is a drop-in for nn.CrossEntropyLoss; fastce.FocalLoss wraps
focal_loss (DESIGN §1)."""
import io

import pytest
import torch
import torch.nn as nn

import fastce
from fastce import reference

from _support import (REDUCTIONS, as64, assert_close_dtype, check_loss_and_grad,
                      count_kernel_launches, grads, make_inputs, make_probs, make_weight)

CTOR_ARGS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none", ignore_index=2),
    dict(label_smoothing=0.15),
    dict(weight=True, reduction="mean", label_smoothing=0.1, ignore_index=-1),
]


def _materialise(kw, C, device):
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = make_weight(C, device)
    return kw


@pytest.mark.parametrize("kw", CTOR_ARGS, ids=lambda d: ",".join(sorted(d)) or "default")
def test_same_results_as_nn(device, kw):
    C = 12
    kw = _materialise(kw, C, device)
    ignore_index = kw.get("ignore_index", -100)
    x, t = make_inputs((25, C), torch.float32, device, ignore_frac=0.2, ignore_index=ignore_index)
    ours, theirs = fastce.CrossEntropyLoss(**kw), nn.CrossEntropyLoss(**kw)
    for attr in ("reduction", "ignore_index", "label_smoothing"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    out, go, (g,) = grads(ours, [x, t], mode="random")
    theirs64 = nn.CrossEntropyLoss(**{k: as64(v) for k, v in kw.items()})
    ref, _, (rg,) = grads(theirs64, [x.double(), t], None if go is None else go.double())
    assert_close_dtype(out, ref, torch.float32, "module loss")
    assert_close_dtype(g, rg, torch.float32, "module grad")


def test_positional_weight_and_kdim(device):
    w = make_weight(5, device)
    x, t = make_inputs((2, 5, 3), torch.float32, device, ignore_frac=0.3)
    out = fastce.CrossEntropyLoss(w)(x, t)
    assert_close_dtype(out, nn.CrossEntropyLoss(w.double())(x.double(), t), torch.float32, "positional weight")
    q = make_probs((2, 5, 3), torch.float32, device)
    out = fastce.CrossEntropyLoss(w, label_smoothing=0.2)(x, q)
    assert_close_dtype(out, nn.CrossEntropyLoss(w.double(), label_smoothing=0.2)(x.double(), q.double()),
                       torch.float32, "probability targets")


def test_module_runs_kernels(device):
    x, t = make_inputs((6, 9), torch.float32, device)
    with count_kernel_launches() as launched:
        fastce.CrossEntropyLoss()(x, t)
        fastce.FocalLoss()(x, t)
    assert len(launched) >= 2


@pytest.mark.parametrize("weight", [False, True])
def test_state_dict_keys_match(weight):
    w = make_weight(4) if weight else None
    ours, theirs = fastce.CrossEntropyLoss(weight=w), nn.CrossEntropyLoss(weight=w)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)


@pytest.mark.parametrize("direction", ["nn_to_fastce", "fastce_to_nn"])
def test_state_dict_with_weight_interchangeable(device, direction):
    C = 6
    w_src, w_dst = make_weight(C, device), make_weight(C, device)
    if direction == "nn_to_fastce":
        src, dst = nn.CrossEntropyLoss(weight=w_src), fastce.CrossEntropyLoss(weight=w_dst)
    else:
        src, dst = fastce.CrossEntropyLoss(weight=w_src), nn.CrossEntropyLoss(weight=w_dst)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))  # strict
    assert torch.equal(dst.weight, w_src)
    x, t = make_inputs((20, C), torch.float32, device, ignore_frac=0.2)
    expect = nn.CrossEntropyLoss(weight=w_src.double())(x.double(), t)
    assert_close_dtype(dst(x, t), expect, torch.float32, "after load")
    assert_close_dtype(src(x, t), expect, torch.float32, "source")


@pytest.mark.parametrize("direction", ["nn_to_fastce", "fastce_to_nn"])
def test_state_dict_without_weight_interchangeable(direction):
    if direction == "nn_to_fastce":
        src, dst = nn.CrossEntropyLoss(), fastce.CrossEntropyLoss()
    else:
        src, dst = fastce.CrossEntropyLoss(), nn.CrossEntropyLoss()
    result = dst.load_state_dict(src.state_dict())  # strict: no missing / unexpected keys
    assert not result.missing_keys and not result.unexpected_keys


def test_weight_is_a_buffer_that_follows_dtype():
    w = make_weight(5)
    ours, theirs = fastce.CrossEntropyLoss(weight=w).double(), nn.CrossEntropyLoss(weight=w).double()
    assert ours.weight.dtype == theirs.weight.dtype == torch.float64
    assert "weight" in dict(ours.named_buffers())


def test_module_in_a_model(device):
    """Inside nn.Sequential-style training code, gradients reach the parameters."""
    torch.manual_seed(0)
    model = nn.Linear(8, 5).to(device)
    x, t = make_inputs((16, 8), torch.float32, device)
    t = t % 5
    loss = fastce.CrossEntropyLoss(label_smoothing=0.1)(model(x), t)
    loss.backward()
    ref_model = nn.Linear(8, 5).to(device).double()
    ref_model.load_state_dict(model.state_dict())
    ref = nn.CrossEntropyLoss(label_smoothing=0.1)(ref_model(x.double()), t)
    ref.backward()
    assert_close_dtype(loss.detach(), ref.detach(), torch.float32, "loss")
    assert_close_dtype(model.weight.grad, ref_model.weight.grad, torch.float32, "weight grad")
    assert_close_dtype(model.bias.grad, ref_model.bias.grad, torch.float32, "bias grad")


@pytest.mark.parametrize("z_loss,softcap", [(0.05, None), (0.0, 4.0), (0.01, 2.5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_zloss_softcap(device, z_loss, softcap, reduction):
    w = make_weight(10, device)
    x, t = make_inputs((14, 10), torch.float32, device, ignore_frac=0.2, scale=4.0)
    m = fastce.CrossEntropyLoss(weight=w, reduction=reduction, label_smoothing=0.1,
                                z_loss=z_loss, softcap=softcap)

    def ref(a, b):
        return reference.cross_entropy(a, b, weight=w.double(), reduction=reduction,
                                       label_smoothing=0.1, z_loss=z_loss, softcap=softcap)

    check_loss_and_grad(m, ref, [x, t], torch.float32, "random", "module z/softcap")


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.3, "tensor"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_module(device, gamma, alpha, reduction):
    C = 7
    if alpha == "tensor":
        alpha = make_weight(C, device)
    x, t = make_inputs((18, C), torch.float32, device, ignore_frac=0.2, ignore_index=-1)
    m = fastce.FocalLoss(gamma=gamma, alpha=alpha, ignore_index=-1, reduction=reduction,
                         label_smoothing=0.05)
    a64 = as64(alpha)

    def ref(a, b):
        return reference.focal_loss(a, b, gamma=gamma, alpha=a64, ignore_index=-1,
                                    reduction=reduction, label_smoothing=0.05)

    check_loss_and_grad(m, ref, [x, t], torch.float32, "random", "FocalLoss")


def test_focal_module_defaults(device):
    """FocalLoss() means gamma=2, alpha=None, mean over non-ignored rows."""
    x, t = make_inputs((10, 4), torch.float32, device, ignore_frac=0.3)
    assert_close_dtype(fastce.FocalLoss()(x, t), reference.focal_loss(x.double(), t, gamma=2.0),
                       torch.float32, "FocalLoss defaults")

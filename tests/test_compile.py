"""torch.compile(fullgraph=True): fastce traces without a graph break and matches eager.

aot_eager exercises what matters here (dynamo tracing, fake tensors through the custom ops'
fake implementations, functionalization of the in-place ops, AOT autograd); one test also runs
inductor end to end.
"""
import pytest
import torch

import fastce
from fastce import reference


def _compiled_matches_eager(fn, x, target, grad_output, backend="aot_eager"):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    loss_eager = fn(x_eager, target)
    loss_compiled = compiled(x_compiled, target)
    loss_eager.backward(grad_output)
    loss_compiled.backward(grad_output)
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("validate", [True, False])
def test_cross_entropy_compiles_without_graph_break(reduction, validate):
    torch._dynamo.reset()
    x = torch.randn(9, 37)
    target = torch.randint(0, 37, (9,))
    target[2] = -100
    weight = torch.rand(37)

    def loss_fn(logits, t):
        return fastce.cross_entropy(logits, t, weight, reduction=reduction, label_smoothing=0.1,
                                    z_loss=1e-3, softcap=20.0, validate=validate)

    grad_output = torch.rand(9) if reduction == "none" else torch.rand(())
    _compiled_matches_eager(loss_fn, x, target, grad_output)
    x_ref = x.double().requires_grad_()
    expected = reference.cross_entropy(x_ref, target, weight.double(), reduction=reduction,
                                       label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    torch.testing.assert_close(torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, target).double(),
                               expected.detach(), atol=1e-5, rtol=1e-5)


def test_focal_loss_compiles_without_graph_break():
    torch._dynamo.reset()
    x = torch.randn(6, 11)
    target = torch.randint(0, 11, (6,))
    _compiled_matches_eager(lambda logits, t: fastce.focal_loss(logits, t, gamma=2.0, alpha=0.25), x, target,
                            torch.rand(()))


def test_inplace_backward_compiles():
    torch._dynamo.reset()
    leaf = torch.randn(5, 13, requires_grad=True)
    target = torch.randint(0, 13, (5,))

    def step(h, t):
        return fastce.cross_entropy(h * 2.0, t, inplace_backward=True)

    torch.compile(step, fullgraph=True, backend="aot_eager")(leaf, target).backward()
    leaf_ref = leaf.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(leaf_ref * 2.0, target).backward()
    torch.testing.assert_close(leaf.grad.double(), leaf_ref.grad, atol=1e-6, rtol=1e-5)


def test_module_compiles_with_inductor():
    torch._dynamo.reset()
    criterion = fastce.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(8, 50)
    target = torch.randint(0, 50, (8,))
    _compiled_matches_eager(lambda logits, t: criterion(logits, t), x, target, torch.tensor(1.0),
                            backend="inductor")


def test_device_side_validation_compiles_without_a_host_sync(monkeypatch):
    # validate=True with CUDA tensors asserts on the device: fullgraph, no sync, still checking
    from fastce.profiling import measure
    monkeypatch.setattr(fastce.functional, "validation_mode", lambda validate, device: "device")
    torch._dynamo.reset()
    compiled = torch.compile(lambda logits, t: fastce.cross_entropy(logits, t), fullgraph=True, backend="aot_eager")
    x = torch.randn(7, 10, requires_grad=True)
    target = torch.randint(0, 10, (7,))
    compiled(x, target).backward()
    with measure() as m:
        loss = compiled(x, target)
        loss.backward()
    assert m.syncs == 0, m.report()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, target))
    target[3] = 10
    with pytest.raises(RuntimeError, match="outside"):
        compiled(x, target)

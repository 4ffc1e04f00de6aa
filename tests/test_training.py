"""The seeds' own examples: training with fastce gives the same loss curve as with
nn.CrossEntropyLoss (same init, same data, same optimiser), step by step."""
import pytest
import torch
import torch.nn as nn

import fastce

# Per-step agreement of two fp32 training runs that differ only in the loss's rounding.
CURVE_RTOL, CURVE_ATOL = 2e-4, 1e-5


def _train(make_model, make_opt, loss_fn, batches, device):
    torch.manual_seed(1234)  # same init for both runs
    model = make_model().to(device)
    opt = make_opt(model.parameters())
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model


def _compare_runs(make_model, make_opt, batches, device, **loss_kw):
    ref_curve, ref_model = _train(make_model, make_opt, nn.CrossEntropyLoss(**loss_kw), batches, device)
    our_curve, our_model = _train(make_model, make_opt, fastce.CrossEntropyLoss(**loss_kw), batches, device)
    assert torch.isfinite(our_curve).all()
    torch.testing.assert_close(our_curve, ref_curve, rtol=CURVE_RTOL, atol=CURVE_ATOL)
    for (name, p), q in zip(our_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    return our_curve


def _blobs(n, dim, classes, device, generator):
    centers = torch.randn(classes, dim, generator=generator) * 2
    y = torch.randint(0, classes, (n,), generator=generator)
    x = centers[y] + torch.randn(n, dim, generator=generator)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("loss_kw", [dict(), dict(label_smoothing=0.1, weight="w")],
                         ids=["default", "smoothing_weight"])
def test_small_classifier_adam(device, loss_kw):
    """Linear 10->64->3 with Adam for 100 steps."""
    g = torch.Generator().manual_seed(7)
    x, y = _blobs(256, 10, 3, device, g)
    batches = [(x[i % 8 * 32:(i % 8 + 1) * 32], y[i % 8 * 32:(i % 8 + 1) * 32]) for i in range(100)]
    loss_kw = dict(loss_kw)
    if loss_kw.get("weight") == "w":
        loss_kw["weight"] = torch.tensor([0.5, 1.0, 2.0], device=device)

    def make_model():
        return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))

    curve = _compare_runs(make_model, lambda p: torch.optim.Adam(p, lr=1e-2), batches, device, **loss_kw)
    assert curve[-10:].mean() < 0.5 * curve[:3].mean(), "the classifier did not learn"


def test_mnist_style_mlp_sgd(device):
    """784->200->200->10 MLP, SGD, on synthetic MNIST-shaped data (nothing is downloaded)."""
    g = torch.Generator().manual_seed(11)
    n, steps, bs = 20 * 32, 20, 32
    # ten sparse "digit" templates plus pixel noise, in [0, 1] like MNIST
    templates = (torch.rand(10, 784, generator=g) < 0.2).float()
    labels = torch.randint(0, 10, (n,), generator=g)
    images = (templates[labels] * 0.8 + torch.rand(n, 784, generator=g) * 0.4).clamp(0, 1)
    images, labels = images.to(device), labels.to(device)
    batches = [(images[i * bs:(i + 1) * bs], labels[i * bs:(i + 1) * bs]) for i in range(steps)]

    def make_model():
        return nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                             nn.Linear(200, 10))

    curve = _compare_runs(make_model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), batches, device)
    assert curve[-3:].mean() < 0.5 * curve[:3].mean(), "the MLP did not learn"

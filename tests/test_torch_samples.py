"""torch's own test inputs, with torch's answers as the oracle: the OpInfo samples of
nn.functional.cross_entropy and nn.functional.nll_loss (run as cross-entropy on the same inputs:
nll_loss of log_softmax is cross_entropy), and the ModuleInfo samples of nn.CrossEntropyLoss,
from torch.testing._internal, in every dtype, on the kernels and on the pure-PyTorch path.

The oracle is torch itself in float64 on the very same (already rounded) inputs, so the
tolerance is fastce's per-dtype table; gradients are compared for a random upstream gradient.
"""
import pytest
import torch
import torch.nn.functional as F

import fastce

from _support import DTYPES, as64, assert_close_dtype, random_grad_output

# torch.testing._internal imports expecttest: the "test" extra installs it.
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db


def _class_dim(x):
    return 0 if x.dim() == 1 else 1


def _check(path, ours_fn, torch_fn, x, target, what):
    """ours_fn(x, target) against torch: the loss's dtype as torch's in the sample's dtype, the
    values against torch_fn on float64 copies (torch_fn(x, target, cast) casts its own tensor
    arguments), loss and input gradient. The pure-PyTorch path computes what torch computes:
    where torch's own error in the sample's dtype exceeds the table (log p of a confident row
    in fp32), it may have twice that."""
    x, target = x.detach().clone().requires_grad_(), target.detach()
    x64 = as64(x).requires_grad_()
    out, theirs = ours_fn(x, target), torch_fn(x, target, lambda t: t)
    expected = torch_fn(x64, as64(target), as64)
    assert out.dtype == theirs.dtype, what
    grad_output = random_grad_output(out)
    (grad,) = torch.autograd.grad(out, x, grad_output)
    (their_grad,) = torch.autograd.grad(theirs, x, grad_output)
    (expected_grad,) = torch.autograd.grad(expected, x64, grad_output.double())
    loss_slack = grad_slack = None
    if path == "reference":
        loss_slack = 2 * (theirs.double() - expected).abs()
        grad_slack = 2 * (their_grad.double() - expected_grad).abs()
    assert_close_dtype(out, expected, out.dtype, f"{what} loss", slack=loss_slack)
    assert_close_dtype(grad, expected_grad, x.dtype, f"{what} gradient", slack=grad_slack)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op_name", ["nn.functional.cross_entropy", "nn.functional.nll_loss"])
def test_opinfo_samples(device, path, op_name, dtype):
    (op,) = [o for o in op_db if o.name == op_name]
    samples = list(op.sample_inputs(device, dtype, requires_grad=True))
    assert samples
    for sample in samples:
        (target,) = sample.args
        kwargs = sample.kwargs

        def torch_fn(x, t, cast):
            kw = {k: cast(v) for k, v in kwargs.items()}
            if op_name == "nn.functional.nll_loss":
                return F.nll_loss(F.log_softmax(x, _class_dim(x)), t, **kw)
            return F.cross_entropy(x, t, **kw)

        _check(path, lambda x, t: fastce.cross_entropy(x, t, **kwargs), torch_fn, sample.input, target,
               f"{op_name} {tuple(sample.input.shape)} {sample.kwargs}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_info_samples(device, path, dtype):
    (info,) = [m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss]
    inputs = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=True)
    assert inputs
    for module_input in inputs:
        ctor, forward = module_input.constructor_input, module_input.forward_input
        ours = fastce.CrossEntropyLoss(*ctor.args, **ctor.kwargs)

        def torch_fn(x, t, cast):
            module = torch.nn.CrossEntropyLoss(*map(cast, ctor.args), **{k: cast(v) for k, v in ctor.kwargs.items()})
            return module(x, t)

        x, target = forward.args
        _check(path, ours, torch_fn, x, target, f"nn.CrossEntropyLoss {module_input.desc}")

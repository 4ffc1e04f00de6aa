"""The implementations compared, each imported only when first used.

A provider maps an operation to a factory: ``factory(case)`` returns ``loss(inputs)``, a
function of the tensors made by ``cases.make_inputs``. A provider that cannot be imported
raises ``NotRun`` from ``load()``; one that lacks an operation or a reduction raises it from
``loss_fn()``. Either way the suite prints the note instead of a number.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Tuple

import torch

from .cases import BINARY_OPS, DISTILLATION_BETA, OPS, Case

LossFn = Callable[[Dict[str, torch.Tensor]], torch.Tensor]
Factory = Callable[[Case], LossFn]


class NotRun(Exception):
    """A provider or an operation that cannot run here; the message says why."""


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    load_ops: Callable[[], Dict[str, Factory]] = field(repr=False)
    # Operations whose memory traffic the CPU mode cannot count, and why (the others run as
    # Triton kernels on the interpreter, or as aten operators, which fastce.profiling sees).
    cpu_blind_ops: Tuple[str, ...] = ()
    cpu_blind_reason: str = ""

    def load(self) -> Dict[str, Factory]:
        """The operations it has; raises NotRun (every time) when it cannot be imported."""
        if self.name not in _LOADED:
            try:
                _LOADED[self.name] = self.load_ops()
            except NotRun as note:
                _LOADED[self.name] = note
        if isinstance(_LOADED[self.name], NotRun):
            raise _LOADED[self.name]
        return _LOADED[self.name]

    def loss_fn(self, case: Case, on_gpu: bool) -> LossFn:
        ops = self.load()
        if case.op not in ops:
            raise NotRun(f"{self.name} has no {case.op}")
        if not on_gpu and case.op in self.cpu_blind_ops:
            raise NotRun(f"not measured on CPU: {self.cpu_blind_reason}")
        return ops[case.op](case)


_LOADED: Dict[str, object] = {}  # provider name -> its operations, or the NotRun it raised


def _require(module: str, install: str):
    """Import ``module`` or say how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as error:  # a broken install is as unusable as a missing one
        raise NotRun(f"cannot import {module} ({type(error).__name__}: {error}); "
                     f"install with: {install}") from None


def _on_logits(call):
    """Factory for a loss called as ``call(logits, target, reduction=...)``."""
    return lambda case: lambda x: call(x["logits"], x["target"], reduction=case.reduction)


def _module_on_logits(module_class):
    """Factory for an nn.Module loss built as ``module_class(reduction=...)``, called on
    (logits, target); built once per case, outside what is measured."""
    def build(case):
        module = module_class(reduction=case.reduction)
        return lambda x: module(x["logits"], x["target"])
    return build


def _on_hidden(call):
    """Factory for a linear loss called as ``call(hidden, weight, target, reduction=...)``."""
    return lambda case: lambda x: call(x["hidden"], x["weight"], x["target"], reduction=case.reduction)


# ---- fastce and PyTorch ------------------------------------------------------------------------

def _fastce_ops():
    fastce = _require("fastce", "pip install -e .")
    ops = {op: adapt(getattr(fastce, op)) for op, adapt in
           (("cross_entropy", _on_logits), ("focal_loss", _on_logits),
            ("linear_cross_entropy", _on_hidden)) if hasattr(fastce, op)}
    ops.update({op: _on_logits(getattr(fastce, op)) for op in BINARY_OPS if hasattr(fastce, op)})
    if not ops:
        raise NotRun("fastce exports no loss yet (fastce.cross_entropy is missing)")
    if hasattr(fastce, "token_logprobs"):
        ops.update(_token_ops(fastce))
    if hasattr(fastce, "distillation_loss"):
        ops.update(_distillation_ops(fastce.distillation_loss, fastce.linear_distillation_loss))
    return ops


def _reference_ops():
    """fastce.reference: the tests' float64-capable oracle (log-softmax in the input's precision,
    every option as plain torch ops), shown for what it costs, not as what PyTorch users run."""
    from fastce import reference
    return {"cross_entropy": _on_logits(reference.cross_entropy),
            "focal_loss": _on_logits(reference.focal_loss),
            "linear_cross_entropy": _on_hidden(reference.linear_cross_entropy),
            **{op: _on_logits(getattr(reference, op)) for op in BINARY_OPS},
            **_token_ops(reference),
            **_distillation_ops(reference.distillation_loss, reference.linear_distillation_loss)}


def _torch_compile_ops():
    """torch.compile of what a user would write: F.cross_entropy, F.linear then F.cross_entropy,
    F.binary_cross_entropy_with_logits, F.soft_margin_loss, (torch has no focal loss) the
    reference's focal losses, and for the token operations a log-softmax in fp32, its gather and
    the entropy."""
    import torch.nn.functional as F

    def compiled(factory):
        def build(case):
            torch.compiler.reset()  # a fresh cache per case: never fall back to eager silently
            return torch.compile(factory(case), dynamic=False)
        return build

    def linear_then_cross_entropy(input, weight, target, reduction):
        return F.cross_entropy(F.linear(input, weight), target, reduction=reduction)

    factories = {"cross_entropy": _on_logits(F.cross_entropy),
                 "focal_loss": _reference_ops()["focal_loss"],
                 "linear_cross_entropy": _on_hidden(linear_then_cross_entropy),
                 "binary_cross_entropy_with_logits": _on_logits(F.binary_cross_entropy_with_logits),
                 "soft_margin_loss": _on_logits(F.soft_margin_loss),
                 "sigmoid_focal_loss": _reference_ops()["sigmoid_focal_loss"],
                 "token_logprobs": _token_stats_on_logits(_log_softmax_gather),
                 "policy_gradient_loss": _token_stats_on_logits(_log_softmax_gather),
                 "linear_token_logprobs": _token_logprob_on_hidden(
                     lambda hidden, weight, target: _log_softmax_gather(hidden @ weight.t(), target)[0]),
                 **_trl_distillation_ops()}
    return {op: compiled(factory) for op, factory in factories.items()}


def _torch_native_ops():
    import torch.nn.functional as F
    ops = {"cross_entropy": _on_logits(F.cross_entropy),
           "binary_cross_entropy_with_logits": _on_logits(F.binary_cross_entropy_with_logits),
           "soft_margin_loss": _on_logits(F.soft_margin_loss)}
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        chunked = torch.nn.LinearCrossEntropyOptions()  # the chunked path, not the reference one
        ops["linear_cross_entropy"] = _on_hidden(functools.partial(F.linear_cross_entropy, options=chunked))
    ops.update(_trainer_token_ops())
    ops.update(_trl_distillation_ops())
    return ops


# ---- token statistics for RL (cases.TOKEN_OPS) ---------------------------------------------------
# token_logprobs: from logits, the per-token loss −(A·log p_y + ENTROPY_BONUS·H) (policy gradient with
# an entropy bonus). linear_token_logprobs: from hidden states, −A·log p_y alone, the loss Liger's
# fused linear GRPO computes too (it returns no entropy). policy_gradient_loss: token_logprobs' loss,
# which fastce (and its reference) compute in one call. 'mean' averages over tokens.

ENTROPY_BONUS = 0.01


def _policy_gradient_loss(logprob, entropy, advantage, reduction):
    per_token = -advantage.to(logprob.dtype) * logprob
    if entropy is not None:
        per_token = per_token - ENTROPY_BONUS * entropy
    return per_token.mean() if reduction == "mean" else per_token


def _token_stats_on_logits(stats):
    """Factory for token_logprobs given ``stats(logits, target) -> (logprob, entropy)``."""
    return lambda case: lambda x: _policy_gradient_loss(*stats(x["logits"], x["target"]), x["advantage"],
                                                        case.reduction)


def _token_logprob_on_hidden(logprob):
    """Factory for linear_token_logprobs given ``logprob(hidden, weight, target)``."""
    return lambda case: lambda x: _policy_gradient_loss(logprob(x["hidden"], x["weight"], x["target"]), None,
                                                        x["advantage"], case.reduction)


def _token_ops(module):
    """fastce's or fastce.reference's token_logprobs / linear_token_logprobs / policy_gradient_loss as
    the three operations."""
    def policy_gradient_loss(case):
        return lambda x: module.policy_gradient_loss(x["logits"], x["target"], x["advantage"],
                                                     entropy_coef=ENTROPY_BONUS, reduction=case.reduction)

    return {"token_logprobs": _token_stats_on_logits(
                functools.partial(module.token_logprobs, return_entropy=True)),
            "linear_token_logprobs": _token_logprob_on_hidden(module.linear_token_logprobs),
            "policy_gradient_loss": policy_gradient_loss}


def _log_softmax_gather(logits, target):
    """(log p_y, entropy) as a user would write them: one fp32 log-softmax of the whole logits."""
    log_p = torch.log_softmax(logits.float(), -1)
    return log_p.gather(-1, target[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def _selective_log_softmax(logits, target, sequence):
    """log softmax(logits)[target] as TRL's selective_log_softmax computes it, a sequence at a time to
    bound the temporaries: logsumexp and a gather in fp32/fp64, a log_softmax in bf16/fp16 (whose
    logsumexp would round)."""
    rows = zip(logits.split(sequence), target.split(sequence))
    if logits.dtype in (torch.float32, torch.float64):
        return torch.cat([row.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(row, -1) for row, t in rows])
    return torch.cat([row.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1) for row, t in rows])


def _chunked_entropy(logits, chunk_rows=128):
    """−Σ p log p per row in chunks of rows, as TRL's entropy_from_logits and verl's chunked entropy."""
    entropies = []
    for chunk in logits.split(chunk_rows):
        log_p = chunk.log_softmax(-1)
        entropies.append(-(log_p.exp() * log_p).sum(-1))
    return torch.cat(entropies)


def _trainer_token_ops():
    """The token operations as RL trainers compute them today (the `torch` provider's)."""
    from .cases import sequence_tokens

    def on_logits(logits, target):
        return _selective_log_softmax(logits, target, sequence_tokens(len(target))), _chunked_entropy(logits)

    def on_hidden(hidden, weight, target):
        return _selective_log_softmax(hidden @ weight.t(), target, sequence_tokens(len(target)))

    return {"token_logprobs": _token_stats_on_logits(on_logits),
            "linear_token_logprobs": _token_logprob_on_hidden(on_hidden),
            "policy_gradient_loss": _token_stats_on_logits(on_logits)}


# ---- distillation (cases.DISTILLATION_OPS) -----------------------------------------------------------


def _distillation_reduction(case: Case) -> str:
    return "batchmean" if case.reduction == "mean" else case.reduction


def _distillation_ops(on_logits, on_hidden):
    """The two distillation operations from a logits-form and a two-head-form function with fastce's
    signatures (fastce's, fastce.reference's)."""
    def logits(case):
        return lambda x: on_logits(x["logits"], x["teacher_logits"], x["target"], beta=DISTILLATION_BETA,
                                   reduction=_distillation_reduction(case))

    def hidden(case):
        return lambda x: on_hidden(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["target"],
                                   beta=DISTILLATION_BETA, reduction=_distillation_reduction(case))
    return {"distillation_loss": logits, "linear_distillation_loss": hidden}


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, reduction):
    """TRL's GKDTrainer.generalized_jsd_loss as its trainers call it (written here from its documented
    formula): log-softmaxes in the logits' dtype, the mixture as a logsumexp of the stacked
    log-probabilities, F.kl_div per element, the ignored tokens masked out; 'batchmean' over the kept
    tokens, 'none' per token."""
    import math

    import torch.nn.functional as F
    student = F.log_softmax(student_logits, dim=-1)
    teacher = F.log_softmax(teacher_logits, dim=-1)
    mixture = torch.logsumexp(torch.stack([student + math.log(1 - beta), teacher + math.log(beta)]), dim=0)
    elements = beta * F.kl_div(mixture, teacher, reduction="none", log_target=True) + \
        (1 - beta) * F.kl_div(mixture, student, reduction="none", log_target=True)
    kept = labels != -100
    if reduction == "none":  # per token, 0 where ignored (TRL's own 'none' returns the kept elements)
        return elements.sum(-1) * kept
    return elements[kept].sum() / kept.sum()  # TRL's boolean mask: a host sync


def _trl_distillation_ops():
    """TRL's unfused formula on the logits, and after F.linear of both heads (the `torch` provider's)."""
    def logits(case):
        return lambda x: _trl_generalized_jsd(x["logits"], x["teacher_logits"], x["target"], DISTILLATION_BETA,
                                              _distillation_reduction(case))

    def hidden(case):
        return lambda x: _trl_generalized_jsd(x["hidden"] @ x["weight"].t(), x["teacher_hidden"] @ x["teacher_weight"].t(),
                                              x["target"], DISTILLATION_BETA, _distillation_reduction(case))
    return {"distillation_loss": logits, "linear_distillation_loss": hidden}


# ---- peers -------------------------------------------------------------------------------------

# Liger-Kernel 0.8.5's device tests that choose its CUDA code path, and what makes each true
_LIGER_CUDA_TESTS = {
    "_can_use_mm_out": (('_input.device.type != "cuda"', "False"),),
    "fused_linear_cross_entropy_forward": (('grad_weight.device.type == "cuda"', "True"),
                                           ("torch.cuda.get_device_capability(grad_weight.device)[0] >= 8",
                                            "True")),
}


@functools.lru_cache(maxsize=None)
def _liger_cuda_functions() -> Dict[str, Callable]:
    """Liger's functions recompiled once from their own source with the device tests made true
    (their globals stay the module's). A Liger release whose source no longer holds these tests
    fails here, not silently."""
    import inspect

    import liger_kernel.ops.fused_linear_cross_entropy as module
    rewritten: Dict[str, Callable] = {}
    for name, tests in _LIGER_CUDA_TESTS.items():
        source = inspect.getsource(getattr(module, name))
        for test, forced in tests:
            if test not in source:
                raise RuntimeError(f"liger-kernel's {name} no longer tests `{test}`: update "
                                   "bench.providers' _LIGER_CUDA_TESTS")
            source = source.replace(test, forced)
        exec(compile(source, module.__file__, "exec"), module.__dict__, rewritten)
    return rewritten


@contextlib.contextmanager
def liger_cuda_branches() -> Iterator[None]:
    """Liger's linear cross-entropy takes its CUDA branches on CPU tensors: its functions are
    swapped for the rewritten ones (_liger_cuda_functions), then restored."""
    import liger_kernel.ops.fused_linear_cross_entropy as module
    rewritten = _liger_cuda_functions()
    saved = {name: getattr(module, name) for name in rewritten}
    try:
        for name, function in rewritten.items():
            setattr(module, name, function)
        yield
    finally:
        for name, function in saved.items():
            setattr(module, name, function)


def _liger_ops():
    liger = _require("liger_kernel.transformers", "pip install liger-kernel")

    def linear_cross_entropy(case):
        module = liger.LigerFusedLinearCrossEntropyLoss(reduction=case.reduction)

        def loss(x):  # on CPU tensors, through the CUDA branches GPU users run
            on_cpu = x["hidden"].device.type == "cpu"
            with liger_cuda_branches() if on_cpu else contextlib.nullcontext():
                return module(x["weight"], x["hidden"], x["target"])  # weight comes first
        return loss

    def linear_token_logprobs(case):
        # on-policy CISPO with a clip above 1 is the plain policy gradient: −Σ A·log p_y over the mask's
        # tokens, divided by their count (the importance ratio is exactly 1, its clip inactive)
        if case.reduction == "none":
            raise NotRun("Liger's fused linear GRPO returns the batch's loss only (no reduction='none')")
        from .cases import sequence_tokens
        chunked = _require("liger_kernel.chunked_loss", "pip install liger-kernel")
        grpo = chunked.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="cispo", epsilon_high=5.0,
                                                compiled=False)

        def loss(x):
            sequences = x["target"].view(-1, sequence_tokens(len(x["target"])))
            return grpo(x["hidden"].view(*sequences.shape, -1), x["weight"], sequences,
                        torch.ones_like(sequences), x["advantage"].view(sequences.shape)[:, 0])[0]
        return loss

    def distillation_loss(case):
        # Liger's JSD kernel takes both models' log-probabilities (a log-softmax of each first, in fp32)
        if case.reduction == "none":
            raise NotRun("Liger's JSD returns the batch's loss only (no reduction='none')")
        jsd = liger.LigerJSD(beta=DISTILLATION_BETA)
        return lambda x: jsd(torch.log_softmax(x["logits"].float(), -1), torch.log_softmax(x["teacher_logits"].float(), -1),
                             x["target"])

    def linear_distillation_loss(case):
        # Liger's fused linear JSD (chunked PyTorch, run with compiled=False), the soft loss alone
        if case.reduction == "none":
            raise NotRun("Liger's fused linear JSD returns the batch's loss only (no reduction='none')")
        chunked = _require("liger_kernel.chunked_loss", "pip install liger-kernel")
        jsd = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=DISTILLATION_BETA,
                                              compiled=False)
        return lambda x: jsd(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["target"])

    return {"cross_entropy": _module_on_logits(liger.LigerCrossEntropyLoss),
            "linear_cross_entropy": linear_cross_entropy, "linear_token_logprobs": linear_token_logprobs,
            "distillation_loss": distillation_loss, "linear_distillation_loss": linear_distillation_loss}


def _flash_attn_ops():
    losses = _require("flash_attn.losses.cross_entropy", "pip install flash-attn (needs CUDA)")
    return {"cross_entropy": _module_on_logits(losses.CrossEntropyLoss)}


def _cut_cross_entropy_ops():
    cce = _require("cut_cross_entropy", "pip install cut-cross-entropy")
    # impl="cce" is the Triton kernel (on macOS the package defaults to torch.compile). Its other
    # defaults fit the cases: ignore_index=-100, shift=False (target i belongs to row i), reduction
    # "mean" / "none" with torch's meaning; filter_eps="high" (part of CCE) skips the gradient
    # blocks whose entries are all below the input dtype's eps / 32.
    cce_loss = _on_hidden(functools.partial(cce.linear_cross_entropy, impl="cce"))

    def linear_cross_entropy(case):
        if case.needs_grad and case.dtype == "fp32":
            raise NotRun("Cut Cross-Entropy's backward takes bf16 or fp16 hidden states only")
        return cce_loss(case)

    return {"linear_cross_entropy": linear_cross_entropy}


def _torchvision_ops():
    vision_ops = _require("torchvision.ops", "pip install torchvision (the build matching your torch)")
    return {"sigmoid_focal_loss": _on_logits(vision_ops.sigmoid_focal_loss)}


def _quack_ops():
    quack_ce = _require("quack.cross_entropy", "pip install quack-kernels (needs CUDA)")
    quack_lce = _require("quack.linear_cross_entropy", "pip install quack-kernels (needs CUDA)")
    chunked = _on_hidden(quack_lce.chunked_linear_cross_entropy)

    def linear_cross_entropy(case):
        if case.reduction == "none":
            raise NotRun("QuACK's linear cross-entropy has no reduction='none'")
        return chunked(case)

    return {"cross_entropy": _on_logits(quack_ce.cross_entropy), "linear_cross_entropy": linear_cross_entropy}


PROVIDERS = {p.name: p for p in (
    Provider("fastce", "fastce (Triton kernels)", _fastce_ops),
    Provider("torch", "PyTorch eager: torch.nn.functional.cross_entropy / linear_cross_entropy (chunked) / "
             "binary_cross_entropy_with_logits / soft_margin_loss; the token operations as RL trainers compute "
             "them (TRL's selective_log_softmax, a sequence at a time, and entropy_from_logits, 128-row chunks); "
             "distillation as TRL's generalized_jsd_loss computes it (unfused, in the logits' dtype)",
             _torch_native_ops),
    Provider("torch.compile", "torch.compile of F.cross_entropy, of F.linear + F.cross_entropy, of "
             "F.binary_cross_entropy_with_logits and F.soft_margin_loss, of the reference's focal losses "
             "(torch has none), and of an fp32 log_softmax with its gather and entropy (token operations)",
             _torch_compile_ops,
             cpu_blind_ops=OPS, cpu_blind_reason="compiled kernels are invisible to the byte counter"),
    Provider("liger", "Liger-Kernel LigerCrossEntropyLoss / LigerFusedLinearCrossEntropyLoss (on CPU "
             "tensors through its CUDA branches: bench.providers.liger_cuda_branches) / "
             "LigerFusedLinearGRPOLoss (pure PyTorch, run with compiled=False: only its per-token loss "
             "arithmetic would be compiled) / LigerJSD (on fp32 log-softmaxes) / LigerFusedLinearJSDLoss "
             "(compiled=False)", _liger_ops),
    Provider("flash-attn", "flash-attention's Triton cross-entropy", _flash_attn_ops),
    Provider("cut-cross-entropy", "Cut Cross-Entropy (Apple), linear cross-entropy", _cut_cross_entropy_ops,
             cpu_blind_ops=("linear_cross_entropy",),
             cpu_blind_reason="the Triton interpreter cannot run its kernels: the log-sum-exp forward "
                              "calls triton.language.extra.libdevice.log1p, which the interpreter lacks "
                              "(and it would multiply bf16 tiles as their raw uint16 bits)"),
    Provider("torchvision", "torchvision.ops.sigmoid_focal_loss (detection's focal loss)", _torchvision_ops),
    Provider("quack", "QuACK (CuTe DSL) cross-entropy and chunked linear cross-entropy", _quack_ops,
             cpu_blind_ops=OPS, cpu_blind_reason="CuTe DSL kernels need an NVIDIA GPU"),
    Provider("fastce-reference", "fastce.reference: the float64-capable pure-PyTorch oracle of the tests "
             "(every option as plain torch ops; not what PyTorch users run: see `torch`)", _reference_ops),
)}

"""What is measured: operations, passes, shapes and dtypes, and the inputs of one case."""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

OPS = ("cross_entropy", "focal_loss", "linear_cross_entropy")
# The binary (sigmoid) losses: logits (N, C) with a target of the same shape and dtype (multi-label
# or detection labels, ±1 for soft margin); "tokens" are the rows N and "vocab" the classes C.
BINARY_OPS = ("binary_cross_entropy_with_logits", "soft_margin_loss", "sigmoid_focal_loss")
OPS = OPS + BINARY_OPS
LINEAR_OPS = ("linear_cross_entropy", "linear_token_logprobs")  # from hidden states (N, H) and a weight (V, H)
# Per-token statistics for RL: a policy-gradient loss on each token's log-probability (and entropy),
# with one advantage per sequence of SEQUENCE_TOKENS tokens (GRPO's), as bench/providers.py defines it;
# policy_gradient_loss is the same loss as token_logprobs', which fastce computes in one fused call.
TOKEN_OPS = ("token_logprobs", "linear_token_logprobs", "policy_gradient_loss")
SEQUENCE_TOKENS = 256
OPS = OPS + TOKEN_OPS
# Distillation (DESIGN §7.5): a student's logits against a teacher's (the teacher gets no gradient), or both
# models' hidden states and heads; β = DISTILLATION_BETA (the symmetric JSD, where every library's β means
# the same), reduction 'mean' is TRL's 'batchmean' (over the tokens).
DISTILLATION_OPS = ("distillation_loss", "linear_distillation_loss")
DISTILLATION_BETA = 0.5
OPS = OPS + DISTILLATION_OPS
LINEAR_OPS = LINEAR_OPS + ("linear_distillation_loss",)
PASSES = ("forward", "backward", "forward+backward")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REDUCTIONS = ("mean", "none")

# Shapes that users have: vocabularies of common tokenizers, 1k-32k tokens per step.
GPU_VOCABS = (256, 4096, 32000, 50257, 128256, 151936, 262144)
GPU_TOKENS = (1024, 4096, 16384, 32768)
GPU_HIDDEN = 4096
# The Triton interpreter runs ~4M elements/s: CPU shapes stay small (bytes moved per input
# byte hardly depend on the number of tokens).
CPU_VOCABS = (256, 4096, 32000)
CPU_TOKENS = (64,)
CPU_HIDDEN = 64
# (rows, classes) of the binary losses: a DETR-style detector (16 images × 900 queries × 91 COCO
# classes), a RetinaNet-style one (2 images × 100k anchors × 80 classes) and a multi-label
# classifier (4096 samples × 10k labels); on the CPU, small ones.
GPU_BINARY_SHAPES = ((16 * 900, 91), (2 * 100_000, 80), (4096, 10_000))
CPU_BINARY_SHAPES = ((64, 91), (16, 1000))


@dataclass(frozen=True)
class Case:
    op: str
    pass_: str
    dtype: str
    tokens: int
    vocab: int
    hidden: int = 0  # LINEAR_OPS only
    reduction: str = "mean"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def input_bytes(self) -> int:
        """Bytes of what the loss must read: the logits, or the hidden states and the weight (a
        binary loss's target, as large as its logits, is counted in ``floor_multiple``)."""
        itemsize = self.torch_dtype.itemsize
        if self.op in LINEAR_OPS:  # the two-head form reads both models' (counted in floor_multiple)
            return (self.tokens + self.vocab) * self.hidden * itemsize
        return self.tokens * self.vocab * itemsize

    @property
    def floor_multiple(self) -> int:
        """The least traffic, in multiples of ``input_bytes``: read the inputs (1), and with a
        backward also write their gradient (2). The binary losses also read a target as large as
        their logits (+1)."""
        reads = 2 if self.op in BINARY_OPS or self.op in DISTILLATION_OPS else 1
        return reads if self.pass_ == "forward" else reads + 1

    @property
    def floor_bytes(self) -> int:
        return self.floor_multiple * self.input_bytes

    @property
    def flops(self) -> int:
        """Useful matmul FLOPs of the linear heads (logits 2NHV, both models' for distillation; dX and dW
        4NHV); 0 otherwise."""
        if self.op not in LINEAR_OPS:
            return 0
        per_pass = {"forward": 2, "backward": 4, "forward+backward": 6}[self.pass_]
        if self.op in DISTILLATION_OPS:  # the teacher's logits too (forward), the student's gradients only
            per_pass = {"forward": 4, "backward": 4, "forward+backward": 8}[self.pass_]
        return per_pass * self.tokens * self.hidden * self.vocab

    @property
    def needs_grad(self) -> bool:
        return self.pass_ != "forward"

    @property
    def test_id(self) -> str:
        hidden = f"-H{self.hidden}" if self.hidden else ""
        return f"{self.op}-{self.pass_}-{self.dtype}-N{self.tokens}-V{self.vocab}{hidden}-{self.reduction}"

    def as_dict(self) -> Dict[str, object]:
        fields = asdict(self)
        fields["pass"] = fields.pop("pass_")
        return fields

    @classmethod
    def from_row(cls, row: Dict[str, object]) -> "Case":
        return cls(row["op"], row["pass"], row["dtype"], int(row["tokens"]), int(row["vocab"]),
                   int(row["hidden"]), row["reduction"])


def make_inputs(case: Case, device: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Fresh random inputs; the tensors that get gradients require grad when the pass has a
    backward. ``grad_output`` is the upstream gradient for the 'none' reduction; ``advantage`` (token
    operations) holds one value per token, the same for every token of a sequence."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    def randn(*shape, scale=1.0):
        values = torch.randn(*shape, generator=generator, device=device) * scale
        return values.to(dtype).requires_grad_(case.needs_grad)

    inputs = {"target": torch.randint(0, case.vocab, (case.tokens,), generator=generator, device=device)}
    if case.op in LINEAR_OPS:
        inputs["hidden"] = randn(case.tokens, case.hidden)
        inputs["weight"] = randn(case.vocab, case.hidden, scale=case.hidden ** -0.5)
    else:
        inputs["logits"] = randn(case.tokens, case.vocab)
    if case.op in DISTILLATION_OPS:  # the teacher's tensors, which get no gradient
        if case.op in LINEAR_OPS:
            inputs["teacher_hidden"] = randn(case.tokens, case.hidden).detach()
            inputs["teacher_weight"] = randn(case.vocab, case.hidden, scale=case.hidden ** -0.5).detach()
        else:
            inputs["teacher_logits"] = randn(case.tokens, case.vocab).detach()
    if case.op in BINARY_OPS:  # a few positives per row, as in detection and multi-label data
        labels = torch.rand(case.tokens, case.vocab, generator=generator, device=device) < 0.05
        inputs["target"] = (labels * 2 - 1 if case.op == "soft_margin_loss" else labels).to(dtype)
    if case.op in TOKEN_OPS:
        sequence = sequence_tokens(case.tokens)
        per_sequence = torch.randn(case.tokens // sequence, generator=generator, device=device)
        inputs["advantage"] = per_sequence.repeat_interleave(sequence)  # fp32, as trainers keep them
    if case.reduction == "none":
        loss_shape = (case.tokens, case.vocab) if case.op in BINARY_OPS else (case.tokens,)
        inputs["grad_output"] = torch.randn(loss_shape, generator=generator, device=device).to(dtype)
    return inputs


def sequence_tokens(tokens: int) -> int:
    """Tokens per sequence of the token operations: SEQUENCE_TOKENS, or fewer so that they divide N."""
    return math.gcd(tokens, SEQUENCE_TOKENS)


def leaves(inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """The inputs that receive gradients."""
    return [t for t in inputs.values() if t.requires_grad]


def build_cases(ops: Iterable[str], passes: Iterable[str], dtypes: Iterable[str],
                tokens: Sequence[int], vocabs: Sequence[int], hidden: int,
                reduction: str, binary_shapes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Case]:
    """Every op × pass × dtype × shape: tokens × vocabs, except that the binary losses take
    ``binary_shapes`` (rows, classes) when given."""
    grid = list(itertools.product(tokens, vocabs))
    return [Case(op, pass_, dtype, n, v, hidden if op in LINEAR_OPS else 0, reduction)
            for op, pass_, dtype in itertools.product(ops, passes, dtypes)
            for n, v in (binary_shapes if op in BINARY_OPS and binary_shapes else grid)]


def preset(on_gpu: bool, quick: bool) -> Dict[str, object]:
    """Keyword arguments of ``build_cases``: the full suite, or ``--quick``'s few small cases
    (forward and forward+backward of every operation, bf16; CI runs it on the CPU)."""
    if quick:
        shapes = (dict(tokens=(4096,), vocabs=(32000, 128256), hidden=GPU_HIDDEN) if on_gpu
                  else dict(tokens=(16, 64), vocabs=(256, 4096), hidden=CPU_HIDDEN))
        binary_shapes = GPU_BINARY_SHAPES[:1] if on_gpu else CPU_BINARY_SHAPES[:1]
        return dict(ops=OPS, passes=("forward", "forward+backward"), dtypes=("bf16",), binary_shapes=binary_shapes,
                    **shapes)
    shapes = (dict(tokens=GPU_TOKENS, vocabs=GPU_VOCABS, hidden=GPU_HIDDEN) if on_gpu
              else dict(tokens=CPU_TOKENS, vocabs=CPU_VOCABS, hidden=CPU_HIDDEN))
    binary_shapes = GPU_BINARY_SHAPES if on_gpu else CPU_BINARY_SHAPES
    return dict(ops=OPS, passes=PASSES, dtypes=tuple(DTYPES), binary_shapes=binary_shapes, **shapes)

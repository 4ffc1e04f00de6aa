"""What is measured: operations, passes, shapes and dtypes, and the inputs of one case."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Sequence

import torch

OPS = ("cross_entropy", "focal_loss", "linear_cross_entropy")
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


@dataclass(frozen=True)
class Case:
    op: str
    pass_: str
    dtype: str
    tokens: int
    vocab: int
    hidden: int = 0  # linear_cross_entropy only
    reduction: str = "mean"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def input_bytes(self) -> int:
        """Bytes of what the loss must read: the logits, or the hidden states and the weight."""
        itemsize = self.torch_dtype.itemsize
        if self.op == "linear_cross_entropy":
            return (self.tokens + self.vocab) * self.hidden * itemsize
        return self.tokens * self.vocab * itemsize

    @property
    def floor_multiple(self) -> int:
        """The least traffic, in multiples of ``input_bytes``: read the inputs (1), and with a
        backward also write their gradient (2)."""
        return 1 if self.pass_ == "forward" else 2

    @property
    def floor_bytes(self) -> int:
        return self.floor_multiple * self.input_bytes

    @property
    def flops(self) -> int:
        """Useful matmul FLOPs of linear cross-entropy (logits 2NHV; dX and dW 4NHV); 0 otherwise."""
        if self.op != "linear_cross_entropy":
            return 0
        per_pass = {"forward": 2, "backward": 4, "forward+backward": 6}[self.pass_]
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
    backward. ``grad_output`` is the upstream gradient for the 'none' reduction."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    def randn(*shape, scale=1.0):
        values = torch.randn(*shape, generator=generator, device=device) * scale
        return values.to(dtype).requires_grad_(case.needs_grad)

    inputs = {"target": torch.randint(0, case.vocab, (case.tokens,), generator=generator, device=device)}
    if case.op == "linear_cross_entropy":
        inputs["hidden"] = randn(case.tokens, case.hidden)
        inputs["weight"] = randn(case.vocab, case.hidden, scale=case.hidden ** -0.5)
    else:
        inputs["logits"] = randn(case.tokens, case.vocab)
    if case.reduction == "none":
        inputs["grad_output"] = torch.randn(case.tokens, generator=generator, device=device).to(dtype)
    return inputs


def leaves(inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """The inputs that receive gradients."""
    return [t for t in inputs.values() if t.requires_grad]


def build_cases(ops: Iterable[str], passes: Iterable[str], dtypes: Iterable[str],
                tokens: Sequence[int], vocabs: Sequence[int], hidden: int,
                reduction: str) -> List[Case]:
    return [Case(op, pass_, dtype, n, v, hidden if op == "linear_cross_entropy" else 0, reduction)
            for op, pass_, dtype, n, v in itertools.product(ops, passes, dtypes, tokens, vocabs)]


def preset(on_gpu: bool, quick: bool) -> Dict[str, object]:
    """Keyword arguments of ``build_cases``: the full suite, or ``--quick``'s few small cases
    (forward and forward+backward of every operation, bf16; CI runs it on the CPU)."""
    if quick:
        shapes = (dict(tokens=(4096,), vocabs=(32000, 128256), hidden=GPU_HIDDEN) if on_gpu
                  else dict(tokens=(16, 64), vocabs=(256, 4096), hidden=CPU_HIDDEN))
        return dict(ops=OPS, passes=("forward", "forward+backward"), dtypes=("bf16",), **shapes)
    shapes = (dict(tokens=GPU_TOKENS, vocabs=GPU_VOCABS, hidden=GPU_HIDDEN) if on_gpu
              else dict(tokens=CPU_TOKENS, vocabs=CPU_VOCABS, hidden=CPU_HIDDEN))
    return dict(ops=OPS, passes=PASSES, dtypes=tuple(DTYPES), **shapes)

"""A tiny decoder-only language model (embedding -> 2 causal transformer layers -> linear head over a
5003-token vocabulary) trained for a few steps with fastce's fused linear cross-entropy gives the
same losses and parameters as F.cross_entropy on the materialised logits."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastce

pytestmark = pytest.mark.skipif(
    not fastce.uses_triton(torch.empty(0)), reason="runs the kernels (TRITON_INTERPRET=1 on CPU)")

VOCAB, WIDTH, SEQ, BATCH, STEPS = 5003, 32, 12, 3, 4
LABEL_SMOOTHING, Z_LOSS = 0.1, 1e-3


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(SEQ, WIDTH) * 0.1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(2))
        self.norm = nn.LayerNorm(WIDTH)
        # the head: owns `linear`, as nn.LinearCrossEntropyLoss does
        self.head = fastce.LinearCrossEntropyLoss(WIDTH, VOCAB, bias=True, label_smoothing=LABEL_SMOOTHING,
                                                  z_loss=Z_LOSS)

    def hidden(self, tokens):
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, src_mask=causal, is_causal=True)
        return self.norm(h)

    def fused_loss(self, tokens, targets):
        return self.head(self.hidden(tokens), targets)  # (B, T, H) hidden states, (B, T) targets

    def materialised_loss(self, tokens, targets):
        logits = self.head.linear(self.hidden(tokens)).reshape(-1, VOCAB)
        targets = targets.reshape(-1)
        lse = torch.logsumexp(logits, dim=-1)[targets != -100]
        return F.cross_entropy(logits, targets, label_smoothing=LABEL_SMOOTHING) + Z_LOSS * (lse ** 2).mean()


def _train(model, loss_name, batches):
    # SGD, not Adam: Adam divides by the gradient's own size, so a parameter whose exact gradient is 0
    # (the attention's key bias) would take full-size steps along fp32 rounding noise in both runs
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9)
    losses = []
    for tokens, targets in batches:
        optimizer.zero_grad()
        loss = getattr(model, loss_name)(tokens, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_language_model_trains_identically_with_the_fused_loss():
    fused = TinyLM()
    materialised = copy.deepcopy(fused)
    batches = []
    for _ in range(STEPS):
        # something to learn: counting up by 7 from a random start, in the first 100 tokens
        sequence = (torch.randint(0, 100, (BATCH, 1)) + 7 * torch.arange(SEQ + 1)) % 100
        targets = sequence[:, 1:].clone()
        targets[0, -3:] = -100  # padding at the end of one sequence
        batches.append((sequence[:, :-1], targets))
    fused_losses = _train(fused, "fused_loss", batches)
    materialised_losses = _train(materialised, "materialised_loss", batches)
    assert fused_losses[-1] < fused_losses[0] - 0.5  # it learns
    torch.testing.assert_close(fused_losses, materialised_losses, rtol=1e-5, atol=0)
    for (name, p_fused), p_materialised in zip(fused.named_parameters(), materialised.parameters()):
        torch.testing.assert_close(p_fused, p_materialised, rtol=1e-4, atol=1e-5, msg=name)

"""fastce.token_logprobs / linear_token_logprobs on a CUDA GPU: correctness against float64 (and
against torch in the input's dtype), torch.compile with inductor, and timings against a copy, the
torch expressions RL trainers use and Liger's fused linear GRPO (if installed). A few minutes on an
H100/H200; no GPU has run it yet (the CPU tests run the same kernels on the interpreter).

    python tools/gpu_check_token_stats.py      # from the repository root
"""
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fastce  # noqa: E402
from fastce import reference  # noqa: E402

dev = "cuda"
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
assert fastce.uses_triton(torch.empty(0, device=dev))
torch.manual_seed(0)
t_start = time.time()


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def both_grads(fn, leaves, target, ga, gb, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    lp, ent = fn(*leaves, target, return_entropy=True, **kw)
    (lp * ga.to(lp.dtype) + ent * gb.to(ent.dtype)).sum().backward()
    return lp.detach(), ent.detach(), [None if t is None else t.grad for t in leaves]


print("== correctness: logits form (errors relative to max |float64|; 'mat' = torch in the same dtype)")
for n, v, dt, temp in [(257, 32000, torch.bfloat16, 0.7), (8, 151936, torch.bfloat16, 1.0),
                       (64, 50257, torch.float32, 1.3), (300, 203, torch.float16, 1.0), (16, 262144, torch.float32, 0.9)]:
    x = (torch.randn(n, v, device=dev) * 3).to(dt)
    y = torch.randint(0, v, (n,), device=dev)
    y[::7] = -100
    ga, gb = torch.randn(n, device=dev), torch.randn(n, device=dev)
    f = both_grads(lambda t, yy, **k: fastce.token_logprobs(t, yy, **k), [x], y, ga, gb, temperature=temp)
    e = both_grads(lambda t, yy, **k: reference.token_logprobs(t, yy, **k), [x.double()], y, ga.double(), gb.double(),
                   temperature=temp)
    m = both_grads(lambda t, yy, **k: reference.token_logprobs(t, yy, **k), [x], y, ga, gb, temperature=temp)
    ign = y == -100
    zero_ok = bool((f[0][ign] == 0).all() and (f[1][ign] == 0).all() and (f[2][0][ign] == 0).all())
    print(f"token N={n} V={v} {dt} T={temp}: logp {rel(f[0], e[0]):.1e} H {rel(f[1], e[1]):.1e} "
          f"grad {rel(f[2][0], e[2][0]):.1e} (mat {rel(m[2][0], e[2][0]):.1e}) ignored-zero {zero_ok}", flush=True)

print("== correctness: linear form")
for n, h, v, dt, chunk in [(1000, 256, 32000, torch.bfloat16, 200), (513, 128, 50257, torch.float32, None),
                           (2048, 512, 8192, torch.float16, 300)]:
    hid = torch.randn(n, h, device=dev).to(dt)
    w = (torch.randn(v, h, device=dev) * h ** -0.5 * 2).to(dt)
    b = torch.randn(v, device=dev).to(dt)
    y = torch.randint(0, v, (n,), device=dev)
    y[::5] = -100
    ga, gb = torch.randn(n, device=dev), torch.randn(n, device=dev)
    lin = lambda a, ww, bb, t, **k: fastce.linear_token_logprobs(a, ww, t, linear_bias=bb, chunk_size=chunk, **k)  # noqa
    ref = lambda a, ww, bb, t, **k: reference.linear_token_logprobs(a, ww, t, linear_bias=bb, **k)  # noqa
    f = both_grads(lin, [hid, w, b], y, ga, gb, temperature=0.8)
    e = both_grads(ref, [hid.double(), w.double(), b.double()], y, ga.double(), gb.double(), temperature=0.8)
    m = both_grads(ref, [hid, w, b], y, ga, gb, temperature=0.8)
    print(f"linear N={n} H={h} V={v} {dt} chunk={chunk}: logp {rel(f[0], e[0]):.1e} H {rel(f[1], e[1]):.1e} "
          + " ".join(f"{name} {rel(a, c):.1e} (mat {rel(mm, c):.1e})"
                     for name, a, mm, c in zip(("dh", "dW", "db"), f[2], m[2], e[2])), flush=True)

print("== torch.compile(fullgraph, inductor) vs eager")
torch._dynamo.reset()
x = torch.randn(64, 1000, device=dev)
y = torch.randint(0, 1000, (64,), device=dev)
hid = torch.randn(64, 32, device=dev)
w = torch.randn(1000, 32, device=dev) * 0.2


def loss_fn(x, hid, w):
    lp, ent = fastce.token_logprobs(x, y, temperature=0.9, return_entropy=True)
    llp, lent = fastce.linear_token_logprobs(hid, w, y, return_entropy=True, chunk_size=16)
    return (lp * 0.3 - ent).sum() + (llp - 0.1 * lent).sum()


outs = []
for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
    leaves = [t.clone().requires_grad_() for t in (x, hid, w)]
    loss = fn(*leaves)
    loss.backward()
    outs.append([loss.detach()] + [t.grad for t in leaves])
print("compiled vs eager max diff:", [f"{(a - b).abs().max().item():.1e}" for a, b in zip(*outs)], flush=True)

print("== timings (median ms; GB/s counted on the bytes each must move)")
n, v = 16384, 128256
x = (torch.randn(n, v, device=dev) * 2).to(torch.bfloat16)
y = torch.randint(0, v, (n,), device=dev)
adv = torch.randn(n, device=dev)
nbytes = x.numel() * 2
copy_ms = do_bench(lambda: torch.empty_like(x).copy_(x), return_mode="median")
print(f"copy of the logits ({nbytes / 1e9:.2f} GB, 2x bytes): {copy_ms:.3f} ms = {2 * nbytes / copy_ms / 1e6:.0f} GB/s")
fwd_ms = do_bench(lambda: fastce.token_logprobs(x, y, return_entropy=True), return_mode="median")
print(f"fastce token_logprobs fwd (1x read): {fwd_ms:.3f} ms = {nbytes / fwd_ms / 1e6:.0f} GB/s", flush=True)
xg = x.clone().requires_grad_()


def step(fn):
    def run():
        lp, ent = fn(xg)
        (-(adv * lp) - 0.01 * ent).mean().backward()
    return run


fastce_step = step(lambda t: fastce.token_logprobs(t, y, return_entropy=True))
fb_ms = do_bench(fastce_step, grad_to_none=[xg], return_mode="median")
print(f"fastce token_logprobs fwd+bwd (3x): {fb_ms:.3f} ms = {3 * nbytes / fb_ms / 1e6:.0f} GB/s "
      f"({fb_ms / copy_ms:.2f}x a copy's time, which moves 2x)", flush=True)


def torch_logits_form(t):
    logp = torch.log_softmax(t.float(), -1)
    return logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


sys.path.insert(0, os.getcwd())
from bench.providers import _chunked_entropy, _selective_log_softmax  # noqa: E402

for name, fn in (("torch log_softmax(fp32).gather + entropy", torch_logits_form),
                 ("trainers (TRL-style, bf16, 256-token sequences, 128-row entropy chunks)",
                  lambda t: (_selective_log_softmax(t, y, 256), _chunked_entropy(t)))):
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(step(fn), grad_to_none=[xg], return_mode="median")
    print(f"{name} fwd+bwd: {ms:.3f} ms ({ms / fb_ms:.1f}x fastce), peak above inputs "
          f"{(torch.cuda.max_memory_allocated() - base) / 1e9:.1f} GB", flush=True)
torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
fastce_step()
xg.grad = None
print(f"fastce peak above inputs: {(torch.cuda.max_memory_allocated() - base) / 1e9:.2f} GB")
del x, xg
torch.cuda.empty_cache()

n, h, v = 8192, 4096, 128256
hid = (torch.randn(n, h, device=dev)).to(torch.bfloat16).requires_grad_()
w = (torch.randn(v, h, device=dev) * h ** -0.5).to(torch.bfloat16).requires_grad_()
y = torch.randint(0, v, (n,), device=dev)
adv = torch.randn(n, device=dev)
flops = 6 * n * h * v
mm_ms = do_bench(lambda: hid @ w.t(), return_mode="median")
print(f"one logits GEMM ({2 * n * h * v / 1e12:.1f} TFLOP): {mm_ms:.3f} ms", flush=True)


def linear_step(entropy):
    def run():
        out = fastce.linear_token_logprobs(hid, w, y, return_entropy=entropy)
        lp, ent = out if entropy else (out, None)
        loss = -(adv * lp).mean() - (0.01 * ent.mean() if entropy else 0)
        loss.backward()
    return run


for entropy in (False, True):
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(linear_step(entropy), grad_to_none=[hid, w], return_mode="median")
    peak = torch.cuda.max_memory_allocated() - base - (hid.numel() + w.numel()) * 2
    print(f"fastce linear_token_logprobs entropy={entropy} fwd+bwd: {ms:.2f} ms = {flops / ms / 1e9:.0f} TFLOP/s "
          f"(6NHV), {ms / mm_ms:.2f} logits-GEMM times; peak beyond inputs+grads {peak / 1e9:.3f} GB "
          f"({peak / (n * v * 2) * 100:.1f}% of the logits)", flush=True)

try:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="cispo", epsilon_high=5.0,
                                    compiled=False)
    seqs = y.view(-1, 256)

    def liger_step():
        grpo(hid.view(*seqs.shape, -1), w, seqs, torch.ones_like(seqs), adv.view(seqs.shape)[:, 0])[0].backward()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(liger_step, grad_to_none=[hid, w], return_mode="median")
    peak = torch.cuda.max_memory_allocated() - base - (hid.numel() + w.numel()) * 2
    print(f"liger fused linear GRPO fwd+bwd: {ms:.2f} ms; peak beyond inputs+grads {peak / 1e9:.3f} GB", flush=True)
except ImportError as error:
    print("liger not installed here:", error)


def trainer_linear():
    logits = hid @ w.t()
    lp = _selective_log_softmax(logits, y, 256)
    (-(adv * lp).mean()).backward()


torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
ms = do_bench(trainer_linear, grad_to_none=[hid, w], return_mode="median")
peak = torch.cuda.max_memory_allocated() - base - (hid.numel() + w.numel()) * 2
print(f"trainers (materialised logits) fwd+bwd: {ms:.2f} ms; peak beyond inputs+grads {peak / 1e9:.2f} GB")
print(f"total {time.time() - t_start:.0f} s")

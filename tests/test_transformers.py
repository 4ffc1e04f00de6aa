"""fastce.integrations.transformers against transformers' own models, built from tiny random configs
(no downloads): losses and every parameter gradient equal the stock model's, on the reference path
and on the kernels, in eager mode, under torch.compile and inside Trainer; bad use is refused.
"""
import contextlib
import copy
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastce
from fastce.profiling import measure

transformers = pytest.importorskip("transformers", reason='the integration needs pip install "fastce[transformers]"')
from transformers.loss import loss_utils  # noqa: E402

from fastce.integrations.transformers import apply_fastce, causal_lm_loss, register, unregister  # noqa: E402

STOCK_LOSS = loss_utils.ForCausalLMLoss
VOCAB = 251  # not a power of two, and not a multiple of the kernels' blocks
BATCH, SEQ = 2, 9
_DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
# name: (model class, config class, config arguments); together they cover every transform the fused head honours
# (test_the_models_cover_what_the_fused_head_honours checks that)
MODELS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _DECODER),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", dict(_DECODER, tie_word_embeddings=True)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _DECODER),
    "mistral": ("MistralForCausalLM", "MistralConfig", _DECODER),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_DECODER, head_dim=8, final_logit_softcapping=3.0)),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(_DECODER, logit_scale=0.5)),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(_DECODER, logits_scaling=4.0)),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(_DECODER, num_key_value_heads=4)),  # a bias on the head
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                                   attn_pdrop=0.0)),
}
AVAILABLE_MODELS = [pytest.param(name, marks=pytest.mark.skipif(not hasattr(transformers, cls),
                                                                reason=f"transformers {transformers.__version__} has no {cls}"))
                    for name, (cls, _, _) in MODELS.items()]


def _tiny_model(name, dtype=torch.float32, **overrides):
    model_class, config_class, arguments = MODELS[name]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                 **{**arguments, **overrides})
    return getattr(transformers, model_class)(config).to(dtype).eval()


def _batch(variant="mean"):
    """Right-padded token ids of ragged lengths (labels -100 on padding and on one prompt token) and the
    loss arguments of `variant`: the plain mean, a num_items_in_batch larger than this batch's tokens
    (gradient accumulation), or explicit shift_labels."""
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ))
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[0, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[1, 2] = -100
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if variant == "num_items_in_batch":
        batch["num_items_in_batch"] = (labels[:, 1:] != -100).sum() + 7
    elif variant == "shift_labels":
        batch["shift_labels"] = torch.randint(0, VOCAB, (BATCH, SEQ)).masked_fill(torch.rand(BATCH, SEQ) < 0.3, -100)
    return batch


def _step(model, batch, call=None):
    """(output, loss, {parameter name: gradient}) of one forward and backward of `model` (run by `call`)."""
    model.zero_grad(set_to_none=True)
    output = (model if call is None else call)(**batch)
    output.loss.backward()
    return output, output.loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _assert_same_step(actual, expected):
    _, loss, grads = actual
    _, expected_loss, expected_grads = expected
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (expected_grads[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(params=["reference", "kernels"])
def path(request, monkeypatch):
    """fastce's pure-PyTorch path, or its Triton kernels (on the interpreter on CPU)."""
    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not fastce.uses_triton(torch.empty(0)):
        pytest.skip("the kernels run on CPU with TRITON_INTERPRET=1")
    return request.param


@contextlib.contextmanager
def _fastce_calls():
    """Lists the calls into fastce's public losses (what the integration must use)."""
    calls = []
    originals = {name: getattr(fastce, name) for name in ("cross_entropy", "linear_cross_entropy")}

    def counting(name):
        def counted(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return counted
    try:
        for name in originals:
            setattr(fastce, name, counting(name))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(fastce, name, original)


@pytest.mark.parametrize("variant", ["mean", "num_items_in_batch", "shift_labels"])
@pytest.mark.parametrize("name", AVAILABLE_MODELS)
def test_loss_and_every_gradient_equal_the_stock_model(name, variant, path):
    stock = _tiny_model(name)
    batch = _batch(variant)
    expected = _step(stock, batch)
    for fused_linear, fastce_loss in ((True, "linear_cross_entropy"), (False, "cross_entropy")):
        model = apply_fastce(copy.deepcopy(stock), fused_linear=fused_linear)
        with _fastce_calls() as calls:
            actual = _step(model, batch)
        assert calls == [fastce_loss]
        output = actual[0]
        if fused_linear:
            assert output.logits is None
        else:
            torch.testing.assert_close(output.logits, expected[0].logits, rtol=0, atol=0)
        _assert_same_step(actual, expected)


@pytest.mark.parametrize("name", AVAILABLE_MODELS)
def test_without_labels_logits_and_generate_equal_the_stock_model(name):
    stock = _tiny_model(name)
    model = apply_fastce(copy.deepcopy(stock))
    batch = _batch()
    del batch["labels"]
    torch.testing.assert_close(model(**batch).logits, stock(**batch).logits, rtol=0, atol=0)
    torch.testing.assert_close(model(batch["input_ids"]).logits, stock(batch["input_ids"]).logits, rtol=0, atol=0)
    prompt = dict(input_ids=batch["input_ids"][:, :5], attention_mask=torch.ones(BATCH, 5, dtype=torch.long))
    tokens = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, stock.generate(**prompt, max_new_tokens=4, do_sample=False))


def test_the_models_cover_what_the_fused_head_honours():
    models = {name: _tiny_model(name) for name, (cls, _, _) in MODELS.items() if hasattr(transformers, cls)}
    head = {name: model.get_output_embeddings() for name, model in models.items()}
    assert head["phi"].bias is not None
    assert head["llama-tied"].weight is models["llama-tied"].get_input_embeddings().weight
    assert head["llama"].weight is not models["llama"].get_input_embeddings().weight
    assert models["gemma2"].config.final_logit_softcapping == 3.0
    assert models["cohere"].logit_scale == 0.5
    assert models["granite"].config.logits_scaling == 4.0


def test_logits_to_keep_positional_arguments_and_tuple_outputs_follow_the_stock_model():
    stock = _tiny_model("gemma2")
    model = apply_fastce(copy.deepcopy(stock))
    batch = _batch()
    for keep in (4, torch.tensor([0, 3, 8])):
        kept = 4 if isinstance(keep, int) else len(keep)
        for targets in (dict(labels=batch["labels"][:, -kept:]),
                        dict(labels=batch["labels"], shift_labels=batch["labels"][:, :kept].contiguous())):
            arguments = dict(attention_mask=batch["attention_mask"], logits_to_keep=keep, **targets)
            _assert_same_step(_step(model, arguments | dict(input_ids=batch["input_ids"])),
                              _step(stock, arguments | dict(input_ids=batch["input_ids"])))
    # every argument up to labels by position, and return_dict=False
    names = list(inspect.signature(transformers.Gemma2ForCausalLM.forward).parameters)
    positional = [batch.get(name) for name in names[1:names.index("labels") + 1]]
    loss, *rest = model(*positional, return_dict=False)
    torch.testing.assert_close(loss, stock(*positional).loss)
    assert len(rest) == len(stock(*positional, return_dict=False)) - 2  # no loss, no logits


@pytest.mark.parametrize("normaliser", [None, "int", "tensor"])
@pytest.mark.parametrize("shifted", [False, True], ids=["labels", "shift_labels"])
def test_causal_lm_loss_is_transformers_loss(normaliser, shifted, path):
    logits = (torch.randn(BATCH, SEQ, VOCAB) * 3).requires_grad_()
    batch = _batch("shift_labels" if shifted else "mean")
    arguments = dict(shift_labels=batch["shift_labels"]) if shifted else {}
    n_targets = int((batch["shift_labels"] if shifted else batch["labels"][:, 1:]).ne(-100).sum()) + 5
    if normaliser is not None:
        arguments["num_items_in_batch"] = n_targets if normaliser == "int" else torch.tensor(n_targets)
    grad_output = torch.rand(()) + 0.5
    results = []
    for loss_function in (causal_lm_loss, STOCK_LOSS):
        x = logits.detach().clone().requires_grad_()
        loss = loss_function(x, batch["labels"], VOCAB, **arguments, unrelated_model_kwarg=True)
        (loss * grad_output).backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (expected_loss, expected_grad) = results
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_sync_beyond_fastce_label_check(dtype):
    batch = _batch("num_items_in_batch")  # a tensor num_items_in_batch stays on the device
    logits = torch.randn(BATCH, SEQ, VOCAB, dtype=dtype, requires_grad=True)
    with measure() as counted:
        causal_lm_loss(logits, batch["labels"], VOCAB, num_items_in_batch=batch["num_items_in_batch"]).backward()
    assert counted.syncs == 1  # fastce's check that the labels are in [0, V)
    stock = _tiny_model("llama", dtype)
    syncs = []
    for model in (stock, apply_fastce(copy.deepcopy(stock))):
        with measure() as counted:
            model(**batch).loss.backward()
        syncs.append(counted.syncs)
    assert syncs[1] == syncs[0] + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normaliser", [None, "tensor"])
def test_low_precision_losses_are_float32_not_rounded_to_the_logits_dtype(dtype, normaliser):
    batch = _batch("num_items_in_batch" if normaliser else "mean")
    loss_arguments = {k: batch[k] for k in ("num_items_in_batch",) if k in batch}
    logits = (torch.randn(BATCH, SEQ, VOCAB) * 3).to(dtype)
    results = []
    for loss_function in (causal_lm_loss, STOCK_LOSS):  # transformers upcasts the logits: fp32 exact
        x = logits.clone().requires_grad_()
        loss = loss_function(x, batch["labels"], VOCAB, **loss_arguments)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (expected_loss, expected_grad) = results
    assert loss.dtype == torch.float32
    # a loss rounded to bf16 (fp16) would be off by up to 2^-9 (2^-12) of its value
    torch.testing.assert_close(loss, expected_loss, rtol=2e-6, atol=0)
    # both gradients are fp32 values (1/num_items_in_batch applied in fp32 too) rounded once to the logits' dtype
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=ulp, atol=ulp * expected_grad.abs().max().item())
    if dtype == torch.float16:
        # equal but where fp32 noise crosses a rounding boundary (an upstream 1/num_items_in_batch rounded to fp16
        # makes ~3% differ); bf16 is held to one ulp only, as the interpreter rounds fp32 to bf16 by truncation
        assert (grad != expected_grad).float().mean() < 0.005
    stock = _tiny_model("cohere", dtype)
    model = apply_fastce(copy.deepcopy(stock))
    fused, stock_loss = model(**batch).loss, stock(**batch).loss
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, stock_loss, rtol=2e-6, atol=0)


def test_autocast_runs_the_head_in_the_autocast_dtype_as_stock():
    stock = _tiny_model("llama")
    model = apply_fastce(copy.deepcopy(stock))
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, expected = _step(model, batch), _step(stock, batch)
    assert actual[1].dtype == torch.float32
    torch.testing.assert_close(actual[1], expected[1], rtol=2e-6, atol=0)
    for name, grad in actual[2].items():  # bf16 GEMMs: gradients agree to bf16 rounding
        torch.testing.assert_close(grad, expected[2][name], rtol=2e-2, atol=2e-2 * expected[2][name].abs().max().item())


def test_torch_compile_of_the_patched_model_matches_the_stock_model():
    torch._dynamo.reset()
    stock = _tiny_model("gemma2")
    model = apply_fastce(copy.deepcopy(stock))
    batch = _batch("num_items_in_batch")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # no graph break in forward or backward
    _assert_same_step(_step(model, batch, call=compiled), _step(stock, batch))


def test_register_routes_unpatched_models_through_fastce_and_unregister_undoes_it():
    stock = _tiny_model("llama")
    batch = _batch("num_items_in_batch")
    expected = _step(stock, batch)
    register()
    try:
        assert loss_utils.LOSS_MAPPING["ForCausalLM"] is causal_lm_loss
        with _fastce_calls() as calls:
            actual = _step(copy.deepcopy(stock), batch)
        assert calls == ["cross_entropy"]
        _assert_same_step(actual, expected)
    finally:
        unregister()
    assert loss_utils.LOSS_MAPPING["ForCausalLM"] is STOCK_LOSS
    assert causal_lm_loss not in loss_utils.LOSS_MAPPING.values()
    assert loss_utils.ForCausalLMLoss is STOCK_LOSS


def _ragged_examples():
    examples = []
    for length in (4, 9, 6, 2, 8, 5, 9, 3, 7, 5, 6, 9):  # each micro-batch its own token count
        example = _batch()
        example["labels"][0, length:] = -100
        example["attention_mask"][0, length:] = 0
        examples.append({key: value[0] for key, value in example.items()})
    return examples


def _train_three_steps(model, examples, tmp_path):
    """Three optimizer steps of two accumulated micro-batches each; the logged losses."""
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=examples)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("use", ["apply_fastce", "register"])
def test_trainer_with_gradient_accumulation_logs_the_stock_losses(use, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    stock = _tiny_model("llama")
    model = copy.deepcopy(stock)
    examples = _ragged_examples()
    expected = _train_three_steps(stock, examples, tmp_path)
    if use == "apply_fastce":
        apply_fastce(model)
    else:
        register()
    try:
        losses = _train_three_steps(model, examples, tmp_path)
    finally:
        unregister()
    assert len(losses) == 3
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    for (name, trained), stock_trained in zip(model.named_parameters(), stock.parameters()):
        torch.testing.assert_close(trained, stock_trained, rtol=1e-5, atol=1e-6, msg=name)


# README, "Hugging Face transformers": a training step's peak memory at Llama-3-8B's head (V = 128256,
# H = 4096) on 8192 tokens in bf16, extrapolated from a 1-layer model at 1/SCALE of it in each dimension.
SCALE = 128
README_STOCK_PEAK, README_FUSED_PEAK, README_SAVING = 13.9e9, 2.91e9, 11.0e9


def test_fused_head_saves_the_memory_the_readme_claims():
    if not fastce.uses_triton(torch.empty(0)):
        pytest.skip("the fused head's memory is the kernels' (TRITON_INTERPRET=1 on CPU)")
    hidden, vocab, tokens = 4096 // SCALE, 128256 // SCALE, 8192 // SCALE
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    stock = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model = apply_fastce(copy.deepcopy(stock))
    input_ids = torch.randint(0, vocab, (2, tokens // 2))
    peaks = []
    for m in (stock, model):
        with measure() as counted:
            m(input_ids=input_ids, labels=input_ids).loss.backward()
        peaks.append(counted.peak_bytes * SCALE ** 2)  # every buffer is a product of two of (tokens, V, H)
    stock_peak, fused_peak = peaks
    assert stock_peak >= README_STOCK_PEAK * 0.99
    assert fused_peak <= README_FUSED_PEAK
    assert stock_peak - fused_peak >= README_SAVING


class ModulesToSaveWrapper(nn.Module):
    """Stands for PEFT's wrapper of the same name (the integration recognises it by name)."""

    def __init__(self, module):
        super().__init__()
        self.original_module = module

    def forward(self, x):
        return self.original_module(x)


class QuantisedLinear(nn.Linear):
    """A Linear subclass whose weight is not what its forward multiplies by (as bitsandbytes')."""

    def forward(self, x):
        return super().forward(x) * 2


def _set(obj, name, value):
    setattr(obj, name, value)


BAD_MODELS = {
    "head is not a Linear": (lambda m: _set(m, "lm_head", nn.Sequential(m.lm_head)), "not a plain torch.nn.Linear"),
    "PEFT modules_to_save": (lambda m: _set(m, "lm_head", ModulesToSaveWrapper(m.lm_head)), "ModulesToSaveWrapper"),
    "quantised head": (lambda m: _set(m, "lm_head", QuantisedLinear(32, VOCAB)), "not a plain torch.nn.Linear"),
    "hooked head": (lambda m: m.lm_head.register_forward_pre_hook(lambda *_: None), "hooks"),
    "unknown logit transform": (lambda m: _set(m.config, "output_logit_soft_cap", 30.0), "output_logit_soft_cap"),
    "a z-loss in the model": (lambda m: _set(m.config, "z_loss_coefficient", 1e-4), "z_loss_coefficient"),
    "custom loss": (lambda m: _set(m, "loss_function", lambda *a, **k: 0.0), "not transformers' ForCausalLMLoss"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_a_model_the_fused_head_cannot_reproduce_is_refused(case):
    model = _tiny_model("llama")
    spoil, message = BAD_MODELS[case]
    spoil(model)
    with pytest.raises(TypeError, match=message):
        apply_fastce(model)
    assert "forward" not in vars(model) and "_fastce_patch" not in vars(model)


def test_a_mixture_of_experts_router_loss_is_refused():
    model = _tiny_model("mixtral", output_router_logits=True)
    with pytest.raises(TypeError, match="output_router_logits"):
        apply_fastce(model)
    model.config.output_router_logits = False
    apply_fastce(model)
    with pytest.raises(TypeError, match="output_router_logits"):
        model(**_batch(), output_router_logits=True)


def test_apply_fastce_needs_the_model_itself():
    model = _tiny_model("llama")
    with pytest.raises(TypeError, match="PreTrainedModel.*before torch.compile"):
        apply_fastce(torch.compile(model))
    with pytest.raises(TypeError, match="no decoder under a head"):
        apply_fastce(model.model)


@pytest.mark.parametrize("spoil, message", [
    (lambda m: _set(m, "lm_head", ModulesToSaveWrapper(m.lm_head)), "ModulesToSaveWrapper"),
    (lambda m: _set(m, "loss_function", STOCK_LOSS), "loss_function was replaced"),
], ids=["head wrapped", "loss replaced"])
def test_a_model_changed_after_apply_fastce_is_refused_in_forward_never_a_wrong_loss(spoil, message):
    model = apply_fastce(_tiny_model("llama"))
    spoil(model)
    batch = _batch()
    with pytest.raises(TypeError, match=message):
        model(**batch)
    del batch["labels"]
    assert model(**batch).logits.shape == (BATCH, SEQ, VOCAB)


def test_apply_again_replaces_the_patch_and_copies_run_themselves():
    model = apply_fastce(_tiny_model("llama"))
    copied = copy.deepcopy(model)  # e.g. TRL's reference model: its forward must run the copy's weights
    assert copied.forward.__self__ is copied and copied._fastce_patch.stock_forward.__self__ is copied
    apply_fastce(model, fused_linear=False)
    assert "forward" not in vars(model) and model.loss_function is causal_lm_loss
    assert model(**_batch()).logits is not None


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: FSDP2 and DTensors on the CPU."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_fsdp2_head_sharded_with_the_model_trains_and_sharded_alone_is_refused(process_group):
    fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard
    stock = _tiny_model("llama")
    batch = _batch()
    expected = _step(stock, batch)
    model = copy.deepcopy(stock)
    fully_shard(model, mesh=process_group)
    apply_fastce(model)
    output, loss, grads = _step(model, batch)
    _assert_same_step((output, loss, {name: grad.full_tensor() for name, grad in grads.items()}), expected)
    head_alone = copy.deepcopy(stock)
    fully_shard(head_alone.lm_head, mesh=process_group)
    with pytest.raises(TypeError, match="fully_shard"):
        apply_fastce(head_alone)


def test_a_dtensor_head_in_forward_is_refused(process_group):
    from torch.distributed.tensor import Shard, distribute_tensor
    model = apply_fastce(_tiny_model("llama"))
    model.lm_head.weight = nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), process_group, [Shard(0)]))
    with pytest.raises(TypeError, match="DTensor"):
        model(**_batch())


def test_fastce_imports_without_transformers_and_the_integration_says_what_to_install():
    script = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None  # any `import transformers` now raises ImportError
        import torch, fastce
        fastce.cross_entropy(torch.randn(3, 5), torch.tensor([0, 4, 2]))
        try:
            import fastce.integrations.transformers
        except ImportError as error:
            print(error)
        """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'pip install "fastce[transformers]"' in result.stdout


# ---- per-token log-probabilities and entropy (RL) -----------------------------------------------------

TOKEN_MODELS = ["llama", "llama-tied", "cohere", "granite", "phi", "gpt2"]  # plain, tied, scaled logits, a head bias


@pytest.mark.parametrize("name", [model for model in AVAILABLE_MODELS if model.values[0] in TOKEN_MODELS])
def test_token_logprobs_and_entropy_equal_the_stock_logits_and_train_the_same(name, path):
    from fastce.integrations.transformers import causal_lm_token_logprobs
    model = _tiny_model(name)
    batch = _batch()
    keep = SEQ - 3  # the completion: the last positions, as GRPO keeps them
    labels = batch["labels"][:, -keep:]
    weights = torch.randn(2, BATCH, keep)

    def statistics(call):
        model.zero_grad(set_to_none=True)
        log_probs, entropy = call()
        (weights[0] * log_probs + weights[1] * entropy).sum().backward()
        return log_probs.detach(), entropy.detach(), {n: p.grad for n, p in model.named_parameters()}

    def fused():
        output = causal_lm_token_logprobs(model, batch["input_ids"], labels, attention_mask=batch["attention_mask"],
                                logits_to_keep=keep, temperature=0.7, return_entropy=True)
        return output["log_probs"], output.entropy

    def stock():  # the model's own logits, then log_softmax(logits / T) at the next token, in float64
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        return fastce.reference.token_logprobs(logits.double(), targets, temperature=0.7, return_entropy=True)

    got, expected = statistics(fused), statistics(stock)
    assert got[0].dtype == torch.float32 and got[0].shape == (BATCH, keep)
    for actual, wanted in zip(got[:2], expected[:2]):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0][:, -1], torch.zeros(BATCH))  # the last position predicts nothing
    for parameter, grad in got[2].items():
        wanted = expected[2][parameter]
        assert (grad is None) == (wanted is None), parameter
        if grad is not None:
            torch.testing.assert_close(grad, wanted.to(grad.dtype), rtol=1e-4, atol=1e-6, msg=parameter)


def test_token_logprobs_refuses_soft_capped_logits():
    from fastce.integrations.transformers import causal_lm_token_logprobs
    if not hasattr(transformers, "Gemma2ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma2ForCausalLM")
    with pytest.raises(TypeError, match="final_logit_softcapping"):
        causal_lm_token_logprobs(_tiny_model("gemma2"), _batch()["input_ids"])

"""Hugging Face transformers: fastce as the loss of causal language models, with no per-model code.

    from fastce.integrations.transformers import apply_fastce, register
    model = apply_fastce(AutoModelForCausalLM.from_pretrained(name))  # training never builds the logits
    register()   # or only this: every causal LM's loss_function becomes causal_lm_loss

apply_fastce patches one model instance, never its class. A forward with labels runs the model's
decoder (model.base_model) with the arguments the model's own forward would give it, then
fastce.linear_cross_entropy on the last hidden states and the head (model.get_output_embeddings()),
so the (tokens × vocab) logits never exist and outputs.logits is None. What transformers' forwards
do to the head's output is read from the model, not from per-model code: final_logit_softcapping
(Gemma 2/3) is fastce's softcap; logit_scale (Cohere) and logits_scaling (Granite) scale the hidden
states and bias instead of the logits, (h·Wᵀ + b)·s = (s·h)·Wᵀ + s·b. A forward without labels is the
model's own, so evaluation and generate() are unchanged.

causal_lm_loss is transformers' ForCausalLMLoss on fastce's kernels (see its docstring). Both paths
return a float32 loss, as transformers does, also for bf16/fp16 models.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastce

MIN_TRANSFORMERS = (4, 50)
_INSTALL = 'pip install "fastce[transformers]"'
try:
    import transformers
    from packaging.version import Version
    from transformers import PreTrainedModel
    from transformers.loss import loss_utils
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput
except ImportError as error:
    raise ImportError("fastce.integrations.transformers needs Hugging Face transformers >= 4.50, which is not "
                      f"installed: {_INSTALL}") from error
if Version(transformers.__version__).release < MIN_TRANSFORMERS:
    raise ImportError(f"fastce.integrations.transformers needs transformers >= 4.50, found {transformers.__version__}: "
                      f"{_INSTALL}")
try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # before transformers 5: an int (the last n positions, 0 = all) or a 1-D tensor of positions
    def slice_logits_to_keep(hidden_states: Tensor, logits_to_keep) -> Tensor:
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, positions, :]
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed: no DTensor can exist
    DTensor = ()

__all__ = ["causal_lm_loss", "apply_fastce", "register", "unregister", "causal_lm_token_logprobs", "TokenLogprobsOutput"]

# transformers' own loss, as imported before register() replaces it
_STOCK_LOSS = loss_utils.ForCausalLMLoss
# The modules where transformers looks up the name ForCausalLMLoss: Trainer compares a model's loss with it to
# count num_items_in_batch over the shifted labels, so register() must rename it there too.
_MODULES_NAMING_THE_LOSS = ("transformers.loss.loss_utils", "transformers.trainer")
# Arguments of a causal LM's forward that reach its loss function (transformers passes all of them).
_LOSS_ARGUMENTS = ("num_items_in_batch", "ignore_index", "shift_labels")
# What some transformers forwards do to the head's output or add to its loss, and fastce's fused head does
# not reproduce: a model whose config sets one (to anything but None or 0) is refused, never given a wrong loss.
_UNSUPPORTED_CONFIG = ("lm_head_multiplier", "logits_mup_width_multiplier", "logits_soft_cap", "output_logit_soft_cap",
                       "z_loss_coefficient")


# ---------------------------------------------------------------------------------------------
# The loss


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int,
                   num_items_in_batch: Union[None, int, Tensor] = None, ignore_index: int = -100,
                   shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ForCausalLMLoss computed by fastce.cross_entropy.

    Position i predicts labels[..., i + 1] (the last position predicts nothing), unless shift_labels
    gives the targets of every position. The loss is the mean over targets != ignore_index, or, with
    num_items_in_batch (an int or a tensor, e.g. the tokens of every micro-batch of a gradient
    accumulation step), their sum divided by it, on the device (no host sync). The result is float32
    for any logits dtype, as transformers' (which upcasts the logits; fastce computes in fp32 without
    the copy). Other keyword arguments are accepted and ignored, as transformers does.
    """
    targets = _next_token_targets(labels, shift_labels, ignore_index, logits.device)
    logits = logits.reshape(-1, vocab_size)
    normalisation = _normalisation(num_items_in_batch, vocab_size, logits.device)
    return fastce.cross_entropy(logits, targets, ignore_index=ignore_index, loss_dtype=torch.float32, **normalisation)


def _next_token_targets(labels: Tensor, shift_labels: Optional[Tensor], ignore_index: int, device) -> Tensor:
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1).to(device)


def _normalisation(num_items_in_batch: Union[None, int, Tensor], n_classes: int, device) -> dict:
    """fastce's arguments for the mean over the targets, or, given num_items_in_batch, the sum divided by it.

    The division is done by class weights 1/num_items_in_batch: the kernel then computes the final
    gradient in fp32, and the upstream gradient stays 1 (dividing the loss afterwards would hand the
    kernel an upstream 1/num_items_in_batch rounded to the loss's dtype, 8 bits for bf16)."""
    if num_items_in_batch is None:
        return dict(reduction="mean")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(device)
    return dict(reduction="sum", weight=torch.ones(n_classes, device=device) / num_items_in_batch)


def _head_operands(model: PreTrainedModel, hidden: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[float]]:
    """(hidden (N, H), weight, bias, softcap) such that the model's logits are softcap·tanh((hidden·Wᵀ + b) / softcap)
    (no tanh when softcap is None): the head's operands in the autocast dtype, its logit scale folded into
    hidden and bias."""
    head = _lm_head(model)
    if isinstance(head.weight, DTensor):  # FSDP2 gives a head sharded with its parent its whole weight in forward
        raise TypeError(
            "the LM head's weight is a DTensor in forward (tensor parallelism, or FSDP2 without the head's parameters "
            "gathered): fastce's fused head needs the whole weight; use apply_fastce(model, fused_linear=False)")
    scale, softcap = _logit_transform(model)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # nn.Linear would run in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return hidden, weight, bias, softcap


def _fused_head_loss(model: PreTrainedModel, hidden: Tensor, labels: Tensor,
                     num_items_in_batch: Union[None, int, Tensor] = None, ignore_index: int = -100,
                     shift_labels: Optional[Tensor] = None) -> Tensor:
    """model.loss_function(head(hidden), labels, …) without the logits: fastce.linear_cross_entropy."""
    targets = _next_token_targets(labels, shift_labels, ignore_index, hidden.device)
    hidden, weight, bias, softcap = _head_operands(model, hidden)
    device_type = hidden.device.type
    normalisation = _normalisation(num_items_in_batch, weight.shape[0], hidden.device)
    with torch.autocast(device_type, enabled=False):
        return fastce.linear_cross_entropy(hidden, weight, targets, linear_bias=bias, ignore_index=ignore_index,
                                           softcap=softcap, loss_dtype=torch.float32, **normalisation)


# ---------------------------------------------------------------------------------------------
# Per-token log-probabilities and entropy (RL, DESIGN §7.2)


@dataclasses.dataclass
class TokenLogprobsOutput(ModelOutput):
    """What token_logprobs returns in place of logits: float32 (B, S) tensors, as TRL's fused head
    returns them (`output["log_probs"]`, `output.entropy`)."""
    log_probs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None


def causal_lm_token_logprobs(model: PreTrainedModel, input_ids: Tensor, labels: Optional[Tensor] = None, *,
                   shift_labels: Optional[Tensor] = None, logits_to_keep: Union[int, Tensor] = 0,
                   temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                   **model_kwargs) -> TokenLogprobsOutput:
    """The log-probability of each next token under a causal LM, and on request the entropy of its
    next-token distribution at each position, from the last hidden states through
    fastce.linear_token_logprobs: the (tokens × vocab) logits are never built, and both outputs are
    differentiable (into the decoder and the head) for GRPO/PPO-style losses.

    Position i of the (kept) hidden states scores labels[:, i + 1] (transformers' shift), or
    shift_labels[:, i]; labels default to input_ids (to their last logits_to_keep positions). Positions
    whose target is ignore_index, and the last one, get 0. temperature divides the logits. model_kwargs
    (attention_mask, position_ids, …) go to the decoder. The model's logit scale (Cohere, Granite) is
    honoured; soft-capped logits (Gemma 2/3's final_logit_softcapping) are refused with a TypeError,
    as the fused head's other refusals: use fastce.token_logprobs on model(...).logits there.
    """
    if model.base_model is model:
        raise TypeError(f"{type(model).__name__} has no decoder under a head (model.base_model is the model itself): "
                        "token_logprobs expects a *ForCausalLM")
    model_kwargs.setdefault("use_cache", False)
    hidden = slice_logits_to_keep(model.base_model(input_ids=input_ids, **model_kwargs)[0], logits_to_keep)
    if labels is None and shift_labels is None:
        labels = input_ids[:, -hidden.shape[1]:] if isinstance(logits_to_keep, int) else input_ids[:, logits_to_keep]
    targets = _next_token_targets(labels, shift_labels, ignore_index, hidden.device)
    row_shape = hidden.shape[:-1]
    hidden, weight, bias, softcap = _head_operands(model, hidden)
    if softcap is not None:
        raise TypeError(f"{type(model).__name__} soft-caps its logits (final_logit_softcapping), which "
                        "fastce.linear_token_logprobs does not: use fastce.token_logprobs on model(...).logits")
    with torch.autocast(hidden.device.type, enabled=False):
        outputs = fastce.linear_token_logprobs(hidden, weight, targets, linear_bias=bias, temperature=temperature,
                                               ignore_index=ignore_index, return_entropy=return_entropy)
    log_probs, entropy = outputs if return_entropy else (outputs, None)
    return TokenLogprobsOutput(log_probs=log_probs.reshape(row_shape),
                               entropy=None if entropy is None else entropy.reshape(row_shape))


token_logprobs = causal_lm_token_logprobs  # deprecated alias: the earlier name shadowed fastce.token_logprobs


# ---------------------------------------------------------------------------------------------
# What a model must be for the fused head


def _check_causal_lm(model) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"apply_fastce expects a transformers PreTrainedModel (a *ForCausalLM), got {type(model).__name__}: "
            "apply it to the model itself, before torch.compile, and to peft_model.get_base_model() under PEFT")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"{type(model).__name__} is an encoder-decoder model: apply_fastce handles causal LMs")
    if model.base_model is model:
        raise TypeError(f"{type(model).__name__} has no decoder under a head (model.base_model is the model itself): "
                        "apply_fastce expects a *ForCausalLM")
    loss = model.loss_function
    if loss is not _STOCK_LOSS and loss is not causal_lm_loss:
        raise TypeError(f"{type(model).__name__}.loss_function is {getattr(loss, '__name__', loss)!r}, not transformers' "
                        "ForCausalLMLoss: fastce reproduces only that loss and would replace yours")


def _lm_head(model: PreTrainedModel) -> nn.Linear:
    """The model's output embeddings, if fastce can use their weight and bias in place of calling them."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__}.get_output_embeddings() is None: no LM head to fuse")
    name = type(head).__name__
    if name == "ModulesToSaveWrapper":
        raise TypeError(
            "the LM head is wrapped by PEFT's ModulesToSaveWrapper (modules_to_save includes the head): fastce's "
            "fused head does not follow PEFT's active adapter. Use apply_fastce(model, fused_linear=False)")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            f"the LM head is a {name}, not a plain torch.nn.Linear (a quantised, adapter-wrapped or custom head computes "
            "its logits its own way, which fastce's fused head cannot reproduce): use apply_fastce(model, "
            "fused_linear=False)")
    if "forward" in vars(head) or head._forward_hooks or head._forward_pre_hooks:
        raise TypeError(
            "the LM head has forward hooks or a patched forward (FSDP2's fully_shard(lm_head) on its own, accelerate's "
            "offloading, …), which fastce's fused head, using the weight without calling the head, would skip: shard "
            "the head with its parent (fully_shard(model)), or use apply_fastce(model, fused_linear=False)")
    if not head.weight.is_floating_point():
        raise TypeError(f"the LM head's weight is {head.weight.dtype}: fastce's fused head needs a floating-point weight")
    return head


def _logit_transform(model: PreTrainedModel) -> tuple[float, Optional[float]]:
    """(scale, softcap) such that the model's logits are softcap·tanh(scale·head(h) / softcap)."""
    config = model.config.get_text_config()
    for name in _UNSUPPORTED_CONFIG:
        if getattr(config, name, None):
            raise TypeError(f"{type(model).__name__}'s config sets {name}, which changes the logits or the loss in a way "
                            "fastce's fused head does not reproduce: use apply_fastce(model, fused_linear=False)")
    scale = 1.0
    logit_scale = getattr(model, "logit_scale", None)  # Cohere: logits · logit_scale
    if logit_scale is not None:
        if not isinstance(logit_scale, (int, float)):
            raise TypeError(f"{type(model).__name__}.logit_scale is a {type(logit_scale).__name__}, not a number: "
                            "use apply_fastce(model, fused_linear=False)")
        scale *= logit_scale
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if logits_scaling is not None:
        scale /= logits_scaling
    return scale, getattr(config, "final_logit_softcapping", None)


# ---------------------------------------------------------------------------------------------
# The patched forward


@dataclasses.dataclass
class _Patch:
    """What a patched model's forward needs. It lives on the model, so that copy.deepcopy(model)
    (TRL's reference models, EMA copies) gets a forward that runs the copy."""
    stock_forward: Callable  # the forward apply_fastce replaced, bound to the model
    argument_names: tuple  # its parameters that can be given by position, in order
    output_class: type  # what it returns
    output_fields: tuple  # the fields of output_class taken from the decoder's output
    decoder_parameters: Optional[frozenset]  # the decoder's forward's parameter names; None: it takes any (**kwargs)

    def decoder_takes(self, name: str) -> bool:
        return self.decoder_parameters is None or name in self.decoder_parameters


def _output_class(stock_forward: Callable) -> type:
    annotation = inspect.signature(stock_forward).return_annotation
    if isinstance(annotation, str):  # `from __future__ import annotations` in the modeling file
        annotation = getattr(sys.modules.get(inspect.unwrap(stock_forward).__module__), annotation, None)
    is_causal_output = (isinstance(annotation, type) and issubclass(annotation, ModelOutput)
                        and {"loss", "logits"} <= {field.name for field in dataclasses.fields(annotation)})
    return annotation if is_causal_output else CausalLMOutputWithPast


def _make_patch(model: PreTrainedModel, stock_forward: Callable) -> _Patch:
    parameters = inspect.signature(stock_forward).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    output_class = _output_class(stock_forward)
    decoder_parameters = inspect.signature(model.base_model.forward).parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in decoder_parameters)
    return _Patch(stock_forward, tuple(p.name for p in parameters if p.kind in positional), output_class,
                  tuple(f.name for f in dataclasses.fields(output_class) if f.name not in ("loss", "logits")),
                  None if takes_any else frozenset(p.name for p in decoder_parameters))


def _patched_forward(model: PreTrainedModel, *args, **kwargs):
    patch = model._fastce_patch
    names = patch.argument_names
    if len(args) > len(names) or any(name in kwargs for name in names[:len(args)]):
        return patch.stock_forward(*args, **kwargs)  # a bad call: the model's own forward says what is wrong
    arguments = {**dict(zip(names, args)), **kwargs}
    if arguments.get("labels") is None:
        return patch.stock_forward(*args, **kwargs)
    _check_no_router_loss(model, patch, arguments.get("output_router_logits"))
    if model.loss_function is not causal_lm_loss:
        raise TypeError(f"{type(model).__name__}.loss_function was replaced after apply_fastce: the fused head computes "
                        "transformers' ForCausalLMLoss only; call apply_fastce(model, fused_linear=False) to keep yours")
    labels = arguments.pop("labels")
    hidden_positions = arguments.pop("logits_to_keep", 0)
    return_dict = arguments.pop("return_dict", None)
    decoder_arguments = {name: value for name, value in arguments.items() if patch.decoder_takes(name)}
    if patch.decoder_takes("return_dict"):
        decoder_arguments["return_dict"] = True
    outputs = model.base_model(**decoder_arguments)
    hidden = slice_logits_to_keep(outputs[0], hidden_positions)
    loss = _fused_head_loss(model, hidden, labels, **{k: arguments[k] for k in _LOSS_ARGUMENTS if k in arguments})
    output = patch.output_class(loss=loss, logits=None, **{name: outputs.get(name) for name in patch.output_fields})
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return output if return_dict else output.to_tuple()


def _check_no_router_loss(model: PreTrainedModel, patch: _Patch, output_router_logits: Optional[bool]) -> None:
    """Mixture-of-experts forwards add a load-balancing loss computed from the router logits, by per-model code."""
    if output_router_logits is None:
        output_router_logits = getattr(model.config.get_text_config(), "output_router_logits", False)
    if output_router_logits and "aux_loss" in patch.output_fields:
        raise TypeError(f"{type(model).__name__} adds the routers' auxiliary loss to the loss (output_router_logits), "
                        "which fastce's fused head does not reproduce: set output_router_logits=False, or use "
                        "apply_fastce(model, fused_linear=False)")


def _forward_signed_like(stock_forward: Callable) -> Callable:
    """_patched_forward under the stock forward's signature and docstring: Trainer keeps the dataset
    columns and generate() the arguments that the signature names."""
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    signature = inspect.signature(stock_forward)
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
    forward.__doc__ = stock_forward.__doc__
    return forward


def _remove_patch(model: PreTrainedModel) -> None:
    patch = vars(model).pop("_fastce_patch", None)
    if patch is None:
        return
    del model.forward
    if getattr(patch.stock_forward, "__func__", None) is not type(model).forward:
        model.forward = patch.stock_forward  # an instance-level forward someone else installed (accelerate's hooks)


def apply_fastce(model: PreTrainedModel, *, fused_linear: bool = True) -> PreTrainedModel:
    """Make fastce compute `model`'s causal-LM loss; returns the same model (patched in place).

    fused_linear=True: a forward with labels computes the loss from the last hidden states with
    fastce.linear_cross_entropy and returns logits=None; without labels the forward is the model's own.
    fused_linear=False: only model.loss_function becomes causal_lm_loss (the logits are built as usual).
    Applying again replaces the previous patch. Raises TypeError, naming the case, for a model the fused
    head cannot reproduce exactly (a head that is not a plain nn.Linear, PEFT's ModulesToSaveWrapper, hooks
    on the head, a DTensor head in forward, an unknown transform of the logits, a mixture of experts' router
    loss, a custom loss).
    """
    _check_causal_lm(model)
    patch = None
    if fused_linear:  # every check before the model is touched
        _lm_head(model)
        _logit_transform(model)
        previous = vars(model).get("_fastce_patch")
        patch = _make_patch(model, model.forward if previous is None else previous.stock_forward)
        _check_no_router_loss(model, patch, None)
    _remove_patch(model)
    model.loss_function = causal_lm_loss
    if patch is not None:
        model._fastce_patch = patch
        model.forward = types.MethodType(_forward_signed_like(patch.stock_forward), model)
    return model


# ---------------------------------------------------------------------------------------------
# Registration


def register() -> None:
    """Make causal_lm_loss transformers' loss for every causal LM, patched or not: each LOSS_MAPPING entry
    that is ForCausalLMLoss ("ForCausalLM", "ForConditionalGeneration", …) and the name ForCausalLMLoss
    where transformers looks it up. Models still build their logits (apply_fastce avoids that).
    unregister() undoes it."""
    _swap(_STOCK_LOSS, causal_lm_loss)


def unregister() -> None:
    """Give transformers back its own ForCausalLMLoss wherever register() installed causal_lm_loss."""
    _swap(causal_lm_loss, _STOCK_LOSS)


def _swap(old: Callable, new: Callable) -> None:
    mapping = loss_utils.LOSS_MAPPING
    for key in [key for key, loss in mapping.items() if loss is old]:
        mapping[key] = new
    for module_name in _MODULES_NAMING_THE_LOSS:
        module = sys.modules.get(module_name)
        if getattr(module, "ForCausalLMLoss", None) is old:
            module.ForCausalLMLoss = new

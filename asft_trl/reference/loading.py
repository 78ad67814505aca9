"""Where the reference comes from: building, freezing and checking the reference model, and switching adapters off.

The reference is the model before fine-tuning. Three cases (see docs/reference_model.md):
- full fine-tuning: a frozen copy of the starting model (or a named reference loaded from a path);
- PEFT with no reference named: no second model, the policy network with its adapters switched off;
- kl_coef == 0: no reference at all.
A separate reference can be made lighter (a lower dtype, or bitsandbytes 8-/4-bit with the LM head left unquantised)
and can be checked for being syncable with the policy (`sync_ref_model`).
This module must not compute losses; it only hands the trainer a model (or a context) to run.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, get_config_model_id, use_adapter

# `ASFTConfig.ref_model_dtype` / `ref_model_quantization` values
REF_MODEL_DTYPES = ("float32", "bfloat16", "float16")
REF_MODEL_QUANTIZATIONS = ("8bit", "4bit")


def output_vocab_size(model: torch.nn.Module) -> int:
    """Number of rows of the LM head, i.e. the size of the distribution the model predicts.

    Read from the head rather than `config.vocab_size`, which a resize can leave stale. Under ZeRO-3 a parameter is
    partitioned and its full shape lives in `ds_shape`.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return model.config.get_text_config().vocab_size
    weight = head.weight
    shape = getattr(weight, "ds_shape", None) or weight.shape
    return int(shape[0])


def check_same_vocabulary(policy_vocab: int, ref_vocab: int, ref_name: str) -> None:
    """Refuse a reference that predicts over a different vocabulary: the per-token KL would compare unrelated tokens."""
    if policy_vocab != ref_vocab:
        raise ValueError(
            f"The reference model {ref_name} predicts over {ref_vocab} tokens but the policy over {policy_vocab}: "
            "the KL anchor needs both to share one vocabulary (same tokenizer, same LM head size). Fix: use a "
            "reference from the same model family and tokenizer, leave `ref_model`/`ref_model_name_or_path` unset to "
            "reference to the starting model, or resize the reference's embeddings the same way as the policy's."
        )


def vocab_size_from_path(name_or_path: str, trust_remote_code: bool = False) -> int:
    """Vocabulary size from a model's config alone (the policy's or the reference's), so a mismatch is caught before
    any weights are loaded."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return config.get_text_config().vocab_size


def freeze(model: torch.nn.Module, disable_dropout: bool = True) -> torch.nn.Module:
    """No gradients, evaluation mode, and (by default) no dropout: the reference must be deterministic and fixed."""
    model.requires_grad_(False)
    model.eval()
    if disable_dropout:
        disable_dropout_in_model(model)
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of the policy as it is now, before any update.

    Copying (rather than reloading from `config._name_or_path`) keeps what TRL did to the policy at set-up, such as
    embeddings resized for a cloned chat template, and works for models built in memory or loaded from a GGUF file.
    TRL patches `forward` onto the policy instance with a closure over the policy's own original forward; the copy
    drops that instance attribute so that it runs its own class forward.
    """
    ref = copy.deepcopy(model)
    ref.__dict__.pop("forward", None)
    return ref


def load_reference(name_or_path: str, init_kwargs: dict, *, distributed_type: str, trust_remote_code: bool):
    """Load a reference from a path or Hub id with the given `from_pretrained` keyword arguments."""
    kwargs = dict(init_kwargs)
    if distributed_type != "NO":
        # Distributed training places the model itself: with TRL's default ("auto") every process would load the
        # reference across (or onto the first of) the GPUs it sees. Any distributed type, not only TRL's own
        # MULTI_GPU/DEEPSPEED: by the time the reference is loaded, accelerate has renamed the run FSDP. A quantised
        # reference then goes to the process's current device (bitsandbytes' default)
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    return create_model_from_path(name_or_path, **kwargs)


def default_reference(policy: PreTrainedModel, init_kwargs: dict, *, distributed_type: str, trust_remote_code: bool):
    """The starting model as the reference for full fine-tuning.

    Under ZeRO-3 the policy's parameters are already partitioned and can't be copied, so the reference is reloaded
    from the policy's path instead (and the caller checks that it still matches the policy's vocabulary).
    """
    if not is_deepspeed_zero3_enabled():
        return frozen_copy(policy)
    path = get_config_model_id(policy.config)
    if not path:
        raise ValueError(
            "Under DeepSpeed ZeRO-3 the reference model is reloaded from the policy's path, but this policy has none "
            "(it was built in memory). Save it with `save_pretrained` and pass the path as the model, or set "
            "`ref_model_name_or_path`."
        )
    kwargs = dict(init_kwargs)
    kwargs.setdefault("dtype", policy.dtype)
    return load_reference(path, kwargs, distributed_type=distributed_type, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def adapters_disabled(peft_model, deterministic: bool):
    """Run the PEFT model as its base model: adapters off and, when asked, dropout off (evaluation mode)."""
    was_training = peft_model.training
    if deterministic and was_training:
        peft_model.eval()
    try:
        with use_adapter(peft_model, adapter_name=None):
            yield
    finally:
        if deterministic and was_training:
            peft_model.train()


def lighter_init_kwargs(
    init_kwargs: dict, dtype: str | None, quantization: str | None, policy_dtype: torch.dtype
) -> dict:
    """`from_pretrained` keyword arguments for a reference in `dtype` and/or quantised with bitsandbytes.

    A 4-bit reference computes in `dtype` (default: the policy's dtype), which is also the dtype of the modules
    bitsandbytes leaves alone (norms, embeddings, the LM head). transformers leaves the output embeddings
    unquantised, so the fused loss still reads a plain head.
    """
    kwargs = dict(init_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is None:
        return kwargs
    from transformers import BitsAndBytesConfig

    compute_dtype = getattr(torch, dtype) if dtype is not None else policy_dtype
    kwargs.setdefault("dtype", compute_dtype)
    if quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    else:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    return kwargs


def policy_path_for_quantised_reference(policy: PreTrainedModel) -> str:
    """The policy's own path, from which a quantised copy of the starting model is loaded (weights can't be
    quantised by bitsandbytes from a model in memory)."""
    path = get_config_model_id(policy.config)
    if not path:
        raise ValueError(
            "ref_model_quantization loads a quantised reference from a path, but this policy was built in memory and "
            "has none. Save it with `save_pretrained` and pass that path as the model, or set "
            "`ref_model_name_or_path` to the starting model's path, or use `ref_model_dtype` instead."
        )
    return path


def cast_reference(model: torch.nn.Module, dtype: str | None) -> torch.nn.Module:
    """Cast a reference built in memory (the frozen copy, or a model passed in) to `dtype`, in place."""
    return model if dtype is None else model.to(getattr(torch, dtype))


def is_quantised(model: torch.nn.Module) -> bool:
    """Whether bitsandbytes (or another transformers quantizer) holds some of this model's weights."""
    return getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)


def check_syncable(policy: torch.nn.Module, ref_model: torch.nn.Module, ref_name: str) -> None:
    """Refuse a reference that `SyncRefModelCallback` can't mix with the policy: it pairs parameters in order, so
    both must have the same parameters, of the same shapes, in the same order."""
    policy_shapes = [tuple(getattr(p, "ds_shape", None) or p.shape) for p in policy.parameters()]
    ref_shapes = [tuple(getattr(p, "ds_shape", None) or p.shape) for p in ref_model.parameters()]
    if policy_shapes != ref_shapes:
        raise ValueError(
            f"sync_ref_model=True mixes the policy's weights into the reference {ref_name}, but the two have different "
            f"parameters ({len(policy_shapes)} against {len(ref_shapes)} tensors, or different shapes). Use a "
            "reference of the same architecture and size as the policy (or the default copy), or set "
            "sync_ref_model=False."
        )


def refuse_options_without_separate_reference(dtype: str | None, quantization: str | None, sync: bool) -> None:
    """Under PEFT with no reference named, the reference is the policy's own base weights (adapters off): there is no
    second model to keep in another dtype or quantise. And TRL's sync pairs the whole policy's parameters, adapters
    included, with the reference's, so it can't sync any reference under PEFT."""
    if dtype is not None or quantization is not None:
        name, value = ("ref_model_dtype", dtype) if dtype is not None else ("ref_model_quantization", quantization)
        raise ValueError(
            f"{name}={value!r} applies to a separate reference model, but under PEFT with no reference named, the "
            "reference is the policy's own base weights with the adapters switched off. Fix: to make both lighter, "
            "quantise the policy itself (QLoRA: `load_in_4bit: true` / a `quantization_config`); or name a reference "
            "(`ref_model_name_or_path`) to load it in that form; or unset " + name + "."
        )
    if sync:
        raise ValueError(
            "sync_ref_model=True is not supported with PEFT: with no reference named, the reference is the policy's "
            "own base weights (adapters off), so there is nothing to sync; and TRL's SyncRefModelCallback pairs the "
            "policy's parameters, adapters included, with a named reference's, which don't match. Fix: full "
            "fine-tuning (no peft_config / use_peft: false), or sync_ref_model=False."
        )


# ------------------------------------------------------------------ a PeftModel that starts with a trained adapter

# The frozen copy of a given PeftModel's adapter (TRL's DPO names its copy "ref"; here the frozen model is "reference")
REFERENCE_ADAPTER = "reference"


def add_reference_adapter(peft_model) -> str:
    """Make the model as it was given the reference of a `PeftModel` passed in with its adapter: its active adapter is
    copied into a second, frozen adapter named `reference`, as TRL's DPO does (`ref`). Returns the name of the adapter
    trained.

    A PeftModel given to the trainer may carry a trained adapter (or one whose initialisation changes the model), so
    switching its adapters off would make the reference another model than the one training starts from. The copy costs
    one adapter's memory, no second model. A `reference` adapter left on the model by an earlier trainer is replaced,
    so the reference is always the model as this trainer received it. Each copied tensor keeps its source's dtype and
    device (QLoRA keeps adapters in bfloat16), and the copy's dropout is off.
    """
    if len(peft_model.active_adapters) != 1:
        raise ValueError(
            f"The PeftModel passed as `model` has {len(peft_model.active_adapters)} active adapters "
            f"({peft_model.active_adapters}); the reference is the model as given, with its one trained adapter. Fix: "
            "activate one adapter (`model.set_adapter(name)`), or merge them into the base model first."
        )
    active = peft_model.active_adapter
    config = peft_model.peft_config[active]
    if config.is_prompt_learning:
        raise ValueError(
            f"The PeftModel passed as `model` carries a {config.peft_type} adapter (prompt learning), which can't be "
            "copied into a frozen reference adapter. Fix: name the reference (`ref_model_name_or_path`, e.g. the "
            "model with this adapter merged and saved), or train a new adapter from the base model (`peft_config`)."
        )
    if any(hasattr(p, "ds_id") for p in peft_model.parameters()):
        # Loaded under ZeRO-3's zero.Init: each process holds a shard, and a copy of `.data` would copy no weights
        raise ValueError(
            "The PeftModel passed as `model` is already partitioned by DeepSpeed ZeRO-3, so its adapter can't be "
            "copied into the frozen reference adapter. Fix: build the PeftModel before the ZeRO-3 "
            "TrainingArguments/ASFTConfig (so it is partitioned when training starts), use ZeRO-2 or FSDP2, or name "
            "the reference (`ref_model_name_or_path`, e.g. the model with this adapter merged and saved)."
        )
    if REFERENCE_ADAPTER in peft_model.peft_config:
        peft_model.delete_adapter(REFERENCE_ADAPTER)
    peft_model.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(config))

    params = dict(peft_model.named_parameters())
    copied = set()
    with torch.no_grad():
        for name, param in params.items():
            parts = name.split(".")
            if active not in parts:
                continue
            target = ".".join(REFERENCE_ADAPTER if part == active else part for part in parts)
            params[target].data = param.detach().clone()
            copied.add(target)
    missing = [n for n in params if REFERENCE_ADAPTER in n.split(".") and n not in copied]
    if missing:
        raise RuntimeError(
            f"The reference adapter has parameters with no counterpart in adapter {active!r}: {missing[:3]}"
        )
    for name, param in params.items():
        if REFERENCE_ADAPTER in name.split("."):
            param.requires_grad_(False)
    for name, module in peft_model.named_modules():
        if isinstance(module, torch.nn.Dropout) and name.split(".")[-1] == REFERENCE_ADAPTER:
            module.p = 0.0
    return active


@contextlib.contextmanager
def reference_adapter_active(peft_model, deterministic: bool):
    """Run the PeftModel with its frozen `reference` adapter instead of the trained one (and, when asked, in evaluation
    mode). PEFT's `set_adapter` sets the gradients of the adapters it switches; every flag is put back afterwards."""
    previous = peft_model.active_adapter
    flags = [
        (p, p.requires_grad)
        for n, p in peft_model.named_parameters()
        if previous in n.split(".") or REFERENCE_ADAPTER in n.split(".")
    ]
    was_training = peft_model.training
    if deterministic and was_training:
        peft_model.eval()
    peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        for param, flag in flags:
            param.requires_grad_(flag)
        if deterministic and was_training:
            peft_model.train()

"""How the fused loss reaches a causal LM's backbone and head without the model building its logits.

`patch_forward` adds two keyword arguments to a model's `forward`, which travel through every wrapper that passes
keyword arguments on (PEFT, DDP, DeepSpeed, FSDP), so that the loss runs inside the model's own forward as those
wrappers expect:
- `asft_hidden_states=True`: run the backbone only and return its output (the reference's hidden states);
- `asft_loss_fn=f`: run the backbone and return `f(model, backbone_output)` (the policy's fused loss).
Without either, the forward is the previous one, so generation and TRL's fused head are unchanged.
A model object is patched once, however many trainers are built on it (a notebook cell run again), and the patch closes
over the model alone: it holds no trainer, so nothing a trainer built outlives it.

`head_parameters` and `head_transform` read the head's weight, bias and logit transform from a model; a head the
fused loss can't express is reported by `fused_head_problem`. Nothing here computes a loss.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

from ..losses import HeadTransform

# Keyword arguments of a causal LM's forward that its backbone does not take
_HEAD_ONLY_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head", "logits_to_keep")


# The models whose forward is patched: a later trainer on the same model object (below TRL's own fused head, which each
# SFTTrainer adds on top) finds the patch in place and adds none. Weak, so a model is never kept alive by this set.
_PATCHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def patch_forward(causal_lm: torch.nn.Module) -> None:
    """Give `causal_lm.forward` the `asft_hidden_states` / `asft_loss_fn` modes (see the module docstring), once.

    The keyword arguments pass through any forward patched on top later (TRL's fused head passes `**kwargs` on), so
    the patch may sit anywhere in the chain. A copy made with `reference.frozen_copy` is a new object and is patched
    on its own.
    """
    if causal_lm in _PATCHED:
        return
    previous = causal_lm.forward

    @functools.wraps(previous)
    def forward(*args, asft_hidden_states: bool = False, asft_loss_fn: Callable | None = None, **kwargs):
        if not asft_hidden_states and asft_loss_fn is None:
            return previous(*args, **kwargs)
        for name in _HEAD_ONLY_KWARGS:
            kwargs.pop(name, None)
        kwargs["use_cache"] = False
        backbone_outputs = causal_lm.base_model(*args, **kwargs)
        return backbone_outputs if asft_loss_fn is None else asft_loss_fn(causal_lm, backbone_outputs)

    causal_lm.forward = forward
    _PATCHED.add(causal_lm)


def head_transform(config) -> HeadTransform:
    """The logit scaling and soft-capping a model's head applies after its matmul, read from its config."""
    text_config = config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text_config, name, None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by `logits_scaling`; HyperCLOVA X multiplies by it
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return HeadTransform(
        logit_scale=1.0 if scale is None else float(scale),
        softcap=getattr(text_config, "final_logit_softcapping", None),
    )


def fused_head_problem(causal_lm: torch.nn.Module) -> str | None:
    """Why the fused loss can't stand in for this model's head, or None when it can."""
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if head is None or not hasattr(causal_lm, "base_model"):
        return f"{type(causal_lm).__name__} has no output embeddings / backbone the fused loss can read"
    if hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        return "the LM head is adapted or trained by PEFT (`target_modules`/`modules_to_save` include it)"
    if not isinstance(head, torch.nn.Linear):
        return f"the LM head is a {type(head).__name__}, not a linear layer"
    # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear but hold integer codes, not the head's matrix
    if type(head).__module__.split(".")[0] == "bitsandbytes" or not head.weight.is_floating_point():
        return f"the LM head is quantised ({type(head).__name__})"
    return None


def head_parameters(
    causal_lm: torch.nn.Module, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias, whole: FSDP2 shards them as DTensors, gathered here (differentiably).

    With `dtype` narrower than a sharded head's own, each shard is cast before the gather, as FSDP's mixed precision
    does for a module's own forward: the reference's float32 head then reaches the loss in the bf16 the policy's head
    has there (the same values at step 0), and half as many bytes are gathered.
    """
    head = causal_lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        if dtype is not None and dtype.itemsize < weight.dtype.itemsize:
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias

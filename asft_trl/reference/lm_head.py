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
fused loss can't express is reported by `fused_head_problem`. `FusedHeadLoss` is the `asft_loss_fn` the trainer passes:
it reads both heads, brings the scored rows to the head's device and calls `asft_trl.losses.chunked_asft_loss`. The
loss itself is computed there, never here.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor
from transformers.modeling_outputs import CausalLMOutputWithPast
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..losses import HeadTransform, TokenTerms, TopKReference, chunked_asft_loss

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


class FusedHeadLoss:
    """The policy's fused loss, run inside its forward as `asft_loss_fn` (`patch_forward`), for one batch.

    Called with the policy's causal LM and its backbone output, it takes the scored rows of the policy's hidden states
    (and of the reference's, given as `ref_hidden`, or the stored reference), reads both heads (gathered when FSDP2
    or ZeRO-3 shard them), moves the rows to the head's device and runs `chunked_asft_loss`; with
    `measure_full_kl` it also measures the exact KL beside an estimator's (evaluation only).

    The forward's output carries only the loss: DDP, DeepSpeed and FSDP2 pass a forward's output through their own
    hooks. The per-token terms and the exact KL are read from this object afterwards (`terms`, `full_kl`); it lives
    for one `compute_loss` call. A plain class on purpose: DDP and FSDP walk a forward's keyword arguments and rebuild
    any dataclass they find (`torch.distributed.utils._apply_to_tensors`), which would leave the results on a copy.

    Args:
        labels: [B, T] target ids, already shifted to the hidden states' positions; `mask` marks the scored ones.
        shifted: whether the hidden states are already aligned with `labels` (context/sequence parallelism);
            otherwise the last position is dropped.
        ref_hidden: the reference's backbone output at the same positions (already aligned), or None.
        ref_lm: the reference's own causal LM when it is a separate model; None when the reference is the policy's
            network (adapters off), whose head is then the policy's.
        ref_topk, ref_token_log_probs: the precomputed reference of the scored tokens, if any.
        loss_kwargs: `kl_coef`, `loss_type`, `kl_direction`, `num_items_in_batch`, `dft_weight_floor`, `kl_estimator`.
    """

    def __init__(
        self,
        *,
        labels: torch.Tensor,
        mask: torch.Tensor,
        shifted: bool,
        ref_hidden: torch.Tensor | None,
        ref_lm: torch.nn.Module | None,
        ref_topk: TopKReference | None,
        ref_token_log_probs: torch.Tensor | None,
        chunk_size: int | None,
        loss_kwargs: dict,
        measure_full_kl: bool,
    ):
        self.labels, self.mask, self.shifted = labels, mask, shifted
        self.ref_hidden, self.ref_lm = ref_hidden, ref_lm
        self.ref_topk, self.ref_token_log_probs = ref_topk, ref_token_log_probs
        self.chunk_size, self.loss_kwargs, self.measure_full_kl = chunk_size, loss_kwargs, measure_full_kl
        self.terms: TokenTerms | None = None
        self.full_kl: torch.Tensor | None = None

    def __call__(self, policy_lm: torch.nn.Module, backbone_outputs) -> CausalLMOutputWithPast:
        hidden = backbone_outputs.last_hidden_state
        hidden = hidden if self.shifted else hidden[:, :-1]
        weight, bias = head_parameters(policy_lm)
        # With the model split across devices (`device_map`) the backbone can end where the head is not
        on_head = self.mask.to(weight.device)
        ref_hidden, ref_weight, ref_bias = self.ref_hidden, None, None
        if ref_hidden is not None:
            # Under PEFT the reference is the same network with adapters off, so its head is the policy's own. A
            # sharded reference head is gathered in the dtype the policy's head has here (FSDP2 mixed precision), so
            # that at step 0 both are the same matrix
            ref_weight, ref_bias = (
                (weight, bias) if self.ref_lm is None else head_parameters(self.ref_lm, dtype=weight.dtype)
            )
        heads = {id(t): t for t in (weight, bias, ref_weight, ref_bias) if t is not None}
        fused_inputs = dict(
            hidden=hidden.to(weight.device)[on_head],
            weight=weight,
            labels=self.labels.to(weight.device)[on_head],
            ref_hidden=None if ref_hidden is None else ref_hidden.to(weight.device)[on_head],
            ref_weight=ref_weight,
            bias=bias,
            ref_bias=ref_bias,
            head=head_transform(policy_lm.config),
            # None: the same head (and transform) as the policy's
            ref_head=None if self.ref_lm is None else head_transform(self.ref_lm.config),
            chunk_size=self.chunk_size,
        )
        ref_topk, ref_token_log_probs = self.ref_topk, self.ref_token_log_probs
        with maybe_gather_lm_head_ctx(*heads.values()):
            loss, self.terms = chunked_asft_loss(
                **fused_inputs,
                ref_topk=None if ref_topk is None else ref_topk.to(weight.device),
                ref_token_log_probs=None if ref_token_log_probs is None else ref_token_log_probs.to(weight.device),
                **self.loss_kwargs,
            )
            if self.measure_full_kl:
                self.full_kl = chunked_asft_loss(
                    **fused_inputs, **{**self.loss_kwargs, "kl_estimator": "full", "kl_coef": 0.0}
                )[1].kl
        return CausalLMOutputWithPast(loss=loss)

"""The reference as one object: which model the KL term anchors to, decided once from the config, and how it runs.

`build_reference` decides which form the reference takes (docs/reference_model.md) and returns it as a `Reference`:
- `SEPARATE`: a model of its own (a frozen copy of the starting model, a named reference, cast or quantised), checked
  against the policy's vocabulary, frozen, and prepared for the launch (DeepSpeed/FSDP as TRL's DPO prepares its own);
- `ADAPTERS_OFF`: under PEFT with no reference named, the policy's own network with its adapters switched off (no
  second model);
- `FROZEN_ADAPTER`: for a `PeftModel` given with its adapter, a frozen copy of that adapter (`REFERENCE_ADAPTER`),
  switched on instead of the trained one;
- `PRECOMPUTED`: with `precompute_ref_log_probs`, one pass of the starting model (or of the named reference) over the
  datasets before training (`precompute`, `cache`); during training nothing runs and the reference's values come
  with each batch (`Reference.take_stored`).
Without an anchor (`kl_coef=0`) there is no reference: `build_reference` returns None.

A `Reference` runs on exactly the policy's inputs (`forward`), says whether its own head can feed the fused loss
(`head_problem`; `causal_lm` is its own causal LM, None when it shares the policy's network and head), and keeps the
frozen adapter out of what a save writes (`left_out_of_save`). How a reference is loaded, copied, lightened or
switched is `loading`'s; this module only chooses and holds it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.models import prepare_deepspeed, prepare_fsdp

from . import cache as reference_cache
from . import lm_head
from . import loading as ref_utils
from .precompute import PrecomputedReference, precompute_reference
from .tokenizer_check import check_reference_tokenizer, tokenizer_kwargs

logger = logging.getLogger(__name__)

# The forms a reference takes
SEPARATE, ADAPTERS_OFF, FROZEN_ADAPTER, PRECOMPUTED = "separate", "adapters_off", "frozen_adapter", "precomputed"
# Only while the precomputing pass runs: the policy itself before its first update, as it was given
STARTING_POLICY = "starting_policy"


@dataclass
class Reference:
    """The frozen model the KL term anchors to, in one of the forms of the module docstring.

    Attributes:
        kind: `SEPARATE`, `ADAPTERS_OFF`, `FROZEN_ADAPTER` or `PRECOMPUTED`.
        name: how messages and the precomputed cache's key name it.
        model: what runs, when it is a model of its own: prepared for the launch (a DeepSpeed engine, an FSDP module,
            or the model itself); None otherwise. `ASFTTrainer.ref_model` is this.
        causal_lm: the reference's own causal LM (the unwrapped `model`), whose head the fused loss reads; None when
            the reference is the policy's network, whose head is the policy's.
        adapter: the frozen reference adapter (`FROZEN_ADAPTER`), which a save leaves out.
        unwrap: the accelerator's `unwrap_model`, to reach the PeftModel inside the launch's wrappers.
        deterministic: run the policy's network in evaluation mode (no dropout) while it is the reference.
        precomputed: the datasets with the reference's columns, their collator and the top-k mass (`PRECOMPUTED`).
    """

    kind: str
    name: str
    model: torch.nn.Module | None = None
    causal_lm: torch.nn.Module | None = None
    adapter: str | None = None
    unwrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    deterministic: bool = True
    precomputed: PrecomputedReference | None = None

    def forward(self, model: torch.nn.Module, inputs: dict[str, Any], **kwargs):
        """The reference's forward, without gradients, on exactly the policy's inputs (same positions, same packing
        information). `model` is the policy as the Trainer calls it (wrapped for the launch): the reference runs
        through it when it is the policy's own network."""
        if self.kind == PRECOMPUTED:
            raise RuntimeError("The precomputed reference does not run: its values come with each batch.")
        with torch.no_grad():
            if self.model is not None:
                return self.model(**inputs, **kwargs)
            if self.kind == STARTING_POLICY:
                return model(**inputs, **kwargs)
            peft_model = self.unwrap(model) if self.unwrap is not None else model
            switch = ref_utils.reference_adapter_active if self.kind == FROZEN_ADAPTER else ref_utils.adapters_disabled
            with switch(peft_model, deterministic=self.deterministic):
                return model(**inputs, **kwargs)

    def head_problem(self) -> str | None:
        """Why the fused loss can't read this reference's own head, or None (also when it shares the policy's)."""
        return None if self.causal_lm is None else lm_head.fused_head_problem(self.causal_lm)

    @staticmethod
    def take_stored(inputs: dict[str, Any]):
        """The precomputed reference of this batch, taken out of `inputs` (top-k rows, or one log-probability per
        token), or None when the batch carries none."""
        return reference_cache.pop_reference(inputs)

    @contextlib.contextmanager
    def left_out_of_save(self, model: torch.nn.Module):
        """While a save runs: a PeftModel saves its trained adapters only, not the frozen reference adapter, so the
        output holds what it would without the reference."""
        if self.adapter is None or not is_peft_model(model):
            yield
            return
        trained = [name for name in model.peft_config if name != self.adapter]
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=trained)
        try:
            yield
        finally:
            del model.save_pretrained


def check_vocabulary_early(model, ref_model, args) -> None:
    """Catch a reference with another vocabulary before any data is tokenised, where that can be known early.

    When TRL will resize the policy (a cloned chat template) the sizes are only comparable after set-up, so the
    check is left to `build_reference`.
    """
    if not args.anchored or ref_model is None or args.chat_template_path is not None:
        return
    if isinstance(model, str):
        policy_vocab = ref_utils.vocab_size_from_path(model, args.trust_remote_code)
    else:
        policy_vocab = ref_utils.output_vocab_size(model)
    if isinstance(ref_model, str):
        ref_vocab = ref_utils.vocab_size_from_path(ref_model, args.trust_remote_code)
    else:
        ref_vocab = ref_utils.output_vocab_size(ref_model)
    ref_utils.check_same_vocabulary(
        policy_vocab, ref_vocab, repr(ref_model if isinstance(ref_model, str) else type(ref_model).__name__)
    )


def check_tokenizer_early(model, ref_model, ref_field: str, args, processing_class) -> None:
    """A named reference must use the policy's tokenizer (`tokenizer_check`): compared from the two tokenizers
    (`processing_class`, or the one at the policy's path, as TRL loads it) before any weights load."""
    if not args.anchored or not isinstance(ref_model, str):
        return
    policy = processing_class
    if policy is None:
        policy = model if isinstance(model, str) else ref_utils.get_config_model_id(model.config)
    check_reference_tokenizer(
        policy,
        ref_model,
        ref_field,
        policy_kwargs=tokenizer_kwargs(args.model_init_kwargs, args.trust_remote_code),
        ref_kwargs=tokenizer_kwargs(args.ref_model_init_kwargs or args.model_init_kwargs, args.trust_remote_code),
    )


def build_reference(
    ref_model: str | torch.nn.Module | None,
    args,
    policy: torch.nn.Module,
    *,
    given_peft_model: bool,
    accelerator,
    deepspeed: bool,
    fsdp: bool,
    datasets: tuple | None = None,
) -> Reference | None:
    """The reference for this run, or None without an anchor (`kl_coef=0`).

    Args:
        ref_model: the reference as given (`ref_model`, or `ref_model_name_or_path`): a model, a path, or None for
            the starting model.
        args: the `ASFTConfig`.
        policy: the policy, unwrapped (a PeftModel under PEFT), after TRL's set-up.
        given_peft_model: the policy was passed in as a PeftModel, whose adapter may be trained: its reference is the
            model as given (a frozen copy of the adapter), not the adapters-off base model.
        accelerator: the trainer's accelerator (preparing a separate reference; unwrapping; the precomputing pass's
            autocast and main-process-first).
        deepspeed, fsdp: the launch, for preparing a separate reference as TRL's DPO does.
        datasets: (train, eval, collator) for `precompute_ref_log_probs`; the precomputed reference holds them
            again, with the reference's columns (`Reference.precomputed`).
    """
    if not args.anchored:
        if ref_model is not None:
            logger.warning("kl_coef=0: the reference model given is not used (no KL term), and is not loaded.")
        return None
    if args.precompute_ref_log_probs:
        return _precomputed(ref_model, args, policy, given_peft_model, accelerator, datasets)
    if is_peft_model(policy):
        # With no reference named, the reference is the policy's own base weights: nothing separate to lighten or
        # sync; and TRL's sync pairs the policy's parameters (adapters included) with the reference's
        ref_utils.refuse_options_without_separate_reference(
            args.ref_model_dtype if ref_model is None else None,
            args.ref_model_quantization if ref_model is None else None,
            args.sync_ref_model,
        )
        if ref_model is None:
            name = ref_utils.get_config_model_id(policy.get_base_model().config) or "the starting model"
            common = dict(unwrap=accelerator.unwrap_model, deterministic=not args.disable_dropout)
            if given_peft_model:
                # The model as given, adapter included: a frozen copy of its adapter runs as the reference
                ref_utils.add_reference_adapter(policy)
                return Reference(FROZEN_ADAPTER, name, adapter=ref_utils.REFERENCE_ADAPTER, **common)
            return Reference(ADAPTERS_OFF, name, **common)

    causal_lm, name = _separate_model(ref_model, args, policy)
    if args.sync_ref_model:
        ref_utils.check_syncable(policy, causal_lm, name)
    if deepspeed:
        prepared = prepare_deepspeed(causal_lm, accelerator)
    elif fsdp:
        prepared = prepare_fsdp(causal_lm, accelerator)
    else:
        prepared = accelerator.prepare_model(causal_lm, evaluation_mode=True)
    return Reference(SEPARATE, name, model=prepared, causal_lm=causal_lm)


def _separate_model(ref_model, args, policy) -> tuple[torch.nn.Module, str]:
    """The reference as a model of its own, and its name for messages: loaded from a path (`ref_model`, or the
    policy's own path for a quantised copy of the starting model), a frozen copy of the starting model, or the
    model given; in `ref_model_dtype` / `ref_model_quantization`; checked against the policy's vocabulary, frozen,
    and able to run its backbone alone (`lm_head.patch_forward`)."""
    init_kwargs = dict(args.ref_model_init_kwargs or args.model_init_kwargs or {})
    init_kwargs = ref_utils.lighter_init_kwargs(
        init_kwargs, args.ref_model_dtype, args.ref_model_quantization, policy.dtype
    )
    distributed_type = str(args.distributed_state.distributed_type).split(".")[-1]
    if ref_model is None and args.ref_model_quantization is not None:
        # bitsandbytes quantises while loading, so the starting model is loaded again from the policy's path
        ref_model = ref_utils.policy_path_for_quantised_reference(policy)
    if isinstance(ref_model, str):
        name = repr(ref_model)
        ref_model = ref_utils.load_reference(
            ref_model, init_kwargs, distributed_type=distributed_type, trust_remote_code=args.trust_remote_code
        )
    elif ref_model is None:
        name = "(a copy of the starting model)"
        ref_model = ref_utils.default_reference(
            policy, init_kwargs, distributed_type=distributed_type, trust_remote_code=args.trust_remote_code
        )
        ref_model = ref_utils.cast_reference(ref_model, args.ref_model_dtype)
    else:
        name = type(ref_model).__name__
        if args.ref_model_quantization is not None and not ref_utils.is_quantised(ref_model):
            raise ValueError(
                f"ref_model_quantization={args.ref_model_quantization!r} can't quantise the {name} passed as "
                "`ref_model`: bitsandbytes quantises while loading. Pass the reference's path instead (`ref_model` "
                "or `ref_model_name_or_path`), or load it yourself with a `BitsAndBytesConfig`."
            )
        ref_model = ref_utils.cast_reference(ref_model, args.ref_model_dtype)
    ref_utils.check_same_vocabulary(ref_utils.output_vocab_size(policy), ref_utils.output_vocab_size(ref_model), name)
    ref_utils.freeze(ref_model, disable_dropout=True)
    lm_head.patch_forward(ref_model)
    return ref_model, name


def _precomputed(ref_model, args, policy, given_peft_model: bool, accelerator, datasets: tuple | None) -> Reference:
    """One pass of the reference over the datasets (`precompute`); afterwards no reference model is kept.

    The default reference is the starting model, which is the policy itself before its first update (adapters off
    under PEFT, or, for a PeftModel given with its adapter, the policy as given), so no second model is loaded at
    all; a named reference is loaded for the pass and freed.
    """
    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "precompute_ref_log_probs=True does not run under DeepSpeed ZeRO-3 (the pass runs before the model is "
            "sharded). Use ZeRO-2 or FSDP2: with the precomputed reference no reference model is kept to shard."
        )
    policy_lm = policy.get_base_model() if is_peft_model(policy) else policy
    if ref_model is not None:
        causal_lm, name = _separate_model(ref_model, args, policy)
        causal_lm = causal_lm.to(args.device)
        starting = Reference(SEPARATE, name, model=causal_lm, causal_lm=causal_lm)
    else:
        name = ref_utils.get_config_model_id(policy_lm.config) or "the starting model"
        # A PeftModel given as is runs with its adapter on; otherwise the policy's adapters are off for the pass
        adapters_off = is_peft_model(policy) and not given_peft_model
        starting = Reference(ADAPTERS_OFF if adapters_off else STARTING_POLICY, name)
    train_dataset, eval_dataset, collator = datasets
    result = precompute_reference(
        starting,
        policy,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        collator=collator,
        args=args,
        device=args.device,
        autocast=accelerator.autocast,
        main_process_first=accelerator.main_process_first,
    )
    return Reference(PRECOMPUTED, name, precomputed=result)

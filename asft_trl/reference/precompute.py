"""The precomputed reference (`precompute_ref_log_probs=True`): one pass of the reference over the datasets before
training, whose top-k log-probs (or, for a per-token KL estimator, its log-probability of each target) ride in the
batches as columns, so that no reference model is kept while training.

`precompute_reference` runs that pass for `build_reference`: it fingerprints the reference's weights (the cache key),
runs its backbone over each split in evaluation mode, stores the columns (`asft_trl.reference.cache`) and wraps the
data collator so the columns reach `compute_loss`. Which model is the reference, and refusing launch shapes the pass
can't run under, are `build_reference`'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset

from . import cache as reference_cache
from . import lm_head

if TYPE_CHECKING:
    from .build import Reference

logger = logging.getLogger(__name__)


@dataclass
class PrecomputedReference:
    """The datasets with the reference's columns, the collator that carries them into batches, and, for top-k storage,
    the mean probability mass the reference's top-k tokens hold over the training tokens."""

    train_dataset: Dataset | None
    eval_dataset: Dataset | dict[str, Dataset] | None
    collator: reference_cache.ReferenceColumnsCollator
    topk_mass: float | None

    def datasets(self) -> tuple:
        return self.train_dataset, self.eval_dataset, self.collator


def precompute_reference(
    reference: Reference,
    policy: torch.nn.Module,
    *,
    train_dataset,
    eval_dataset,
    collator,
    args,
    device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    main_process_first: Callable[[], contextlib.AbstractContextManager],
) -> PrecomputedReference:
    """One pass of the reference over the datasets; afterwards nothing of it need be kept.

    Args:
        reference: the reference as it runs before training (`build_reference`): a model of its own, or the policy's
            network (adapters off, or as given).
        policy: the policy, unwrapped: its network runs the pass when the reference is not a model of its own, and
            its head is then the reference's.
        args: the `ASFTConfig` (`precompute_ref_*`, `kl_estimator`, `output_dir`, `per_device_train_batch_size`).
        autocast, main_process_first: the accelerator's context managers (mixed precision; the main process fills
            the cache first, the others read it).
    """
    from .build import ADAPTERS_OFF

    policy_lm = policy.get_base_model() if is_peft_model(policy) else policy
    head_lm = reference.causal_lm if reference.causal_lm is not None else policy_lm
    weight, bias = lm_head.head_parameters(head_lm)
    head = (weight, bias, lm_head.head_transform(head_lm.config))
    # Adapters switched off for the pass are left out of the fingerprint; a given PeftModel runs as is, adapter on
    adapters = tuple(policy.peft_config) if reference.kind == ADAPTERS_OFF else ()
    reference_id = f"{reference.name}:{reference_cache.weights_fingerprint(head_lm, skip_adapters=adapters)}"
    runner = reference.model if reference.model is not None else policy

    def run_backbone(inputs):
        with autocast():
            return reference.forward(runner, inputs, asft_hidden_states=True).last_hidden_state

    cache_dir = args.precompute_ref_cache_dir or f"{args.output_dir}/reference_cache"
    # A per-token KL estimator needs only the reference's log-probability of each target: one float per token
    store = "topk" if args.kl_estimator == "full" else "token"
    options = dict(
        run_backbone=run_backbone,
        head=head,
        collator=collator,
        k=args.precompute_ref_topk,
        batch_size=args.precompute_ref_batch_size or args.per_device_train_batch_size,
        cache_dir=cache_dir,
        reference_id=reference_id,
        device=device,
        store=store,
    )
    was_training = runner.training
    runner.eval()
    try:
        with main_process_first():
            train_dataset = _with_reference_columns(train_dataset, "train", options)
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    key: _with_reference_columns(dataset, f"eval {key}", options)
                    for key, dataset in eval_dataset.items()
                }
            else:
                eval_dataset = _with_reference_columns(eval_dataset, "eval", options)
    finally:
        runner.train(was_training)
    collator = reference_cache.ReferenceColumnsCollator(collator, store=store)
    if store == "token":
        logger.info(
            f"Precomputed the reference ({reference.name}) into {cache_dir}: its log-probability of each completion "
            f"token, for kl_estimator={args.kl_estimator!r}."
        )
        return PrecomputedReference(train_dataset, eval_dataset, collator, None)
    topk_mass = reference_cache.mean_topk_mass(train_dataset)
    message = (
        f"Precomputed the reference ({reference.name}) into {cache_dir}: its top-{args.precompute_ref_topk} tokens hold "
        f"{100 * topk_mass:.1f}% of its probability mass on average over the training tokens."
    )
    if topk_mass < 0.9:
        # Measured on SmolLM2 (docs/benchmarks.md): the KL's relative gap is of the order of the mass left out
        logger.warning(
            f"{message} The top-k KL then falls well short of the exact KL (by roughly the mass left out), so "
            "the reference is weaker than the paper's: raise precompute_ref_topk, or use the live reference."
        )
    else:
        logger.info(message)
    return PrecomputedReference(train_dataset, eval_dataset, collator, topk_mass)


def _with_reference_columns(dataset, split: str, options: dict):
    if dataset is None:
        return None
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"precompute_ref_log_probs=True needs a map-style `datasets.Dataset` for {split} (got "
            f"{type(dataset).__name__}): the stored reference is added to it as columns. Load the data without "
            "streaming, or set precompute_ref_log_probs to False."
        )
    what = "top-k log-probs" if options["store"] == "topk" else "log-probs of the targets"
    return reference_cache.add_reference_columns(
        dataset, desc=f"Precomputing the reference's {what} ({split})", **options
    )

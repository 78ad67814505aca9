"""Before DFT training: can the starting model learn the special tokens its completions end with?

DFT weights each token's loss by the token's own probability, so a token the starting model gives p close to 0 is
barely learned: an end-of-turn or EOS token under a chat template the model has not seen, or a new special token. The
model then never learns to stop (the "DFT doesn't learn" reports on DFT's issue tracker). `SpecialTokenCheck`
measures, when training starts, the starting model's mean probability of each special token (EOS, end-of-turn, any
token the tokenizer marks special) where the first `SAMPLE_EXAMPLES` training completions hold it, and warns for a
token whose mean DFT weight (the probability, or the weight floor when higher) is below `WARN_BELOW`, naming the
fixes. The report lands in `trainer.special_token_report` and in the run's `asft_run.json`.

Cost: one no-grad forward of the policy's backbone over the sample, and its head at the special-token positions
only. It runs only for a DFT loss, only on a fresh start (a resumed run's weights are not the starting model), uses no
random numbers (the first examples in dataset order, dropout off) and no network. This module only measures.
"""

from __future__ import annotations

import contextlib
import itertools
import logging

import torch
from transformers import TrainerCallback
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..losses import head_log_probs
from ..reference.cache import pop_reference
from ..reference.lm_head import fused_head_problem, head_parameters, head_transform

logger = logging.getLogger(__name__)

# Examples measured: a few batches, each completion holding its EOS / end-of-turn token once or more
SAMPLE_EXAMPLES = 64
# A mean DFT weight below this gives the token under 1% of the gradient cross-entropy would give it
WARN_BELOW = 0.01


def special_token_ids(tokenizer) -> dict[int, str]:
    """Every id the tokenizer treats as special (EOS, BOS, pad, end-of-turn, added special tokens) -> its text."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor's own tokenizer
    ids = {int(i): tokenizer.convert_ids_to_tokens(int(i)) for i in getattr(tokenizer, "all_special_ids", [])}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.setdefault(int(i), str(getattr(added, "content", added)))
    return ids


def summarise(log_probs: torch.Tensor, targets: torch.Tensor, names: dict[int, str], floor: float = 0.0) -> list[dict]:
    """Per special token seen in `targets`: how often, its mean probability and its mean DFT weight max(p, floor),
    and whether that weight is below `WARN_BELOW`. `log_probs` are the model's log-probabilities of `targets`."""
    report = []
    probs = log_probs.double().exp()
    for token_id in sorted(set(targets.tolist())):
        p = probs[targets == token_id]
        weight = p.clamp_min(floor)
        report.append(
            {
                "token": names.get(token_id, str(token_id)),
                "id": token_id,
                "count": int(p.numel()),
                "mean_probability": float(p.mean()),
                "mean_dft_weight": float(weight.mean()),
                "warned": bool(weight.mean() < WARN_BELOW),
            }
        )
    return report


def warning_text(entry: dict, examples: int) -> str:
    return (
        f"DFT may never learn to produce the special token {entry['token']!r} (id {entry['id']}): the starting model "
        f"gives it a mean probability of {entry['mean_probability']:.2g} where the completions hold it ({entry['count']} "
        f"times in the first {examples} training examples), and DFT weights each token's loss by that probability (mean "
        f"weight {entry['mean_dft_weight']:.2g}), so the fine-tuned model may not stop. Fixes: a DFT weight floor "
        "(dft_weight_floor: 0.1), a short SFT warm-up (train with loss_type: nll first, then DFT/ASFT from it), or a "
        "chat template the model already knows (the model's own template: prompt_template: chat, or chat_template_path)."
    )


@contextlib.contextmanager
def _evaluation_mode(model: torch.nn.Module):
    """Every module in eval mode (no dropout, so no random numbers), except bitsandbytes' layers, kept in training
    mode as for the training forward: in eval mode on a CPU its 4-bit layers repack their weights in place for
    inference (and fail on small shapes); they have no dropout."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    for module in modes:
        if type(module).__module__.split(".")[0] == "bitsandbytes":
            module.training = True
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


class SpecialTokenCheck(TrainerCallback):
    """Measures, at the start of training, the starting model's probability of the special tokens in the completions
    (see the module docstring). Added by `ASFTTrainer` for `loss_type="dft"`."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        if state.global_step > 0 or trainer.special_token_report is not None:
            return  # resumed: the weights are no longer the starting model's
        names = special_token_ids(trainer.processing_class)
        if not names or trainer.train_dataset is None:
            trainer.special_token_report = []
            return
        examples = self._first_examples(trainer.train_dataset)
        log_probs, targets = [], []
        with _evaluation_mode(model):
            for start in range(0, len(examples), args.per_device_train_batch_size):
                batch = trainer.data_collator(examples[start : start + args.per_device_train_batch_size])
                lp, y = self._special_target_log_probs(model, trainer._prepare_inputs(batch), names)
                log_probs.append(lp.cpu())
                targets.append(y.cpu())
        floor = args.dft_weight_floor
        report = summarise(torch.cat(log_probs), torch.cat(targets), names, floor) if targets else []
        trainer.special_token_report = report
        if not state.is_world_process_zero:  # every process measured the same examples; one says so
            return
        for entry in report:
            if entry["warned"]:
                logger.warning(warning_text(entry, len(examples)))
            else:
                logger.info(
                    f"Special token {entry['token']!r}: mean probability {entry['mean_probability']:.3g} under "
                    f"the starting model ({entry['count']} times in the first {len(examples)} examples)."
                )

    @staticmethod
    def _first_examples(dataset) -> list[dict]:
        """The first `SAMPLE_EXAMPLES` examples in dataset order: no sampler, so training's random numbers are
        untouched."""
        if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
            return list(dataset.select(range(min(SAMPLE_EXAMPLES, len(dataset)))))
        return list(itertools.islice(iter(dataset), SAMPLE_EXAMPLES))

    def _special_target_log_probs(self, model, inputs: dict, names: dict[int, str]):
        """log p(y_t) of the starting model at the completion positions whose target is a special token."""
        pop_reference(inputs)  # a precomputed reference's columns are not model inputs
        shifted = "shift_labels" in inputs
        labels = inputs["shift_labels"] if shifted else inputs["labels"][:, 1:]
        special = torch.zeros_like(labels, dtype=torch.bool)
        for token_id in names:
            special |= labels == token_id
        targets = labels[special]
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        model_inputs["use_cache"] = False
        if not special.any():
            return torch.zeros(0), targets
        policy_lm = self.trainer._policy_lm
        with torch.no_grad():
            if fused_head_problem(policy_lm) is None:
                # The backbone only, and the head at the special positions: no [tokens x vocab] logits
                hidden = model(**model_inputs, asft_hidden_states=True).last_hidden_state
                hidden = (hidden if shifted else hidden[:, :-1])[special.to(hidden.device)]
                weight, bias = head_parameters(policy_lm)
                with maybe_gather_lm_head_ctx(*(t for t in (weight, bias) if t is not None)):
                    log_q = head_log_probs(hidden.to(weight.device), weight, bias, head_transform(policy_lm.config))
            else:
                logits = model(**model_inputs).logits
                log_q = torch.log_softmax(
                    (logits if shifted else logits[:, :-1])[special.to(logits.device)].float(), -1
                )
        targets = targets.to(log_q.device)
        return log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1), targets

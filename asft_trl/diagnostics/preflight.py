"""Before DFT training: how strong is the starting model's prior on the data, and can it learn the tokens that end it?

DFT (and ASFT, which keeps DFT's task term) weights each completion token's loss by the token's own probability under
the model, so a token the starting model gives p close to 0 is barely learned. Two cases matter:

- **The answers as a whole** (prior strength). When a large share of the completion tokens start below p = 0.1 (facts
  the model does not know, a format it has never seen), DFT learns them slowly or not at all, and SFT, or SFT with the
  KL anchor, learns them where DFT does not (docs/study.md: on invented facts DFT recalled 7% where SFT recalled 48%).
  The check measures the share of completion tokens below `LOW_P` and their mean probability, and warns in one line
  when the share is at least `WARN_LOW_P_SHARE`, naming the alternatives (docs/method.md, "Which objective").
- **Special tokens** the completions end with: an EOS or end-of-turn token under a chat template the model has not
  seen, or a new special token. The model then never learns to stop (the "DFT doesn't learn" reports on DFT's issue
  tracker). Per special token, the mean DFT weight (the probability, or the weight floor when higher); a warning names
  any below `WARN_BELOW`, with the fixes.

`PreflightCheck` measures both in one no-grad pass over the first `SAMPLE_EXAMPLES` training examples when training
starts: the policy's backbone once, its head at the completion positions only, in chunks (no [tokens x vocabulary]
logits of the whole batch). The report lands in `trainer.preflight_report` and in the run's `asft_run.json`
(`preflight`); `asft-trl check-data --config X.yaml` runs the same measurement without training.

Cost: one no-grad forward of the policy's backbone over the sample, and its head at the completion positions. It runs
only for a DFT loss, only on a fresh start (a resumed run's weights are not the starting model), uses no random
numbers (the first examples in dataset order, dropout off) and no network. This module only measures.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time

import torch
from transformers import TrainerCallback
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..losses import auto_chunk_size, head_log_probs
from ..reference.cache import pop_reference
from ..reference.lm_head import fused_head_problem, head_parameters, head_transform

logger = logging.getLogger(__name__)

# Examples measured: a few batches, each completion holding its EOS / end-of-turn token once or more
SAMPLE_EXAMPLES = 64
# A special token whose mean DFT weight is below this gets under 1% of the gradient cross-entropy would give it
WARN_BELOW = 0.01
# A completion token with probability below this is "unlikely" (the studies' measure of a token not yet learned)
LOW_P = 0.1
# Warn when at least this share of the completion tokens is unlikely under the starting model. Set from the studies'
# data (docs/method.md, "Which objective"): the invented facts DFT did not learn measure 0.20-0.22 with SmolLM2-135M,
# and a 64-example sample varies by a few points
WARN_LOW_P_SHARE = 0.15
METHOD_DOC = "docs/method.md#which-objective-a-pre-flight-check-of-the-datas-prior-strength"


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
    and whether that weight is below `WARN_BELOW`. `log_probs` are the model's log-probabilities of `targets`; targets
    that are not special tokens (not in `names`) are left out."""
    report = []
    probs = log_probs.double().exp()
    for token_id in sorted(set(targets.tolist()) & set(names)):
        p = probs[targets == token_id]
        weight = p.clamp_min(floor)
        report.append(
            {
                "token": names[token_id],
                "id": token_id,
                "count": int(p.numel()),
                "mean_probability": float(p.mean()),
                "mean_dft_weight": float(weight.mean()),
                "warned": bool(weight.mean() < WARN_BELOW),
            }
        )
    return report


def prior_strength(log_probs: torch.Tensor, floor: float = 0.0) -> dict:
    """The completion tokens as a whole: how many, their mean probability, the share below `LOW_P`, and whether that
    share calls for a warning (at least `WARN_LOW_P_SHARE`, unless a DFT weight floor of at least `LOW_P` already
    lifts every such token's weight)."""
    p = log_probs.double().exp()
    if p.numel() == 0:
        return {"count": 0, "mean_probability": None, "low_p_share": None, "low_p": LOW_P, "warned": False}
    share = float((p < LOW_P).double().mean())
    return {
        "count": int(p.numel()),
        "mean_probability": float(p.mean()),
        "low_p_share": share,
        "low_p": LOW_P,
        "warn_share": WARN_LOW_P_SHARE,
        "warned": bool(share >= WARN_LOW_P_SHARE and floor < LOW_P),
    }


def special_token_warning(entry: dict, examples: int) -> str:
    return (
        f"DFT may never learn to produce the special token {entry['token']!r} (id {entry['id']}): the starting model "
        f"gives it a mean probability of {entry['mean_probability']:.2g} where the completions hold it ({entry['count']} "
        f"times in the first {examples} training examples), and DFT weights each token's loss by that probability (mean "
        f"weight {entry['mean_dft_weight']:.2g}), so the fine-tuned model may not stop. Fixes: a DFT weight floor "
        "(dft_weight_floor: 0.1), a short SFT warm-up (train with loss_type: nll first, then DFT/ASFT from it), or a "
        "chat template the model already knows (the model's own template: prompt_template: chat, or chat_template_path)."
    )


def prior_warning(prior: dict, examples: int) -> str:
    """The one line that says the data's prior is weak and what to do about it."""
    return (
        f"Weak prior: {prior['low_p_share']:.0%} of the completion tokens in the first {examples} training examples have "
        f"p < {LOW_P:g} under the starting model (mean p {prior['mean_probability']:.2f}). DFT and ASFT weight each "
        "token's loss by p, so they barely learn such tokens (in our knowledge study SFT recalled 48% of the facts, DFT "
        "7%, ASFT 3%). Consider SFT+KL (loss_type: nll, kl_coef: 0.05), which keeps the anchor, or a DFT weight floor "
        f"(dft_weight_floor: 0.1). See {METHOD_DOC}."
    )


def report_lines(report: dict) -> list[tuple[int, str]]:
    """(logging level, message) for a preflight report: a warning per finding, else one line of figures."""
    examples, prior = report["examples"], report["answer_tokens"]
    lines = []
    if prior["warned"]:
        lines.append((logging.WARNING, prior_warning(prior, examples)))
    elif prior["count"]:
        lines.append(
            (
                logging.INFO,
                f"Prior strength: {prior['low_p_share']:.0%} of the completion tokens in the first {examples} "
                f"training examples have p < {LOW_P:g} under the starting model (mean p "
                f"{prior['mean_probability']:.2f}; a warning from {WARN_LOW_P_SHARE:.0%}).",
            )
        )
    for entry in report["special_tokens"]:
        if entry["warned"]:
            lines.append((logging.WARNING, special_token_warning(entry, examples)))
        else:
            lines.append(
                (
                    logging.INFO,
                    f"Special token {entry['token']!r}: mean probability {entry['mean_probability']:.3g} under "
                    f"the starting model ({entry['count']} times in the first {examples} examples).",
                )
            )
    return lines


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


def first_examples(dataset, n: int = SAMPLE_EXAMPLES) -> list[dict]:
    """The first `n` examples in dataset order: no sampler, so training's random numbers are untouched."""
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        return list(dataset.select(range(min(n, len(dataset)))))
    return list(itertools.islice(iter(dataset), n))


def measure(trainer, model, batch_size: int, sample_size: int = SAMPLE_EXAMPLES) -> dict:
    """The preflight report of `trainer`'s starting model on its first `sample_size` training examples, batched as the
    trainer batches them: `examples`, `answer_tokens` (`prior_strength`), `special_tokens` (`summarise`) and the
    `seconds` it took."""
    began = time.perf_counter()
    names = special_token_ids(trainer.processing_class)
    examples = first_examples(trainer.train_dataset, sample_size) if trainer.train_dataset is not None else []
    log_probs, targets = [], []
    with _evaluation_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = trainer.data_collator(examples[start : start + batch_size])
            lp, y = completion_log_probs(trainer._policy_lm, model, trainer._prepare_inputs(batch))
            log_probs.append(lp.cpu())
            targets.append(y.cpu())
    log_probs = torch.cat(log_probs) if log_probs else torch.zeros(0)
    targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    floor = getattr(trainer.args, "dft_weight_floor", 0.0)
    return {
        "examples": len(examples),
        "answer_tokens": prior_strength(log_probs, floor),
        "special_tokens": summarise(log_probs, targets, names, floor),
        "seconds": time.perf_counter() - began,
    }


def completion_log_probs(policy_lm, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t) of the model at every completion position of a collated batch, and the targets y_t.

    `model` is what the trainer calls (PEFT or distributed wrappers included), `policy_lm` the causal LM inside it
    whose forward `lm_head.patch_forward` gave its backbone-only mode."""
    pop_reference(inputs)  # a precomputed reference's columns are not model inputs
    shifted = "shift_labels" in inputs
    labels = inputs["shift_labels"] if shifted else inputs["labels"][:, 1:]
    scored = labels != -100
    targets = labels[scored]
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    model_inputs["use_cache"] = False
    if not scored.any():
        return torch.zeros(0), targets
    with torch.no_grad():
        if fused_head_problem(policy_lm) is None:
            # The backbone only, and the head at the completion positions in chunks: no [tokens x vocab] logits
            hidden = model(**model_inputs, asft_hidden_states=True).last_hidden_state
            hidden = (hidden if shifted else hidden[:, :-1])[scored.to(hidden.device)]
            weight, bias = head_parameters(policy_lm)
            transform = head_transform(policy_lm.config)
            chunk = auto_chunk_size(weight.shape[0], weight.device)
            token_log_p = []
            with maybe_gather_lm_head_ctx(*(t for t in (weight, bias) if t is not None)):
                for rows, ys in zip(hidden.split(chunk), targets.to(weight.device).split(chunk)):
                    log_q = head_log_probs(rows.to(weight.device), weight, bias, transform)
                    token_log_p.append(log_q.gather(-1, ys.unsqueeze(-1)).squeeze(-1))
            return torch.cat(token_log_p), targets.to(weight.device)
        logits = model(**model_inputs).logits
        log_q = torch.log_softmax((logits if shifted else logits[:, :-1])[scored.to(logits.device)].float(), -1)
    targets = targets.to(log_q.device)
    return log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1), targets


class PreflightCheck(TrainerCallback):
    """Measures, at the start of training, the starting model's prior on the completions and its probability of the
    special tokens they hold (see the module docstring). Added by `ASFTTrainer` for `loss_type="dft"`."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        if state.global_step > 0 or trainer.preflight_report is not None:
            return  # resumed: the weights are no longer the starting model's
        trainer.preflight_report = report = measure(trainer, model, args.per_device_train_batch_size)
        if not state.is_world_process_zero:  # every process measured the same examples; one says so
            return
        for level, message in report_lines(report):
            logger.log(level, message)

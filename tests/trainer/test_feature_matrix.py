"""TRL's SFT features a user reaches for first, each with the anchor: the KL is exactly 0 on the first step (the
reference is the starting model, fed the policy's exact inputs), the fused loss equals the plain one once the policy
has moved, and a resumed run takes the same next steps as the run it resumes. `use_liger_kernel` is refused with the
ASFT loss, with the reason.

One trainer per feature (two for resume), tiny model, 2-3 plain SGD steps: the fused/plain comparison is made on one
batch by switching the trainer's loss path, after training moved the policy away from its reference.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from asft_trl import ASFTConfig, ASFTTrainer
from tiny import WORDS, make_args, prompt_completion_rows

# Plain SGD with no clipping, at a rate large enough for DFT at random init (its weights are ~1/V): a step's change is
# the gradient itself (Adam's normalisation would turn float noise in near-zero gradients into full-size steps)
TRAINING = dict(
    max_steps=2,
    optim="sgd",
    learning_rate=50.0,
    max_grad_norm=0.0,
    lr_scheduler_type="constant",
    kl_coef=0.5,
    loss_chunk_size=7,
)


def messages_rows(n: int = 16) -> list[dict]:
    return [{"messages": [row["prompt"][0], row["completion"][0]]} for row in prompt_completion_rows(n)]


def text_rows(n: int = 16) -> list[dict]:
    return [{"text": " ".join(WORDS[i % len(WORDS) :] + WORDS[: i % 3])} for i in range(n)]


# feature -> (rows, ASFTConfig overrides)
FEATURES = {
    "prompt_completion": (prompt_completion_rows, {}),
    "messages": (messages_rows, {}),
    "text": (text_rows, {}),
    "packing": (prompt_completion_rows, dict(packing=True, max_length=64, per_device_train_batch_size=2)),
    "padding_free": (prompt_completion_rows, dict(padding_free=True, max_length=None)),
    "completion_only_loss_false": (prompt_completion_rows, dict(completion_only_loss=False)),
    # make_args sets the deprecated name to False; unset it, or the two names would disagree
    "activation_checkpointing": (
        prompt_completion_rows,
        dict(activation_checkpointing=True, gradient_checkpointing=None),
    ),
    "eval_during_training": (prompt_completion_rows, dict(eval_strategy="steps", eval_steps=1)),
}


def build(model_path, out, rows, **overrides):
    dataset = Dataset.from_list(rows())
    eval_dataset = dataset.select(range(4)) if overrides.get("eval_strategy") == "steps" else None
    args = make_args(out, **{**TRAINING, **overrides})
    return ASFTTrainer(model_path, args=args, train_dataset=dataset, eval_dataset=eval_dataset)


def losses_both_ways(trainer, batch) -> dict[bool, tuple[float, float]]:
    """(loss, kl) of one batch through the fused and the plain path, same weights."""
    labels = batch["labels"][:, 1:] if "shift_labels" not in batch else batch["shift_labels"]
    num_items = (labels != -100).sum()
    mode = "train" if trainer.model.training else "eval"
    result = {}
    for fused in (True, False):
        trainer.use_fused_loss = fused
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        result[fused] = (loss.item(), trainer._metrics[mode]["kl"][-1])
    trainer.use_fused_loss = True
    trainer._metrics[mode].clear()  # these two measurements must not enter the next logged averages
    return result


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_keeps_the_anchor(feature, tiny_model_path, tmp_path):
    rows, overrides = FEATURES[feature]
    trainer = build(tiny_model_path, tmp_path / "run", rows, **overrides)
    assert trainer.use_fused_loss
    trainer.train()
    history = [h for h in trainer.state.log_history if "kl" in h and "loss" in h]
    assert len(history) == 2
    assert history[0]["kl"] == 0.0, "the policy is the reference before its first update"
    assert history[1]["kl"] > 1e-5, "the anchor was not exercised: the policy did not move"

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    if feature in ("packing", "padding_free"):
        assert "position_ids" in batch and batch["input_ids"].shape[0] == 1
    if feature == "completion_only_loss_false":
        assert (batch["labels"] != -100).sum() == batch["attention_mask"].sum()  # prompt tokens are scored too
    both = losses_both_ways(trainer, batch)
    assert both[True][1] > 1e-5
    assert both[True][0] == pytest.approx(both[False][0], rel=1e-5)
    assert both[True][1] == pytest.approx(both[False][1], rel=1e-4, abs=1e-8)

    if feature == "eval_during_training":
        evals = [h for h in trainer.state.log_history if "eval_kl" in h]
        assert len(evals) == 2 and evals[-1]["eval_kl"] > 0
        fused_eval = trainer.evaluate()
        trainer.use_fused_loss = False
        plain_eval = trainer.evaluate()
        assert fused_eval["eval_loss"] == pytest.approx(plain_eval["eval_loss"], rel=1e-5)
        assert fused_eval["eval_kl"] == pytest.approx(plain_eval["eval_kl"], rel=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_resume_takes_the_same_next_steps(fused, tiny_model_path, tmp_path):
    overrides = dict(max_steps=3, save_strategy="steps", save_steps=2, use_fused_loss=fused)
    full = build(tiny_model_path, tmp_path / "full", prompt_completion_rows, **overrides)
    full.train()
    resumed = build(tiny_model_path, tmp_path / "resumed", prompt_completion_rows, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    def steps(trainer):
        return {h["step"]: (h["loss"], h["kl"]) for h in trainer.state.log_history if "kl" in h and "loss" in h}

    assert steps(full)[1][1] == 0.0 and steps(full)[3][1] > 1e-5
    assert steps(resumed)[3] == pytest.approx(steps(full)[3], rel=1e-6)
    end = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.allclose(param, end[name], atol=1e-7), name
    # the anchor of the resumed run is still the starting model, not the checkpoint
    start = {k: v for k, v in full.ref_model.state_dict().items()}
    for name, value in resumed.ref_model.state_dict().items():
        assert torch.equal(value, start[name]), name


def test_liger_kernel_is_refused_with_the_asft_loss(tmp_path):
    with pytest.raises(ValueError, match="use_liger_kernel=True does not go with the ASFT loss.*reference.*Fix"):
        ASFTConfig(output_dir=str(tmp_path), use_liger_kernel=True)
    with pytest.raises(ValueError, match="use_liger_kernel"):
        ASFTConfig(output_dir=str(tmp_path), use_liger_kernel=True, kl_coef=0.0, dft_weight_floor=0.1)
    # without the anchor the loss is TRL's own, which handles Liger itself
    assert ASFTConfig(output_dir=str(tmp_path), use_liger_kernel=True, kl_coef=0.0).use_liger_kernel

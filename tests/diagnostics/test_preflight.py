"""The pre-flight check before DFT training: it measures the starting model's prior on the completions (the share of
their tokens below p 0.1, the mean p) and its probability of the special tokens they hold, warns with the figures and
the fixes, records the report in the run's info, and changes nothing about training."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from asft_trl import ASFTTrainer
from asft_trl.diagnostics import preflight
from asft_trl.diagnostics.preflight import PreflightCheck, prior_strength, special_token_ids, summarise
from tiny import make_args

LOGGER = "asft_trl.diagnostics.preflight"


def _has_check(trainer) -> bool:
    return any(isinstance(cb, PreflightCheck) for cb in trainer.callback_handler.callbacks)


def test_warns_for_an_end_of_turn_token_the_model_finds_unlikely(tiny_model_path, pc_dataset, tmp_path, caplog):
    args = make_args(tmp_path, max_steps=1)
    trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    report = trainer.preflight_report["special_tokens"]
    end_of_turn = trainer.processing_class.convert_tokens_to_ids("<|im_end|>")
    assert [e["id"] for e in report] == [end_of_turn]  # the only special token the completions hold
    entry = report[0]
    assert entry["token"] == "<|im_end|>" and entry["count"] == len(pc_dataset)  # one per completion
    assert entry["warned"] and entry["mean_probability"] < preflight.WARN_BELOW
    text = " ".join(r.getMessage() for r in caplog.records if r.name == LOGGER)
    for words in (
        "'<|im_end|>'",
        f"{entry['mean_probability']:.2g}",
        "dft_weight_floor",
        "loss_type: nll",
        "chat template",
    ):
        assert words in text, words


def test_the_probability_is_the_starting_models(tiny_model_path, pc_dataset, tmp_path):
    """The reported mean equals p(<|im_end|>) computed from the full logits of the model before training."""
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path, max_steps=1, learning_rate=0.5), train_dataset=pc_dataset
    )
    batch = trainer.data_collator([pc_dataset_row for pc_dataset_row in trainer.train_dataset])
    labels = batch["labels"][:, 1:]
    eot = trainer.processing_class.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.softmax(logits.float(), -1)[..., eot][labels == eot].mean().item()
    trainer.train()
    assert trainer.preflight_report["special_tokens"][0]["mean_probability"] == pytest.approx(expected, rel=1e-4)


def test_a_weight_floor_silences_what_it_fixes(tiny_model_path, pc_dataset, tmp_path, caplog):
    """A floor of 0.05 lifts the end-of-turn token's weight above 0.01, but leaves tokens below p 0.1 weighted below
    0.1: the prior warning stays. A floor of 0.1 lifts them all: no warning."""
    for floor, prior_warned in ((0.05, True), (0.1, False)):
        caplog.clear()
        args = make_args(tmp_path / str(floor), max_steps=1, dft_weight_floor=floor)
        trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            trainer.train()
        entry = trainer.preflight_report["special_tokens"][0]
        assert entry["mean_dft_weight"] == pytest.approx(floor) and not entry["warned"]
        assert trainer.preflight_report["answer_tokens"]["warned"] is prior_warned
        warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert len(warnings) == prior_warned and all(w.startswith("Weak prior") for w in warnings)


def test_the_prior_is_the_starting_models_on_every_completion_token(tiny_model_path, pc_dataset, tmp_path, caplog):
    """Mean p and the share below 0.1 equal those of a full-logits pass over the completion tokens before training;
    the warning is one line with the share, the mean and the alternatives."""
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path, max_steps=1, learning_rate=0.5), train_dataset=pc_dataset
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    scored = labels != -100
    p = torch.softmax(logits.float(), -1)[scored].gather(-1, labels[scored].unsqueeze(-1)).squeeze(-1).double()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    prior = trainer.preflight_report["answer_tokens"]
    assert trainer.preflight_report["examples"] == len(pc_dataset) and prior["count"] == int(scored.sum())
    train_seconds = trainer.state.log_history[-1]["train_runtime"]
    assert 0 < trainer.preflight_report["seconds"] < train_seconds  # what the check cost, within the run's time
    assert prior["mean_probability"] == pytest.approx(p.mean().item(), rel=1e-4)
    assert prior["low_p_share"] == pytest.approx((p < 0.1).double().mean().item())
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Weak prior")]
    assert "\n" not in line
    for words in (
        f"{prior['low_p_share']:.0%}",
        f"mean p {prior['mean_probability']:.2f}",
        "SFT+KL",
        "dft_weight_floor",
    ):
        assert words in line, words


@pytest.mark.parametrize(
    "probs, floor, warned",
    [
        ([0.5, 0.9, 0.8, 0.05], 0.0, False),  # 25% below 0.1: under the threshold
        ([0.5, 0.9, 0.01, 0.05], 0.0, True),  # 50%
        ([0.5, 0.9, 0.01, 0.05], 0.1, False),  # a floor of 0.1 weights every token at least 0.1
    ],
)
def test_prior_strength_figures(probs, floor, warned, monkeypatch):
    monkeypatch.setattr(preflight, "WARN_LOW_P_SHARE", 0.3)
    prior = prior_strength(torch.tensor(probs).log(), floor)
    assert prior["count"] == 4 and prior["mean_probability"] == pytest.approx(sum(probs) / 4)
    assert prior["low_p_share"] == pytest.approx(sum(p < 0.1 for p in probs) / 4)
    assert prior["warned"] is warned
    assert prior_strength(torch.zeros(0))["count"] == 0 and not prior_strength(torch.zeros(0))["warned"]


def test_only_for_a_dft_loss(tiny_model_path, pc_dataset, tmp_path):
    sft = ASFTTrainer(tiny_model_path, args=make_args(tmp_path / "sft", loss_type="nll"), train_dataset=pc_dataset)
    assert not _has_check(sft)
    dft = ASFTTrainer(tiny_model_path, args=make_args(tmp_path / "dft", kl_coef=0.0), train_dataset=pc_dataset)
    assert _has_check(dft)


def test_it_changes_nothing_about_training(tiny_model_path, pc_dataset, tmp_path):
    """No random numbers, no weights touched: with and without the check, the same trained weights."""
    results = []
    for check in (True, False):
        args = make_args(tmp_path / str(check), max_steps=2, learning_rate=0.5, shuffle_dataset=True)
        trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
        if not check:
            trainer.remove_callback(PreflightCheck)
        trainer.train()
        assert (trainer.preflight_report is not None) is check
        results.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_not_repeated_on_resume(tiny_model_path, pc_dataset, tmp_path):
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset).train()
    args = make_args(tmp_path, max_steps=3, save_strategy="no")
    resumed = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.preflight_report is None  # the weights were no longer the starting model's


def test_special_ids_and_summary():
    import tiny

    tokenizer = tiny.build_tokenizer()
    ids = special_token_ids(tokenizer)
    assert {ids[i] for i in ids} >= {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"}
    report = summarise(
        torch.tensor([0.5, 0.5, 1e-4, 2e-4]).log(), torch.tensor([7, 7, 3, 3]), {3: "<eos>", 7: "<x>"}, floor=0.0
    )
    assert [(e["token"], e["count"], e["warned"]) for e in report] == [("<eos>", 2, True), ("<x>", 2, False)]
    assert report[0]["mean_probability"] == pytest.approx(1.5e-4)


@pytest.mark.slow  # a real `asft-trl train` launch in a subprocess
def test_the_report_is_in_the_runs_info(tiny_model_path, tmp_path):
    from tiny import run_cli, write_recipe

    recipe = write_recipe(tmp_path, tiny_model_path)
    result = run_cli("train", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "asft_run.json").read_text())
    special = info["preflight"]["special_tokens"]
    assert special[0]["token"] == "<|im_end|>" and special[0]["warned"]
    assert info["preflight"]["answer_tokens"]["warned"]  # an untrained tiny model knows nothing of its data
    assert "special tokens DFT may not learn" in result.stdout + result.stderr  # the end-of-run summary repeats it

"""The special-token check before DFT training: it measures the starting model's probability of the special tokens the
completions hold, warns with the token, its probability and the fixes, records the report in the run's info, and
changes nothing about training."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from asft_trl import ASFTTrainer
from asft_trl.diagnostics import special_tokens
from asft_trl.diagnostics.special_tokens import SpecialTokenCheck, special_token_ids, summarise
from tiny import make_args

LOGGER = "asft_trl.diagnostics.special_tokens"


def _has_check(trainer) -> bool:
    return any(isinstance(cb, SpecialTokenCheck) for cb in trainer.callback_handler.callbacks)


def test_warns_for_an_end_of_turn_token_the_model_finds_unlikely(tiny_model_path, pc_dataset, tmp_path, caplog):
    args = make_args(tmp_path, max_steps=1)
    trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    report = trainer.special_token_report
    end_of_turn = trainer.processing_class.convert_tokens_to_ids("<|im_end|>")
    assert [e["id"] for e in report] == [end_of_turn]  # the only special token the completions hold
    entry = report[0]
    assert entry["token"] == "<|im_end|>" and entry["count"] == len(pc_dataset)  # one per completion
    assert entry["warned"] and entry["mean_probability"] < special_tokens.WARN_BELOW
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
    assert trainer.special_token_report[0]["mean_probability"] == pytest.approx(expected, rel=1e-4)


def test_a_weight_floor_above_the_threshold_silences_it(tiny_model_path, pc_dataset, tmp_path, caplog):
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path, max_steps=1, dft_weight_floor=0.05), train_dataset=pc_dataset
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    entry = trainer.special_token_report[0]
    assert entry["mean_dft_weight"] == pytest.approx(0.05) and not entry["warned"]
    assert not [r for r in caplog.records if r.name == LOGGER]


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
            trainer.remove_callback(SpecialTokenCheck)
        trainer.train()
        assert (trainer.special_token_report is not None) is check
        results.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_not_repeated_on_resume(tiny_model_path, pc_dataset, tmp_path):
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset).train()
    args = make_args(tmp_path, max_steps=3, save_strategy="no")
    resumed = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.special_token_report is None  # the weights were no longer the starting model's


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
    assert info["special_tokens"][0]["token"] == "<|im_end|>" and info["special_tokens"][0]["warned"]
    assert "special tokens DFT may not learn" in result.stdout + result.stderr  # the end-of-run summary repeats it

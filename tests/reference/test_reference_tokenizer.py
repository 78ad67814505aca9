"""A named reference must use the policy's tokenizer, not just one of the same size: two tiny tokenizers with the same
260 tokens under other ids are refused (by the trainer and by `asft-trl train`, before any weights load), identical
ones accepted, special tokens that differ over the same vocabulary warned about, and a reference folder without
tokenizer files warned about (not refused)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedModel

from asft_trl import ASFTTrainer
from asft_trl.reference.tokenizer_check import special_token_differences, vocabulary_differences
from tiny import make_args, train_error, write_recipe

TOKENIZER_LOGGER = "asft_trl.reference.tokenizer_check"


def variant(model_path: str, destination: Path, *, shuffle_ids=False, eos=None, tokenizer=True) -> str:
    """A copy of the tiny model whose tokenizer gives its ordinary tokens the ids in reverse order (same size), has
    another eos, or is missing."""
    shutil.copytree(model_path, destination)
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (destination / name).unlink(missing_ok=True)
    if shuffle_ids:
        data = json.loads((destination / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        specials = {token["content"] for token in data["added_tokens"]}
        ordinary = sorted((index, token) for token, index in vocab.items() if token not in specials)
        ids = [index for index, _ in ordinary]
        vocab.update({token: index for (_, token), index in zip(ordinary, reversed(ids))})
        (destination / "tokenizer.json").write_text(json.dumps(data))
    if eos is not None:
        config = json.loads((destination / "tokenizer_config.json").read_text())
        config["eos_token"] = eos
        (destination / "tokenizer_config.json").write_text(json.dumps(config))
    return str(destination)


@pytest.fixture(scope="module")
def references(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("references")
    return {
        "same": variant(tiny_model_path, root / "same"),
        "shuffled": variant(tiny_model_path, root / "shuffled", shuffle_ids=True),
        "other_eos": variant(tiny_model_path, root / "other_eos", eos="<|endoftext|>"),
        "no_tokenizer": variant(tiny_model_path, root / "no_tokenizer", tokenizer=False),
    }


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model's weights fails the test: the refusal must come first."""

    def loaded(*args, **kwargs):
        raise AssertionError("model weights were loaded before the tokenizers were compared")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(loaded))


def test_the_messages_say_what_differs(tiny_model_path, references):
    policy = AutoTokenizer.from_pretrained(tiny_model_path).get_vocab()
    shuffled = AutoTokenizer.from_pretrained(references["shuffled"]).get_vocab()
    assert len(policy) == len(shuffled) == 260
    message = vocabulary_differences(policy, shuffled)
    assert message.startswith("the policy's tokenizer has 260 tokens and the reference's 260; ")
    assert "256 of the policy's tokens have another id in the reference (e.g. '!': 4 vs 259" in message
    assert vocabulary_differences(policy, dict(policy)) == ""
    fewer = {token: index for token, index in policy.items() if token != "!"}
    assert "1 are not in the reference at all (e.g. '!')" in vocabulary_differences(policy, fewer)
    assert "the reference has 1 tokens the policy lacks" in vocabulary_differences(fewer, policy)
    assert special_token_differences({"eos_token": "</s>"}, {"eos_token": "<|im_end|>", "bos_token": "<s>"}) == (
        "bos differs: none in the policy vs '<s>' in the reference; "
        "eos differs: '</s>' in the policy vs '<|im_end|>' in the reference"
    )


def test_trainer_refuses_a_reference_with_other_token_ids_before_loading_weights(
    tiny_model_path, references, pc_dataset, tmp_path, no_weights
):
    args = make_args(tmp_path, ref_model_name_or_path=references["shuffled"])
    with pytest.raises(ValueError, match=r"ref_model_name_or_path='.*shuffled' does not use the policy's tokenizer"):
        ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
    # passed as `ref_model`, with the notebook user's own processing_class
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match=r"ref_model='.*' does not use the policy's tokenizer \(the processing_class"):
        ASFTTrainer(
            tiny_model_path,
            ref_model=references["shuffled"],
            args=make_args(tmp_path),
            train_dataset=pc_dataset,
            processing_class=tokenizer,
        )


def test_no_anchor_no_check(tiny_model_path, references, pc_dataset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=TOKENIZER_LOGGER):
        args = make_args(tmp_path, kl_coef=0.0, ref_model_name_or_path=references["shuffled"])
        assert ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset).ref_model is None
    assert [record for record in caplog.records if record.name == TOKENIZER_LOGGER] == []


@pytest.mark.parametrize(
    "name, warning",
    [
        ("same", None),
        ("other_eos", "eos differs: '<|im_end|>' in the policy vs '<|endoftext|>' in the reference"),
        ("no_tokenizer", "Could not compare the tokenizers"),
    ],
)
def test_trainer_accepts_the_same_vocabulary_and_warns_when_it_cannot_tell(
    name, warning, tiny_model_path, references, pc_dataset, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger=TOKENIZER_LOGGER):
        trainer = ASFTTrainer(
            tiny_model_path,
            args=make_args(tmp_path, ref_model_name_or_path=references[name]),
            train_dataset=pc_dataset,
        )
    assert trainer.ref_model is not None
    messages = [record.getMessage() for record in caplog.records if record.name == TOKENIZER_LOGGER]
    if warning is None:
        assert messages == []
    else:
        (message,) = messages
        assert warning in message
    if name == "no_tokenizer":
        assert "has no tokenizer files" in message and "Only the vocabulary sizes are checked" in message


def test_asft_trl_train_refuses_before_launching(tiny_model_path, references, tmp_path, capsys, no_launch):  # noqa: F811
    recipe = write_recipe(tmp_path, tiny_model_path, ref_model_name_or_path=references["shuffled"])
    error = train_error(capsys, "--config", recipe)
    assert "ref_model_name_or_path=" in error and "does not use the policy's tokenizer" in error
    assert "256 of the policy's tokens have another id in the reference" in error
    assert "Fix: name a reference that uses the policy's tokenizer" in error

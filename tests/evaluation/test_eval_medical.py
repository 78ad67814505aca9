"""Medical scoring with a tiny model: the chosen letter is the arg-max of the option letters' next-token
log-probabilities, checked against a direct one-question-at-a-time computation; plus the loaders' schemas."""

from __future__ import annotations

import pytest
import torch

import tiny
from asft_trl.evaluation.benchmarks import SchemaError, load_benchmark
from asft_trl.evaluation.medical import authors_letter, letter_token_ids, predict, score_rows
from asft_trl.evaluation.prompts import medical_prompt

FIXTURE = tiny.FIXTURES / "eval" / "medical.jsonl"


def test_fixture_rows_of_four_schemas_normalise_to_the_same_form():
    items = load_benchmark("medical_fixture", "medical", str(FIXTURE))
    assert [item["answer"] for item in items] == ["B", "A", "C", "C"]  # letter, answer_idx, cop index, MMLU index
    assert items[2]["options"] == ["Alpha cells", "Delta cells", "Beta cells", "Acinar cells"]
    assert items[1]["options"][0] == "Vitamin C"


def test_prediction_is_argmax_of_direct_letter_logprobs(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    items = load_benchmark("medical_fixture", "medical", str(FIXTURE))
    rows = predict(model, tokenizer, items, batch_size=3)  # batches of unequal lengths: padding must not matter

    ids = letter_token_ids(tokenizer, "ABCD")
    for item, row in zip(items, rows):
        prompt = medical_prompt(item["question"], item["options"])
        assert row["prompt"] == prompt and prompt.endswith("\n\nAnswer:")
        with torch.no_grad():
            logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        direct = torch.log_softmax(logits.float(), dim=-1)[ids]
        assert list(row["option_logprobs"].values()) == pytest.approx(direct.tolist(), abs=1e-4)
        assert row["prediction"] == "ABCD"[int(direct.argmax())]
        assert row["answer"] == item["answer"]
    metrics, _ = score_rows(rows)
    assert metrics["accuracy"] == sum(r["prediction"] == r["answer"] for r in rows) / len(rows)


def test_the_head_at_the_last_positions_only_gives_the_same_scores(tiny_model_path, monkeypatch):
    """With `logits_to_keep` (the head at each row's last real token only) and without it, the same rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_trl.evaluation import medical

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    items = load_benchmark("medical_fixture", "medical", str(FIXTURE))
    assert medical.accepts_logits_to_keep(model)
    kept = predict(model, tokenizer, items, batch_size=4)  # four prompts of different lengths in one batch
    monkeypatch.setattr(medical, "accepts_logits_to_keep", lambda model: False)
    full = predict(model, tokenizer, items, batch_size=4)
    for a, b in zip(kept, full):
        assert a["option_logprobs"] == pytest.approx(b["option_logprobs"], abs=1e-5)
        assert [t for t, _ in a["top_logprobs"]] == [t for t, _ in b["top_logprobs"]]


def test_letter_tokens_prefer_the_spaced_letter_when_it_is_one_token():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Answer: A", "Answer: B", "Answer: C", "Answer: D"] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = letter_token_ids(tokenizer, "ABCD")
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == ["ĠA", "ĠB", "ĠC", "ĠD"]


def test_score_rows_from_predictions_only():
    metrics, scored = score_rows([{"prediction": "a", "answer": "A"}, {"prediction": "B", "answer": "C"}])
    assert metrics["accuracy"] == 0.5 and [r["correct"] for r in scored] == [True, False]


def test_loader_names_the_missing_fields(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["x", "y"], "answer": "A"}\n')
    with pytest.raises(SchemaError, match=r"\['options', 'choices'\]"):
        load_benchmark("bad", "medical", str(bad))
    bad.write_text('{"question": "q", "options": ["x", "y"], "answer": "E"}\n')
    with pytest.raises(SchemaError, match="neither an option letter"):
        load_benchmark("bad", "medical", str(bad))


# ---------------------------------------------------------------------------------------------------- authors' rule


@pytest.mark.parametrize(
    "top, expected",
    [
        ([[" B", -0.5], ["\n", -1.0], [" A", -2.0]], ("B", False)),  # the best letter among the top tokens
        ([["\n", -0.1], [" C", -3.0], [" D", -2.5]], ("D", False)),  # not the first letter met: the best one
        ([[" A", -1.0], [" B", -1.5], ["A", -3.0]], ("B", False)),  # a later variant of A replaces the earlier one
        ([[" a", -0.9], [" b", -1.2]], ("A", False)),  # upper-cased, as theirs
        ([["\n", -0.1], [" The", -1.0]], ("A", True)),  # no letter: their fallback answers "A"
        ([[" (C", -0.1], [" The", -1.0]], ("C", True)),  # no letter token, but a standalone letter in the greedy text
        ([[" E", -0.1], [" B", -2.0]], ("B", False)),  # E is not an option of a four-option question
    ],
)
def test_authors_rule(top, expected):
    assert authors_letter(top, "ABCD") == expected


def test_authors_rule_on_the_tiny_model_reads_the_top_ten_of_the_same_distribution(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    items = load_benchmark("medical_fixture", "medical", str(FIXTURE))
    ours = predict(model, tokenizer, items, batch_size=3)
    theirs = predict(model, tokenizer, items, batch_size=2, scoring="authors")
    for a, b in zip(ours, theirs):
        with torch.no_grad():
            logits = model(**tokenizer(a["prompt"], return_tensors="pt")).logits[0, -1]
        top = torch.log_softmax(logits.float(), dim=-1).topk(10)
        assert [t for t, _ in b["top_logprobs"]] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert [v for _, v in b["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert a["option_logprobs"] == pytest.approx(b["option_logprobs"], abs=1e-5)  # one pass serves both rules
        assert (b["prediction"], b["fallback"]) == authors_letter(b["top_logprobs"], "ABCD")
        assert "fallback" not in a
    metrics, _ = score_rows(theirs)
    assert metrics["fallbacks"] == sum(r["fallback"] for r in theirs)
    # Saved rows rescored by either rule give what generating with that rule gave
    assert [r["prediction"] for r in score_rows(ours, "authors")[1]] == [r["prediction"] for r in theirs]
    assert [r["prediction"] for r in score_rows(theirs, "letters")[1]] == [r["prediction"] for r in ours]
    assert "fallbacks" not in score_rows(theirs, "letters")[0]


def test_rescoring_the_authors_way_needs_the_top_tokens():
    rows = [{"prediction": "B", "answer": "B", "option_logprobs": {"A": -1.0, "B": -0.5}}]
    assert score_rows(rows, "letters")[0]["accuracy"] == 1.0
    assert score_rows([{"prediction": "B", "answer": "B"}], "letters")[0]["accuracy"] == 1.0  # another tool's rows
    with pytest.raises(ValueError, match="top_logprobs.*medical_scoring='authors'"):
        score_rows(rows, "authors")

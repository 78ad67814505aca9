"""Medical scoring with a tiny model: the chosen letter is the arg-max of the option letters' next-token
log-probabilities, checked against a direct one-question-at-a-time computation; plus the loaders' schemas."""

from __future__ import annotations

import pytest
import torch

import tiny
from asft_trl.evaluation.benchmarks import SchemaError, load_benchmark
from asft_trl.evaluation.medical import letter_token_ids, predict, score_rows
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

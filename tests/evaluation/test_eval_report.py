"""Prompt templates and the result tables: what the model is shown and what people read."""

from __future__ import annotations

import json

from asft_trl.data.formatting import to_prompt_completion
from asft_trl.evaluation.prompts import MATH_INSTRUCTION, code_prompt, math_prompt, medical_prompt, quickstart_prompt
from asft_trl.evaluation.report import build_results, compare_table, markdown_table


def test_prompt_templates():
    alpaca = math_prompt("1+1?", "alpaca")
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith("### Response:")
    assert "1+1?\nPlease reason step by step" in alpaca and "\\boxed{}" in alpaca
    assert math_prompt("1+1?", "chat") == [
        {"role": "user", "content": "1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."}
    ]
    assert math_prompt("1+1?", "raw") == "1+1?"
    item = {"prompt": "def f():\n", "mode": "complete"}
    assert (
        code_prompt(item, "raw") == "def f():\n"
        and "```python\ndef f():\n```" in code_prompt(item, "chat")[0]["content"]
    )
    assert medical_prompt("Q?", ["x", "y"]) == "Question: Q?\n\nOptions:\nA. x\nB. y\n\nAnswer:"


def test_alpaca_prompt_is_the_one_the_recipes_train_on():
    """A model trained on the recipes' Alpaca prompts is scored on exactly that prompt (nothing added after it)."""
    trained = to_prompt_completion(f"1+1?\n{MATH_INSTRUCTION}", "2", "alpaca")["prompt"]
    assert math_prompt("1+1?", "alpaca") == trained
    trained = to_prompt_completion("Reverse: a b", "b a", "alpaca")["prompt"]
    assert quickstart_prompt("Reverse: a b", "alpaca") == trained
    item = {"prompt": "Write f.", "mode": "write"}
    assert code_prompt(item, "alpaca").endswith("### Response:")


def test_tables_and_compare(tmp_path):
    first = build_results(
        "math",
        {
            "math500": {"accuracy": 0.25, "num_problems": 4, "num_samples": 2, "pass@2": 0.5},
            "amc23": {"accuracy": 0.75, "num_problems": 4, "num_samples": 2, "pass@2": 1.0},
        },
        {"model": "base", "num_samples": 2},
    )
    assert first["average"] == 0.5
    table = markdown_table(first)
    assert "| math500 | 25.00 | 4 | 50.00 |" in table and "avg@2 (%)" in table and "**50.00**" in table
    second = build_results("math", {"math500": {"accuracy": 1.0, "num_problems": 4}}, {"model": "tuned"})
    paths = []
    for name, results in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "results.json")
        paths[-1].write_text(json.dumps(results))
    table = compare_table([str(p) for p in paths])
    assert "| amc23 | 75.00 | - |" in table and "| math500 | 25.00 | 100.00 |" in table
    assert "base (a)" in table and "tuned (b)" in table

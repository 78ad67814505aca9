"""`asft-trl eval` end to end on tiny offline models and local fixtures: generate -> generations.jsonl -> score ->
results.json/results.md; re-scoring with --predictions; config files; compare; refusing to overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tiny
from asft_trl.scripts.cli import main as asft_main

FIXTURES = tiny.FIXTURES / "eval"


def eval_cli(*args) -> int:
    return asft_main(["eval", *map(str, args)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_math_end_to_end_then_rescore_predictions(tiny_model_path, tmp_path, capsys):
    pytest.importorskip("math_verify")
    out = tmp_path / "math"
    assert (
        eval_cli(
            "math",
            "--model",
            tiny_model_path,
            "--data_files",
            f"math500={FIXTURES / 'math.jsonl'}",
            "--num_samples",
            2,
            "--max_new_tokens",
            6,
            "--batch_size",
            2,
            "--output_dir",
            out,
        )
        == 0
    )
    generations = read_jsonl(out / "generations.jsonl")
    assert len(generations) == 3 and all(len(row["prediction"]) == 2 for row in generations)
    assert [row["answer"] for row in generations] == ["\\frac{3}{4}", "4", "(-1, 1)"]
    assert "\\boxed{}" in generations[0]["prompt"][0]["content"]  # chat template with the boxed instruction
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"math500"} and results["settings"]["num_samples"] == 2
    assert results["benchmarks"]["math500"]["num_problems"] == 3
    assert "| math500 |" in (out / "results.md").read_text() and "avg@2" in capsys.readouterr().out

    # Scoring is a separate step: known-right and known-wrong predictions, no model.
    predictions = tmp_path / "predictions.jsonl"
    rows = [dict(row, prediction=[f"\\boxed{{{row['answer']}}}", "\\boxed{42}"]) for row in generations]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_cli("math", "--predictions", predictions, "--output_dir", tmp_path / "rescored") == 0
    rescored = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert rescored["benchmarks"]["math500"]["accuracy"] == pytest.approx(0.5)
    assert rescored["benchmarks"]["math500"]["pass@2"] == pytest.approx(1.0)

    with pytest.raises(SystemExit, match="--overwrite"):  # an earlier run is never replaced silently
        eval_cli("math", "--predictions", predictions, "--output_dir", tmp_path / "rescored")

    assert eval_cli("compare", out / "results.json", tmp_path / "rescored" / "results.json") == 0
    table = capsys.readouterr().out
    assert "| math500 |" in table and "50.00" in table and "**average**" in table


def test_medical_and_config_file(tiny_model_path, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": tiny_model_path,
                "data_files": [f"medqa={FIXTURES / 'medical.jsonl'}"],
                "batch_size": 3,
                "output_dir": str(tmp_path / "medical"),
            }
        )
    )
    assert eval_cli("medical", "--config", config) == 0
    rows = read_jsonl(tmp_path / "medical" / "generations.jsonl")
    assert [r["answer"] for r in rows] == ["B", "A", "C", "C"]
    assert all(r["prediction"] == max(r["option_logprobs"], key=r["option_logprobs"].get) for r in rows)
    results = json.loads((tmp_path / "medical" / "results.json").read_text())
    expected = sum(r["prediction"] == r["answer"] for r in rows) / 4
    assert results["benchmarks"]["medqa"]["accuracy"] == expected == results["average"]

    # The authors' rule: generated directly, or the saved rows rescored without the model, the same letters
    authors = ["--medical_scoring", "authors", "--output_dir"]
    assert eval_cli("medical", "--config", config, *authors, tmp_path / "authors") == 0
    generated = read_jsonl(tmp_path / "authors" / "generations.jsonl")
    assert all("fallback" in r and len(r["top_logprobs"]) == 10 for r in generated)
    predictions = tmp_path / "medical" / "generations.jsonl"
    assert eval_cli("medical", "--predictions", predictions, *authors, tmp_path / "rescored") == 0
    rescored = read_jsonl(tmp_path / "rescored" / "scored.jsonl")
    assert [r["prediction"] for r in rescored] == [r["prediction"] for r in generated]
    metrics = json.loads((tmp_path / "rescored" / "results.json").read_text())["benchmarks"]["medqa"]
    assert metrics["fallbacks"] == sum(r["fallback"] for r in generated)
    assert "fallbacks" in (tmp_path / "rescored" / "results.md").read_text()


def test_code_from_model_and_from_predictions(tiny_model_path, tmp_path):
    assert (
        eval_cli(
            "code",
            "--model",
            tiny_model_path,
            "--data_files",
            f"humaneval={FIXTURES / 'code.jsonl'}",
            "--num_samples",
            1,
            "--temperature",
            0,
            "--max_new_tokens",
            8,
            "--output_dir",
            tmp_path / "gen",
        )
        == 0
    )
    rows = read_jsonl(tmp_path / "gen" / "generations.jsonl")
    assert [r["mode"] for r in rows] == ["complete", "write"] and rows[1]["entry_point"] == "square"
    # The same rows with hand-written answers: one right, one wrong.
    rows[0]["prediction"] = ["    return a + b\n"]
    rows[1]["prediction"] = ["```python\ndef square(x):\n    return x * 3\n```"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_cli("code", "--predictions", tmp_path / "p.jsonl", "--output_dir", tmp_path / "scored") == 0
    scored = read_jsonl(tmp_path / "scored" / "scored.jsonl")
    assert [r["passed"] for r in scored] == [True, False]


def test_quickstart_suite_on_its_held_out_split_and_local_file(tiny_model_path, tmp_path):
    from asft_trl.quickstart.task import make_splits

    assert (
        eval_cli(
            "quickstart",
            "--model",
            tiny_model_path,
            "--limit",
            3,
            "--num_samples",
            1,
            "--temperature",
            0,
            "--max_new_tokens",
            6,
            "--output_dir",
            tmp_path / "qs",
        )
        == 0
    )
    rows = read_jsonl(tmp_path / "qs" / "generations.jsonl")
    held_out = make_splits(seed=42)["test"]  # the recipe's split: TrainingArguments' default seed
    assert [r["prompt"] for r in rows] == held_out["prompt"][:3]
    assert [r["answer"] for r in rows] == [c[-1]["content"] for c in held_out["completion"][:3]]
    predictions = tmp_path / "qs.jsonl"
    predictions.write_text(
        json.dumps({"prediction": "Stone, river apple.", "answer": "stone river apple"})
        + "\n"
        + json.dumps({"prediction": "river stone apple", "answer": "stone river apple"})
        + "\n"
    )
    assert eval_cli("quickstart", "--predictions", predictions, "--output_dir", tmp_path / "qs2") == 0
    assert json.loads((tmp_path / "qs2" / "results.json").read_text())["average"] == 0.5


def test_bad_input_fails_before_a_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    with pytest.raises(SystemExit, match=r"\['answer', 'final_answer', 'gold'\]"):
        # a folder that holds no model: loading it would fail, so the data error proves nothing was loaded
        eval_cli("math", "--model", tmp_path, "--data_files", f"x={bad}", "--output_dir", tmp_path / "o")
    with pytest.raises(SystemExit, match="--model"):
        eval_cli("math", "--output_dir", tmp_path / "o")
    with pytest.raises(SystemExit, match="template"):
        eval_cli("medical", "--model", "m", "--template", "chat")
    with pytest.raises(SystemExit, match="medical_scoring='paper' is not supported"):
        eval_cli("medical", "--model", "m", "--medical_scoring", "paper")
    with pytest.raises(SystemExit, match="not a suite"):
        eval_cli("poetry", "--model", "m")


def test_prompt_template_is_the_training_name_and_template_a_warned_alias(tmp_path):
    """`--prompt_template` as in training recipes; the old `--template` keeps working (users' scripts and configs)
    with a FutureWarning, and the two may not disagree."""
    from asft_trl.scripts.evaluate import parse_args

    assert parse_args(["math", "--model", str(tmp_path), "--prompt_template", "alpaca"]).prompt_template == "alpaca"
    with pytest.warns(FutureWarning, match="prompt_template"):
        args = parse_args(["math", "--model", str(tmp_path), "--template", "raw"])
    assert args.prompt_template == "raw" and args.template is None
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="disagree"):
        parse_args(["math", "--model", str(tmp_path), "--template", "raw", "--prompt_template", "chat"])
    with pytest.raises(ValueError, match="prompt_template='jinja' is not supported"):
        parse_args(["math", "--model", str(tmp_path), "--prompt_template", "jinja"])


def test_bad_model_path_is_named_before_any_benchmark_is_fetched(tmp_path, monkeypatch):
    """Offline, `--model /nonexistent` used to report the unreachable benchmark; the path is checked first."""
    from asft_trl.scripts import evaluate as eval_cli_module

    def no_benchmarks(*args, **kwargs):
        raise AssertionError("a benchmark was loaded before the model path was checked")

    monkeypatch.setattr(eval_cli_module, "load_benchmark", no_benchmarks)
    with pytest.raises(SystemExit, match=r"model='/nonexistent' is neither a local folder .* nor a Hub id"):
        eval_cli("math", "--model", "/nonexistent", "--output_dir", tmp_path / "o")
    with pytest.raises(SystemExit, match="not in the local Hub cache while the Hub is offline"):
        eval_cli("math", "--model", "no-such-org/no-such-model", "--output_dir", tmp_path / "o")
    with pytest.raises(SystemExit, match=r"adapter='.*missing-adapter' is neither a local folder"):
        eval_cli("math", "--model", tmp_path, "--adapter", "./missing-adapter", "--output_dir", tmp_path / "o")

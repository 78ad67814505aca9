"""Code suite scoring: turn a model's answer into a program, run it against the benchmark's tests, report pass@1.

HumanEval-style items (`mode="complete"`) give a signature and docstring: a fenced code block in the answer is used
as the whole function (after the prompt, so the prompt's imports still apply), plain text is taken as the body
that continues the prompt, cut where a new top-level statement starts. MBPP-style items (`mode="write"`) need the
whole function: the first fenced block, or the answer as is. The program is then the test imports, the code, the
tests, and `check(entry_point)` when the tests define `check` (HumanEval's convention). Execution is sandbox.py's:
isolated by namespaces where the machine allows it (`sandbox`), each program failing its own problem only.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from .sandbox import choose_layer, run_in_layer

# Where a plain-text HumanEval completion stops being the function body (the usual HumanEval stop sequences).
STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(item: dict, completion: str) -> str:
    """The code to test for `item`, from the model's answer `completion`."""
    block = _FENCE.search(completion)
    if block:
        code = block.group(1)
        return f"{item['prompt']}\n    pass\n\n{code}" if item["mode"] == "complete" else code
    if item["mode"] == "complete":
        body = completion
        for stop in STOP_SEQUENCES:
            body = body.split(stop)[0]
        return item["prompt"] + body
    return completion


def build_program(item: dict, code: str) -> str:
    parts = [item.get("test_imports") or "", code, item["test"]]
    if "def check(" in item["test"]:
        if not item.get("entry_point"):
            raise ValueError(f"Code item {item.get('id')}: its tests define check() but it names no `entry_point`.")
        parts.append(f"check({item['entry_point']})")
    return "\n\n".join(part for part in parts if part) + "\n"


def score_rows(
    rows: list[dict], timeout: float = 10.0, memory_mb: int = 2048, workers: int = 2, sandbox: str = "auto"
) -> tuple[dict, list[dict]]:
    """Execute each row's first sample (`prediction`, a string or a list) against its tests; pass@1 = mean passed.

    Rows need the item fields (`prompt`, `test`, `mode`, optional `entry_point`, `test_imports`) and `prediction`.
    A sample that hangs, crashes, exits early or attacks fails its own problem only. `sandbox`: see
    `asft_trl.evaluation.sandbox` (the layer used is reported as the metric `sandbox`).
    """
    from tqdm.auto import tqdm

    for index, row in enumerate(rows):
        missing = [f for f in ("prediction", "prompt", "test", "mode") if f not in row]
        if missing:
            raise ValueError(f"Code row {index} lacks {missing} (it has {sorted(row)}).")
    layer = choose_layer(sandbox)  # once: refuses, or warns about running unisolated, before anything runs

    def run(row):
        sample = row["prediction"][0] if isinstance(row["prediction"], list) else row["prediction"]
        program = build_program(row, extract_code(row, str(sample)))
        return run_in_layer(program, layer, timeout=timeout, memory_mb=memory_mb)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # the work happens in child processes; threads just wait
        results = list(tqdm(pool.map(run, rows), total=len(rows), desc="Running code tests", unit="problem"))
    scored = [
        {**row, "passed": r.passed, "status": r.status, "error": r.detail[-500:]} for row, r in zip(rows, results)
    ]
    statuses = [r.status for r in results]
    metrics = {
        "accuracy": sum(r.passed for r in results) / len(results),
        "num_problems": len(results),
        "timeouts": statuses.count("timeout"),
        "sandbox": layer,
    }
    return metrics, scored

"""Results files of an evaluation run and the tables people read: `results.json` (per benchmark, the average, the
settings used), `results.md`, and `compare`, which puts several runs' JSON files side by side.

Files are written under a temporary name and renamed, so an interrupted run never leaves a half-written result.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..utils.io import write_atomic


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON line: {error}") from error
    if not rows:
        raise ValueError(f"{path} has no rows.")
    return rows


def build_results(suite: str, metrics: dict[str, dict], settings: dict) -> dict:
    """The JSON document of a run: per-benchmark metrics and their unweighted mean accuracy (the paper's average)."""
    average = sum(m["accuracy"] for m in metrics.values()) / len(metrics)
    return {"suite": suite, "benchmarks": metrics, "average": average, "settings": settings}


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown_table(results: dict) -> str:
    """One row per benchmark: accuracy in percent, problems scored, and the suite's extra counts."""
    suite = results["suite"]
    settings = results.get("settings", {})
    label = {"math": f"avg@{settings.get('num_samples', 1)}", "code": "pass@1"}.get(suite, "accuracy")
    extras = sorted(
        {k for m in results["benchmarks"].values() for k in m} - {"accuracy", "num_problems", "num_samples"}
    )
    header = f"| benchmark | {label} (%) | problems | " + " | ".join(extras) + (" |" if extras else "")
    lines = [header.replace("|  |", "|"), "|" + "---|" * (3 + len(extras))]
    for name, m in results["benchmarks"].items():
        cells = [name, _percent(m["accuracy"]), str(m["num_problems"])]
        cells += [_percent(m[k]) if k.startswith("pass@") else str(m.get(k, "-")) for k in extras]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| **average** | **{_percent(results['average'])}** | | " + "| " * len(extras))
    model = settings.get("model") or settings.get("predictions")
    title = f"**{suite}** suite, {model}" + (f" + adapter {settings['adapter']}" if settings.get("adapter") else "")
    return title + "\n\n" + "\n".join(line.rstrip() for line in lines) + "\n"


def compare_table(paths: list[str]) -> str:
    """Runs side by side: one column per results.json, one row per benchmark, the averages last."""
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "benchmarks" not in data or "average" not in data:
            raise ValueError(f"{path} is not a results.json of `asft-trl eval` (no `benchmarks`/`average`).")
        runs.append(data)
    labels = [_run_label(path, data) for path, data in zip(paths, runs)]
    names = list(dict.fromkeys(name for run in runs for name in run["benchmarks"]))
    lines = ["| benchmark | " + " | ".join(labels) + " |", "|---|" + "---|" * len(runs)]
    for name in names:
        cells = [_percent(run["benchmarks"][name]["accuracy"]) if name in run["benchmarks"] else "-" for run in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(f"**{_percent(run['average'])}**" for run in runs) + " |")
    suites = sorted({run["suite"] for run in runs})
    note = "" if len(suites) == 1 else "\n(runs of different suites: averages are not comparable)\n"
    return "\n".join(lines) + "\n" + note


def _run_label(path: str, data: dict) -> str:
    settings = data.get("settings", {})
    model = settings.get("adapter") or settings.get("model") or settings.get("predictions") or path
    return f"{Path(str(model).rstrip('/')).name} ({Path(path).parent.name or path})"

"""Exact-match scoring for short free-form answers: the quickstart's held-out word-order task, or any local file of
prompt/answer rows. Answers are compared after `normalize` (lowercase, letters and digits only), so punctuation and
case do not count and nothing else is forgiven."""

from __future__ import annotations

import re


def normalize(text: str) -> str:
    """Lowercase and keep only letters/digits separated by single spaces, so punctuation and case do not count."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def score_rows(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Accuracy of rows with `prediction` (a string or a list of samples) and `answer`; every sample is checked."""
    scored, fractions = [], []
    for index, row in enumerate(rows):
        for field in ("prediction", "answer"):
            if field not in row:
                raise ValueError(f"Row {index} has no `{field}` field (it has {sorted(row)}).")
        samples = row["prediction"] if isinstance(row["prediction"], list) else [row["prediction"]]
        verdicts = [normalize(str(s)) == normalize(str(row["answer"])) for s in samples]
        fractions.append(sum(verdicts) / len(verdicts))
        scored.append({**row, "correct": verdicts})
    return {"accuracy": sum(fractions) / len(fractions), "num_problems": len(rows)}, scored

"""Math answer checking: is a model's answer equal to the gold answer, in any of the forms mathematicians write it?

Extraction and equivalence are math-verify's (boxed answers first, then other LaTeX and plain expressions;
fractions, decimals, intervals, sets, units and `\\text{}` are handled as it handles them). This module only decides
how gold answers are presented to it and turns verdicts into avg@n. It never generates text.
"""

from __future__ import annotations

INSTALL_HINT = "pip install 'asft-trl[eval]'  (or: pip install math-verify)"


def _math_verify():
    try:
        import math_verify
    except ImportError as error:  # the suite cannot score anything without it
        raise ImportError(f"The math suite needs math-verify: {INSTALL_HINT}") from error
    return math_verify


def parse_gold(answer: str):
    """Gold answers in the benchmarks are bare LaTeX (`\\frac{14}{3}`, `(3, \\frac{\\pi}{2})`); boxing them makes
    math-verify read them as the final answer instead of hunting for one inside the string."""
    mv = _math_verify()
    text = answer.strip()
    if "\\boxed" not in text and "$" not in text:
        text = f"\\boxed{{{text}}}"
    return mv.parse(text)


def is_correct(prediction: str, gold) -> bool:
    """True when the answer extracted from `prediction` equals `gold` (a string, or the result of `parse_gold`)."""
    mv = _math_verify()
    gold = parse_gold(gold) if isinstance(gold, str) else gold
    if not gold:  # a gold answer math-verify cannot read is a data problem, not a wrong model answer
        raise ValueError("math-verify could not parse a gold answer; check the benchmark's `answer` field.")
    try:
        return bool(mv.verify(gold, mv.parse(prediction)))
    except Exception:  # noqa: BLE001 -- math-verify can raise on exotic input; an unreadable answer is a wrong one
        return False


def score_rows(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Score rows with `answer` and `prediction` (one string or a list of samples).

    Returns the metrics (`avg@n` = mean over problems of the fraction of correct samples, `pass@n` = fraction of
    problems with at least one correct sample) and the rows with a per-sample `correct` list added.
    """
    from tqdm.auto import tqdm

    scored, fractions, any_correct, n_values = [], [], [], set()
    for index, row in enumerate(tqdm(rows, desc="Checking math answers", unit="problem")):
        for field in ("prediction", "answer"):
            if field not in row:
                raise ValueError(f"Math row {index} has no `{field}` field (it has {sorted(row)}).")
        samples = row["prediction"] if isinstance(row["prediction"], list) else [row["prediction"]]
        if not samples:
            raise ValueError(f"Math row {index} has an empty `prediction` list.")
        gold = parse_gold(str(row["answer"]))
        verdicts = [is_correct(str(sample), gold) for sample in samples]
        fractions.append(sum(verdicts) / len(verdicts))
        any_correct.append(any(verdicts))
        n_values.add(len(verdicts))
        scored.append({**row, "correct": verdicts})
    n = max(n_values)
    metrics = {
        "accuracy": sum(fractions) / len(fractions),
        f"pass@{n}": sum(any_correct) / len(any_correct),
        "num_problems": len(rows),
        "num_samples": n,
    }
    return metrics, scored

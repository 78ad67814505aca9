"""NuminaMath-CoT (AI-MO/NuminaMath-CoT), the paper's math training data: a competition problem and its
chain-of-thought solution, which ends in a \\boxed{} answer. Columns used: `problem`, `solution`."""

from __future__ import annotations

from .formatting import DatasetFormat, required_text


def to_instruction_response(row: dict) -> tuple[str, str]:
    return required_text(row, "problem"), required_text(row, "solution")


FORMAT = DatasetFormat(
    name="numina_math",
    hub_id="AI-MO/NuminaMath-CoT",
    required_columns=("problem", "solution"),
    to_instruction_response=to_instruction_response,
    description="math problem -> chain-of-thought solution",
)

"""Magicoder-Evol-Instruct-110K (ise-uiuc/Magicoder-Evol-Instruct-110K), the paper's code training data: a
programming instruction and a response with code. Columns used: `instruction`, `response`."""

from __future__ import annotations

from .formatting import DatasetFormat, required_text


def to_instruction_response(row: dict) -> tuple[str, str]:
    return required_text(row, "instruction"), required_text(row, "response")


FORMAT = DatasetFormat(
    name="magicoder",
    hub_id="ise-uiuc/Magicoder-Evol-Instruct-110K",
    required_columns=("instruction", "response"),
    to_instruction_response=to_instruction_response,
    description="coding instruction -> response",
)

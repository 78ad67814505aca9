"""What every dataset formatter shares: the record of a dataset format, the reason a row is unusable, and the two
prompt templates (the authors' Alpaca prompt, the model's chat template) that turn an instruction/response pair into
the prompt/completion form `ASFTTrainer` (TRL's SFTTrainer) trains on.

A formatter only maps one row to an (instruction, response) pair or raises `UnusableRow`; subsetting, counting and
reporting live in `asft_trl.data.prepare`. No EOS token is added here: for plain-text prompt/completion TRL's
SFTTrainer appends the tokenizer's EOS to the completion itself (unless it already ends with it), and for
conversational rows the chat template closes the assistant turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Stanford Alpaca's "prompt_no_input", the prompt of the authors' training code. The completion (the response)
# follows "### Response:" directly, as in Alpaca, and TRL appends the EOS token.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

PROMPT_TEMPLATES = ("alpaca", "chat")


class UnusableRow(ValueError):
    """A row that cannot become a training example; the message is the reason, counted in the preparation report."""


@dataclass(frozen=True)
class DatasetFormat:
    """A source dataset's schema and how one of its rows becomes an (instruction, response) pair.

    `to_instruction_response(row)` returns the pair or raises `UnusableRow` with a short, countable reason.
    `note(row)` optionally names a property worth counting in usable rows (e.g. "no explanation"), or returns None.
    """

    name: str
    hub_id: str
    required_columns: tuple[str, ...]
    to_instruction_response: Callable[[dict], tuple[str, str]]
    description: str
    note: Callable[[dict], str | None] | None = None


def required_text(row: dict, column: str) -> str:
    """The row's non-empty text in `column`, stripped of surrounding whitespace; else `UnusableRow`."""
    value = row.get(column)
    if value is None:
        raise UnusableRow(f"missing {column}")
    if not isinstance(value, str):
        raise UnusableRow(f"{column} is not text")
    value = value.strip()
    if not value:
        raise UnusableRow(f"empty {column}")
    return value


def to_prompt_completion(instruction: str, response: str, prompt_template: str) -> dict:
    """The trainer's prompt/completion form: plain text with the Alpaca prompt, or messages for the chat template."""
    if prompt_template == "alpaca":
        return {"prompt": ALPACA_PROMPT_NO_INPUT.format(instruction=instruction), "completion": response}
    if prompt_template == "chat":
        return {
            "prompt": [{"role": "user", "content": instruction}],
            "completion": [{"role": "assistant", "content": response}],
        }
    raise ValueError(f"prompt_template={prompt_template!r} is not supported. Use one of {list(PROMPT_TEMPLATES)}.")

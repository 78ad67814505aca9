"""Checks on training data that must fail early and say why, instead of a `KeyError` or a sampler error later.

- `check_dataset_format`: the dataset is in one of the formats TRL's SFTTrainer accepts.
- `report_dropped`: examples TRL dropped because truncation left them no completion token are counted and reported,
  and a dataset left empty is refused.
- `report_empty_completions`: prompt/completion rows whose completion is empty (they would teach "end the answer right
  after the prompt", the EOS token being all that is scored) are counted and reported.
This module never changes data; it only looks at column names and row counts.
"""

from __future__ import annotations

import logging

from datasets import Dataset
from trl.data_utils import get_dataset_column_names

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = (
    "language modeling: a text column named by `dataset_text_field` (default 'text')",
    "conversational language modeling: 'messages' (list of {'role', 'content'})",
    "ShareGPT-style: 'conversations' (list of {'from', 'value'})",
    "prompt-completion: 'prompt' and 'completion' (strings or lists of messages)",
    "pre-tokenized: 'input_ids' (and optionally 'completion_mask' or 'labels')",
    "vision: 'images' or 'image' next to one of the above",
)


def check_dataset_format(dataset, dataset_text_field: str, has_formatting_func: bool, dataset_name: str) -> None:
    """Raise a ValueError naming the columns found and the formats accepted when none of TRL's formats matches."""
    if has_formatting_func:
        return  # the formatting function builds the text itself
    columns = set(get_dataset_column_names(dataset) or [])
    if not columns:  # an IterableDataset whose features are unknown: TRL finds out on the first example
        return
    if columns & {"input_ids", dataset_text_field, "messages", "conversations"}:
        return
    if {"prompt", "completion"} <= columns:
        return
    hint = ""
    if "prompt" in columns and "completion" not in columns:
        hint = " It has 'prompt' but no 'completion': rename the answer column to 'completion'."
    elif "completion" in columns and "prompt" not in columns:
        hint = " It has 'completion' but no 'prompt': rename the question column to 'prompt'."
    raise ValueError(
        f"The {dataset_name} dataset has columns {sorted(columns)}, which match none of the formats the trainer "
        f"accepts:\n  - " + "\n  - ".join(ACCEPTED_FORMATS) + f"\n{hint} Fix: rename the columns (e.g. with "
        "`dataset.rename_columns`), set `dataset_text_field` to your text column, or pass a `formatting_func`."
    )


def report_dropped(n_before: int | None, dataset, dataset_name: str, max_length: int | None) -> int:
    """Count the rows TRL's preparation removed (completions truncated to nothing) and refuse an emptied dataset.

    Returns the number dropped (0 when the counts are unknown, e.g. for an IterableDataset).
    """
    if n_before is None or not isinstance(dataset, Dataset):
        return 0
    dropped = n_before - len(dataset)
    if dropped > 0:
        logger.warning(
            "%d of %d %s examples were dropped: with max_length=%s their completion was truncated to nothing, so they "
            "carry no training signal. Raise `max_length` or shorten the prompts to keep them.",
            dropped,
            n_before,
            dataset_name,
            max_length,
        )
    if n_before > 0 and len(dataset) == 0:
        raise ValueError(
            f"All {n_before} {dataset_name} examples were dropped: with max_length={max_length} truncation leaves no "
            "completion token in any of them (the prompts alone fill max_length). Raise `max_length`, shorten the "
            "prompts, or check that the 'completion' column is not empty."
        )
    return dropped


def _is_empty_completion(completion) -> bool:
    if completion is None:
        return True
    if isinstance(completion, str):
        return not completion.strip()
    if isinstance(completion, list):  # conversational: the assistant messages
        return all(
            not str(message.get("content") or "").strip() for message in completion if isinstance(message, dict)
        )
    return False


def report_empty_completions(dataset, dataset_name: str) -> int:
    """Count the prompt/completion rows whose completion is empty or blank, and warn with a few row numbers.

    Such a row still trains (TRL appends EOS, or the chat template closes the turn, and that is what is scored), so it
    teaches the model to stop right after the prompt; usually it is a data bug. Returns the count (0 when the dataset
    has no 'completion' column or its rows can't be read up front, e.g. an IterableDataset).
    """
    if not isinstance(dataset, Dataset) or "completion" not in (dataset.column_names or []):
        return 0
    empty = [i for i, completion in enumerate(dataset["completion"]) if _is_empty_completion(completion)]
    if empty:
        shown = ", ".join(str(i) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        logger.warning(
            "%d of %d %s examples have an empty completion (rows %s): they still train, teaching the model to end its "
            "answer right after the prompt (only the end-of-turn token is scored). If that is not meant, remove them, "
            "e.g. `dataset.filter(lambda row: row['completion'])`.",
            len(empty),
            len(dataset),
            dataset_name,
            shown,
        )
    return len(empty)

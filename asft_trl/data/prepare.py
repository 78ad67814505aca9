"""Turn a loaded source dataset (NuminaMath-CoT, MedMCQA, Magicoder, or a local file in the same schema) into the
prompt/completion rows the trainer takes: check its columns, take a seeded subset, format every row, and count and
report the rows that cannot be used.

- Missing columns are an error before any compute, naming the columns and the fix.
- Subsetting is deterministic: the rows are visited in one seeded permutation and the first `size` usable ones are
  kept, so the same (size, seed) gives the same examples, and an unusable row is replaced by the next one in that
  order rather than shrinking the subset.
- An unusable row (a missing field, an answer index out of range, ...) is never a crash in the middle of a run: it is
  skipped, counted by reason, and reported with a few of its row numbers. A split left with no usable row is an error.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from datasets import Dataset, DatasetDict, Features, IterableDataset, List, Value, concatenate_datasets

from .formatting import PROMPT_TEMPLATES, DatasetFormat, UnusableRow, to_prompt_completion
from .registry import get_dataset_format

logger = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 5  # row numbers listed per unusable reason in the report

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
_BOOKKEEPING = {"_unusable": Value("string"), "_note": Value("string"), "_source_index": Value("int64")}


@dataclass
class PreparationReport:
    """What preparing one split did: rows available, visited, kept, and the unusable ones by reason."""

    split: str
    dataset_format: str | None
    prompt_template: str | None
    rows_available: int
    rows_requested: int | None
    seed: int | None
    rows_read: int = 0
    rows_used: int = 0
    unusable: dict[str, int] = field(default_factory=dict)
    unusable_examples: dict[str, list[int]] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        what = f"{self.dataset_format}, {self.prompt_template} prompt" if self.dataset_format else "as loaded"
        subset = "" if self.rows_requested is None else f" (subset of {self.rows_requested}, seed {self.seed})"
        line = f"{self.split}: {self.rows_used} of {self.rows_available} rows used{subset} [{what}]"
        if self.unusable:
            reasons = ", ".join(
                f"{reason}: {count} (e.g. rows {self.unusable_examples.get(reason, [])}, 0-based)"
                for reason, count in sorted(self.unusable.items())
            )
            line += (
                f"; {sum(self.unusable.values())} of {self.rows_read} rows read were unusable and skipped: {reasons}"
            )
        if self.notes:
            line += "; " + ", ".join(f"{note}: {count}" for note, count in sorted(self.notes.items()))
        return line


def check_columns(dataset, dataset_format: DatasetFormat, split: str, dataset_name: str | None) -> None:
    """Refuse, before any compute, a dataset lacking the columns the format reads."""
    columns = list(getattr(dataset, "column_names", None) or [])
    missing = [c for c in dataset_format.required_columns if c not in columns]
    if not missing:
        return
    hint = ""
    if {"prompt", "completion"} <= set(columns) or "messages" in columns:
        hint = " It looks already formatted for the trainer: leave `dataset_format` unset (--dataset_format none)."
    raise ValueError(
        f"The {split} split of {dataset_name!r} lacks the column(s) {missing} that dataset_format="
        f"{dataset_format.name!r} reads (it has {sorted(columns)}). Expected the schema of {dataset_format.hub_id}: "
        f"{list(dataset_format.required_columns)}.{hint} Fix: rename the columns (datasets' `rename_columns`), or "
        f"pick the dataset_format matching your data (one of the registry's formats)."
    )


def _output_features(prompt_template: str) -> Features:
    text = Value("string") if prompt_template == "alpaca" else _MESSAGES
    return Features({"prompt": text, "completion": text, **_BOOKKEEPING})


def _format_rows(
    dataset: Dataset,
    dataset_format: DatasetFormat,
    prompt_template: str,
    source_indices: np.ndarray,
    desc: str,
    num_proc: int | None,
) -> Dataset:
    empty = "" if prompt_template == "alpaca" else []

    def format_row(row: dict, position: int) -> dict:
        out = {"_unusable": "", "_note": "", "_source_index": int(source_indices[position])}
        try:
            instruction, response = dataset_format.to_instruction_response(row)
        except UnusableRow as reason:
            return {"prompt": empty, "completion": empty, **out, "_unusable": str(reason)}
        if dataset_format.note is not None:
            out["_note"] = dataset_format.note(row) or ""
        return {**to_prompt_completion(instruction, response, prompt_template), **out}

    return dataset.map(
        format_row,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=_output_features(prompt_template),
        desc=desc,
        num_proc=num_proc,
    )


def prepare_split(
    dataset: Dataset,
    dataset_format: str | None,
    prompt_template: str = "alpaca",
    size: int | None = None,
    seed: int = 42,
    split: str = "train",
    dataset_name: str | None = None,
    num_proc: int | None = None,
) -> tuple[Dataset, PreparationReport]:
    """Format one split (when `dataset_format` is given) and keep `size` usable rows of a seeded order (all when None).

    Returns the prepared split (prompt/completion columns when formatted) and its report.
    """
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "dataset_format/dataset_size need the whole dataset (a seeded subset and per-row checks); they do not work "
            "with dataset_streaming=true. Fix: set dataset_streaming to false."
        )
    if size is not None and size <= 0:
        raise ValueError(f"The subset size for the {split} split is {size}; it must be a positive number of rows.")
    fmt = get_dataset_format(dataset_format) if dataset_format else None
    if fmt is not None:
        check_columns(dataset, fmt, split, dataset_name)
        if prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template={prompt_template!r} is not supported. Use one of {list(PROMPT_TEMPLATES)}."
            )
    n = len(dataset)
    report = PreparationReport(
        split=split,
        dataset_format=fmt and fmt.name,
        prompt_template=fmt and prompt_template,
        rows_available=n,
        rows_requested=size,
        seed=seed if size is not None else None,
    )
    # One permutation of all rows, drawn from `seed` alone: the subset does not depend on the training seed
    order = np.random.default_rng(seed).permutation(n) if size is not None else np.arange(n)
    wanted = n if size is None else min(size, n)

    if fmt is None:  # no formatting: every row counts as usable, TRL checks the format itself
        report.rows_read = report.rows_used = wanted
        return (dataset.select(order[:wanted]) if size is not None else dataset), report

    parts, unusable, examples, notes, start = [], Counter(), {}, Counter(), 0
    while report.rows_used < wanted and start < n:
        # Read exactly as many rows as are still missing: the kept rows are then the first usable ones of the order
        # however many rounds it takes
        stop = min(n, start + wanted - report.rows_used)
        indices = order[start:stop]
        chunk = dataset.select(indices) if size is not None or start or stop < n else dataset
        desc = f"Formatting {split} ({fmt.name}, {prompt_template} prompt)"
        formatted = _format_rows(chunk, fmt, prompt_template, indices, desc, num_proc)
        reasons = formatted["_unusable"]
        for reason, source in zip(reasons, formatted["_source_index"]):
            if reason:
                unusable[reason] += 1
                examples.setdefault(reason, [])
                if len(examples[reason]) < EXAMPLES_PER_REASON:
                    examples[reason].append(int(source))
        notes.update(note for note, reason in zip(formatted["_note"], reasons) if note and not reason)
        keep = [i for i, reason in enumerate(reasons) if not reason]
        parts.append(formatted.select(keep) if len(keep) < len(formatted) else formatted)
        report.rows_used += len(keep)
        report.rows_read += len(indices)
        start = stop
    report.unusable, report.unusable_examples, report.notes = dict(unusable), examples, dict(notes)

    prepared = concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else None
    if report.rows_used == 0:
        raise ValueError(
            f"No usable row in the {split} split of {dataset_name!r} ({n} rows, dataset_format={fmt.name!r}): "
            f"{report.summary()}. Fix: check that the split has the expected fields filled in"
            + (" (MedMCQA's Hub test split has no answers: use the validation split)" if fmt.name == "medmcqa" else "")
            + "."
        )
    if size is not None and report.rows_used < size:
        logger.warning(
            "The %s split has only %d usable rows; the recipe asks for %d (dataset_size). Training on %d.",
            split,
            report.rows_used,
            size,
            report.rows_used,
        )
    if report.unusable:
        logger.warning("Data preparation skipped unusable rows. %s", report.summary())
    return prepared.remove_columns(list(_BOOKKEEPING)), report


def prepare_splits(
    splits: DatasetDict, script_args, num_proc: int | None = None
) -> tuple[DatasetDict, list[PreparationReport]]:
    """Prepare the recipe's train split and, if the dataset has it, its test split, as the recipe's fields say:
    `dataset_format`, `prompt_template`, `dataset_size` / `dataset_test_size`, `dataset_seed`."""
    dataset_format = script_args.dataset_format
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    if train_split not in splits:
        raise ValueError(
            f"The dataset {script_args.dataset_name!r} has no {train_split!r} split (it has {sorted(splits)}). "
            "Fix: set dataset_train_split to one of those."
        )
    if dataset_format:  # fail on the columns of every split used before formatting any of them
        fmt = get_dataset_format(dataset_format)
        for split in (train_split, test_split):
            if split in splits:
                check_columns(splits[split], fmt, split, script_args.dataset_name)
    prepared, reports = dict(splits), []
    for split, size in ((train_split, script_args.dataset_size), (test_split, script_args.dataset_test_size)):
        if split not in splits:
            continue
        prepared[split], report = prepare_split(
            splits[split],
            dataset_format,
            script_args.prompt_template,
            size=size,
            seed=script_args.dataset_seed,
            split=split,
            dataset_name=script_args.dataset_name,
            num_proc=num_proc,
        )
        reports.append(report)
    return DatasetDict({k: v for k, v in prepared.items() if k in (train_split, test_split)}), reports

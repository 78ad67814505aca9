"""Turn a recipe's dataset fields into a `DatasetDict`: a Hub id, a local file, a TRL dataset mixture, or a task this
package generates (no download). Only loading: formatting and checks live elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from datasets import DatasetDict, load_dataset

from ..utils.paths import DATA_FILE_FORMATS

# Generated datasets, by the name a recipe uses as `dataset_name`. Each builder takes the seed and returns splits.
# Filled by the packages that generate them when they are imported (`asft_trl.quickstart` adds "asft/quickstart"; the
# command line imports it), so this module names none of them.
GENERATED_DATASETS: dict[str, Callable[..., DatasetDict]] = {}


def register_generated_dataset(name: str, build: Callable[..., DatasetDict]) -> None:
    """Make `dataset_name: NAME` load `build(seed=training seed)` (a `DatasetDict`) instead of a file or Hub id."""
    GENERATED_DATASETS[name] = build


def check_dataset_given(script_args, dataset_args=None) -> None:
    """Refuse a recipe that names no dataset (neither `dataset_name` nor a `datasets:` mixture)."""
    if dataset_args is not None and getattr(dataset_args, "datasets", None):
        return
    if not script_args.dataset_name:
        raise ValueError(
            "No dataset given. Set `dataset_name` in the recipe (a Hub id, a local .json/.jsonl/.parquet/.csv file, or "
            f"one of the generated datasets {sorted(GENERATED_DATASETS)}), or a `datasets:` mixture."
        )


def load_training_data(script_args, dataset_args=None, seed: int = 42) -> DatasetDict:
    """Load the recipe's dataset.

    `dataset_name` may be a generated dataset (see GENERATED_DATASETS), a local file (json/jsonl/parquet/csv), a
    local directory saved with `save_to_disk`, or anything `datasets.load_dataset` accepts. A TRL dataset mixture
    (`datasets:` in the recipe) takes precedence, as in `trl sft`.
    """
    if dataset_args is not None and getattr(dataset_args, "datasets", None):
        from trl import get_dataset

        return get_dataset(dataset_args)
    check_dataset_given(script_args)
    name = script_args.dataset_name
    if name in GENERATED_DATASETS:
        return GENERATED_DATASETS[name](seed=seed)
    path = Path(name)
    if path.is_file():
        builder = DATA_FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset_name={name!r} is a file of an unknown type. Use one of {sorted(DATA_FILE_FORMATS)}."
            )
        return load_dataset(builder, data_files={script_args.dataset_train_split: str(path)})
    if path.is_dir() and (path / "dataset_dict.json").exists():
        from datasets import load_from_disk

        return load_from_disk(str(path))
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)

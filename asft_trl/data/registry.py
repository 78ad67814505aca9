"""The dataset formats a recipe can name as `dataset_format`, by name. Add a dataset by writing a module with a
`FORMAT` (see `asft_trl.data.formatting.DatasetFormat`) and listing it here."""

from __future__ import annotations

from . import magicoder, medmcqa, numina_math
from .formatting import DatasetFormat

DATASET_FORMATS: dict[str, DatasetFormat] = {
    module.FORMAT.name: module.FORMAT for module in (numina_math, medmcqa, magicoder)
}


def get_dataset_format(name: str) -> DatasetFormat:
    if name not in DATASET_FORMATS:
        raise ValueError(
            f"dataset_format={name!r} is not known. Use one of {sorted(DATASET_FORMATS)}, or leave dataset_format "
            "unset for data already in a format the trainer accepts (prompt/completion, messages, text)."
        )
    return DATASET_FORMATS[name]

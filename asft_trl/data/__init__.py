"""Training data: loading (Hub, local files, generated tasks), the paper's dataset formatters with seeded subsetting
(`prepare`), and the early checks on it."""

from .checks import check_dataset_format, report_dropped
from .formatting import ALPACA_PROMPT_NO_INPUT, PROMPT_TEMPLATES, DatasetFormat, UnusableRow
from .loading import GENERATED_DATASETS, load_training_data, register_generated_dataset
from .prepare import PreparationReport, prepare_split, prepare_splits
from .registry import DATASET_FORMATS, get_dataset_format

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "DATASET_FORMATS",
    "GENERATED_DATASETS",
    "PROMPT_TEMPLATES",
    "DatasetFormat",
    "PreparationReport",
    "UnusableRow",
    "check_dataset_format",
    "get_dataset_format",
    "load_training_data",
    "prepare_split",
    "prepare_splits",
    "register_generated_dataset",
    "report_dropped",
]

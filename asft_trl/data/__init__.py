"""Training data: loading (Hub, local files, generated tasks) and the early checks on it."""

from .checks import check_dataset_format, report_dropped
from .loading import GENERATED_DATASETS, load_training_data

__all__ = ["GENERATED_DATASETS", "check_dataset_format", "load_training_data", "report_dropped"]

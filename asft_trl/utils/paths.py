"""Where a model or dataset named in a recipe, a config or on the command line can come from, checked before anything
loads: a local folder (or file), or a Hub id. A value that is neither gets an error that says so, instead of
`huggingface_hub`'s "Repo id must be in the form 'repo_name'..." half a minute into a run.

Only looks at the file system, the id's form and (offline) the local Hub cache; never downloads, never loads (a
registered model's `resolve_model` is the provider's own code, run only when asked).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# Local data files, by ending: the `datasets` builder that reads each. `dataset_name` (asft_trl.data.loading) and
# `asft-trl eval --data_files` (asft_trl.evaluation.benchmarks) accept these.
DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
DATA_FILE_SUFFIXES = tuple(DATA_FILE_FORMATS)


# Models that resolve themselves, by the name a recipe or the command line gives: `resolve(cache_dir)` returns what
# `from_pretrained` loads (the quickstart's SmolLM2: the Hub id when reachable, else an offline copy it writes under
# `cache_dir`). Filled by the package that provides the model when it is imported (`asft_trl.quickstart`).
_MODEL_RESOLVERS: dict[str, Callable[[str | os.PathLike], str]] = {}
DEFAULT_MODEL_CACHE_DIR = os.path.join("outputs", "models")


def register_model_resolver(name: str, resolve: Callable[[str | os.PathLike], str]) -> None:
    _MODEL_RESOLVERS[name] = resolve


def resolves_itself(name: str | None) -> bool:
    """Whether `name` is a registered model that finds its own files (so `check_model_source` does not apply)."""
    return name in _MODEL_RESOLVERS


def resolve_model(name: str, cache_dir: str | os.PathLike = DEFAULT_MODEL_CACHE_DIR) -> str:
    """What `from_pretrained` should load for `name`: a registered model's resolution, anything else unchanged."""
    resolve = _MODEL_RESOLVERS.get(name)
    return name if resolve is None else resolve(cache_dir)


def is_hub_id(value: str) -> bool:
    """Whether `value` has the form of a Hub repository id ('name' or 'namespace/name')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str, filename: str, cache_dir: str | None, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision), str)


def check_model_source(
    value: str | None,
    field: str,
    *,
    config_file: str = "config.json",
    cache_dir: str | None = None,
    revision: str | None = None,
) -> None:
    """Refuse a model (or adapter) source that is neither a local folder nor a Hub id, naming `field` and the fix.

    A Hub-shaped id is accepted as it is online (only the Hub can say whether it exists); offline
    (`HF_HUB_OFFLINE=1`) it must be in the local Hub cache, at `revision` (the default branch when unset), under
    `cache_dir`. `config_file` is the file that cache must hold (`adapter_config.json` for a PEFT adapter).
    """
    if value is None or os.path.isdir(os.path.expanduser(value)):
        return
    if os.path.exists(os.path.expanduser(value)):
        raise ValueError(
            f"{field}={value!r} is a file, not a model folder. Fix: give the folder that holds {config_file} and the "
            "weights (what `save_pretrained` writes), or a Hub id such as 'Qwen/Qwen2.5-0.5B'."
        )
    if not is_hub_id(value):
        raise ValueError(
            f"{field}={value!r} is neither a local folder (no such directory) nor a Hub id ('name' or "
            "'namespace/name'). Fix: check the path (relative paths start from the current directory, "
            f"{os.getcwd()!r}), or give a Hub id such as 'Qwen/Qwen2.5-0.5B'."
        )
    if _hub_offline() and not _in_hub_cache(value, config_file, cache_dir, revision):
        raise ValueError(
            f"{field}={value!r} is not a local folder, and as a Hub id it is not in the local Hub cache while the Hub "
            "is offline (HF_HUB_OFFLINE=1). Fix: check the path, or download the model once with the Hub reachable."
        )


def check_dataset_source(value: str | None, field: str = "dataset_name") -> None:
    """Refuse a dataset source that names a missing local file or is neither a local path nor a Hub id."""
    if value is None or os.path.exists(os.path.expanduser(value)):
        return
    if Path(value).suffix.lower() in DATA_FILE_SUFFIXES or not is_hub_id(value):
        raise ValueError(
            f"{field}={value!r} is neither an existing local file or folder nor a Hub dataset id. Fix: check the path "
            f"(relative paths start from the current directory, {os.getcwd()!r}), or give a Hub id such as "
            "'trl-lib/Capybara'."
        )

"""Offline-friendly quickstart: the SmolLM2-135M-Instruct model and a small generated task to fine-tune it on.

from asft_trl.quickstart import HUB_ID, resolve_quickstart_model, make_splits, score

model_path = resolve_quickstart_model(HUB_ID, cache_dir="~/.cache/asft-trl")  # Hub id, or offline GGUF copy
splits = make_splits(seed=0)                  # "reverse these words": 800 train, 64 held-out prompts
score(model, tokenizer, splits["test"])["accuracy"]                             # greedy exact match
"""

from .model import HUB_ID, find_gguf, materialize_smollm2, resolve_quickstart_model
from .task import make_splits, ood_checks, score

__all__ = [
    "HUB_ID",
    "find_gguf",
    "materialize_smollm2",
    "resolve_quickstart_model",
    "make_splits",
    "ood_checks",
    "score",
]

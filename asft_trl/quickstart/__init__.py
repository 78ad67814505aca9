"""Offline-friendly quickstart: the SmolLM2-135M-Instruct model and a small generated task to fine-tune it on.

from asft_trl.quickstart import HUB_ID, resolve_quickstart_model, make_splits, score

model_path = resolve_quickstart_model(HUB_ID, cache_dir="~/.cache/asft-trl")  # Hub id, or offline GGUF copy
splits = make_splits(seed=0)                  # "reverse these words": 800 train, 64 held-out prompts
score(model, tokenizer, splits["test"])["accuracy"]                             # greedy exact match

Importing this package registers the demo with the libraries it plugs into, which never import it: its model with
`utils.paths` (offline fallback), its generated dataset "asft/quickstart" with `data.loading`, its held-out split as
the "quickstart" benchmark and its greedy exact match as the "quickstart" task metric with `evaluation.benchmarks`.
The command line (`asft_trl.scripts`) imports it.
"""

from ..data.loading import register_generated_dataset
from ..evaluation.benchmarks import Benchmark, register_benchmark, register_task_metric
from ..utils.paths import register_model_resolver
from .model import HUB_ID, find_gguf, materialize_smollm2, resolve_quickstart_model
from .task import make_splits, ood_checks, score

register_model_resolver(HUB_ID, lambda cache_dir: resolve_quickstart_model(HUB_ID, cache_dir=cache_dir))
register_generated_dataset("asft/quickstart", lambda seed: make_splits(seed=seed))
# The held-out split of a quickstart training run with that seed
register_benchmark(
    Benchmark("quickstart", "quickstart", None, generate=lambda seed: list(make_splits(seed=seed)["test"]))
)
register_task_metric("quickstart", score)

__all__ = [
    "HUB_ID",
    "find_gguf",
    "materialize_smollm2",
    "resolve_quickstart_model",
    "make_splits",
    "ood_checks",
    "score",
]

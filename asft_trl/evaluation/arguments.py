"""`EvalArguments`: every setting of `asft-trl eval`, documented once for `--help`, YAML configs and the docs.

Parsed by TRL's `TrlParser`, so `asft-trl eval math --config eval.yaml --temperature 0.6` works like training
recipes: the YAML file sets fields, the command line overrides them. Validation lives in `__post_init__`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..data.formatting import PROMPT_TEMPLATES
from .medical import MEDICAL_SCORINGS
from .sandbox import SANDBOXES

SUITES = ("math", "medical", "code", "quickstart")
# The training recipes' prompt templates, plus the text as is
TEMPLATES = (*PROMPT_TEMPLATES, "raw")
BACKENDS = ("auto", "hf", "vllm")


@dataclass
class EvalArguments:
    """Settings of one `asft-trl eval` run.

    Parameters:
        > What to score
        suite: `math`, `medical`, `code`, or `quickstart` (exact match on the quickstart's held-out split or on
            local prompt/answer files).
        benchmarks: names from the suite (default: all the paper's benchmarks of the suite).
        data_files: `name=path` pairs: score local files (same schema as the Hub set) instead of the Hub.
        limit: score only the first N items of each benchmark (smoke tests).
        quickstart_seed: the quickstart training run's `seed`; its generated held-out split depends on it.
        predictions: a JSONL file of earlier generations to score without a model.

        > Model
        model: Hub id or local folder. `HuggingFaceTB/SmolLM2-135M-Instruct` resolves as in training: the Hub when
            reachable, else the offline GGUF copy materialised under outputs/models.
        adapter: a PEFT adapter folder loaded on top of `model`.
        dtype: `auto`, `float32`, `bfloat16` or `float16`.

        > Generation (math, code, quickstart)
        prompt_template: `chat` (the model's chat template plus an instruction), `alpaca` (the authors'
            prompt_no_input), `raw` (the text as is, for base models on code completion).
        num_samples, temperature, top_p, max_new_tokens: sampling; temperature 0 means greedy.
        batch_size: prompts per `generate` call / questions per forward pass.
        backend: `auto` (vLLM when installed and a GPU is present, else Hugging Face `generate`), `hf`, `vllm`.

        > Medical scoring
        medical_scoring: how the next-token distribution after "Answer:" becomes a letter: `letters` (the option
            letter with the highest log-probability; default) or `authors` (the ASFT authors' code: the best letter
            among the 10 most likely tokens, else "A"). See asft_trl/evaluation/medical.py.

        > Code execution
        timeout: seconds of wall time per problem; memory_mb: address-space limit per problem; workers: problems
            run at once.
        sandbox: how model-generated programs are isolated: `auto` (an isolation layer when this machine has one,
            else the audit-hook guard alone, with a loud warning), `isolated` (an isolation layer or refuse),
            `bubblewrap` or `unshare` (that layer or refuse), `guard` (the guard alone, no isolation).

        > Output
        output_dir: where `generations.jsonl`, `results.json` and `results.md` go; an existing results file is
            never overwritten unless `overwrite` is set.
    """

    suite: str = field(default="math", metadata={"help": f"Suite to score: one of {', '.join(SUITES)}."})
    model: str | None = field(default=None, metadata={"help": "Hub id or local model folder."})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder to load on top of --model."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    benchmarks: list[str] | None = field(
        default=None, metadata={"help": "Benchmarks of the suite to score (default: all of the suite's)."}
    )
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local data instead of the Hub, as name=path pairs (e.g. math500=my_math.jsonl)."},
    )
    limit: int | None = field(default=None, metadata={"help": "Score only the first N items of each benchmark."})
    quickstart_seed: int = field(
        default=42,
        metadata={
            "help": "quickstart suite: the training run's `seed` (42 unless the recipe set one); the generated "
            "train/held-out split depends on it, so this must match to score truly held-out prompts."
        },
    )
    predictions: str | None = field(
        default=None, metadata={"help": "Score this JSONL of generations/predictions; no model is loaded."}
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Prompt format: chat (model's chat template + instruction), alpaca (the authors' "
            "prompt_no_input), raw (text as is). Default: chat; medical always uses the paper's raw prompt. The "
            "training recipes' field of the same name."
        },
    )
    template: str | None = field(
        default=None,
        metadata={"help": "Deprecated name of --prompt_template; still accepted, with a warning."},
    )
    num_samples: int = field(default=16, metadata={"help": "Samples per prompt (math: avg@n; paper: 16)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 = greedy (paper: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling top_p (paper: 1.0)."})
    max_new_tokens: int = field(default=4096, metadata={"help": "Most new tokens per sample (paper: 4096)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call / questions per forward pass."})
    backend: str = field(default="auto", metadata={"help": "Generation backend: auto, hf, vllm."})
    seed: int = field(default=0, metadata={"help": "Random seed for sampling."})
    medical_scoring: str = field(
        default="letters",
        metadata={
            "help": "Medical suite: `letters` (the option letter with the highest next-token log-probability) or "
            "`authors` (the ASFT authors' evaluation: the best option letter among the 10 most likely next tokens, "
            'else "A"), so numbers compare with the paper\'s. With --predictions, rescores the saved rows.'
        },
    )
    timeout: float = field(default=10.0, metadata={"help": "Code suite: seconds of wall time per problem."})
    memory_mb: int = field(default=2048, metadata={"help": "Code suite: address-space limit per problem (MiB)."})
    workers: int = field(default=2, metadata={"help": "Code suite: problems executed at once."})
    sandbox: str = field(
        default="auto",
        metadata={
            "help": "Code suite: how generated programs are isolated. auto: bubblewrap or unshare namespaces when "
            "they work here (no network, read-only system, nothing of the user's files), else the audit-hook guard "
            "alone with a loud warning; isolated: refuse instead of falling back; bubblewrap, unshare: that layer "
            "or refuse; guard: the guard alone (no isolation)."
        },
    )
    output_dir: str = field(
        default="outputs/eval", metadata={"help": "Folder for generations, results.json, results.md."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace results already in output_dir."})

    def __post_init__(self):
        if self.suite not in SUITES:
            raise ValueError(f"suite={self.suite!r} is not a suite; use one of {', '.join(SUITES)}.")
        if self.template is not None:
            # The old name of the field; recipes' and scripts' `--template` keep working
            warnings.warn(
                f"`template` is deprecated: use `prompt_template` (the training recipes' name), e.g. --prompt_template "
                f"{self.template}. `template` will be removed in a later release.",
                FutureWarning,
                stacklevel=3,
            )
            if self.prompt_template is not None and self.prompt_template != self.template:
                raise ValueError(
                    f"template={self.template!r} and prompt_template={self.prompt_template!r} disagree; template is "
                    "the deprecated name of prompt_template. Fix: set prompt_template only."
                )
            self.prompt_template, self.template = self.template, None
        if self.prompt_template is None:
            self.prompt_template = "raw" if self.suite == "medical" else "chat"
        if self.prompt_template not in TEMPLATES:
            raise ValueError(
                f"prompt_template={self.prompt_template!r} is not supported; use one of {', '.join(TEMPLATES)}."
            )
        if self.suite == "medical" and self.prompt_template != "raw":
            raise ValueError(
                f"prompt_template={self.prompt_template!r}: the medical suite scores the paper's zero-shot raw prompt "
                "(Question/Options/Answer:); drop --prompt_template or pass --prompt_template raw."
            )
        if self.sandbox not in SANDBOXES:
            raise ValueError(f"sandbox={self.sandbox!r} is not supported; use one of {', '.join(SANDBOXES)}.")
        if self.medical_scoring not in MEDICAL_SCORINGS:
            raise ValueError(
                f"medical_scoring={self.medical_scoring!r} is not supported; use one of {', '.join(MEDICAL_SCORINGS)}."
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not supported; use one of {', '.join(BACKENDS)}.")
        if self.model is None and self.predictions is None:
            raise ValueError("Give --model PATH_OR_ID to generate, or --predictions FILE to score existing outputs.")
        if self.model is not None and self.predictions is not None:
            raise ValueError("Give either --model or --predictions, not both (predictions are scored as they are).")
        for name in ("num_samples", "max_new_tokens", "batch_size", "workers", "memory_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1].")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError(
                f"num_samples={self.num_samples} with temperature=0 gives {self.num_samples} identical "
                "greedy samples; set --num_samples 1 or a temperature > 0."
            )
        if self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout} must be positive.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be at least 1.")
        for pair in self.data_files or []:
            if "=" not in pair:
                raise ValueError(f"data_files entry {pair!r} must be name=path (e.g. math500=problems.jsonl).")
        # A bad path is named before any benchmark is fetched or model loaded (the quickstart model resolves offline)
        from ..utils.paths import check_model_source, resolves_itself

        if not resolves_itself(self.model):
            check_model_source(self.model, "model")
        check_model_source(self.adapter, "adapter", config_file="adapter_config.json")

    def local_files(self) -> dict[str, str]:
        return dict(pair.split("=", 1) for pair in self.data_files or [])

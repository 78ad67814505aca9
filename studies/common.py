"""What any study here needs, so that a new study is its task, its measures and its report, and nothing else.

- the methods: `RunSpec` (the two switches, `loss_type` and `kl_coef`), the paper's four (`method_specs`), the
  trainer's config and LoRA set-up every study trains with (`trainer_config`, `lora_config`), training with its
  cost measured (`train_timed`), scoring greedy answers (`accuracy`) and the probes' (prompt, answer) pairs
  (`prompt_answer_pairs`);
- run folders: a finished run is reused when its stored settings match, an unfinished one resumes from its last
  checkpoint, and a folder that holds other settings is refused before anything is written (`check_run_dir`,
  `check_seed_dirs`, `last_checkpoint`); runs go seed by seed (`seed_dir`), so an interrupted study already holds
  whole seeds (`run_seed_by_seed`);
- verdicts by rules fixed before a study runs (`Hypothesis`, `verdict`, `judge`) and the effects they read from runs'
  curves (`curve_end`, `curve_mid`, `curve_start`, `relative`, `reduction`, `minus`);
- figures: curves of several seeds as a mean and a min-max band per method (`plot_seed_bands`);
- the report: the measured part of a docs file, given explicitly, between a study's own markers; everything else the
  file holds is kept (`write_generated`, `replace_generated`), with the tables' helpers (`mean_sd`, `fmt_effect`,
  `verdict_table`), and the report's common fields (`StudyClock`);
- the command line: `--model`/`--model_cache_dir`, the training options (`add_training_arguments`), `--num_threads`,
  `--seeds`, and the checks every study makes (`parse_study_args`).

The studies are this repository's experiments, not the library: `asft_trl` never imports them, and the wheel does not
ship them. Run them from the repository's root (`python -m studies.drift`, `make study-drift`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import asft_trl.quickstart  # noqa: F401  (registers the quickstart model, which `resolve_model` resolves offline)
from asft_trl.utils.io import write_atomic

# The committed reports, figures and results live in the repository's docs/, wherever a study is started from
DOCS = Path(__file__).resolve().parents[1] / "docs"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD_KEYS = ("sft", "dft", "sft_kl", "asft")
RESULTS_FILE, SETTINGS_FILE = "results.json", "run_settings.json"
# The title a report file gets when a study creates it
NEW_DOC_HEAD = "# Drift study: SFT vs DFT vs SFT+KL vs ASFT\n\n"


# ---------------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class RunSpec:
    """One run's method, as the paper's two switches; its name (SFT, DFT, SFT+KL, ASFT), label and folder name."""

    loss_type: str
    kl_coef: float

    @property
    def method_name(self) -> str:
        from asft_trl.trainer.config import method_name

        return method_name(self.loss_type, self.kl_coef)

    @property
    def label(self) -> str:
        from asft_trl.diagnostics.plot import run_label

        return run_label({"method_name": self.method_name, "kl_coef": self.kl_coef})

    @property
    def dirname(self) -> str:
        slug = self.method_name.lower().replace("+", "_")
        return f"{slug}_{self.kl_coef:g}" if self.kl_coef else slug


def method_specs(kl_coef: float) -> dict[str, RunSpec]:
    """The paper's four methods, keyed as `METHOD_KEYS`: two switches, `loss_type` and `kl_coef`."""
    return {
        "sft": RunSpec("nll", 0.0),
        "dft": RunSpec("dft", 0.0),
        "sft_kl": RunSpec("nll", kl_coef),
        "asft": RunSpec("dft", kl_coef),
    }


def trainer_config(run_dir: Path, spec: RunSpec, args, seed: int, **options):
    """The `ASFTConfig` of one study run: the method's two switches, the study's steps, batch, learning rate, length
    and logging, one process and no accumulation, no weight decay, no evaluation, no reporting; `options` add to or
    override these (the scheduler, checkpoints)."""
    from asft_trl.trainer.config import ASFTConfig

    settings = dict(
        output_dir=str(run_dir),
        loss_type=spec.loss_type,
        kl_coef=spec.kl_coef,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_length=args.max_length,
        logging_steps=args.logging_steps,
        eval_strategy="no",
        report_to="none",
        dataset_num_proc=None,
        seed=seed,
    )
    return ASFTConfig(**{**settings, **options})


def resumable_trainer(model_path: str, run_dir: Path, spec: RunSpec, args, seed: int, train_dataset):
    """A LoRA `ASFTTrainer` for one study run, with checkpoints only so that an interrupted run resumes (the last one
    stays: the trained adapter) and the LoRA initialisation seeded. `args` holds the study's training options
    (`trainer_config`), `lr_scheduler_type`, `save_steps`, `lora_r` and `lora_alpha`."""
    from transformers import set_seed

    from asft_trl.trainer.trainer import ASFTTrainer

    config = trainer_config(
        run_dir,
        spec,
        args,
        seed,
        lr_scheduler_type=args.lr_scheduler_type,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        gradient_checkpointing=False,
        data_seed=seed,
    )
    set_seed(seed)  # the LoRA initialisation happens while the trainer is built, before the Trainer seeds anything
    return ASFTTrainer(
        model_path, args=config, train_dataset=train_dataset, peft_config=lora_config(args.lora_r, args.lora_alpha)
    )


def time_steps_interleaved(trainers: dict, rounds: int) -> tuple[dict, list[float]]:
    """Train each of `trainers` (method key -> trainer set to a few steps) once per round, the methods interleaved so
    that a change of load hits all of them, timing every step (wall and this process's CPU time) and dropping each
    round's first (warm-up; a DFT loss's pre-flight check). Returns per method the median seconds per step and the
    steps timed, and the 1-minute load average after each round. The cost scripts' shared measurement."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self._t = [], [], None

        def on_step_begin(self, *a, **k):
            self._t = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            self.wall.append(time.perf_counter() - self._t[0])
            self.cpu.append(time.process_time() - self._t[1])

    timers = {key: StepTimer() for key in trainers}
    for key, trainer in trainers.items():
        trainer.add_callback(timers[key])
    loads = []
    for _ in range(rounds):
        for key, trainer in trainers.items():
            n = len(timers[key].wall)
            trainer.train()
            del timers[key].wall[n], timers[key].cpu[n]
        loads.append(os.getloadavg()[0])
    methods = {
        key: {
            "wall_s_per_step": statistics.median(timer.wall),
            "cpu_s_per_step": statistics.median(timer.cpu),
            "steps_timed": len(timer.wall),
        }
        for key, timer in timers.items()
    }
    return methods, loads


def lora_config(r: int, alpha: int):
    """LoRA on every projection, without dropout (the base model is the network with its adapters off)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


def load_model(model_path: str):
    """The model and tokenizer at `model_path`, as a study scores its base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)


def prompt_answer_pairs(dataset) -> list[tuple[str, str]]:
    """(prompt, answer) of conversational prompt/completion rows, as the drift probes take them."""
    return [(row["prompt"][0]["content"], row["completion"][0]["content"]) for row in dataset]


def accuracy(model, tokenizer, dataset, max_new_tokens: int, match: str = "exact") -> tuple[float, list[list[str]]]:
    """Greedy accuracy on `dataset` (`asft_trl.quickstart.task.score`) and its first three failures."""
    from asft_trl.quickstart.task import score

    result = score(model, tokenizer, dataset, max_new_tokens=max_new_tokens, match=match)
    return result["accuracy"], [list(f) for f in result["failures"][:3]]


def train_timed(trainer, probes, checkpoint: str | None = None) -> tuple[float, float, int]:
    """Train (resuming from `checkpoint` when given) and say what it took: the wall seconds, the probes' share of them
    (`DriftCallback.seconds`), and the optimizer steps run here."""
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    resumed_at = int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
    return seconds, sum(p.seconds for p in probes), trainer.state.global_step - resumed_at


def series(history: list[dict], key: str) -> list[list[float]]:
    """[step, value] of every logged `key` in a Trainer's log history."""
    return [[e["step"], e[key]] for e in history if key in e and "step" in e and isinstance(e[key], (int, float))]


def final_and_peak(history: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [e[key] for e in history if key in e]
    return (values[-1], max(values)) if values else (None, None)


# ---------------------------------------------------------------------------------------------------- run folders


def last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def check_run_dir(run_dir: Path, settings: dict, label: str) -> dict | None:
    """The finished result to reuse, or None to train (resuming from a checkpoint when there is one). A folder that
    holds a run with other settings (in its `results.json`, or the `run_settings.json` a run writes when it starts) is
    refused before anything is written."""
    import json

    for name in (RESULTS_FILE, SETTINGS_FILE):
        path = run_dir / name
        if path.is_file():
            held = json.loads(path.read_text())
            held = held.get("settings") if name == RESULTS_FILE else held
            if held != settings:
                changed = sorted(k for k in set(held or {}) | set(settings) if (held or {}).get(k) != settings.get(k))
                raise FileExistsError(
                    f"{run_dir} holds a {label} run with other settings (differing: {changed}). Fix: pass another "
                    "--output_dir, or move that folder away."
                )
            if name == RESULTS_FILE:
                return json.loads(path.read_text())
    return None


def seed_dir(out_dir: Path, method: str, seed: int) -> Path:
    """Where one method's run with one seed lives: `out_dir/<method>/seed<k>`."""
    return out_dir / method / f"seed{seed}"


def check_seed_dirs(
    out_dir: Path,
    seeds: list[int],
    methods: list[str],
    settings: Callable[[str, int], dict],
    label: Callable[[str, int], str],
) -> None:
    """`check_run_dir` for every method and seed, so a folder holding other settings is refused before any compute."""
    for seed in seeds:
        for key in methods:
            check_run_dir(seed_dir(out_dir, key, seed), settings(key, seed), label(key, seed))


def run_seed_by_seed(
    out_dir: Path,
    seeds: list[int],
    methods: list[str],
    train: Callable[[str, int, Path], dict],
    describe: Callable[[str, int, dict], str],
    clock: StudyClock,
    prefix: str,
) -> dict[str, dict[int, dict]]:
    """`train(method, seed, run_dir)` for every seed and method, seed by seed (an interruption leaves whole seeds),
    in `seed_dir(out_dir, method, seed)`; after each run one line: `describe(method, seed, result)`, the time so far
    and an estimate of the time left from the runs trained here. Counts the runs trained and reused on `clock`. Returns
    {method: {seed: result}}."""
    plan = [(seed, key) for seed in seeds for key in methods]
    runs: dict[str, dict[int, dict]] = {k: {} for k in methods}
    trained_seconds = 0.0
    for i, (seed, key) in enumerate(plan, 1):
        run_dir = seed_dir(out_dir, key, seed)
        run_start = time.perf_counter()
        finished_before = (run_dir / RESULTS_FILE).is_file()
        result = runs[key][seed] = train(key, seed, run_dir)
        if finished_before:
            clock.reused_runs += 1
        else:
            clock.trained_runs += 1
            trained_seconds += time.perf_counter() - run_start
        left = sum(1 for s, k in plan[i:] if not (seed_dir(out_dir, k, s) / RESULTS_FILE).is_file())
        eta = (
            f", about {left * trained_seconds / clock.trained_runs / 60:.0f} min to go"
            if clock.trained_runs and left
            else ""
        )
        print(
            f"{prefix} run {i}/{len(plan)} {describe(key, seed, result)}, {clock.minutes_so_far():.1f} min so far{eta}"
        )
    return runs


# ---------------------------------------------------------------------------------------------------- verdicts


def value_at(curve: list[list[float]], step: float) -> float | None:
    """The curve's value at the logged step nearest `step` (the earlier one on a tie)."""
    if not curve:
        return None
    return min(curve, key=lambda point: (abs(point[0] - step), point[0]))[1]


def curve_end(result: dict, metric: str) -> float | None:
    curve = result["curves"].get(metric) or []
    return curve[-1][1] if curve else None


def curve_mid(result: dict, metric: str) -> float | None:
    return value_at(result["curves"].get(metric) or [], result["settings"]["max_steps"] / 2)


def curve_start(result: dict, metric: str) -> float | None:
    return value_at(result["curves"].get(metric) or [], 0)


def relative(a: float | None, b: float | None) -> float | None:
    """(a - b) / b, None when a value is missing or b is not positive."""
    return None if a is None or b is None or b <= 0 else (a - b) / b


def reduction(a: float | None, b: float | None) -> float | None:
    """(b - a) / b: how far `a` stays below `b`, relative to `b`; None as for `relative`."""
    change = relative(a, b)
    return None if change is None else -change


def minus(a: float | None, b: float | None) -> float | None:
    """a - b, None when a value is missing."""
    return None if a is None or b is None else a - b


@dataclass(frozen=True)
class Hypothesis:
    """One claim, its per-seed effect (positive = in the paper's direction) and the effect it takes to count."""

    key: str
    claim: str
    effect_text: str
    threshold: float
    effect: Callable[[dict[str, dict]], float | None]  # {method key: that method's result for one seed} -> effect
    percent: bool = False  # show the effect as a percentage (relative effects)


def verdict(effects: list[float | None], threshold: float) -> str:
    """The rule, fixed before the study ran: "shown" when the mean effect over seeds is at least `threshold` in the
    paper's direction and every seed points that way; "opposite" when the mean is at least `threshold` the other way
    and every seed points the other way; otherwise "not shown". "not measured" when a seed lacks the numbers."""
    if not effects or any(e is None or not math.isfinite(e) for e in effects):
        return "not measured"
    mean = sum(effects) / len(effects)
    if mean >= threshold and all(e > 0 for e in effects):
        return "shown"
    if mean <= -threshold and all(e < 0 for e in effects):
        return "opposite"
    return "not shown"


def judge(
    by_seed: dict[int, dict[str, dict]], hypotheses: Iterable[Hypothesis], methods: Iterable[str] = METHOD_KEYS
) -> list[dict]:
    """The verdict of each hypothesis from `{seed: {method key: result}}`; only seeds that hold every one of `methods`
    count."""
    seeds = sorted(s for s, runs in by_seed.items() if all(k in runs for k in methods))
    out = []
    for h in hypotheses:
        effects = [h.effect(by_seed[s]) for s in seeds]
        known = [e for e in effects if e is not None]
        out.append(
            {
                "key": h.key,
                "claim": h.claim,
                "effect": h.effect_text,
                "threshold": h.threshold,
                "percent": h.percent,
                "seeds": seeds,
                "effects": effects,
                "mean": sum(known) / len(known) if known else None,
                "verdict": verdict(effects, h.threshold),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------- figures


def plot_seed_bands(groups: dict[str, list[Path]], metrics: list[str], title: str, png: Path) -> None:
    """One panel per metric, one line per group (a method): the mean over its runs (seeds) and their min-max band."""
    from asft_trl.diagnostics.plot import load_run, plot_run_groups, save_figure

    runs = {label: [load_run(run_dir) for run_dir in run_dirs] for label, run_dirs in groups.items() if run_dirs}
    save_figure(plot_run_groups(runs, metrics, title), png)


# ---------------------------------------------------------------------------------------------------- the report


def mean_sd(values: list[float | None], digits: int = 2, percent: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}{unit}"


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_effect(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.0f}%" if percent else f"{value:+.3f}"


def verdict_table(verdicts: list[dict]) -> str:
    lines = [
        "| # | claim | effect (paper's direction positive) | per seed | mean | needed | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        per_seed = ", ".join(f"{s}: {fmt_effect(e, v['percent'])}" for s, e in zip(v["seeds"], v["effects"]))
        needed = f"{v['threshold'] * 100:.0f}%" if v["percent"] else f"{v['threshold']:g}"
        lines.append(
            f"| {v['key']} | {v['claim']} | {v['effect']} | {per_seed or '-'} | "
            f"{fmt_effect(v['mean'], v['percent'])} | ≥ {needed} | **{v['verdict']}** |"
        )
    return "\n".join(lines)


class StudyClock:
    """A study's wall time, the load average at its start and end, and how many runs it trained or reused: the fields
    every report ends with."""

    def __init__(self):
        self.start, self.load_start = time.perf_counter(), os.getloadavg()
        self.trained_runs = self.reused_runs = 0

    def minutes_so_far(self) -> float:
        return (time.perf_counter() - self.start) / 60

    @staticmethod
    def finished() -> str:
        return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    @staticmethod
    def machine() -> str:
        import torch

        return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"

    def totals(self) -> dict:
        return {
            "wall_seconds": time.perf_counter() - self.start,
            "trained_runs": self.trained_runs,
            "reused_runs": self.reused_runs,
            "load_start": [round(x, 2) for x in self.load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()],
        }


def write_generated(doc: Path, begin: str, end: str, report: dict, body: list[str], cost: str = "") -> None:
    """Write a study's measured part into `doc` between its markers `begin` and `end`: the command that made it,
    `body` (lines), and the machine, wall time and load (from `report`, which holds `StudyClock`'s fields) followed by
    `cost`. Everything else `doc` holds is kept (`replace_generated`)."""
    generated = "\n".join(
        [
            begin,
            "",
            f"Generated {report['finished']} by `{report['command']}`.",
            "",
            *body,
            "",
            f"Machine: {report['machine']}. Study wall time {report['wall_seconds'] / 60:.1f} min "
            f"({report['trained_runs']} runs trained, {report['reused_runs']} reused); load average (1, 5, 15 min) at "
            f"start {report['load_start']}, at end {report['load_end']}.{cost}",
            "",
            end,
        ]
    )
    replace_generated(doc, generated, begin, end)


def replace_generated(doc: Path, generated: str, begin: str, end: str, new_doc_head: str = NEW_DOC_HEAD) -> None:
    """Put `generated` (which starts with `begin` and ends with `end`) in place of the text between those markers in
    `doc`, or at its end when it has none; everything else in the file is kept. A new file starts with `new_doc_head`.
    Written under a temporary name and renamed, so a failure never leaves a half-written report."""
    text = doc.read_text() if doc.is_file() else new_doc_head
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + generated + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(doc, text)


# ---------------------------------------------------------------------------------------------------- command line


class DeprecatedFlag(argparse.Action):
    """An old flag kept working for users' scripts: it stores into the new flag's destination, with a FutureWarning
    that names the new flag."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            f"{option_string} is deprecated: use {self.new_flag} (the training recipes' name). {option_string} will be "
            "removed in a later release.",
            FutureWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, values)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """`--model` and `--model_cache_dir`."""
    from asft_trl.quickstart.model import HUB_ID

    p.add_argument(
        "--model",
        default=HUB_ID,
        help="Model path or Hub id (default: the quickstart model; offline, "
        "its GGUF copy materialised under --model_cache_dir).",
    )
    p.add_argument(
        "--model_cache_dir",
        default=os.path.join("outputs", "models"),
        help="Where the offline quickstart model is (or is materialised).",
    )


def add_training_arguments(
    p: argparse.ArgumentParser,
    *,
    max_steps: int,
    per_device_train_batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    max_length: int,
    logging_steps: int = 5,
    kl_coef_help: str = "lambda of SFT+KL and ASFT.",
) -> None:
    """The options every study's runs train with, with the study's defaults: lambda (`--kl_coef`, 0.05), steps, batch,
    learning rate, warm-up, maximum length and logging interval."""
    p.add_argument("--kl_coef", type=float, default=0.05, help=kl_coef_help)
    p.add_argument("--max_steps", type=int, default=max_steps)
    p.add_argument("--per_device_train_batch_size", type=int, default=per_device_train_batch_size)
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--warmup_steps", type=int, default=warmup_steps)
    p.add_argument("--max_length", type=int, default=max_length)
    p.add_argument("--logging_steps", type=int, default=logging_steps)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """`--num_threads`."""
    p.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a CPU shared with other jobs, 1 avoids the "
        "threads of one process waiting on each other and can be several times faster.",
    )


def seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`: at least one, each once."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one seed, each once")
    return values


def parse_study_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, positive: Iterable[str]
) -> argparse.Namespace:
    """Parse `argv` (default: the command line), refuse a setting of `positive` that is not > 0 and a `kl_coef` that
    is not > 0 (the lambda of SFT+KL and ASFT); the parsed arguments keep `argv` (the report's command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0 (got {getattr(args, name)})")
    if args.kl_coef <= 0:
        parser.error(f"--kl_coef must be > 0 (got {args.kl_coef}): it is the lambda of SFT+KL and ASFT")
    args.argv = argv
    return args


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)

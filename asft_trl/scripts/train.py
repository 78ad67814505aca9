"""The training script: parse the recipe -> load model and data -> ASFTTrainer -> train -> save -> summary + curves.

Run it as `asft-trl train --config recipes/X.yaml [--field value ...]`, or under accelerate/torchrun as
`accelerate launch [--config_file ...] -m asft_trl.scripts.train --config recipes/X.yaml`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..data.formatting import PROMPT_TEMPLATES
from ..trainer.config import ASFTConfig


@dataclass
class ASFTScriptArguments(ScriptArguments):
    """Script arguments of `trl sft`, plus what an ASFT run needs around the trainer."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local .json/.jsonl/.parquet/.csv file, `save_to_disk` folder, or a generated dataset "
            "(asft/quickstart)."
        },
    )
    dataset_format: str | None = field(
        default=None,
        metadata={
            "help": "Schema of the source dataset, formatted into prompt/completion before training: 'numina_math' "
            "(problem, solution), 'medmcqa' (question, opa..opd, cop, exp), 'magicoder' (instruction, response). "
            "Works for the Hub dataset and for a local file with the same columns. Unset (or 'none'): the data is "
            "used as loaded (any format TRL's SFTTrainer accepts)."
        },
    )
    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "How a formatted row is presented: 'alpaca' (the authors' Alpaca prompt_no_input, plain-text "
            "prompt/completion; TRL appends EOS) or 'chat' (the model's chat template, conversational rows).",
            "choices": list(PROMPT_TEMPLATES),
        },
    )
    dataset_size: int | None = field(
        default=None,
        metadata={
            "help": "Number of training rows to keep: the first usable rows of a permutation drawn from dataset_seed "
            "(the paper's 10k / 30k / 100k). Unset: all rows."
        },
    )
    dataset_test_size: int | None = field(
        default=None,
        metadata={"help": "Number of test-split rows to keep (seeded like dataset_size). Unset: all rows."},
    )
    dataset_seed: int = field(
        default=42,
        metadata={"help": "Seed of the subset permutation; independent of the training seed."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into an output_dir that already holds a run (its files are replaced)."},
    )
    held_out_metric: str | None = field(
        default=None,
        metadata={
            "help": "Task metric to report on the test split before and after training: 'quickstart' (exact match of "
            "greedy answers on the generated task). The eval loss is reported whenever there is a test split."
        },
    )
    held_out_size: int = field(default=64, metadata={"help": "Number of test examples the task metric scores."})
    log_drift: bool = field(
        default=False,
        metadata={
            "help": "Log drift_kl: the per-token KL(reference || policy) on a fixed set of general prompts the training "
            "data never touches (asft_trl.diagnostics.drift), at step 0 and every log step. Costs a forward pass per log."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Accelerate config for `asft-trl train`: a file path or one of TRL's names (single_gpu, "
            "multi_gpu, zero1, zero2, zero3, fsdp1, fsdp2). Ignored when the script is started by accelerate or "
            "torchrun directly."
        },
    )

    def __post_init__(self):
        if isinstance(self.dataset_format, str) and self.dataset_format.lower() in ("", "none", "null"):
            self.dataset_format = None
        if self.dataset_format is not None:
            from ..data.registry import get_dataset_format

            get_dataset_format(self.dataset_format)  # an unknown name fails here, before anything is loaded
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"prompt_template={self.prompt_template!r} is not supported. Use one of {list(PROMPT_TEMPLATES)}."
            )
        for name in ("dataset_size", "dataset_test_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be a positive number of rows (or unset for all rows).")


def make_parser(prog: str | None = None) -> TrlParser:
    parser = TrlParser((ASFTScriptArguments, ASFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog)

    def error(message: str):
        # One line, not argparse's usage of every field of every config first
        parser.exit(2, f"{parser.prog}: error: {message}. `{parser.prog} --help` lists every field.\n")

    parser.error = error
    return parser


def check_output_dir(output_dir: str, resume_from_checkpoint, overwrite: bool) -> None:
    """Refuse to train over an earlier run unless resuming it or told to overwrite: nothing written is lost silently."""
    path = Path(output_dir)
    if resume_from_checkpoint or overwrite or not path.is_dir():
        return
    previous = sorted(
        p.name
        for p in path.iterdir()
        if p.name.startswith("checkpoint-")
        or p.suffix in (".safetensors", ".bin")
        or p.name in ("trainer_state.json", "adapter_config.json", "config.json")
    )
    if previous:
        raise FileExistsError(
            f"output_dir={output_dir!r} already holds a run ({', '.join(previous[:4])}). Fix: resume it with "
            "--resume_from_checkpoint true (or a checkpoint path), choose another --output_dir, or pass "
            "--overwrite_output_dir true to replace it."
        )


def _resume_value(value):
    if isinstance(value, str) and value.lower() in ("true", "yes", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", ""):
        return None
    return value


def prepare_training_data(splits, script_args: ASFTScriptArguments, training_args: ASFTConfig):
    """Format the source dataset named by `dataset_format` and take the seeded subsets; report what was used.

    The report (rows used, unusable rows by reason) is printed and written to `output_dir/data_preparation.json`.
    """
    from accelerate import PartialState

    from ..data.prepare import prepare_splits

    if not (script_args.dataset_format or script_args.dataset_size or script_args.dataset_test_size):
        return splits
    splits, reports = prepare_splits(splits, script_args, num_proc=training_args.dataset_num_proc)
    state = PartialState()
    if state.is_main_process:
        print("Data: " + "\n      ".join(report.summary() for report in reports))
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "data_preparation.json"), "w") as f:
            json.dump(
                {"dataset_name": script_args.dataset_name, "splits": [r.to_dict() for r in reports]}, f, indent=2
            )
    return splits


def check_run(
    script_args: ASFTScriptArguments, training_args: ASFTConfig, model_args: ModelConfig, dataset_args=None
) -> None:
    """What can be checked about a run without loading any weights: an earlier run in `output_dir`, a dataset named
    and where it comes from, the model's and the reference's paths, and that a named reference uses the policy's
    tokenizer. The config fields themselves were checked when they were parsed. `asft-trl train` calls this before
    it launches anything, so a bad recipe fails in seconds."""
    from ..data.loading import check_dataset_given
    from ..utils.paths import check_dataset_source, check_model_source, resolves_itself

    check_output_dir(
        training_args.output_dir, _resume_value(training_args.resume_from_checkpoint), script_args.overwrite_output_dir
    )
    check_dataset_given(script_args, dataset_args)
    if not (dataset_args is not None and getattr(dataset_args, "datasets", None)):
        check_dataset_source(script_args.dataset_name, "dataset_name")
    if not model_args.model_name_or_path:
        raise ValueError(
            "model_name_or_path is not set. Fix: name the model to fine-tune in the recipe "
            "(`model_name_or_path: Qwen/Qwen2.5-0.5B`, or a local folder) or with --model_name_or_path."
        )
    if not resolves_itself(model_args.model_name_or_path):  # the quickstart model falls back to its offline copy
        check_model_source(
            model_args.model_name_or_path,
            "model_name_or_path",
            cache_dir=(training_args.model_init_kwargs or {}).get("cache_dir"),
            revision=model_args.model_revision,
        )
    ref_kwargs = training_args.ref_model_init_kwargs or training_args.model_init_kwargs or {}
    check_model_source(
        training_args.ref_model_name_or_path,
        "ref_model_name_or_path",
        cache_dir=ref_kwargs.get("cache_dir"),
        revision=ref_kwargs.get("revision"),
    )
    # A named reference must use the policy's tokenizer; a self-resolving policy is compared once it is resolved
    if (
        training_args.ref_model_name_or_path
        and training_args.anchored
        and not resolves_itself(model_args.model_name_or_path)
    ):
        from ..reference.tokenizer_check import check_reference_tokenizer, tokenizer_kwargs

        policy_kwargs = {**(training_args.model_init_kwargs or {}), "revision": model_args.model_revision}
        check_reference_tokenizer(
            model_args.model_name_or_path,
            training_args.ref_model_name_or_path,
            "ref_model_name_or_path",
            policy_kwargs=tokenizer_kwargs(policy_kwargs, training_args.trust_remote_code),
            ref_kwargs=tokenizer_kwargs(ref_kwargs, training_args.trust_remote_code),
        )


def check_launch(training_args: ASFTConfig) -> None:
    """Refuse a launch that would not run as the distributed run it was asked to be.

    - On a machine without GPUs, `torchrun --nproc_per_node N` without `--use_cpu true` leaves accelerate with no
      process group: N independent trainings would run and write the same `output_dir`.
    - An FSDP accelerate config on CPU processes (`--use_cpu true`, or no GPU) is silently run as plain DDP (or as one
      unsharded process) by accelerate, which only shards on GPU-like devices: every process would hold the whole
      policy and reference while the launch says FSDP.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    on_cpu_fix = (
        "FSDP does not run on CPU processes (accelerate would train plain DDP): on CPU use a DeepSpeed config "
        "(recipes/accelerate/zero2.yaml or zero3.yaml) with `--use_cpu true`, which shards over gloo, or multi_gpu.yaml "
        "for DDP; for FSDP run on GPUs."
    )
    if launched > 1 and training_args.world_size == 1:
        raise SystemExit(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but training sees only one, so each would "
            f"train on its own and overwrite the others' output. "
            f"{on_cpu_fix if fsdp else 'On CPU add `--use_cpu true` (gloo).'} On GPUs, check that each process can "
            "see a GPU."
        )
    distributed_type = str(training_args.distributed_state.distributed_type).split(".")[-1]
    if fsdp and distributed_type in ("NO", "MULTI_CPU"):
        raise SystemExit(
            f"An FSDP accelerate config was given, but this run is {distributed_type} (use_cpu="
            f"{training_args.use_cpu}), not processes on GPUs, and accelerate drops FSDP there without a word. "
            f"{on_cpu_fix} On GPUs, start it with `accelerate launch` or `asft-trl train --accelerate_config`."
        )


def main(script_args: ASFTScriptArguments, training_args: ASFTConfig, model_args: ModelConfig, dataset_args=None):
    from accelerate import PartialState
    from accelerate.logging import get_logger
    from trl import get_peft_config, get_quantization_config

    from ..data import load_training_data
    from ..trainer.trainer import ASFTTrainer
    from ..utils.paths import resolve_model, resolves_itself
    from .summary import held_out_missing_note, held_out_report, print_summary

    logger = get_logger(__name__)
    check_launch(training_args)
    resume = _resume_value(training_args.resume_from_checkpoint)
    check_output_dir(training_args.output_dir, resume, script_args.overwrite_output_dir)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    model_path = model_args.model_name_or_path
    if resolves_itself(model_path):  # the quickstart model: the Hub when reachable, else the offline GGUF copy
        with PartialState().main_process_first():
            model_path = resolve_model(model_path)

    with PartialState().main_process_first():  # the main process fills datasets' cache; the others read it
        splits = load_training_data(script_args, dataset_args, seed=training_args.seed)
        splits = prepare_training_data(splits, script_args, training_args)
    train_split = splits[script_args.dataset_train_split]
    eval_split = splits[script_args.dataset_test_split] if script_args.dataset_test_split in splits else None

    trainer = ASFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_split,
        eval_dataset=eval_split,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    logger.info(
        f"Method: {training_args.method_name} (loss_type={training_args.loss_type}, kl_coef={training_args.kl_coef})"
    )
    if script_args.log_drift:
        from ..diagnostics.drift import add_drift_callback

        add_drift_callback(trainer)

    before = held_out_report(trainer, eval_split, script_args) if eval_split is not None else {}
    trainer.train(resume_from_checkpoint=resume)
    after = held_out_report(trainer, eval_split, script_args) if eval_split is not None else {}

    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(model_name=Path(training_args.output_dir).name, dataset_name=script_args.dataset_name)
    if trainer.accelerator.is_main_process:
        report = {
            "method": training_args.method_name,
            "before": before,
            "after": after,
            "dropped_examples": trainer.dropped_examples,
            "empty_completions": trainer.empty_completions,
        }
        if eval_split is None:
            report["note"] = held_out_missing_note(script_args.dataset_test_split, splits)
        with open(os.path.join(training_args.output_dir, "held_out.json"), "w") as f:
            json.dump(report, f, indent=2)
        print_summary(trainer, before, after, note=report.get("note"))
    from ..diagnostics.plot import write_run_curves

    write_run_curves(trainer)  # trainer_state.json, asft_run.json and curves.png in the output dir (main process)
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def parse(argv: list[str] | None = None, prog: str | None = None):
    """Parse a recipe plus overrides; unknown fields (in the YAML or on the command line) are an error."""
    return make_parser(prog=prog).parse_args_and_config(argv, fail_with_unknown_args=True)


if __name__ == "__main__":
    main(*parse(prog="python -m asft_trl.scripts.train"))

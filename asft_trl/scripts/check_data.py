"""`asft-trl check-data --config RECIPE.yaml [--field value ...]`: the pre-flight check of a recipe's data, without
training.

It does what `asft-trl train` does up to the first step, and stops there: the recipe is parsed and validated as for
training (every field, the dataset and model sources; one line and exit status 2 on a bad recipe), the training split
is loaded and prepared as the recipe says (`dataset_format`, `prompt_template`, `dataset_size`), and the trainer is
built on its first `--sample_size` examples, so they are tokenised, templated and batched exactly as training would
batch them. Then the starting model's prior on them is measured by the same pass `ASFTTrainer` runs when DFT training
starts (`asft_trl.diagnostics.preflight`): the share of completion tokens below p 0.1 and their mean probability, and
the probability of each special token the completions hold. It prints the figures and any warning, and writes nothing
(the recipe's `output_dir` is not touched). The figures do not depend on `loss_type` or `kl_coef`: the reference is
not built, because the check only reads the starting model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile

from ..diagnostics.preflight import SAMPLE_EXAMPLES, WARN_LOW_P_SHARE, measure, report_lines

USAGE = "usage: asft-trl check-data --config RECIPE.yaml [--field value ...] [--sample_size N]"
# --sample_size N: the first N training examples in dataset order are measured (default: what the trainer measures
# when DFT training starts)


def policy_only(training_args, output_dir: str):
    """The recipe's training config with everything about the reference switched off (the check reads the starting
    model only, so no reference is loaded or precomputed) and the output in `output_dir`."""
    return dataclasses.replace(
        training_args,
        output_dir=output_dir,
        kl_coef=0.0,
        kl_coef_schedule="constant",
        kl_coef_warmup_steps=0,
        kl_coef_final=0.0,
        kl_coef_milestones=None,
        kl_target=None,
        kl_estimator="full",
        ref_model_name_or_path=None,
        ref_model_dtype=None,
        ref_model_quantization=None,
        sync_ref_model=False,
        precompute_ref_log_probs=False,
        report_to="none",
    )


def parse(argv: list[str]):
    """The recipe's dataclasses (an unknown field is an error, as for training) and `--sample_size`."""
    from .train import parse as parse_recipe

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--sample_size", type=int, default=SAMPLE_EXAMPLES)
    check_args, recipe_argv = own.parse_known_args(argv)
    if check_args.sample_size < 1:
        raise ValueError(f"sample_size={check_args.sample_size} must be at least 1 training example.")
    return (*parse_recipe(recipe_argv, prog="asft-trl check-data"), check_args)


def run(script_args, training_args, model_args, dataset_args, check_args) -> dict:
    """Load, prepare and batch the sample as training would, and measure it. Returns the preflight report."""
    from accelerate import PartialState
    from trl import get_peft_config, get_quantization_config

    from ..data import load_training_data
    from ..data.prepare import prepare_splits
    from ..trainer.trainer import ASFTTrainer
    from ..utils.paths import resolve_model, resolves_itself
    from .train import check_run

    # What training checks before it loads anything; check-data writes nothing, so an earlier run in output_dir is
    # no reason to refuse
    check_run(dataclasses.replace(script_args, overwrite_output_dir=True), training_args, model_args, dataset_args)
    model_path = model_args.model_name_or_path
    if resolves_itself(model_path):  # the quickstart model: the Hub when reachable, else the offline GGUF copy
        model_path = resolve_model(model_path)
    splits = load_training_data(script_args, dataset_args, seed=training_args.seed)
    if script_args.dataset_format or script_args.dataset_size or script_args.dataset_test_size:
        splits, reports = prepare_splits(splits, script_args, num_proc=training_args.dataset_num_proc)
        if PartialState().is_main_process:
            print("Data: " + "\n      ".join(report.summary() for report in reports))
    train_split = splits[script_args.dataset_train_split]
    sample = train_split.select(range(min(check_args.sample_size, len(train_split))))
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    with tempfile.TemporaryDirectory(prefix="asft-check-data-") as scratch:
        args = policy_only(training_args, scratch)
        args.model_init_kwargs = model_init_kwargs
        trainer = ASFTTrainer(
            model=model_path,
            args=args,
            train_dataset=sample,
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
        )
        report = measure(trainer, trainer.model, training_args.per_device_train_batch_size, len(sample))
    return report


def format_report(report: dict, training_args, model_name: str) -> list[str]:
    prior = report["answer_tokens"]
    lines = [
        f"Pre-flight check: {model_name} on the first {report['examples']} training examples "
        f"(the recipe trains with loss_type={training_args.loss_type}, kl_coef={training_args.kl_coef:g})",
    ]
    if prior["count"]:
        lines.append(
            f"  completion tokens: {prior['count']}, mean p {prior['mean_probability']:.3f}, share below p "
            f"{prior['low_p']:g}: {prior['low_p_share']:.1%} (a warning from {WARN_LOW_P_SHARE:.0%})"
        )
    else:
        lines.append("  no completion tokens in the sample: nothing is trained on")
    for entry in report["special_tokens"]:
        lines.append(
            f"  special token {entry['token']!r}: mean p {entry['mean_probability']:.3g} ({entry['count']} times)"
        )
    warnings = [message for level, message in report_lines(report) if level >= logging.WARNING]
    if warnings and training_args.loss_type != "dft":
        lines.append(
            f"  (the recipe trains with loss_type={training_args.loss_type}, which weights every token by 1: the "
            "warnings below are for DFT/ASFT on this data)"
        )
    lines += [f"WARNING: {message}" for message in warnings]
    if not warnings:
        lines.append("  no warnings: DFT and ASFT can learn these completions")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(f"{USAGE}\n\n{__doc__.split(chr(10) + chr(10), 1)[1].strip()}", file=sys.stderr if not argv else None)
        return 2 if not argv else 0
    try:
        script_args, training_args, model_args, dataset_args, check_args = parse(argv)
        report = run(script_args, training_args, model_args, dataset_args, check_args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"asft-trl check-data: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(format_report(report, training_args, model_args.model_name_or_path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

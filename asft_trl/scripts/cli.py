"""`asft-trl` command line. `asft-trl train --config recipes/X.yaml [--field value ...] [accelerate launch flags]`;
`asft-trl eval SUITE --model PATH [...]` (asft_trl/scripts/evaluate.py), `asft-trl check-data --config RECIPE.yaml` (the
pre-flight check of a recipe's data, asft_trl/scripts/check_data.py) and `asft-trl plot RUN_DIR ...` (training curves)
run in this process. The studies are the repository's, not the package's: `python -m studies.drift` (README).

Like `trl sft`: the recipe is parsed and validated here first (every config field, an earlier run in `output_dir`, the
dataset, the model and reference paths: `asft_trl.scripts.train.check_run`), so a bad recipe ends in seconds with one
line and exit status 2; then the training script is started through `accelerate launch`, with the recipe's or the
command line's `accelerate_config` and any flags that are not recipe fields (e.g. `--num_processes 2`) passed on to
accelerate.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _without_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` minus the ordered `subsequence` (the launch flags argparse left over), keeping everything else."""
    rest, pending = [], list(subsequence)
    for item in items:
        if pending and item == pending[0]:
            pending.pop(0)
        else:
            rest.append(item)
    return rest


TRAIN_USAGE = "usage: asft-trl train --config RECIPE.yaml [--field value ...] [accelerate launch flags]"


def _train(argv: list[str]) -> int:
    if not argv:
        print(
            f"{TRAIN_USAGE}\nasft-trl train: error: no recipe given, e.g. `asft-trl train --config "
            "recipes/quickstart.yaml`; `asft-trl train --help` lists every field.",
            file=sys.stderr,
        )
        return 2
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    from . import train

    parser = train.make_parser(prog="asft-trl train")
    # Everything a recipe can get wrong is checked here, before accelerate starts a process that would spend a
    # minute loading before it fails: one line that says what to fix, no traceback
    try:
        *dataclasses_, config_remaining, launch_args = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        if config_remaining:
            raise ValueError(f"unknown fields in the recipe: {config_remaining}. Remove or rename them.")
        train.check_run(*dataclasses_)
        script_args = dataclasses_[0]
        script_argv = _without_subsequence(argv, launch_args)
        if script_args.accelerate_config:
            launch_args = (
                resolve_accelerate_config_argument(["--accelerate_config", script_args.accelerate_config])
                + launch_args
            )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"asft-trl train: error: {error}", file=sys.stderr)
        return 2
    accelerate_args = launch_command_parser().parse_args(
        launch_args + ["--module", "asft_trl.scripts.train"] + script_argv
    )
    _fill_launch_defaults(accelerate_args)
    launch_command(accelerate_args)
    return 0


def _fill_launch_defaults(accelerate_args) -> None:
    """Without an accelerate config, pass on the values `accelerate launch` would pick, so that it does not warn
    about each of them on every run; on a machine without an accelerator that is one process (accelerate picks 0)."""
    import os

    import torch
    from accelerate.commands.config import default_config_file

    if accelerate_args.config_file is not None or os.path.isfile(default_config_file):
        return  # the config file sets them
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if accelerate_args.num_processes is None and not accelerator:
        accelerate_args.num_processes = 1
    for name, value in (("num_machines", 1), ("mixed_precision", "no"), ("dynamo_backend", "no")):
        if getattr(accelerate_args, name) is None:
            setattr(accelerate_args, name, value)  # accelerate's own defaults; bf16/fp16 come from the recipe


# Commands that run in this process: name -> (help, module with `main(argv) -> int`)
_IN_PROCESS_COMMANDS = {
    "eval": ("Score a model on the math, medical or code suite; `eval compare` runs.", "asft_trl.scripts.evaluate"),
    "check-data": (
        "Measure a recipe's data before training: the starting model's prior on the completions (share of tokens "
        "below p 0.1, mean p) and its special tokens; warns where DFT/ASFT would barely learn.",
        "asft_trl.scripts.check_data",
    ),
    "plot": ("Draw the training curves of one or more runs into a PNG.", "asft_trl.diagnostics.plot"),
}


# Commands that left the package, and where they went
_MOVED_COMMANDS = {
    "study": "the studies are the repository's experiments, no longer part of the package: from a clone of the "
    "repository, run `python -m studies.drift` or `python -m studies.knowledge` (`make study-drift`, "
    "`make study-knowledge`)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in _MOVED_COMMANDS:
        print(f"asft-trl: error: `asft-trl {argv[0]}` was removed: {_MOVED_COMMANDS[argv[0]]}.", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="asft-trl", description="Anchored Supervised Fine-Tuning on TRL.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("train", help="Train from a YAML recipe (TRL's parser; CLI overrides win).", add_help=False)
    for name, (help_text, _) in _IN_PROCESS_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, _ = parser.parse_known_args(argv[:1])
    if args.command == "train":
        return _train(argv[1:])
    if args.command in _IN_PROCESS_COMMANDS:
        module = importlib.import_module(_IN_PROCESS_COMMANDS[args.command][1])
        return module.main(argv[1:])
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`asft-trl` command line. `asft-trl train --config recipes/X.yaml [--field value ...] [accelerate launch flags]`;
`asft-trl eval SUITE --model PATH [...]` (asft_trl/evaluation/cli.py), `asft-trl plot RUN_DIR ...` (training curves)
and `asft-trl study` (the drift study) run in this process.

Like `trl sft`: the recipe is parsed (and so validated) here first, then the training script is started through
`accelerate launch`, with the recipe's or the command line's `accelerate_config` and any flags that are not recipe
fields (e.g. `--num_processes 2`) passed on to accelerate.
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


def _train(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    from . import train

    parser = train.make_parser(prog="asft-trl train")
    script_args, *_, config_remaining, launch_args = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if config_remaining:
        raise SystemExit(f"asft-trl train: unknown fields in the recipe: {config_remaining}. Remove or rename them.")
    script_argv = _without_subsequence(argv, launch_args)
    if script_args.accelerate_config:
        launch_args = resolve_accelerate_config_argument(["--accelerate_config", script_args.accelerate_config]) + launch_args
    accelerate_args = launch_command_parser().parse_args(
        launch_args + ["--module", "asft_trl.train"] + script_argv
    )
    launch_command(accelerate_args)
    return 0


# Commands that run in this process: name -> (help, module with `main(argv) -> int`)
_IN_PROCESS_COMMANDS = {
    "eval": ("Score a model on the math, medical or code suite; `eval compare` runs.", ".evaluation.cli"),
    "plot": ("Draw the training curves of one or more runs into a PNG.", ".diagnostics.plot"),
    "study": ("Run SFT vs DFT vs SFT+KL vs ASFT and a lambda sweep (`study knowledge`: the knowledge study, several "
              "seeds); write docs/study.md.", ".study"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="asft-trl", description="Anchored Supervised Fine-Tuning on TRL.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("train", help="Train from a YAML recipe (TRL's parser; CLI overrides win).", add_help=False)
    for name, (help_text, _) in _IN_PROCESS_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, _ = parser.parse_known_args(argv[:1])
    if args.command == "train":
        return _train(argv[1:])
    if args.command in _IN_PROCESS_COMMANDS:
        module = importlib.import_module(_IN_PROCESS_COMMANDS[args.command][1], __package__)
        return module.main(argv[1:])
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    raise SystemExit(main())

"""The command line end to end: `asft-trl train --config recipe.yaml` on a tiny local model and a local file."""

from __future__ import annotations

import json

import pytest
import torch

from tiny import run_cli, train_error, write_recipe


@pytest.mark.slow
def test_train_recipe_end_to_end_and_reload(tiny_model_path, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_path)
    result = run_cli("train", "--config", str(recipe), "--max_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert "ASFT run finished" in result.stdout + result.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 260
    card = (out / "README.md").read_text()
    assert "2509.23753" in card
    report = json.loads((out / "held_out.json").read_text())
    assert report["method"] == "ASFT"
    # The command-line override won over the recipe's max_steps: 2
    state_steps = [line for line in (result.stdout + result.stderr).splitlines() if "steps: " in line]
    assert state_steps and "steps: 3" in state_steps[-1]


def test_no_arguments_prints_usage(capsys):
    from asft_trl.scripts import cli

    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: asft-trl train --config") and "no recipe given" in err


def test_the_removed_study_command_says_where_the_studies_went(capsys):
    """`asft-trl study` left the package (issue 21): one line naming the new commands, not argparse's choice list."""
    from asft_trl.scripts import cli

    assert cli.main(["study", "knowledge", "--num_threads", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asft-trl: error: `asft-trl study` was removed") and "python -m studies.knowledge" in err
    assert err.count("\n") == 1


def test_help_lists_every_field(capsys):
    """argparse %-formats every help string: one stray '%' made `--help` crash before any option was listed."""
    from asft_trl.scripts import cli
    from asft_trl.scripts.train import make_parser

    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--kl_horizon" in out and "factor of at most 1.02" in out and "--ref_model_name_or_path" in out
    with pytest.raises(SystemExit) as exit:  # `python -m asft_trl.scripts.train --help`
        make_parser(prog="python -m asft_trl.scripts.train").parse_args_and_config(["--help"])
    assert exit.value.code == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--kl_coef", "-1"], "kl_coef=-1.0 is invalid"),
        (["--kl_direction", "sideways"], "invalid choice: 'sideways'"),
        (["--loss_type", "ce"], "invalid choice: 'ce'"),
        (["--kl_coef_schedule", "cosine", "--kl_coef", "0"], "needs an anchor"),
        (["--use_liger_kernel", "true"], "use_liger_kernel=True does not go with the ASFT loss"),
        (
            ["--ref_model_name_or_path", "/nonexistent"],
            "ref_model_name_or_path='/nonexistent' is neither a local folder",
        ),
        (
            ["--model_name_or_path", "./no/such-model"],
            "model_name_or_path='./no/such-model' is neither a local folder",
        ),
        (["--model_name_or_path", "no-such-org/no-such-model"], "not in the local Hub cache while the Hub is offline"),
        (["--dataset_name", "missing.jsonl"], "dataset_name='missing.jsonl' is neither an existing local file"),
    ],
)
def test_bad_recipe_value_fails_before_launch(overrides, message, tiny_model_path, tmp_path, capsys, no_launch):
    recipe = write_recipe(tmp_path, tiny_model_path)
    assert message in train_error(capsys, "--config", recipe, *overrides)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kl_direction", "sideways", "kl_direction='sideways' is not supported"),
        ("loss_type", "ce", "loss_type='ce' is not supported"),
        ("kl_coef", -0.5, "kl_coef=-0.5 is invalid"),
    ],
)
def test_bad_value_in_the_recipe_file_fails_before_launch(
    field, value, message, tiny_model_path, tmp_path, capsys, no_launch
):
    """argparse checks choices on the command line only: a recipe's own values reach the config's validation."""
    recipe = write_recipe(tmp_path, tiny_model_path, **{field: value})
    assert message in train_error(capsys, "--config", recipe)


def test_unknown_recipe_field_is_an_error(tiny_model_path, tmp_path, capsys, no_launch):
    recipe = write_recipe(tmp_path, tiny_model_path, kl_coeff=0.1)
    assert "kl_coeff" in train_error(capsys, "--config", recipe)


def test_recipe_without_dataset_fails_before_launch(tiny_model_path, tmp_path, capsys, no_launch):
    recipe = write_recipe(tmp_path, tiny_model_path)
    assert "No dataset given" in train_error(capsys, "--config", recipe, "--dataset_name", "")


def test_existing_run_is_not_overwritten(tiny_model_path, tmp_path, capsys, no_launch):
    recipe = write_recipe(tmp_path, tiny_model_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    line = train_error(capsys, "--config", recipe)
    assert "already holds a run" in line and "--overwrite_output_dir" in line
    assert (out / "model.safetensors").read_bytes() == b"precious"


def test_cpu_launch_passes_accelerates_defaults(monkeypatch, tiny_model_path, tmp_path, caplog):
    """Without an accelerate config, accelerate would warn about each default it picks ("`--num_processes` was set to
    a value of `0`" on a CPU) on every run: they are passed explicitly, with the values it would pick."""
    import logging

    import accelerate.commands.config as accelerate_config
    import accelerate.commands.launch as launch

    from asft_trl.scripts import cli

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "none.yaml"))
    seen = {}

    def validate_only(args):
        seen["args"], *_ = launch._validate_launch_command(args)

    monkeypatch.setattr(launch, "launch_command", validate_only)
    recipe = write_recipe(tmp_path, tiny_model_path)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["train", "--config", str(recipe)]) == 0
    assert "were not passed to `accelerate launch`" not in caplog.text
    if not torch.cuda.is_available():
        assert seen["args"].num_processes == 1


def test_accelerate_config_is_resolved(monkeypatch, tiny_model_path, tmp_path):
    """`accelerate_config` (a TRL name or a path) becomes `accelerate launch --config_file ...`."""
    import accelerate.commands.launch as launch

    from asft_trl.scripts import cli

    seen = {}
    monkeypatch.setattr(launch, "launch_command", lambda args: seen.setdefault("args", args))
    recipe = write_recipe(tmp_path, tiny_model_path, accelerate_config="zero2")
    assert cli.main(["train", "--config", str(recipe), "--num_processes", "2"]) == 0
    args = seen["args"]
    assert args.config_file.endswith("zero2.yaml") and args.num_processes == 2
    assert args.module and args.training_script == "asft_trl.scripts.train"
    assert args.training_script_args[:2] == ["--config", str(recipe)]


def _launch_args(world_size: int, distributed_type: str = "NO", use_cpu: bool = False, fsdp=()):
    from types import SimpleNamespace

    return SimpleNamespace(
        world_size=world_size,
        use_cpu=use_cpu,
        fsdp=list(fsdp),
        distributed_state=SimpleNamespace(distributed_type=distributed_type),
    )


def test_multi_process_launch_that_is_not_distributed_is_refused(monkeypatch, tmp_path):
    from asft_trl.scripts.train import check_launch

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--use_cpu true"):
        check_launch(_launch_args(1))
    check_launch(_launch_args(2, "MULTI_CPU", use_cpu=True))
    check_launch(_launch_args(2, "DEEPSPEED", use_cpu=True))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(_launch_args(1))


@pytest.mark.parametrize("how", ["env", "args"])
def test_fsdp_config_on_cpu_processes_is_refused_not_run_as_ddp(monkeypatch, how):
    """accelerate drops the FSDP plugin on CPU processes and trains DDP: the launch must say so, not suggest it."""
    from asft_trl.scripts.train import check_launch

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    fsdp = ()
    if how == "env":  # what `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` sets
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    else:  # `--fsdp full_shard` on the command line
        fsdp = ("full_shard",)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="FSDP does not run on CPU processes") as refused:
        check_launch(_launch_args(2, "MULTI_CPU", use_cpu=True, fsdp=fsdp))
    assert "MULTI_CPU" in str(refused.value) and "zero3.yaml" in str(refused.value)
    # Without --use_cpu on a machine without GPU: no advice to add it, which would only turn FSDP into DDP
    with pytest.raises(SystemExit) as refused:
        check_launch(_launch_args(1, fsdp=fsdp))
    assert "FSDP does not run on CPU processes" in str(refused.value)
    assert "add `--use_cpu true`" not in str(refused.value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="FSDP does not run on CPU"):
        check_launch(_launch_args(1, "NO", fsdp=fsdp))
    # On GPUs the same config is what it says
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(_launch_args(2, "MULTI_GPU", fsdp=fsdp))


def test_run_without_held_out_split_says_why_in_held_out_json(tiny_model_path, tmp_path, capsys):
    """A local file has only a train split: held_out.json says so instead of holding an empty before/after."""
    from asft_trl.scripts.train import main, parse

    recipe = write_recipe(tmp_path, tiny_model_path, max_steps=1)
    trainer = main(*parse(["--config", str(recipe)]))
    report = json.loads((tmp_path / "out" / "held_out.json").read_text())
    assert report["before"] == report["after"] == {}
    assert "no 'test' split (its splits: ['train'])" in report["note"] and "dataset_test_split" in report["note"]
    assert report["empty_completions"] == {"train": 0} and report["dropped_examples"] == {"train": 0}
    assert "No held-out evaluation" in capsys.readouterr().out
    assert trainer.state.global_step == 1


def test_offline_hub_id_is_looked_up_at_its_revision_and_cache_dir(
    monkeypatch, tiny_model_path, tmp_path, capsys, no_launch
):
    """Offline, a Hub id passes when the local cache holds it at the recipe's revision (no false refusal)."""
    import huggingface_hub

    asked = []

    def cached(repo_id, filename, cache_dir=None, revision=None, **kwargs):
        asked.append((repo_id, filename, cache_dir, revision))
        return "/cache/config.json" if revision == "v1" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    recipe = write_recipe(tmp_path, "org/model", model_revision="v1", output_dir=str(tmp_path / "o1"))
    from asft_trl.scripts.train import check_run, parse

    check_run(*parse(["--config", str(recipe)]))
    assert asked == [("org/model", "config.json", None, "v1")]
    recipe = write_recipe(tmp_path, "org/model", output_dir=str(tmp_path / "o2"))
    assert "not in the local Hub cache" in train_error(capsys, "--config", recipe)

"""The command line end to end: `asft-trl train --config recipe.yaml` on a tiny local model and a local file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import prompt_completion_rows


def write_recipe(tmp_path: Path, model_path: str, **overrides) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in prompt_completion_rows(12)))
    recipe = {
        "model_name_or_path": model_path,
        "dataset_name": str(data),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        "kl_coef": 0.1,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "gradient_checkpointing": False,
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args, timeout=300):
    cli = [sys.executable, "-c", "import sys; from asft_trl.cli import main; sys.exit(main())", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cli, capture_output=True, text=True, timeout=timeout, env=env)


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


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tiny_model_path, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    result = run_cli("train", "--config", str(recipe))
    assert result.returncode != 0
    assert "already holds a run" in result.stderr and "--overwrite_output_dir" in result.stderr
    assert (out / "model.safetensors").read_bytes() == b"precious"


def test_unknown_recipe_field_is_an_error(tiny_model_path, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_path, kl_coeff=0.1)
    result = run_cli("train", "--config", str(recipe))
    assert result.returncode != 0 and "kl_coeff" in result.stderr


def test_bad_value_fails_before_launch(tiny_model_path, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_path)
    result = run_cli("train", "--config", str(recipe), "--kl_coef", "-1")
    assert result.returncode != 0 and "kl_coef=-1.0 is invalid" in result.stderr
    assert not (tmp_path / "out").exists()


def test_accelerate_config_is_resolved(monkeypatch, tiny_model_path, tmp_path):
    """`accelerate_config` (a TRL name or a path) becomes `accelerate launch --config_file ...`."""
    import accelerate.commands.launch as launch
    from asft_trl import cli

    seen = {}
    monkeypatch.setattr(launch, "launch_command", lambda args: seen.setdefault("args", args))
    recipe = write_recipe(tmp_path, tiny_model_path, accelerate_config="zero2")
    assert cli.main(["train", "--config", str(recipe), "--num_processes", "2"]) == 0
    args = seen["args"]
    assert args.config_file.endswith("zero2.yaml") and args.num_processes == 2
    assert args.module and args.training_script == "asft_trl.train"
    assert args.training_script_args[:2] == ["--config", str(recipe)]


def _launch_args(world_size: int, distributed_type: str = "NO", use_cpu: bool = False, fsdp=()):
    from types import SimpleNamespace

    return SimpleNamespace(world_size=world_size, use_cpu=use_cpu, fsdp=list(fsdp),
                           distributed_state=SimpleNamespace(distributed_type=distributed_type))


def test_multi_process_launch_that_is_not_distributed_is_refused(monkeypatch, tmp_path):
    from asft_trl.train import check_launch

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
    from asft_trl.train import check_launch

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

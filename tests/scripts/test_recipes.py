"""The paper's recipes (recipes/asft_*.yaml) and launch shapes (recipes/accelerate/): every recipe parses, holds the
paper's settings, and dry-runs 2 optimizer steps with the tiny local model and a local fixture in its dataset's own
schema (so the formatter path runs); LoRA runs with PEFT and QLoRA with bitsandbytes 4-bit on CPU; a 2-process
torchrun launch of a recipe logs the same losses as 1 process."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from tiny import FIXTURES, REPO_ROOT

RECIPES = REPO_ROOT / "recipes"
ACCELERATE = RECIPES / "accelerate"

# The paper's reported settings (../shared/ASFT_NOTES.md): the recipes must hold them, LoRA/QLoRA variants included,
# except where the authors published LoRA settings since (AUTHORS_LORA)
PAPER = {
    "math": dict(
        model="Qwen/Qwen2.5-7B",
        dataset="AI-MO/NuminaMath-CoT",
        dataset_format="numina_math",
        max_length=2048,
        global_batch=256,
        learning_rate=5e-5,
        epochs=1,
        fixture="numina_math_cot.jsonl",
        usable=7,
        unusable={"empty solution": 2, "missing problem": 1},
    ),
    "medical": dict(
        model="meta-llama/Llama-2-7b-hf",
        dataset="openlifescienceai/medmcqa",
        dataset_format="medmcqa",
        max_length=512,
        global_batch=64,
        learning_rate=2e-5,
        epochs=3,
        fixture="medmcqa.jsonl",
        usable=7,
        unusable={"cop out of range 0-3": 2, "missing opc": 1},
    ),
    "code": dict(
        model="meta-llama/Llama-2-7b-hf",
        dataset="ise-uiuc/Magicoder-Evol-Instruct-110K",
        dataset_format="magicoder",
        max_length=512,
        global_batch=64,
        learning_rate=2e-5,
        epochs=2,
        fixture="magicoder_evol_instruct.jsonl",
        usable=6,
        unusable={"empty instruction": 1, "empty response": 1},
    ),
}
# The authors' LoRA settings since the paper (their repository README, "LoRA (Recommended)", and its mixed-precision
# note): rank 8 / alpha 16 on q_proj, v_proj, lr 5e-4 (best of their LLaMA-2-7B medical grid), lambda 0.03 under bf16
AUTHORS_LORA = dict(
    lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"], learning_rate=5e-4, kl_coef=0.03
)
SOURCES = ("github.com/zhuchichi56/ASFT", "github.com/hiyouga/LLaMA-Factory/pull/10174")
VARIANTS = ("", "_lora", "_qlora")
PAPER_RECIPES = [f"asft_{domain}{variant}.yaml" for domain in PAPER for variant in VARIANTS]
ACCELERATE_CONFIGS = {
    "single_gpu.yaml": "NO",
    "multi_gpu.yaml": "MULTI_GPU",
    "zero2.yaml": "DEEPSPEED",
    "zero3.yaml": "DEEPSPEED",
    "fsdp2.yaml": "FSDP",
}


def parse_recipe(name: str, *overrides: str):
    from asft_trl.scripts.train import parse

    return parse(["--config", str(RECIPES / name), *overrides])


def parse_recipe_on_cpu(name: str, *overrides: str):
    """Parse as written (bf16 included): `use_cpu` only lets TrainingArguments accept bf16 on a machine without GPU."""
    import warnings

    with warnings.catch_warnings():
        # a recipe of this package must not use a deprecated field (transformers' `gradient_checkpointing`, say)
        warnings.simplefilter("error", FutureWarning)
        return parse_recipe(name, "--use_cpu", "true", *overrides)


def domain_of(name: str) -> str:
    return name.removeprefix("asft_").removesuffix(".yaml").split("_")[0]


def test_recipe_files_are_the_expected_set():
    found = sorted(p.name for p in RECIPES.glob("asft_*.yaml"))
    assert found == sorted(PAPER_RECIPES)
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)
    assert (ACCELERATE / "slurm_multinode.sh").exists()


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_recipe_parses_and_holds_the_paper_settings(name):
    script_args, args, model_args, _ = parse_recipe_on_cpu(name)
    assert args.bf16 is True and model_args.dtype == "bfloat16"
    paper = PAPER[domain_of(name)]
    assert model_args.model_name_or_path == paper["model"]
    assert script_args.dataset_name == paper["dataset"]
    assert script_args.dataset_format == paper["dataset_format"]
    assert script_args.prompt_template == "alpaca"
    assert script_args.dataset_size == 10000
    assert args.max_length == paper["max_length"]
    assert args.num_train_epochs == paper["epochs"]
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == pytest.approx(0.1)
    assert (args.loss_type, args.kl_direction, args.method_name) == ("dft", "forward", "ASFT")
    assert args.completion_only_loss is True and args.packing is False
    assert args.activation_checkpointing is True
    header = (RECIPES / name).read_text().split("\n\n")[0]
    assert all(source in header for source in SOURCES), f"{name}: the header does not cite the authors' newer guidance"
    if name.endswith(("_lora.yaml", "_qlora.yaml")):
        assert model_args.use_peft is True
        assert model_args.load_in_4bit is name.endswith("_qlora.yaml")
        assert (model_args.lora_r, model_args.lora_alpha) == (AUTHORS_LORA["lora_r"], AUTHORS_LORA["lora_alpha"])
        assert model_args.lora_target_modules == AUTHORS_LORA["lora_target_modules"]
        assert args.learning_rate == pytest.approx(AUTHORS_LORA["learning_rate"])
        assert args.kl_coef == AUTHORS_LORA["kl_coef"]
        assert "lr 5e-4" in header and "lambda 0.03" in header
        if domain_of(name) != "medical":  # the authors' LoRA grid is on the medical run only: the header says so
            assert "carried over, not measured" in header
    else:
        assert model_args.use_peft is False
        assert args.learning_rate == pytest.approx(paper["learning_rate"])
        assert args.kl_coef == 0.05  # the paper's full fine-tuning, main tables
        assert "--kl_coef 0.03" in header

    # The header states the batch arithmetic, and it adds up to the paper's global batch
    match = re.search(
        r"Global batch (\d+) = per_device_train_batch_size (\d+) x gradient_accumulation_steps (\d+) x "
        r"(\d+) GPUs?",
        header,
    )
    assert match, f"{name}: the header does not state the global batch arithmetic"
    global_batch, per_device, accumulation, gpus = map(int, match.groups())
    assert global_batch == paper["global_batch"] == per_device * accumulation * gpus
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (per_device, accumulation)
    assert gpus == (8 if "_" not in name.removeprefix("asft_").removesuffix(".yaml") else 1)
    assert "Memory:" in header and "Launch:" in header


@pytest.mark.parametrize(
    "overrides, method",
    [
        (("--loss_type", "nll", "--kl_coef", "0"), "SFT"),
        (("--kl_coef", "0"), "DFT"),
        (("--loss_type", "nll"), "SFT+KL"),
        ((), "ASFT"),
    ],
)
def test_baselines_are_one_line_overrides(overrides, method):
    script_args, args, *_ = parse_recipe_on_cpu("asft_medical.yaml", *overrides, "--dataset_size", "30000")
    assert args.method_name == method
    assert script_args.dataset_size == 30000


@pytest.mark.parametrize("name, distributed_type", sorted(ACCELERATE_CONFIGS.items()))
def test_accelerate_configs_load(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / name))
    assert str(config.distributed_type).split(".")[-1] == distributed_type
    assert config.mixed_precision == "bf16"
    assert config.num_processes == (1 if name == "single_gpu.yaml" else 8)  # the recipes' batch arithmetic
    if name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[4])


def test_accelerate_config_paths_resolve_for_the_cli():
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    for name in ACCELERATE_CONFIGS:
        path = str(ACCELERATE / name)
        assert resolve_accelerate_config_argument(["--accelerate_config", path]) == ["--config_file", path]


# ------------------------------------------------------------------------------------------------ dry runs


def dry_run_overrides(model: str, fixture: Path, output_dir: Path) -> list[str]:
    """What a dry run changes in a recipe: the model, the data (a local file in the recipe's own schema), the size of
    the run and CPU-only settings. Everything else (format, template, subset, loss, PEFT, 4-bit) stays the recipe's."""
    return [
        "--model_name_or_path",
        model,
        "--dataset_name",
        str(fixture),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_length",
        "512",
        "--warmup_steps",
        "0",
        "--bf16",
        "false",
        "--dtype",
        "float32",
        "--activation_checkpointing",
        "false",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
    ]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_recipe_dry_run(name, tiny_model_path, tmp_path):
    from asft_trl.scripts.train import main

    paper = PAPER[domain_of(name)]
    trainer = main(*parse_recipe(name, *dry_run_overrides(tiny_model_path, FIXTURES / paper["fixture"], tmp_path)))

    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert kls[-1] > 0, "the KL anchor was not exercised: the policy did not move away from the reference"

    # The formatter ran on the fixture: the unusable rows were counted by reason and reported, not silently dropped
    report = json.loads((tmp_path / "data_preparation.json").read_text())["splits"][0]
    assert report["dataset_format"] == paper["dataset_format"]
    assert report["rows_used"] == paper["usable"] == len(trainer.train_dataset)
    assert report["unusable"] == paper["unusable"]

    # Plain-text Alpaca prompt/completion: the completion ends in exactly one EOS (TRL's; the formatter adds none)
    eos = trainer.processing_class.eos_token_id
    for ids, labels in zip(trainer.train_dataset["input_ids"], trainer.train_dataset["labels"]):
        assert ids[-1] == eos and ids[-2] != eos and labels[-1] == eos  # trained on, not masked

    modules = {type(m).__name__ for m in trainer.model.modules()}
    if name.endswith(("_lora.yaml", "_qlora.yaml")):
        from peft import PeftModel

        assert isinstance(trainer.model, PeftModel)
        assert trainer.ref_model is None, "under PEFT the reference is the adapters-off policy, not a second model"
        assert ("Linear4bit" in modules) is name.endswith("_qlora.yaml")
    else:
        assert trainer.ref_model is not None and "Linear4bit" not in modules


def test_recipe_with_chat_template(tiny_model_path, tmp_path):
    """prompt_template: chat gives conversational rows, which the model's chat template renders."""
    from asft_trl.scripts.train import main

    overrides = dry_run_overrides(tiny_model_path, FIXTURES / "magicoder_evol_instruct.jsonl", tmp_path)
    trainer = main(*parse_recipe("asft_code_lora.yaml", *overrides, "--prompt_template", "chat"))
    assert trainer.state.global_step == 2
    text = trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])
    assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text
    assert "### Instruction" not in text


def test_recipe_dry_run_with_the_dft_and_estimator_options(tiny_model_path, tmp_path):
    """The options beyond the paper's loss (issue 16) reach a paper recipe from the command line."""
    from asft_trl.scripts.train import main

    overrides = dry_run_overrides(tiny_model_path, FIXTURES / "medmcqa.jsonl", tmp_path)
    trainer = main(
        *parse_recipe(
            "asft_medical_lora.yaml",
            *overrides,
            "--kl_estimator",
            "k3",
            "--kl_direction",
            "reverse",
            "--dft_normalization",
            "weights",
        )
    )
    assert (trainer.args.kl_estimator, trainer.args.kl_direction, trainer.args.dft_normalization) == (
        "k3",
        "reverse",
        "weights",
    )
    assert trainer.state.global_step == 2
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kls[-1] > 0 and all(math.isfinite(kl) for kl in kls)
    info = json.loads((tmp_path / "asft_run.json").read_text())
    assert info["kl_estimator"] == "k3" and info["preflight"]["special_tokens"]  # the completions end with EOS


def test_recipe_refuses_data_without_the_columns(tiny_model_path, tmp_path):
    """The medical recipe pointed at a file of another schema fails on its columns, before any model is loaded."""
    from asft_trl.scripts.train import main

    overrides = dry_run_overrides("no/such-model", FIXTURES / "magicoder_evol_instruct.jsonl", tmp_path)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['question', 'opa', 'opb', 'opc', 'opd', 'cop'\]"):
        main(*parse_recipe("asft_medical.yaml", *overrides))


# ------------------------------------------------------------------------------------------------ 2 processes


@pytest.mark.slow
def test_recipe_two_processes_log_the_same_losses_as_one(tiny_model_path, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU) on a recipe, 2 x micro-batch 2, logs the losses of 1 process with
    micro-batch 4: same examples per optimizer step, loss normalised over both processes' tokens."""
    from dist_train import launch

    def run(nproc: int, batch_size: int) -> list[dict]:
        out = tmp_path / f"{nproc}proc"
        overrides = dry_run_overrides(tiny_model_path, FIXTURES / "medmcqa.jsonl", out)
        overrides += [
            "--per_device_train_batch_size",
            str(batch_size),
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "3",
            "--shuffle_dataset",
            "false",
            "--train_sampling_strategy",
            "sequential",
            "--dataset_size",
            "4",
            "--seed",
            "0",  # 4 rows: every step is one whole epoch
            # without it accelerate sets up no process group on a machine without GPU, and each torchrun
            # process trains alone
            "--use_cpu",
            "true",
        ]
        launcher = (
            [sys.executable]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        )
        launch(
            [*launcher, "-m", "asft_trl.scripts.train", "--config", str(RECIPES / "asft_medical.yaml"), *overrides],
            f"{nproc}-process recipe run",
        )
        state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        assert state["train_batch_size"] == batch_size
        return [entry for entry in state["log_history"] if "loss" in entry]

    single, double = run(1, 4), run(2, 2)
    assert len(single) == len(double) == 3
    for one, two in zip(single, double):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-7)
        assert two["kl"] == pytest.approx(one["kl"], rel=1e-3, abs=1e-7)
        assert two["num_tokens"] == one["num_tokens"]
    assert single[-1]["kl"] > 0 and single[0]["loss"] != single[-1]["loss"]

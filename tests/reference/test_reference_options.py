"""The reference options of ASFTConfig: a lighter anchor (`ref_model_dtype`, `ref_model_quantization`) and a synced one
(`sync_ref_model`, TRL's SyncRefModelCallback).

A lighter anchor changes the KL the loss sees; the tolerances below bound that change for a policy moved away from its
reference, and were chosen from measurements on this tiny model (measured relative errors in brackets, about 10x
below each bound): bfloat16 2e-3 (2.0e-4), float16 1e-4 (5.6e-6), 8-bit 5e-3 (4.0e-4), 4-bit NF4 3e-2 (5.8e-3).
SmolLM2-135M's figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

import tiny
from asft_trl import ASFTConfig, ASFTTrainer
from asft_trl.reference import lm_head
from tiny import make_args, prompt_completion_rows

# Relative error of the mean per-token KL(reference variant || policy) against KL(float32 reference || policy)
KL_TOLERANCE = {"bfloat16": 2e-3, "float16": 1e-4, "8bit": 5e-3, "4bit": 3e-2}
VARIANT_OPTIONS = {
    "bfloat16": dict(ref_model_dtype="bfloat16"),
    "float16": dict(ref_model_dtype="float16"),
    "8bit": dict(ref_model_quantization="8bit"),
    "4bit": dict(ref_model_quantization="4bit"),
}


@pytest.fixture(scope="module")
def model64_path(tmp_path_factory) -> str:
    # bitsandbytes' CPU 4-bit inference packs weights in blocks of 64 input features: a hidden size of 32 fails there
    return tiny.build_model(tmp_path_factory.mktemp("tiny64") / "model", hidden_size=64)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(prompt_completion_rows())


def move_policy(model, scale: float = 0.05) -> None:
    """The same seeded perturbation of the policy in every trainer, so that there is a real KL to measure."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def batch_kl(trainer) -> float:
    """Mean per-token KL(reference || policy) the trainer's own loss measures on its first batch."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    num_items = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    return trainer._metrics["train" if trainer.model.training else "eval"]["kl"][-1]


def quantised_layers(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}


def reference_tensors(model) -> dict[str, torch.Tensor]:
    """Copies of the parameters, buffers and bitsandbytes block scales, read without `state_dict()` (which repacks
    bitsandbytes' CPU 4-bit weights)."""
    tensors = {}
    for name, param in [*model.named_parameters(), *model.named_buffers()]:
        tensors[name] = param.detach().clone()
        quant_state = getattr(param, "quant_state", None) or getattr(param, "SCB", None)
        if quant_state is not None:
            tensors[name + ".scale"] = getattr(quant_state, "absmax", quant_state).detach().clone()
    return tensors


def check_variant(ref_model, variant: str) -> None:
    """The reference really is in the asked form, with an unquantised float LM head."""
    if variant in ("bfloat16", "float16"):
        assert {p.dtype for p in ref_model.parameters()} == {getattr(torch, variant)}
    else:
        assert quantised_layers(ref_model) == {"Linear8bitLt" if variant == "8bit" else "Linear4bit"}
    head = ref_model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.is_floating_point()
    assert lm_head.fused_head_problem(ref_model) is None


@pytest.fixture(scope="module")
def fp32_kls(model64_path, dataset, tmp_path_factory):
    """KL at the start (policy == reference) and after the policy moved, against the float32 frozen copy."""
    trainer = ASFTTrainer(model64_path, args=make_args(tmp_path_factory.mktemp("fp32")), train_dataset=dataset)
    start = batch_kl(trainer)
    move_policy(trainer.model)
    return start, batch_kl(trainer), trainer.ref_model.get_memory_footprint()


@pytest.mark.parametrize("variant", list(VARIANT_OPTIONS))
def test_lighter_reference_kl_is_within_tolerance_of_the_fp32_reference(
    model64_path, dataset, tmp_path, fp32_kls, variant
):
    fp32_start, fp32_kl, fp32_bytes = fp32_kls
    trainer = ASFTTrainer(model64_path, args=make_args(tmp_path, **VARIANT_OPTIONS[variant]), train_dataset=dataset)
    check_variant(trainer.ref_model, variant)
    assert trainer.use_fused_loss
    assert trainer.ref_model.get_memory_footprint() < 0.75 * fp32_bytes

    # Before any update the float32 anchor gives exactly 0; a lighter one is a (slightly) different distribution
    assert fp32_start == 0.0
    distortion = batch_kl(trainer)
    assert 0 < distortion < 0.05 * fp32_kl

    move_policy(trainer.model)
    kl = batch_kl(trainer)
    relative_error = abs(kl - fp32_kl) / fp32_kl
    assert fp32_kl > 0.01
    assert 0 < relative_error <= KL_TOLERANCE[variant], (kl, fp32_kl)


@pytest.mark.parametrize(
    "variant, fused", [("bfloat16", True), ("float16", True), ("8bit", True), ("4bit", True), ("4bit", False)]
)
def test_trainer_trains_with_a_lighter_reference(model64_path, dataset, tmp_path, variant, fused):
    trainer = ASFTTrainer(
        model64_path,
        args=make_args(tmp_path, max_steps=3, learning_rate=5e-2, use_fused_loss=fused, **VARIANT_OPTIONS[variant]),
        train_dataset=dataset,
    )
    ref = trainer.ref_model
    check_variant(ref, variant)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    # bitsandbytes' CPU 4-bit inference repacks the weights at the first no-grad forward (rounding the block scales
    # to bfloat16; `state_dict()` unpacks them again): the reference must not change after that
    with torch.no_grad():
        ref(input_ids=torch.tensor([[1, 2, 3]]))
    before = reference_tensors(ref)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["kl"] > history[0]["kl"] >= 0
    after = reference_tensors(ref)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    check_variant(ref, variant)


def test_reference_loaded_from_a_path_gets_the_dtype(model64_path, dataset, tmp_path):
    trainer = ASFTTrainer(
        model64_path,
        args=make_args(tmp_path, ref_model_name_or_path=model64_path, ref_model_dtype="bfloat16"),
        train_dataset=dataset,
    )
    check_variant(trainer.ref_model, "bfloat16")
    assert next(trainer.model.parameters()).dtype == torch.float32  # the policy is untouched


def test_quantised_head_falls_back_to_the_plain_loss(model64_path, dataset, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Without the default skip list bitsandbytes quantises the head too: the fused loss can't read it
    ref = AutoModelForCausalLM.from_pretrained(
        model64_path,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["none"]),
        dtype=torch.float32,
    )
    assert lm_head.fused_head_problem(ref) == "the LM head is quantised (Linear8bitLt)"
    with caplog.at_level("WARNING"):
        trainer = ASFTTrainer(
            model64_path, ref_model=ref, args=make_args(tmp_path, ref_model_quantization="8bit"), train_dataset=dataset
        )
    assert not trainer.use_fused_loss and "LM head is quantised" in caplog.text
    move_policy(trainer.model)
    assert batch_kl(trainer) > 0


# ------------------------------------------------------------------------------------------------ synced reference


def test_synced_reference_follows_the_tr_dpo_formula(model64_path, dataset, tmp_path):
    from transformers import TrainerCallback

    alpha, every = 0.3, 2
    trainer = ASFTTrainer(
        model64_path,
        args=make_args(
            tmp_path,
            max_steps=5,
            learning_rate=5e-2,
            sync_ref_model=True,
            ref_model_mixup_alpha=alpha,
            ref_model_sync_steps=every,
        ),
        train_dataset=dataset,
    )
    seen = []

    class Record(TrainerCallback):  # added after the sync callback, so it sees each step's synced reference
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(
                (
                    state.global_step,
                    [p.detach().clone() for p in trainer.model.parameters()],
                    [p.detach().clone() for p in trainer.ref_model.parameters()],
                )
            )

    trainer.add_callback(Record())
    previous = [p.detach().clone() for p in trainer.ref_model.parameters()]
    trainer.train()
    assert [step for step, _, _ in seen] == [1, 2, 3, 4, 5]
    for step, policy, ref in seen:
        if step % every == 0:
            expected = [alpha * p + (1 - alpha) * r for p, r in zip(policy, previous)]
            assert all(torch.allclose(r, e, atol=1e-7) for r, e in zip(ref, expected)), step
            assert not all(torch.equal(r, r0) for r, r0 in zip(ref, previous))
        else:
            assert all(torch.equal(r, r0) for r, r0 in zip(ref, previous)), step
        previous = ref
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())


def test_synced_reference_in_bfloat16(model64_path, dataset, tmp_path):
    trainer = ASFTTrainer(
        model64_path,
        args=make_args(tmp_path, max_steps=2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_dtype="bfloat16"),
        train_dataset=dataset,
    )
    before = [p.detach().clone() for p in trainer.ref_model.parameters()]
    trainer.train()
    assert all(p.dtype == torch.bfloat16 for p in trainer.ref_model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(trainer.ref_model.parameters(), before))


# ------------------------------------------------------------------------------------------------ refused combinations


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ref_model_dtype="int8"), r"ref_model_dtype='int8' is not supported"),
        (dict(ref_model_quantization="2bit"), r"ref_model_quantization='2bit' is not supported"),
        (dict(kl_coef=0.0, ref_model_dtype="bfloat16"), r"ref_model_dtype='bfloat16' .* kl_coef=0 builds none"),
        (dict(kl_coef=0.0, ref_model_quantization="4bit"), r"ref_model_quantization='4bit' .* kl_coef=0"),
        (dict(kl_coef=0.0, sync_ref_model=True), r"sync_ref_model=True .* kl_coef=0"),
        (dict(sync_ref_model=True, ref_model_quantization="8bit"), r"can't update a quantised reference"),
        (dict(ref_model_mixup_alpha=0.0), r"ref_model_mixup_alpha=0.0 is invalid"),
        (dict(ref_model_mixup_alpha=1.5), r"ref_model_mixup_alpha=1.5 is invalid"),
        (dict(ref_model_sync_steps=0), r"ref_model_sync_steps=0 is invalid"),
    ],
)
def test_config_refuses_bad_reference_options(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ASFTConfig(output_dir=str(tmp_path), report_to="none", **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ref_model_dtype="bfloat16"), r"ref_model_dtype='bfloat16' applies to a separate reference .*QLoRA"),
        (dict(ref_model_quantization="4bit"), r"ref_model_quantization='4bit' .*QLoRA"),
        (dict(sync_ref_model=True), r"sync_ref_model=True is not supported with PEFT"),
    ],
)
def test_peft_without_a_named_reference_refuses_reference_options(model64_path, dataset, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ASFTTrainer(
            model64_path,
            args=make_args(tmp_path, **overrides),
            train_dataset=dataset,
            peft_config=tiny.lora_config(["q_proj"]),
        )


def test_peft_with_a_named_reference_accepts_a_lighter_one_but_not_sync(model64_path, dataset, tmp_path):
    trainer = ASFTTrainer(
        model64_path,
        args=make_args(tmp_path, ref_model_name_or_path=model64_path, ref_model_quantization="4bit"),
        train_dataset=dataset,
        peft_config=tiny.lora_config(["q_proj"]),
    )
    check_variant(trainer.ref_model, "4bit")
    with pytest.raises(ValueError, match="sync_ref_model=True is not supported with PEFT"):
        ASFTTrainer(
            model64_path,
            args=make_args(tmp_path, ref_model_name_or_path=model64_path, sync_ref_model=True),
            train_dataset=dataset,
            peft_config=tiny.lora_config(["q_proj"]),
        )


def test_quantised_reference_needs_a_path(model64_path, dataset, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model64_path)
    in_memory = LlamaForCausalLM(loaded.config)
    in_memory.config._name_or_path = ""
    tokenizer = AutoTokenizer.from_pretrained(model64_path)
    with pytest.raises(ValueError, match="built in memory .*ref_model_name_or_path"):
        ASFTTrainer(
            in_memory,
            args=make_args(tmp_path, ref_model_quantization="8bit"),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="can't quantise the LlamaForCausalLM passed as `ref_model`"):
        ASFTTrainer(
            model64_path,
            ref_model=loaded,
            args=make_args(tmp_path, ref_model_quantization="4bit"),
            train_dataset=dataset,
        )


def test_sync_refuses_a_reference_of_another_shape(model64_path, dataset, tmp_path):
    other = tiny.build_model(tmp_path / "deeper", hidden_size=64, layers=3)
    with pytest.raises(ValueError, match="sync_ref_model=True mixes .* different parameters"):
        ASFTTrainer(
            model64_path,
            args=make_args(tmp_path, ref_model_name_or_path=other, sync_ref_model=True),
            train_dataset=dataset,
        )


# ------------------------------------------------------------------------------------------------ YAML and CLI


def test_reference_options_from_yaml_and_the_command_line(model64_path, tmp_path):

    from asft_trl.scripts.train import main, parse

    path = tiny.write_recipe(
        tmp_path,
        model64_path,
        rows=8,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        disable_tqdm=True,
        ref_model_dtype="bfloat16",
        sync_ref_model=True,
        ref_model_sync_steps=1,
    )

    _, args, *_ = parse(["--config", str(path), "--ref_model_quantization", "8bit", "--sync_ref_model", "false"])
    assert (args.ref_model_dtype, args.ref_model_quantization, args.sync_ref_model) == ("bfloat16", "8bit", False)

    trainer = main(*parse(["--config", str(path), "--ref_model_mixup_alpha", "0.4"]))
    assert trainer.args.ref_model_mixup_alpha == 0.4
    assert trainer.ref_model.dtype == torch.bfloat16
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 2 and kls[-1] > 0

"""The anchor under PEFT is the model training starts from: a new adapter (`peft_config`) starts as the base model, so
the adapters-off network is the anchor; a `PeftModel` given with an adapter that already changes the model (trained,
say) is anchored to itself, through a frozen copy of that adapter (TRL's DPO does the same). Either way the KL is 0 on
the first step, on the fused, the plain and the precomputed paths, and no second model is built."""

from __future__ import annotations

import gc

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import tiny
from asft_trl import ASFTTrainer
from asft_trl.reference.loading import REFERENCE_ADAPTER
from tiny import make_args

TARGETS = ["q_proj", "v_proj", "o_proj"]
PATHS = {"fused": {}, "plain": {"use_fused_loss": False}, "precomputed": {"precompute_ref_log_probs": True}}


def lora_config():
    return tiny.lora_config(TARGETS, lora_dropout=0.1)


def trained_peft_model(path: str) -> PeftModel:
    """A PeftModel whose adapter changes the model, as a trained one does (LoRA B moved away from 0)."""
    base = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)  # the same adapter every time (LoRA A is drawn at random)
    model = get_peft_model(base, lora_config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def first_kl(trainer, path: str) -> float:
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h][0]
    assert kl >= 0
    return kl


def assert_zero(kl: float, path: str) -> None:
    if path == "precomputed":  # the stored pass and the training batches round differently (same bound as elsewhere)
        assert kl < 1e-6, kl
    else:
        assert kl == 0.0, kl


def count_llamas() -> int:
    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


@pytest.mark.parametrize("path", list(PATHS))
def test_new_adapter_is_anchored_to_the_base_model(path, tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path, **PATHS[path]), train_dataset=pc_dataset, peft_config=lora_config()
    )
    assert trainer.ref_model is None and REFERENCE_ADAPTER not in trainer.model.peft_config
    assert_zero(first_kl(trainer, path), path)


@pytest.mark.parametrize("path", list(PATHS))
def test_given_adapter_is_part_of_the_anchor(path, tiny_model_path, pc_dataset, tmp_path):
    model = trained_peft_model(tiny_model_path)
    baseline = count_llamas()
    trainer = ASFTTrainer(
        model, args=make_args(tmp_path, save_strategy="steps", save_steps=2, **PATHS[path]), train_dataset=pc_dataset
    )
    assert trainer.ref_model is None and count_llamas() == baseline  # no second model
    assert_zero(first_kl(trainer, path), path)
    if path == "precomputed":
        assert REFERENCE_ADAPTER not in model.peft_config  # the pass ran the model as given; nothing kept
        return
    # the anchor adapter is a frozen, unchanged copy of the adapter as given; the given adapter trained
    reference = {n: p for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    trained = {n.replace(f".{REFERENCE_ADAPTER}.", ".default."): p for n, p in reference.items()}
    assert reference and not any(p.requires_grad for p in reference.values())
    assert all(dict(model.named_parameters())[n].requires_grad for n in trained)
    start = trained_peft_model(tiny_model_path)
    start_params = dict(start.named_parameters())
    for name, param in reference.items():
        assert torch.equal(param, start_params[name.replace(f".{REFERENCE_ADAPTER}.", ".default.")]), name
    moved = max((dict(model.named_parameters())[n] - start_params[n]).abs().max().item() for n in trained)
    assert moved > 0
    tiny.assert_every_parameter_moved(
        {n: start_params[n] for n in trained}, {n: p.detach() for n, p in model.named_parameters() if n in trained}
    )
    assert all(m.p == 0 for n, m in model.named_modules() if n.endswith(f"lora_dropout.{REFERENCE_ADAPTER}"))
    # saved outputs hold the trained adapter only
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / REFERENCE_ADAPTER).exists()


def test_fresh_peft_model_and_a_second_trainer_on_the_same_model(tiny_model_path, pc_dataset, tmp_path):
    """A PeftModel wrapped by the user (adapter not trained yet) trains from KL 0 too; a second trainer on the same
    object (a notebook cell run again) anchors to the model as it is then, replacing the first one's copy."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), lora_config())
    for run in range(2):
        trainer = ASFTTrainer(
            model, args=make_args(tmp_path / str(run), max_steps=2, learning_rate=5e-2), train_dataset=pc_dataset
        )
        assert first_kl(trainer, "fused") == 0.0
        assert [h["kl"] for h in trainer.state.log_history if "kl" in h][-1] > 0
        assert list(model.peft_config) == ["default", REFERENCE_ADAPTER]
        del trainer


def test_adapter_partitioned_by_zero3_is_refused_with_the_fix(tiny_model_path):
    """Under ZeRO-3's zero.Init each process holds a shard of each weight: copying `.data` would copy no weights."""
    from asft_trl.reference.loading import add_reference_adapter

    model = trained_peft_model(tiny_model_path)
    next(p for n, p in model.named_parameters() if "lora_A" in n).ds_id = 0  # what zero.Init leaves on a weight
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3.*Fix"):
        add_reference_adapter(model)
    assert REFERENCE_ADAPTER not in model.peft_config

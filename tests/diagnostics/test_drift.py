"""The held-out drift measure: exactly 0 before any update, positive after training, logged into the trainer's logs."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from asft_trl import ASFTTrainer
from asft_trl.diagnostics.drift import GENERAL_PROMPTS, DriftProbe, add_drift_callback
from asft_trl.quickstart.task import OOD_QUESTIONS
from asft_trl.reference.loading import freeze, frozen_copy
from tiny import make_args


def test_untouched_model_has_exactly_zero_drift(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    probe = DriftProbe(AutoTokenizer.from_pretrained(tiny_model_path))
    values = probe.measure(model, freeze(frozen_copy(model)))
    assert values["drift_kl"] == 0.0
    assert values["drift_nll"] > 0


def test_general_prompts_are_not_the_quickstart_ood_questions():
    # The OOD check of the study is scored separately; the drift set must not overlap it (nor the training task)
    assert not {p for p, _ in GENERAL_PROMPTS} & {q for q, _ in OOD_QUESTIONS}
    assert not any("reverse" in p.lower() for p, _ in GENERAL_PROMPTS)


def test_tokenizer_without_chat_template_is_refused(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        DriftProbe(tokenizer)


@pytest.mark.parametrize("setup", ["full_kl0", "full_kl", "lora"])
def test_drift_is_zero_at_step_0_and_positive_after_training(tiny_model_path, pc_dataset, tmp_path, setup):
    kl_coef = 0.0 if setup == "full_kl0" else 0.1
    peft_config = tiny.lora_config(["q_proj", "v_proj"]) if setup == "lora" else None
    trainer = ASFTTrainer(
        tiny_model_path,
        args=make_args(tmp_path, kl_coef=kl_coef, max_steps=2, learning_rate=5e-2),
        train_dataset=pc_dataset,
        peft_config=peft_config,
    )
    callback = add_drift_callback(trainer)
    trainer.train()
    drift = [(e["step"], e["drift_kl"]) for e in trainer.state.log_history if "drift_kl" in e]
    assert [step for step, _ in drift] == [0, 1, 2]
    assert drift[0][1] == 0.0
    assert drift[-1][1] > 0
    # The base it compares against is the trainer's own anchor where there is one, the adapters-off network under PEFT
    if setup == "full_kl":
        assert callback.ref_model is trainer.ref_model
    elif setup == "lora":
        assert callback.ref_model is None
    entries = [e for e in trainer.state.log_history if "loss" in e]
    assert all("drift_kl" in e and "drift_nll" in e for e in entries)

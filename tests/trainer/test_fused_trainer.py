"""The trainer's default, fused loss path: same training as the plain path, and no [tokens x vocab] logits."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig

import tiny
from asft_trl import ASFTTrainer
from asft_trl.reference.lm_head import fused_head_problem, head_transform
from tiny import make_args


@pytest.mark.parametrize("case", ["full", "full_tied", "lora", "reverse"])
def test_fused_and_plain_paths_train_the_same(tiny_model_path, tied_model_path, pc_dataset, tmp_path, case):
    path = tied_model_path if case == "full_tied" else tiny_model_path
    extra = {"kl_direction": "reverse"} if case == "reverse" else {}
    plain, h_plain = tiny.train_moved_policy(
        path, pc_dataset, tmp_path / "p", fused=False, peft=case == "lora", **extra
    )
    fused, h_fused = tiny.train_moved_policy(
        path, pc_dataset, tmp_path / "f", fused=True, peft=case == "lora", **extra
    )
    assert plain.keys() == fused.keys()
    moved = max((fused[k] - plain[k]).abs().max().item() for k in plain)
    assert moved < 2e-5, moved
    assert h_fused[-1]["kl"] > 1e-4 and h_fused[-1]["kl"] == pytest.approx(h_plain[-1]["kl"], rel=1e-3)
    assert h_fused[-1]["loss"] == pytest.approx(h_plain[-1]["loss"], rel=1e-4)


def test_fused_path_never_builds_full_logits(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(tiny_model_path, args=make_args(tmp_path, max_steps=2), train_dataset=pc_dataset)
    calls = []
    for lm in (trainer.model, trainer.ref_model):
        lm.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    trainer.train()
    assert trainer.use_fused_loss and not calls
    trainer.evaluate(pc_dataset.select(range(4)))
    assert not calls


def test_head_adapted_by_peft_falls_back_to_the_plain_loss(tiny_model_path, pc_dataset, tmp_path, caplog):
    config = tiny.lora_config(["q_proj"], modules_to_save=["lm_head"])
    with caplog.at_level(logging.WARNING):
        trainer = ASFTTrainer(tiny_model_path, args=make_args(tmp_path), train_dataset=pc_dataset, peft_config=config)
    assert not trainer.use_fused_loss
    assert "fused ASFT loss is not used" in caplog.text and "PEFT" in caplog.text
    # The plain loss trains the adapter and the head's trainable copy, against the head the reference runs with its
    # adapters off: the original one, which stays as it was
    peft_head = trainer.model.get_base_model().lm_head
    frozen_head = peft_head.original_module.weight.detach().clone()
    logits_built = []
    peft_head.register_forward_hook(lambda *a: logits_built.append(1))
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    assert any("modules_to_save" in k for k in start)
    trainer.train()
    end = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    tiny.assert_every_parameter_moved(start, end)
    assert logits_built  # the head ran as a module: the plain loss, not the fused one
    assert torch.equal(peft_head.original_module.weight, frozen_head)
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kl) == 2 and 0 <= kl[0] < 1e-6 < kl[1]  # 0 before the first update, then the anchor measures drift


def test_head_transform_is_read_from_the_config():
    assert head_transform(LlamaConfig()).softcap is None
    config = LlamaConfig()
    config.final_logit_softcapping, config.logit_scale = 30.0, 0.5
    transform = head_transform(config)
    assert (transform.softcap, transform.logit_scale) == (30.0, 0.5)
    config = LlamaConfig()
    config.logits_scaling = 4.0
    assert head_transform(config).logit_scale == 0.25


def test_a_head_that_is_not_linear_is_reported():
    class Odd(torch.nn.Module):
        base_model = None

        def get_output_embeddings(self):
            return torch.nn.Embedding(3, 2)

    assert "not a linear layer" in fused_head_problem(Odd())

"""The trainer's default, fused loss path: same training as the plain path, and no [tokens x vocab] logits."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig

import tiny
from asft_trl import ASFTTrainer
from asft_trl.reference.lm_head import fused_head_problem, head_transform
from conftest import make_args


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])


def _train(model_path, dataset, out, *, fused, peft=False, **overrides):
    """Two plain SGD steps (no clipping) from a policy moved away from its reference, so the KL term matters."""
    args = make_args(
        out,
        max_steps=2,
        learning_rate=2.0,
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        use_fused_loss=fused,
        kl_coef=0.5,
        loss_chunk_size=7,
        **overrides,
    )
    trainer = ASFTTrainer(model_path, args=args, train_dataset=dataset, peft_config=_lora() if peft else None)
    assert trainer.use_fused_loss is fused
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(trainer.model.named_parameters()):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    end = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    motion = max((end[k] - start[k]).abs().max().item() for k in start)
    assert motion > 1e-2  # the weights really moved
    tiny.assert_every_parameter_moved(start, end)
    return end, history


@pytest.fixture(scope="module")
def tied_model_path(tmp_path_factory) -> str:
    return tiny.build_model(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


@pytest.mark.parametrize("case", ["full", "full_tied", "lora", "reverse"])
def test_fused_and_plain_paths_train_the_same(tiny_model_path, tied_model_path, pc_dataset, tmp_path, case):
    path = tied_model_path if case == "full_tied" else tiny_model_path
    extra = {"kl_direction": "reverse"} if case == "reverse" else {}
    plain, h_plain = _train(path, pc_dataset, tmp_path / "p", fused=False, peft=case == "lora", **extra)
    fused, h_fused = _train(path, pc_dataset, tmp_path / "f", fused=True, peft=case == "lora", **extra)
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
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
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

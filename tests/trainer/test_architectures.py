"""ASFT on tiny models of several architectures, whose heads the fused loss reads differently (soft-capping, logit
scales, tied heads, an MoE router): each trains with KL exactly 0 at step 0, and the fused loss trains the same
weights as the plain one (full logits through the model's own head)."""

from __future__ import annotations

import pytest
import torch

import tiny
from asft_trl import ASFTTrainer
from asft_trl.reference.lm_head import head_transform
from tiny import make_args

STEPS = 2
# Plain SGD, no clipping. DFT at random init weights every token by ~1/V, hence large rates; chosen per architecture
# so that 3 steps move the weights by 0.1-0.5 (Granite's and Cohere's heads scale the logits, and so the gradients,
# down)
LEARNING_RATES = {"granite": 200.0, "cohere": 100.0, "olmo2": 20.0}
ATOL = 2e-5


def _train(model_path, dataset, out, fused: bool, learning_rate: float, **overrides):
    args = tiny.sgd_args(out, fused=fused, max_steps=STEPS, learning_rate=learning_rate, **overrides)
    trainer = ASFTTrainer(model_path, args=args, train_dataset=dataset)
    assert trainer.use_fused_loss is fused
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    end = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    history = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, start, end, history


@pytest.mark.parametrize("architecture", sorted(tiny.ARCHITECTURES))
def test_architecture_trains_with_kl_zero_at_step_0_and_fused_equals_plain(architecture, pc_dataset, tmp_path):
    path = tiny.build_model(tmp_path / "model", architecture=architecture)
    # An MoE's router auxiliary loss (TRL's default for MoE models) needs the plain loss: compared without it here
    # (the next test trains with it)
    overrides = {"router_aux_loss_coef": 0.0} if architecture == "qwen3_moe" else {}
    lr = LEARNING_RATES.get(architecture, 50.0)
    trainer, start, fused, h_fused = _train(path, pc_dataset, tmp_path / "fused", True, lr, **overrides)
    _, _, plain, h_plain = _train(path, pc_dataset, tmp_path / "plain", False, lr, **overrides)

    config = trainer.model.config
    transform = head_transform(config)
    expected = {"gemma2": (1.0, 2.0), "cohere": (0.5, None), "granite": (0.25, None)}.get(architecture, (1.0, None))
    assert (transform.logit_scale, transform.softcap) == expected  # the head transform the fused loss applies

    motion = max((fused[k] - start[k]).abs().max().item() for k in start)
    diff = max((fused[k] - plain[k]).abs().max().item() for k in plain)
    print(f"\n[{architecture}] motion {motion:.3g}, |fused - plain| {diff:.3g}, kl {[h['kl'] for h in h_fused]}")
    assert motion > 1000 * ATOL, f"the weights barely moved ({motion:.3g})"
    tiny.assert_every_parameter_moved(start, fused)
    assert diff < ATOL, f"{architecture}: fused and plain training differ by {diff:.3g}"
    assert h_fused[0]["kl"] == 0.0 and h_plain[0]["kl"] == 0.0, "KL at step 0 (policy = reference) must be 0"
    assert h_fused[-1]["kl"] > 1e-5 and h_fused[-1]["kl"] == pytest.approx(h_plain[-1]["kl"], rel=1e-3, abs=1e-6)
    for f, p in zip(h_fused, h_plain):
        assert f["loss"] == pytest.approx(p["loss"], rel=1e-4, abs=1e-7)
    # The reference never moved
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(ref[k], start[k]) for k in ref)


def test_moe_with_its_router_loss_trains_on_the_plain_loss(pc_dataset, tmp_path, caplog):
    """With TRL's default router auxiliary loss the fused loss steps aside (it has no router term): the plain loss
    trains, with KL 0 at step 0 and the auxiliary loss in the objective."""
    path = tiny.build_model(tmp_path / "model", architecture="qwen3_moe")
    args = make_args(
        tmp_path / "out",
        max_steps=STEPS,
        learning_rate=50.0,
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        kl_coef=0.5,
    )
    with caplog.at_level("WARNING"):
        trainer = ASFTTrainer(path, args=args, train_dataset=pc_dataset)
    assert trainer.aux_loss_enabled and not trainer.use_fused_loss
    assert "router's auxiliary loss" in caplog.text
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 1e-4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)

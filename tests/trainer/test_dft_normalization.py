"""`dft_normalization="weights"`: the step's loss divided by the sum of its DFT weights instead of its token count, the
gradients rescaled once per optimizer step before clipping; refused where it means nothing or can't run.

Split- and process-invariance (8x1 = 4x2 = 2x4, 1 vs 2 processes) are in tests/distributed/test_equivalence.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tiny
from asft_trl import ASFTConfig, ASFTTrainer
from tiny import make_args


def _one_step(model_path, dataset, out, learning_rate=0.5, **overrides):
    """One plain-SGD step on the first 4 examples; returns (log entry, start weights, end weights)."""
    args = make_args(
        out,
        max_steps=1,
        learning_rate=learning_rate,
        optim="sgd",
        lr_scheduler_type="constant",
        kl_coef=0.1,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        **overrides,
    )
    trainer = ASFTTrainer(model_path, args=args, train_dataset=dataset)
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    end = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return next(h for h in trainer.state.log_history if "loss" in h), start, end


def _update_norm(start, end, lr):
    return torch.sqrt(sum(((end[k] - start[k]) / lr).double().pow(2).sum() for k in start)).item()


@pytest.mark.parametrize("fused", [True, False])
def test_the_step_is_divided_by_its_weight_sum_and_clipping_sees_that_gradient(
    tiny_model_path, pc_dataset, tmp_path, fused
):
    weights, start, end_w = _one_step(
        tiny_model_path,
        pc_dataset,
        tmp_path / "w",
        max_grad_norm=0.0,
        use_fused_loss=fused,
        dft_normalization="weights",
    )
    # One micro-batch on one process: W / N is the logged mean DFT weight of the step
    mean_weight = weights["dft_weight_mean"]
    assert mean_weight < 0.05  # an untrained tiny model: p(y) ~ 1/V, so the two normalisations differ ~250x
    # The token-normalised step with the rate scaled by N / W is the same SGD step
    tokens, _, end_t = _one_step(
        tiny_model_path,
        pc_dataset,
        tmp_path / "t",
        max_grad_norm=0.0,
        use_fused_loss=fused,
        learning_rate=0.5 / mean_weight,
    )
    assert tokens["dft_weight_mean"] == pytest.approx(mean_weight, rel=1e-6)
    assert weights["loss"] == pytest.approx(tokens["loss"] / mean_weight, rel=1e-4)
    assert weights["grad_norm"] == pytest.approx(tokens["grad_norm"] / mean_weight, rel=1e-4)
    assert max((end_w[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the step moved the weights
    tiny.assert_every_parameter_moved(start, end_w)
    for k in start:
        torch.testing.assert_close(end_w[k], end_t[k], rtol=1e-4, atol=1e-5)

    # Clipping between the two gradient norms: only the weight-normalised step is clipped, to exactly max_grad_norm,
    # so the clipping saw the rescaled gradient (rescaling after clipping would leave a step 1 / mean_weight too long)
    clip = 10 * tokens["grad_norm"]
    assert tokens["grad_norm"] < clip < weights["grad_norm"]
    clipped, start_c, end_c = _one_step(
        tiny_model_path,
        pc_dataset,
        tmp_path / "c",
        max_grad_norm=clip,
        use_fused_loss=fused,
        dft_normalization="weights",
    )
    assert clipped["grad_norm"] == pytest.approx(weights["grad_norm"], rel=1e-4)  # the pre-clip norm it logs
    assert _update_norm(start_c, end_c, 0.5) == pytest.approx(clip, rel=1e-3)


def test_the_loss_is_the_weighted_mean_of_the_formula(tiny_model_path, pc_dataset, tmp_path):
    """In evaluation a batch is a step: eval_loss = sum_t (w_t nll_t + lambda kl_t) / sum_t w_t, on one batch."""
    args = make_args(
        tmp_path, kl_coef=0.1, dft_normalization="weights", per_device_eval_batch_size=16, use_fused_loss=False
    )
    trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset, eval_dataset=pc_dataset)
    with torch.no_grad():  # move the policy so that the KL term is not 0
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    metrics = trainer.evaluate()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    with torch.no_grad():
        log_p = torch.log_softmax(
            trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask],
            -1,
        )
        log_q = torch.log_softmax(
            trainer.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][
                mask
            ],
            -1,
        )
    token_log_p = log_p.gather(-1, labels[mask][:, None]).squeeze(-1)
    w = token_log_p.exp()
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    expected = ((w * -token_log_p).sum() + 0.1 * kl.sum()) / w.sum()
    assert metrics["eval_kl"] > 1e-3
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_a_dft_run_without_anchor_uses_the_packages_loss(tiny_model_path, pc_dataset, tmp_path):
    """kl_coef = 0 would be TRL's own DFT loss, which knows no weight normalisation: this package's loss takes over."""
    args = make_args(tmp_path, kl_coef=0.0, dft_normalization="weights")
    trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
    assert trainer._uses_own_loss(args) and trainer.ref_model is None
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = [h["dft_weight_mean"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] > 1.0 and weights[0] < 0.05  # ~ the weighted-mean NLL (~log V), not DFT's ~0.02


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(dft_normalization="mean"), ["dft_normalization='mean'", "'tokens'", "'weights'"]),
        (
            dict(dft_normalization="weights", loss_type="nll"),
            ["dft_normalization='weights'", "loss_type='nll'", "'tokens'"],
        ),
        (
            dict(dft_normalization="weights", deepspeed={"zero_optimization": {"stage": 2}}),
            ["DeepSpeed", "dft_normalization='tokens'"],
        ),
    ],
)
def test_bad_values_and_combinations_are_refused_with_the_fix(tmp_path, overrides, words):
    with pytest.raises(ValueError) as error:
        ASFTConfig(output_dir=str(tmp_path), **overrides)
    for word in words:
        assert word in str(error.value)


def test_the_fields_are_documented_and_off_by_default(tmp_path):
    args = ASFTConfig(output_dir=str(tmp_path))
    assert (args.dft_normalization, args.kl_estimator) == ("tokens", "full")
    fields = {f.name: f for f in dataclasses.fields(ASFTConfig)}
    for name in ("dft_normalization", "kl_estimator"):
        assert fields[name].metadata.get("help") and fields[name].metadata.get("choices")
        assert f"{name} (`" in ASFTConfig.__doc__

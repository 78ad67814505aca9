"""The precomputed (top-k) reference in the trainer: exact training at k = V, no reference model kept, the stored
pass reused only for the same data and weights, and clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset

import tiny
from asft_trl import ASFTConfig, ASFTTrainer
from asft_trl.reference import cache as reference_cache
from asft_trl.reference import loading as ref_utils
from tiny import make_args, prompt_completion_rows

WHOLE = 10**6  # more than tests/tiny.py's vocabulary: k is capped at V, so the whole distribution is stored


@pytest.mark.parametrize("case", ["full_fused", "full_plain", "lora_fused"])
def test_k_equal_to_vocabulary_trains_like_the_live_reference(tiny_model_path, pc_dataset, tmp_path, case):
    fused, peft = case.endswith("fused"), case.startswith("lora")
    live, h_live = tiny.train_moved_policy(tiny_model_path, pc_dataset, tmp_path / "live", fused=fused, peft=peft)
    stored, h_stored = tiny.train_moved_policy(
        tiny_model_path,
        pc_dataset,
        tmp_path / "stored",
        fused=fused,
        peft=peft,
        precompute_ref_log_probs=True,
        precompute_ref_topk=WHOLE,
    )
    moved = max((stored[k] - live[k]).abs().max().item() for k in live)
    assert moved < 2e-5, moved
    assert h_stored[-1]["kl"] > 1e-4 and h_stored[-1]["kl"] == pytest.approx(h_live[-1]["kl"], rel=1e-3)
    assert h_stored[-1]["loss"] == pytest.approx(h_live[-1]["loss"], rel=1e-4)


def test_no_reference_model_is_kept_or_copied(tiny_model_path, pc_dataset, tmp_path, monkeypatch):
    def refuse(*_):
        raise AssertionError("a second model was made")

    monkeypatch.setattr(ref_utils, "frozen_copy", refuse)
    monkeypatch.setattr(ref_utils, "load_reference", refuse)
    args = make_args(tmp_path, precompute_ref_log_probs=True, precompute_ref_topk=8, max_steps=1, learning_rate=1e-6)
    trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
    assert trainer.ref_model is None and trainer.reference.kind == "precomputed"
    assert trainer.reference.model is None and trainer.reference.causal_lm is None
    assert set(reference_cache.COLUMNS) <= set(trainer.train_dataset.column_names)
    # An untrained tiny model is nearly uniform over its vocabulary: 8 tokens hold a few percent of its mass
    assert 0.01 < trainer.precomputed_topk_mass < 0.2
    trainer.train()
    first = next(h for h in trainer.state.log_history if "kl" in h)
    assert 0 <= first["kl"] < 1e-6  # the anchor is the starting model: no divergence before the first update


def test_the_stored_pass_is_reused_only_for_the_same_data_and_weights(tiny_model_path, pc_dataset, tmp_path):
    cache = tmp_path / "cache"
    args = make_args(
        tmp_path / "a", precompute_ref_log_probs=True, precompute_ref_topk=4, precompute_ref_cache_dir=str(cache)
    )
    ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
    files = {f: os.path.getmtime(cache / f) for f in os.listdir(cache) if f.startswith("reference_top4")}
    assert len(files) == 1

    ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)  # the same: read back, not rewritten
    assert {f: os.path.getmtime(cache / f) for f in files} == files

    other_data = Dataset.from_list(prompt_completion_rows(12))
    ASFTTrainer(tiny_model_path, args=args, train_dataset=other_data)
    model = ASFTTrainer(tiny_model_path, args=make_args(tmp_path / "b", kl_coef=0.0), train_dataset=pc_dataset).model
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # other weights, same name
    ASFTTrainer(model, args=args, train_dataset=pc_dataset)
    assert len([f for f in os.listdir(cache) if f.startswith("reference_top4")]) == 3


def test_packed_padding_free_and_eval_batches_line_up(tiny_model_path, pc_dataset, tmp_path):
    args = make_args(
        tmp_path,
        precompute_ref_log_probs=True,
        precompute_ref_topk=WHOLE,
        packing=True,
        max_length=64,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=3,
        learning_rate=1e-6,
    )
    trainer = ASFTTrainer(
        tiny_model_path,
        args=args,
        train_dataset=pc_dataset,
        eval_dataset={"held_out": Dataset.from_list(prompt_completion_rows(5))},
    )
    trainer.train()
    # TRL logs the ASFT metrics of every eval set as `eval_*`; the loss carries the set's name
    kls = [h["eval_kl"] for h in trainer.state.log_history if "eval_held_out_loss" in h]
    assert len(kls) == 2 and all(0 <= kl < 1e-5 for kl in kls)


def test_lora_runs_with_other_adapter_seeds_share_the_stored_pass(tiny_model_path, pc_dataset, tmp_path):
    cache = tmp_path / "cache"
    for seed in (0, 1):
        args = make_args(
            tmp_path / str(seed),
            precompute_ref_log_probs=True,
            precompute_ref_topk=4,
            seed=seed,
            precompute_ref_cache_dir=str(cache),
        )
        ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset, peft_config=tiny.lora_config())
    assert len(list(cache.glob("reference_top4-*.arrow"))) == 1


def test_lora_precomputes_with_the_adapters_off(tiny_model_path, pc_dataset, tmp_path):
    args = make_args(tmp_path, precompute_ref_log_probs=True, precompute_ref_topk=WHOLE)
    trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset, peft_config=tiny.lora_config())
    assert trainer.ref_model is None
    row = trainer.train_dataset[0]
    # A zero-initialised LoRA does not change the model, so compare with the base model's own distribution
    collated = reference_cache.ReferenceColumnsCollator(trainer.data_collator.collator)([row])
    with torch.no_grad():
        base = trainer.model.get_base_model()
        logits = base(input_ids=collated["input_ids"]).logits[:, :-1][collated["labels"][:, 1:] != -100]
    expected = torch.log_softmax(logits.float(), -1).topk(logits.shape[-1], -1)
    torch.testing.assert_close(collated["ref_topk_log_probs"], expected.values, atol=1e-5, rtol=1e-5)


def test_errors_before_any_compute(tiny_model_path, pc_dataset, tmp_path):
    with pytest.raises(ValueError, match="kl_coef"):
        ASFTConfig(str(tmp_path), precompute_ref_log_probs=True, kl_coef=0.0)
    with pytest.raises(ValueError, match="precompute_ref_topk"):
        ASFTConfig(str(tmp_path), precompute_ref_log_probs=True, precompute_ref_topk=0)
    streaming = pc_dataset.to_iterable_dataset()
    args = make_args(tmp_path, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="map-style"):
        ASFTTrainer(tiny_model_path, args=args, train_dataset=streaming)


@pytest.mark.slow  # a real `asft-trl train` launch in a subprocess
def test_options_come_from_a_recipe_and_the_command_line(tiny_model_path, tmp_path):
    from tiny import run_cli, write_recipe

    recipe = write_recipe(
        tmp_path, tiny_model_path, precompute_ref_log_probs=True, precompute_ref_topk=8, dft_weight_floor=0.05
    )
    result = run_cli("train", "--config", str(recipe), "--precompute_ref_topk", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert [f for f in os.listdir(out / "reference_cache") if f.startswith("reference_top16-")]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    weights = [h["dft_weight_mean"] for h in history if "dft_weight_mean" in h]
    assert weights and min(weights) >= 0.05  # the floor reached the loss (a tiny model's p is ~1/V)


@pytest.mark.parametrize(
    "field,value", [("sync_ref_model", True), ("ref_model_dtype", "bfloat16"), ("ref_model_quantization", "8bit")]
)
def test_options_for_a_kept_reference_are_refused_with_the_precomputed_one(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}=.*precompute_ref_log_probs"):
        ASFTConfig(str(tmp_path), precompute_ref_log_probs=True, **{field: value})

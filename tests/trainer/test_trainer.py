"""ASFTTrainer wiring: the loss it computes, the reference it builds, the metrics it logs, the errors it raises."""

from __future__ import annotations

import gc

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

import tiny
from asft_trl import ASFTTrainer, asft_loss
from tiny import make_args, prompt_completion_rows


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def num_items(batch):
    return (batch["labels"][:, 1:] != -100).sum()


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_kl_coef_zero_is_trls_own_loss(tiny_model_path, pc_dataset, tmp_path, loss_type):
    asft = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path / "a", kl_coef=0.0, loss_type=loss_type), train_dataset=pc_dataset
    )
    sft_args = SFTConfig(
        output_dir=str(tmp_path / "s"),
        loss_type=loss_type,
        per_device_train_batch_size=4,
        report_to="none",
        gradient_checkpointing=False,
        bf16=False,
        seed=0,
    )
    sft = SFTTrainer(tiny_model_path, args=sft_args, train_dataset=pc_dataset)
    assert asft.ref_model is None
    batch = first_batch(asft)
    n = num_items(batch)
    with torch.no_grad():
        ours = asft.compute_loss(asft.model, dict(batch), num_items_in_batch=n)
        theirs = sft.compute_loss(sft.model, dict(batch), num_items_in_batch=n)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    mode = "train" if asft.model.training else "eval"
    assert {"nll", "dft_weight_mean", "dft_weight_ess"} <= set(asft._metrics[mode])


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_trainer_loss_is_the_formula_on_completion_tokens(
    tiny_model_path, pc_dataset, tmp_path, loss_type, kl_direction
):
    trainer = ASFTTrainer(
        tiny_model_path,
        args=make_args(tmp_path, kl_coef=0.2, loss_type=loss_type, kl_direction=kl_direction),
        train_dataset=pc_dataset,
    )
    # Move the policy away from the reference so that the KL term is not zero
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(50))

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        policy_logits = trainer.model(**inputs).logits[:, :-1]
        ref_logits = trainer.ref_model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    assert mask.sum() < mask.numel()  # prompt and padding positions exist and are excluded
    expected, terms = asft_loss(
        policy_logits[mask],
        labels[mask],
        ref_logits[mask],
        kl_coef=0.2,
        loss_type=loss_type,
        kl_direction=kl_direction,
        num_items_in_batch=50,
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms.kl.mean() > 1e-4


def train_and_history(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_full_finetuning_reference_is_frozen_copy_and_never_changes(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path, max_steps=4, learning_rate=5e-2), train_dataset=pc_dataset
    )
    ref = trainer.ref_model
    assert isinstance(ref, LlamaForCausalLM) and ref is not trainer.model
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    history = train_and_history(trainer)
    after = ref.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert history[0]["kl"] == 0.0  # policy == reference on the first step
    assert all(h["kl"] >= 0 for h in history)
    assert history[-1]["kl"] > 0
    for key in ("kl", "nll", "dft_weight_mean", "dft_weight_ess", "entropy", "mean_token_accuracy", "num_tokens"):
        assert key in history[-1], key
    assert 0 < history[-1]["dft_weight_ess"] <= 1


def count_llamas() -> int:
    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


def test_lora_uses_adapters_off_as_reference_and_no_second_model(tiny_model_path, pc_dataset, tmp_path):
    baseline = count_llamas()
    trainer = ASFTTrainer(
        tiny_model_path,
        args=make_args(tmp_path, max_steps=4, learning_rate=5e-2),
        train_dataset=pc_dataset,
        peft_config=tiny.lora_config(),
    )
    assert trainer.ref_model is None
    assert count_llamas() - baseline == 1  # the policy only
    base_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_" not in k}
    history = train_and_history(trainer)
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), name


def test_explicit_reference_is_used_under_lora(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(
        tiny_model_path,
        ref_model=tiny_model_path,
        args=make_args(tmp_path),
        train_dataset=pc_dataset,
        peft_config=tiny.lora_config(["q_proj"]),
    )
    assert isinstance(trainer.ref_model, LlamaForCausalLM)


def test_kl_coef_zero_builds_no_reference_even_for_full_finetuning(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(tiny_model_path, args=make_args(tmp_path, kl_coef=0.0), train_dataset=pc_dataset)
    assert trainer.ref_model is None


def test_reference_with_other_vocabulary_is_refused_before_tokenisation(
    tiny_model_path, other_vocab_model_path, pc_dataset, tmp_path, monkeypatch
):
    def no_tokenising(*args, **kwargs):
        raise AssertionError("the dataset was prepared before the reference was checked")

    monkeypatch.setattr(ASFTTrainer, "_prepare_dataset", no_tokenising)
    for ref in (other_vocab_model_path, AutoModelForCausalLM.from_pretrained(other_vocab_model_path)):
        with pytest.raises(ValueError, match="predicts over 300 tokens but the policy over 260"):
            ASFTTrainer(tiny_model_path, ref_model=ref, args=make_args(tmp_path), train_dataset=pc_dataset)
    with pytest.raises(ValueError, match="ref_model_name_or_path|same model family"):
        ASFTTrainer(
            tiny_model_path,
            args=make_args(tmp_path, ref_model_name_or_path=other_vocab_model_path),
            train_dataset=pc_dataset,
        )


def test_same_object_as_reference_is_refused(tiny_model_path, pc_dataset, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="same object"):
        ASFTTrainer(model, ref_model=model, args=make_args(tmp_path), train_dataset=pc_dataset)


def test_model_built_in_memory_gets_a_matching_reference(tiny_model_path, pc_dataset, tmp_path):
    config = AutoModelForCausalLM.from_pretrained(tiny_model_path).config
    model = LlamaForCausalLM(config)
    model.config._name_or_path = ""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    trainer = ASFTTrainer(model, args=make_args(tmp_path), train_dataset=pc_dataset, processing_class=tokenizer)
    assert trainer.ref_model is not None
    assert train_and_history(trainer)[0]["kl"] == 0.0


def test_chat_template_that_adds_tokens_keeps_reference_in_step(tiny_model_path, pc_dataset, tmp_path):
    """TRL resizes the policy for a cloned chat template; the default reference must match the resized policy."""
    import tiny

    source = tiny.build_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    source.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    source.eos_token = "<|end|>"
    source_dir = tmp_path / "template_source"
    source.save_pretrained(source_dir)
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path / "out", chat_template_path=str(source_dir)), train_dataset=pc_dataset
    )
    policy_rows = trainer.model.get_output_embeddings().weight.shape[0]
    assert policy_rows != 260  # TRL did resize the policy
    assert trainer.ref_model.get_output_embeddings().weight.shape[0] == policy_rows
    assert train_and_history(trainer)[0]["kl"] == 0.0


def test_dataset_in_no_accepted_format_names_its_columns(tiny_model_path, tmp_path):
    bad = Dataset.from_list([{"question": "q", "answer": "a"}] * 4)
    with pytest.raises(ValueError) as error:
        ASFTTrainer(tiny_model_path, args=make_args(tmp_path), train_dataset=bad)
    message = str(error.value)
    assert "['answer', 'question']" in message and "prompt-completion" in message and "formatting_func" in message


def test_prompt_without_completion_gets_a_hint(tiny_model_path, tmp_path):
    bad = Dataset.from_list([{"prompt": "q", "response": "a"}] * 4)
    with pytest.raises(ValueError, match="rename the answer column to 'completion'"):
        ASFTTrainer(tiny_model_path, args=make_args(tmp_path), train_dataset=bad)


def test_truncated_completions_are_counted_and_an_emptied_dataset_is_refused(tiny_model_path, tmp_path):
    rows = prompt_completion_rows(8)
    long_prompt = {"role": "user", "content": "hello world " * 40}
    rows += [{"prompt": [long_prompt], "completion": [{"role": "assistant", "content": "ok"}]}] * 3
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path, max_length=48), train_dataset=Dataset.from_list(rows)
    )
    assert trainer.dropped_examples["train"] == 3
    assert len(trainer.train_dataset) == 8

    only_long = Dataset.from_list(rows[-3:])
    with pytest.raises(ValueError, match="All 3 train examples were dropped.*max_length=48"):
        ASFTTrainer(tiny_model_path, args=make_args(tmp_path, max_length=48), train_dataset=only_long)


def test_model_card_names_asft_and_cites_the_paper(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(tiny_model_path, args=make_args(tmp_path), train_dataset=pc_dataset)
    trainer.create_model_card(model_name="tiny-asft")
    card = (tmp_path / "README.md").read_text()
    assert "ASFT" in card and "2509.23753" in card and "Anchored Supervised Fine-Tuning" in card


def test_eval_logs_the_asft_metrics(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path), train_dataset=pc_dataset, eval_dataset=pc_dataset.select(range(4))
    )
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_kl", "eval_nll", "eval_dft_weight_ess", "eval_entropy", "eval_mean_token_accuracy"):
        assert key in metrics, key
    assert metrics["eval_kl"] == 0.0


def test_padding_free_batches_give_the_reference_the_same_positions(tiny_model_path, pc_dataset, tmp_path):
    """Packing passes position_ids; with policy == reference the KL must still be exactly 0."""
    trainer = ASFTTrainer(
        tiny_model_path,
        args=make_args(tmp_path, packing=True, max_length=64, per_device_train_batch_size=2),
        train_dataset=pc_dataset,
    )
    batch = first_batch(trainer)
    assert "position_ids" in batch
    trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items(batch))
    mode = "train" if trainer.model.training else "eval"
    assert trainer._metrics[mode]["kl"][-1] == 0.0


def test_sft_config_as_args_is_converted_and_says_what_it_trains(tiny_model_path, pc_dataset, tmp_path, caplog):
    """`to_dict` masks every `*_token` field ('<EOS_TOKEN>'), so the conversion must read them from the config."""
    import logging

    sft_args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        bf16=False,
        hub_token="secret",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    with caplog.at_level(logging.WARNING):
        trainer = ASFTTrainer(tiny_model_path, args=sft_args, train_dataset=pc_dataset)
    args = trainer.args
    assert (args.eos_token, args.pad_token, args.hub_token) == ("<|im_end|>", "<pad>", "secret")
    assert (args.loss_type, args.kl_coef, args.method_name) == ("nll", 0.05, "SFT+KL")
    assert "converted to an ASFTConfig that trains SFT+KL" in caplog.text
    assert "loss_type='nll' (kept)" in caplog.text and "kl_coef=0.05 (default)" in caplog.text
    trainer.train()
    assert [h["kl"] for h in trainer.state.log_history if "kl" in h] == [0.0]
    # an SFTConfig left at its defaults (eos_token=None) converts too
    assert (
        ASFTTrainer(
            tiny_model_path,
            args=SFTConfig(output_dir=str(tmp_path), bf16=False, report_to="none"),
            train_dataset=pc_dataset,
        ).args.eos_token
        is None
    )


@pytest.mark.parametrize("where", ["ref_model", "ref_model_name_or_path", "model"])
def test_path_that_is_neither_folder_nor_hub_id_is_named_before_loading(
    where, tiny_model_path, pc_dataset, tmp_path, monkeypatch
):
    def no_tokenising(*args, **kwargs):
        raise AssertionError("the dataset was prepared before the path was checked")

    monkeypatch.setattr(ASFTTrainer, "_prepare_dataset", no_tokenising)
    missing = str(tmp_path / "no" / "such-model")
    kwargs = {"ref_model": missing} if where == "ref_model" else {}
    args = make_args(tmp_path, ref_model_name_or_path=missing if where == "ref_model_name_or_path" else None)
    with pytest.raises(ValueError, match=f"^{where}='{missing}' is neither a local folder .* nor a Hub id"):
        ASFTTrainer(missing if where == "model" else tiny_model_path, args=args, train_dataset=pc_dataset, **kwargs)


def test_empty_completions_are_counted_and_reported(tiny_model_path, tmp_path, caplog):
    import logging

    rows = prompt_completion_rows(8)
    rows[2]["completion"] = [{"role": "assistant", "content": ""}]
    rows[5]["completion"] = [{"role": "assistant", "content": "   "}]
    plain = [{"prompt": "q", "completion": ""}, {"prompt": "q", "completion": "a"}]
    with caplog.at_level(logging.WARNING):
        trainer = ASFTTrainer(
            tiny_model_path,
            args=make_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(plain),
        )
    assert trainer.empty_completions == {"train": 2, "eval": 1}
    assert "2 of 8 train examples have an empty completion (rows 2, 5)" in caplog.text
    assert "1 of 2 eval examples have an empty completion (rows 0)" in caplog.text


def test_model_card_links_only_what_is_on_the_hub(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(tiny_model_path, args=make_args(tmp_path), train_dataset=pc_dataset)
    local_data = tmp_path / "train.jsonl"
    local_data.write_text("{}")
    trainer.create_model_card(model_name="tiny-asft", dataset_name=str(local_data))
    card = (tmp_path / "README.md").read_text()
    assert "huggingface.co/None" not in card and "huggingface.co/datasets/" not in card and 'model="None"' not in card
    assert f"fine-tuned version of the local model `{tiny_model_path}` on the local data `{local_data}`." in card
    assert f'model="{tmp_path}"' in card and "2509.23753" in card
    # Hub ids are still linked
    trainer.model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trainer.create_model_card(model_name="tiny-asft", dataset_name="trl-lib/Capybara")
    card = (tmp_path / "README.md").read_text()
    assert (
        "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) on the "
        "[trl-lib/Capybara](https://huggingface.co/datasets/trl-lib/Capybara) dataset."
    ) in card


def test_a_plain_cpu_config_raises_no_deprecation_or_pin_memory_warning(tiny_model_path, pc_dataset, tmp_path):
    """TRL's config sets transformers' deprecated `gradient_checkpointing`, and pinned memory warns without an
    accelerator: a first run should print neither."""
    import warnings

    from asft_trl import ASFTConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = ASFTConfig(
            output_dir=str(tmp_path),
            report_to="none",
            max_steps=1,
            per_device_train_batch_size=4,
            dataset_num_proc=None,
        )
        assert args.activation_checkpointing is True and args.gradient_checkpointing is True  # TRL's default
        trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=pc_dataset)
        next(iter(trainer.get_train_dataloader()))
    messages = [str(w.message) for w in caught]
    assert not any("gradient_checkpointing" in m for m in messages), messages
    if not torch.cuda.is_available():
        assert args.dataloader_pin_memory is False
        assert not any("pin_memory" in m for m in messages), messages
    # the old name still works, with transformers' warning
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        assert ASFTConfig(output_dir=str(tmp_path), gradient_checkpointing=False).activation_checkpointing is False

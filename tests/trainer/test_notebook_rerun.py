"""A notebook cell run again: a trainer built on a model object that outlives it is freed by `del trainer`, and the
model's forward is patched once, however many trainers are built on it (benchmarks/notebook_rerun_memory.py measures
the memory this keeps on SmolLM2-135M)."""

from __future__ import annotations

import gc
import weakref

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from asft_trl import ASFTTrainer
from tiny import make_args


def asft_patches(model) -> int:
    """How many of this package's patches sit in the model's forward chain (below or above TRL's fused heads)."""
    count, forward = 0, model.__dict__.get("forward")
    while forward is not None:
        function = getattr(forward, "__func__", forward)
        if function.__code__.co_qualname.startswith("patch_forward."):  # functools.wraps renames the function
            count += 1
        inner = None
        for cell in function.__closure__ or ():
            value = cell.cell_contents
            if callable(value) and getattr(value, "__name__", None) == "forward" and value is not forward:
                inner = value
        forward = None if getattr(inner, "__func__", None) is type(model).forward else inner
    return count


@pytest.mark.parametrize("kl_coef", [0.05, 0.0], ids=["asft", "kl_coef_0"])
def test_rerun_frees_the_trainer_and_patches_once(kl_coef, tiny_model_path, pc_dataset, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)  # the notebook's model object, kept across cells
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    trainers = []
    for run in range(3):
        trainer = ASFTTrainer(
            model,
            args=make_args(tmp_path / str(run), kl_coef=kl_coef, max_steps=1),
            train_dataset=pc_dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
        assert kls == ([0.0] if kl_coef else []), kls  # the new anchor is the model as this cell received it
        trainers.append(weakref.ref(trainer))
        del trainer
        gc.collect()
        assert [ref() is None for ref in trainers] == [True] * (run + 1), "a trainer outlived `del trainer`"
        assert asft_patches(model) == 1
    # the model still works on its own afterwards
    out = model(**tokenizer("hello world", return_tensors="pt"))
    assert out.logits.shape[-1] == model.config.vocab_size

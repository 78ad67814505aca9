"""Pins the TRL internals asft-trl relies on. A TRL upgrade that moves any of them fails here, loudly, first."""

from __future__ import annotations

import inspect

import trl
from packaging.version import Version
from trl import SFTConfig, SFTTrainer


def test_trl_version_in_supported_range():
    assert Version("1.16") <= Version(trl.__version__) < Version("2"), trl.__version__


def test_sft_trainer_private_hooks():
    # We override `_prepare_dataset` with this exact signature to check formats and count dropped rows
    params = list(inspect.signature(SFTTrainer._prepare_dataset).parameters)
    assert params == ["self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"]
    source = inspect.getsource(SFTTrainer.__init__)
    # Metrics mechanism, token counting, MoE aux loss and model tags that compute_loss reuses
    for name in (
        "self._metrics",
        "self._total_train_tokens",
        "self._tp_size",
        "self.aux_loss_enabled",
        "self.router_aux_loss_coef",
        "self._tag_names",
        "add_fused_lm_head",
    ):
        assert name in source, name
    assert "_name" in vars(SFTTrainer) and "_tag_names" in vars(SFTTrainer)
    assert hasattr(SFTTrainer, "_paper") and hasattr(SFTTrainer, "get_tp_size")


def test_fused_lm_head_contract():
    from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

    fields = FusedCausalLMOutput.__dataclass_fields__
    assert {"log_probs", "label_mask"} <= set(fields)
    assert "fused_lm_head=True" in inspect.getsource(SFTTrainer.compute_loss)
    # The patch is an instance attribute that `reference.frozen_copy` drops from the copy
    assert "model.forward = types.MethodType" in inspect.getsource(add_fused_lm_head)


def test_reference_model_utilities():
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, get_config_model_id, use_adapter

    assert list(inspect.signature(prepare_deepspeed).parameters) == ["model", "accelerator"]
    assert list(inspect.signature(prepare_fsdp).parameters) == ["model", "accelerator"]
    assert "adapter_name" in inspect.signature(use_adapter).parameters
    assert callable(create_model_from_path) and callable(disable_dropout_in_model) and callable(get_config_model_id)
    assert resolve_accelerate_config_argument(["--accelerate_config", "zero3"])[0] == "--config_file"


def test_config_internals():
    assert "model_init_kwargs" in SFTConfig._VALID_DICT_FIELDS
    assert SFTConfig.__dataclass_fields__["loss_type"].default == "nll"


def test_transformers_counts_items_for_models_that_accept_loss_kwargs():
    """ASFTTrainer sets `model_accepts_loss_kwargs = True` so that the Trainer counts `num_items_in_batch` (the step's
    scored tokens) for every model and does not divide the loss by the accumulation steps again. Both are checked on
    the Trainer's own code: the count is run on a stub that has the flag, and not taken without it."""
    from types import SimpleNamespace

    import torch
    from transformers import Trainer

    def counted(accepts_loss_kwargs: bool):
        stub = SimpleNamespace(
            model_accepts_loss_kwargs=accepts_loss_kwargs,
            compute_loss_func=None,
            _loss_shifts_labels=True,
            args=SimpleNamespace(average_tokens_across_devices=False, world_size=1, n_gpu=1),
            # One process, no tensor/context/sequence parallelism: the count is not divided
            get_tp_size=lambda: 1,
            get_cp_size=lambda: 1,
            get_sp_size=lambda: 1,
        )
        batches = [{"labels": torch.tensor([[-100, 5, 6, -100, 7]])}, {"labels": torch.tensor([[-100, 8, -100]])}]
        return Trainer._get_num_items_in_batch(stub, batches, torch.device("cpu"))

    # Position 0 is never a target (labels are shifted): 3 + 1 scored tokens
    assert int(counted(True)) == 4
    assert counted(False) is None
    # The loss normalised by num_items_in_batch is not divided by the accumulation steps again
    step = inspect.getsource(Trainer.training_step)
    assert "self.model_accepts_loss_kwargs and num_items_in_batch is not None" in step
    assert "loss / self.current_gradient_accumulation_steps" in step
    assert hasattr(Trainer, "loss_is_scaled_for_ga")


def test_lm_head_gather_context_for_the_fused_loss(monkeypatch):
    """The fused loss reads the head's weight directly (`reference.lm_head.FusedHeadLoss`); TRL's context gathers it
    under ZeRO-3, each partitioned parameter once (the policy's head is passed twice when it is the reference's too),
    None and already gathered parameters left out; without ZeRO-3 it is a null context."""
    import contextlib

    import deepspeed
    import torch
    import transformers.integrations.deepspeed as hf_deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    assert list(inspect.signature(maybe_gather_lm_head_ctx).parameters) == ["params"]
    weight, bias, tied = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    assert isinstance(maybe_gather_lm_head_ctx(weight, None), contextlib.nullcontext)  # no ZeRO-3

    gathered = []
    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", lambda params: gathered.append(params) or "gathering")
    weight.ds_status = bias.ds_status = ZeroParamStatus.NOT_AVAILABLE
    tied.ds_status = ZeroParamStatus.AVAILABLE  # tied embeddings: already gathered by embed_tokens
    assert maybe_gather_lm_head_ctx(weight, bias, weight, None, tied) == "gathering"
    assert [[id(p) for p in params] for params in gathered] == [[id(weight), id(bias)]]
    assert isinstance(maybe_gather_lm_head_ctx(tied, None), contextlib.nullcontext) and len(gathered) == 1


def test_the_last_micro_batch_is_marked_before_its_training_step_and_clipped_after():
    """`dft_normalization="weights"` rescales the step's gradients at the end of the last micro-batch's
    `training_step`, which it recognises by `accelerator.sync_gradients`; clipping and the optimizer step must come
    after it (a test also checks the behaviour: tests/trainer/test_dft_normalization.py)."""
    from transformers import Trainer

    source = inspect.getsource(Trainer._run_epoch)
    order = [
        source.index(s)
        for s in (
            "_set_sync_gradients(do_sync_step)",
            "self.training_step(",
            "self._clip_grad_norm(",
            "self.optimizer.step()",
        )
    ]
    assert order == sorted(order), order

"""`ASFTTrainer`: TRL's `SFTTrainer` with the ASFT loss and a frozen reference model, in the manner of TRL's DPO.

What this module adds to SFTTrainer, and nothing else:
- the reference, one `asft_trl.reference.build.Reference` chosen from the config by `build_reference` (a model of its
  own, checked, frozen and prepared for DeepSpeed/FSDP; or adapters switched off under PEFT, or a frozen copy of the
  adapter a given `PeftModel` carries; or, with `precompute_ref_log_probs`, one pass of it before training whose
  top-k log-probs ride in the batches);
- `compute_loss` for `kl_coef > 0` (or a DFT weight floor, or `dft_normalization="weights"`): by default the chunked,
  fused loss from both models' hidden states (`asft_trl.losses.fused`, reached through `asft_trl.reference.lm_head`'s
  `FusedHeadLoss`), else the plain one from full logits; otherwise the loss is TRL's own, untouched;
- the ASFT metrics (`kl`, `nll`, `dft_weight_mean`, `dft_weight_ess`) through TRL's `_metrics` mechanism;
- lambda by step: a schedule, or the adaptive controller (`asft_trl.trainer.kl_control`) held by `AdaptiveKLCallback`,
  which updates it once per optimizer step and saves it with every checkpoint;
- early, explanatory errors for paths and data TRL would fail on later (`asft_trl.utils.paths`, `asft_trl.data.checks`);
- a model card that links to the Hub only what is there.
Nothing it attaches to the model holds the trainer, so a trainer is freed with its last reference (a notebook cell
run again), however many are built on one model object.
"""

from __future__ import annotations

import logging
import os
import textwrap

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PreTrainedModel
from trl import SFTTrainer
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import disable_dropout_in_model, get_config_model_id

from ..data.checks import check_dataset_format, report_dropped, report_empty_completions
from ..diagnostics.preflight import PreflightCheck
from ..losses import asft_loss, asft_token_terms, weight_stats
from ..reference import cache as reference_cache
from ..reference import lm_head
from ..reference.build import Reference, build_reference, check_tokenizer_early, check_vocabulary_early
from ..utils.paths import check_model_source, is_hub_id
from .callbacks import AdaptiveKLCallback
from .config import ASFTConfig
from .kl_control import KLCoefSchedule
from .normalization import StepNormalization, refuse_weights_under_deepspeed

logger = logging.getLogger(__name__)


class ASFTTrainer(SFTTrainer):
    """Trainer for Anchored Supervised Fine-Tuning (ASFT).

    Takes everything [`~trl.SFTTrainer`] takes, plus `ref_model`, and an [`ASFTConfig`] as `args`.

    Args:
        model: the model to fine-tune, as a path/Hub id or a loaded model (a `PeftModel` included).
        ref_model: the reference, as a model or a path/Hub id. Default: the starting model (a frozen copy for full
            fine-tuning; under PEFT the same network with its adapters switched off, and no second model).
        args: an [`ASFTConfig`]. Any other `TrainingArguments` is converted, as SFTTrainer does.
        **kwargs: passed on to [`~trl.SFTTrainer`] (`train_dataset`, `eval_dataset`, `processing_class`,
            `peft_config`, `quantization_config`, `callbacks`, ...).
    """

    _tag_names = ["trl", "sft", "asft"]
    _name = "ASFT"
    _paper = {
        "title": "Anchored Supervised Fine-Tuning",
        "id": "2509.23753",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zhu2026anchored,
                title        = {{Anchored Supervised Fine-Tuning}},
                author       = {He Zhu and Junyou Su and Peng Lai and Ren Ma and Wenjia Zhang and Linyi Yang and Guanhua Chen},
                year         = 2026,
                booktitle    = {International Conference on Learning Representations (ICLR)},
                eprint       = {arXiv:2509.23753},
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        args: ASFTConfig | None = None,
        *pos_args,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = ASFTConfig(f"{(name or 'model').split('/')[-1]}-ASFT")
        elif not isinstance(args, ASFTConfig):
            args = _as_asft_config(args)
        if ref_model is not None and not isinstance(ref_model, str) and ref_model is model:
            raise ValueError(
                "`model` and `ref_model` are the same object, so the reference would move with the policy. Omit "
                "`ref_model`: a frozen copy of the starting model (or, under PEFT, the adapters switched off) is used."
            )
        if ref_model is None and args.ref_model_name_or_path is not None:
            ref_model = args.ref_model_name_or_path
        # A path that is neither a folder nor a Hub id fails here, by name, not inside a loader half a minute later
        if isinstance(model, str):
            init_kwargs = args.model_init_kwargs or {}
            check_model_source(
                model, "model", cache_dir=init_kwargs.get("cache_dir"), revision=init_kwargs.get("revision")
            )
        ref_field = "ref_model_name_or_path" if ref_model == args.ref_model_name_or_path else "ref_model"
        if isinstance(ref_model, str):
            ref_kwargs = args.ref_model_init_kwargs or args.model_init_kwargs or {}
            check_model_source(
                ref_model, ref_field, cache_dir=ref_kwargs.get("cache_dir"), revision=ref_kwargs.get("revision")
            )
        # Filled in by `_prepare_dataset`, which SFTTrainer.__init__ calls
        self.dropped_examples: dict[str, int] = {}
        self.empty_completions: dict[str, int] = {}
        # A PeftModel given as is may carry a trained adapter: its reference is then a frozen copy of that adapter
        given_peft_model = not isinstance(model, str) and is_peft_model(model)
        check_vocabulary_early(model, ref_model, args)
        check_tokenizer_early(model, ref_model, ref_field, args, kwargs.get("processing_class"))

        super().__init__(model, args, *pos_args, **kwargs)

        # The loss is normalised by `num_items_in_batch`, so the Trainer must count it for every model (it only does
        # for models whose forward takes **kwargs) and must not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._policy_lm = self.model.get_base_model() if is_peft_model(self.model) else self.model
        # Patched once per model object, holding no trainer: a notebook cell run again frees the previous trainer
        lm_head.patch_forward(self._policy_lm)
        if args.disable_dropout:
            disable_dropout_in_model(self.accelerator.unwrap_model(self.model))
        # The reference, in whichever form the config gives it (None without an anchor): `asft_trl.reference.build`
        self.reference: Reference | None = build_reference(
            ref_model,
            args,
            self.accelerator.unwrap_model(self.model),
            given_peft_model=given_peft_model,
            accelerator=self.accelerator,
            deepspeed=self.is_deepspeed_enabled,
            fsdp=self.is_fsdp_enabled,
            datasets=(self.train_dataset, self.eval_dataset, self.data_collator),
        )
        if self.reference is not None and self.reference.precomputed is not None:
            self.train_dataset, self.eval_dataset, self.data_collator = self.reference.precomputed.datasets()
            if self.reference.precomputed.topk_mass is not None:
                self.precomputed_topk_mass = self.reference.precomputed.topk_mass
        if args.sync_ref_model and self.ref_model is not None:
            # TRL's own callback (TR-DPO): ref = alpha * policy + (1 - alpha) * ref every `ref_model_sync_steps` steps,
            # gathering ZeRO-3 partitions itself; it is given the prepared reference, as DPOTrainer does
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        self.use_fused_loss = self._fused_loss_applies(args)

        # lambda by step (off by default): a schedule, or the adaptive controller in a callback, so that its state
        # rides in trainer_state.json with every checkpoint (transformers' `ExportableState`) and a resume restores it
        self._kl_coef_schedule = None
        if args.anchored and args.kl_coef_schedule != "constant":
            self._kl_coef_schedule = KLCoefSchedule(
                args.kl_coef_schedule,
                args.kl_coef,
                args.kl_coef_warmup_steps,
                args.kl_coef_final,
                args.kl_coef_milestones or {},
            )
        if args.anchored and args.kl_target is not None:
            self.add_callback(AdaptiveKLCallback(args.kl_coef, args.kl_target, args.kl_horizon, args.kl_error_clip))
        self._set_up_dft_options(args)

    # ------------------------------------------------------------------ reference model

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The reference when it is a model of its own, prepared for the launch (TRL's name, as in `DPOTrainer`);
        None under PEFT (the policy's network is the reference), with the precomputed reference, or without an
        anchor. `self.reference` holds the reference in every form."""
        return None if self.reference is None else self.reference.model

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.precompute_ref_log_probs and reference_cache.COLUMNS[0] not in self._signature_columns:
            self._signature_columns = [
                *self._signature_columns,
                *reference_cache.COLUMNS,
                reference_cache.TOKEN_COLUMN,
            ]

    @staticmethod
    def _uses_own_loss(args: ASFTConfig) -> bool:
        """Whether the loss is this package's rather than TRL's own SFT/DFT loss: with a KL term, a weight floor, or
        the DFT weight normalisation."""
        return args.anchored or args.dft_weight_floor > 0 or args.dft_normalization == "weights"

    @property
    def current_kl_coef(self) -> float:
        """lambda for the current optimisation step: `kl_coef`, the schedule's value at this step, or the adaptive
        controller's. Constant within an optimizer step: the step counter and the controller only move between steps."""
        callback = self._kl_controller_callback()
        if callback is not None:
            return callback.controller.kl_coef
        if self._kl_coef_schedule is not None:
            return self._kl_coef_schedule(self.state.global_step, self.state.max_steps)
        return self.args.kl_coef

    def _fused_loss_applies(self, args: ASFTConfig) -> bool:
        """Whether the fused loss runs; where it can't, say why once and use the plain loss."""
        if not args.use_fused_loss or not self._uses_own_loss(args):
            return False
        problem = lm_head.fused_head_problem(self._policy_lm)
        if problem is None and self.reference is not None:
            problem = self.reference.head_problem()
        if problem is None and self.aux_loss_enabled:
            problem = "the MoE router's auxiliary loss is enabled"
        if (
            problem is None
            and self.is_fsdp_enabled
            and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1
        ):
            problem = "FSDP1 keeps the head's parameters flattened outside the forward (FSDP2 is supported)"
        if problem is not None:
            logger.warning(f"The fused ASFT loss is not used because {problem}; the plain loss builds full logits.")
            return False
        return True

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save as SFTTrainer does, leaving out the frozen reference adapter: the output holds the trained adapter
        alone, as it would without the reference."""
        if self.reference is None:
            return super()._save(output_dir, state_dict)
        with self.reference.left_out_of_save(self.model):
            return super()._save(output_dir, state_dict)

    # ------------------------------------------------------------------ model card

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        """TRL's model card, which links the base model and the dataset on the Hub; one that is not there (a local
        folder or file, a model built in memory) is named instead of linked to `huggingface.co/None` or to
        `huggingface.co/datasets/<local path>`."""
        local_data = dataset_name is not None and (os.path.exists(dataset_name) or not is_hub_id(dataset_name))
        super().create_model_card(model_name=model_name, dataset_name=None if local_data else dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        card_path = os.path.join(self.args.output_dir, "README.md")
        with open(card_path) as f:
            lines = f.read().split("\n")
        base = get_config_model_id(self.model.config)
        hub_base = bool(base) and not os.path.isdir(base)
        base_text = (
            f"[{base}](https://huggingface.co/{base})"
            if hub_base
            else (f"the local model `{base}`" if base else "a model built in memory")
        )
        data_text = (
            f" on the local data `{dataset_name}`"
            if local_data
            else (
                f" on the [{dataset_name}](https://huggingface.co/datasets/{dataset_name}) dataset"
                if dataset_name
                else ""
            )
        )
        for i, line in enumerate(lines):
            if line.startswith("This model is a fine-tuned version of "):
                lines[i] = f"This model is a fine-tuned version of {base_text}{data_text}."
            elif self.hub_model_id is None and 'model="None"' in line:  # not pushed: load it from where it was saved
                lines[i] = line.replace('model="None"', f'model="{self.args.output_dir}"')
        with open(card_path, "w") as f:
            f.write("\n".join(lines))

    # ------------------------------------------------------------------ data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        check_dataset_format(dataset, args.dataset_text_field, formatting_func is not None, dataset_name)
        self.empty_completions[dataset_name] = report_empty_completions(dataset, dataset_name)
        n_before = len(dataset) if isinstance(dataset, Dataset) and not packing else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        self.dropped_examples[dataset_name] = report_dropped(n_before, prepared, dataset_name, args.max_length)
        return prepared

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stored = Reference.take_stored(inputs)
        if not self._uses_own_loss(self.args):
            # TRL's own loss, untouched; its fused head's per-token log-probabilities also give the DFT weight
            # statistics, read from the call it makes anyway
            recording = _FusedOutputsRecorder(model)
            result = super().compute_loss(recording, inputs, return_outputs, num_items_in_batch)
            if recording.outputs is not None:
                log_probs, mask = recording.outputs.log_probs.detach(), recording.outputs.label_mask
                self._log_completion_metrics("train" if self.model.training else "eval", -log_probs[mask])
            return result
        return self._compute_anchored_loss(model, inputs, return_outputs, num_items_in_batch, stored)

    def _compute_anchored_loss(self, model, inputs, return_outputs, num_items_in_batch, stored=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        # Context/sequence parallelism passes labels already shifted
        shifted = "shift_labels" in inputs
        labels = inputs["shift_labels"] if shifted else inputs["labels"][:, 1:]
        mask = labels != -100
        anchored = self.args.anchored
        loss_kwargs = dict(
            kl_coef=self.current_kl_coef if anchored else 0.0,
            loss_type=self.args.loss_type,
            kl_direction=self.args.kl_direction,
            num_items_in_batch=num_items_in_batch,
            dft_weight_floor=self.args.dft_weight_floor,
            kl_estimator=self.args.kl_estimator,
        )
        # The precomputed reference: top-k rows (the exact KL) or one log-probability per token (an estimator)
        ref_topk = stored if isinstance(stored, reference_cache.TopKReference) else None
        ref_token_log_probs = stored if torch.is_tensor(stored) else None
        # The exact KL beside an estimate, in evaluation only (one more pass of both heads; none in training)
        measure_full_kl = anchored and mode == "eval" and self.args.kl_estimator != "full" and stored is None
        full_kl = None

        if stored is not None and len(stored) != int(mask.sum()):
            raise RuntimeError(
                f"The batch scores {int(mask.sum())} completion tokens but carries the precomputed reference of "
                f"{len(stored)}: the stored reference does not match these examples."
            )

        if self.use_fused_loss:
            ref_hidden = None
            if anchored and stored is None:
                ref_hidden = self.reference.forward(model, model_inputs, asft_hidden_states=True).last_hidden_state
                ref_hidden = ref_hidden if shifted else ref_hidden[:, :-1]
            fused_loss = lm_head.FusedHeadLoss(
                labels=labels,
                mask=mask,
                shifted=shifted,
                ref_hidden=ref_hidden,
                ref_lm=self.reference.causal_lm if self.reference is not None else None,
                ref_topk=ref_topk,
                ref_token_log_probs=ref_token_log_probs,
                chunk_size=self.args.loss_chunk_size,
                loss_kwargs=loss_kwargs,
                measure_full_kl=measure_full_kl,
            )
            outputs = model(**model_inputs, asft_loss_fn=fused_loss)
            loss, terms, full_kl = outputs.loss, fused_loss.terms, fused_loss.full_kl
            if return_outputs:  # the logits were never built; only `compute_metrics` users ask for them
                with torch.no_grad():
                    outputs = model(**model_inputs)
        else:
            outputs = model(**model_inputs)
            policy_logits = outputs.logits if shifted else outputs.logits[:, :-1]
            ref_logits = None
            if anchored and stored is None:
                ref_logits = self.reference.forward(model, model_inputs).logits
                ref_logits = (ref_logits if shifted else ref_logits[:, :-1])[mask]
            loss, terms = asft_loss(
                policy_logits[mask],
                labels[mask],
                ref_logits,
                ref_topk=ref_topk,
                ref_token_log_probs=ref_token_log_probs,
                **loss_kwargs,
            )
            if measure_full_kl:
                with torch.no_grad():
                    full_kl = asft_token_terms(
                        policy_logits[mask], labels[mask], ref_logits, kl_direction=self.args.kl_direction
                    ).kl
        # The step's normalisation (`asft_trl.trainer.normalization`); "weights" refuses the MoE auxiliary loss
        loss = self.step_normalization.normalize(mode, loss, terms.weight, num_items_in_batch, int(mask.sum()))
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        self._log_token_metrics(mode, terms, inputs, full_kl)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ DFT: weight normalisation, special tokens

    def _set_up_dft_options(self, args: ASFTConfig) -> None:
        """The step's normalisation, refusing what `dft_normalization="weights"` can't run under; and, for a DFT loss,
        the check before training of how strong the starting model's prior on the completions is and whether it can
        learn the special tokens they hold (`PreflightCheck`)."""
        refuse_weights_under_deepspeed(args.dft_normalization, self.is_deepspeed_enabled)
        if args.dft_normalization == "weights" and self.aux_loss_enabled:
            raise ValueError(
                "dft_normalization='weights' rescales the step's whole gradient, the MoE router's auxiliary loss "
                "included. Set dft_normalization='tokens', or switch the auxiliary loss off (router_aux_loss_coef)."
            )
        self.step_normalization = StepNormalization(args, self.accelerator, self.get_tp_size)
        self.preflight_report = None  # filled in by PreflightCheck when training starts
        if args.loss_type == "dft":
            self.add_callback(PreflightCheck(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        return self.step_normalization.after_backward(model, loss)

    # ------------------------------------------------------------------ metrics

    def _gathered_sums(self, *values: torch.Tensor) -> list[float]:
        local = torch.stack([v.detach().float().sum() for v in values])
        return self.accelerator.gather_for_metrics(local.unsqueeze(0)).sum(0).tolist()

    def _log_completion_metrics(self, mode: str, nll: torch.Tensor, **per_token: torch.Tensor) -> dict[str, float]:
        """Log the mean `nll`, the DFT weight statistics of p(y_t) = exp(-nll), and the mean of each `per_token` term;
        return the token count and the `per_token` sums, gathered across processes.

        The weights are logged for "nll" runs too, so SFT and DFT runs can be compared on the same scale.
        """
        prob = nll.float().neg().exp().clamp_min(self.args.dft_weight_floor)  # the weights as the loss used them
        count, nll_sum, w_sum, w_sq, *sums = self._gathered_sums(
            torch.ones_like(prob), nll, prob, prob**2, *per_token.values()
        )
        mean, ess = weight_stats(torch.tensor(w_sum), torch.tensor(w_sq), torch.tensor(count))
        metrics = self._metrics[mode]
        metrics["nll"].append(nll_sum / count if count else 0.0)
        metrics["dft_weight_mean"].append(mean)
        metrics["dft_weight_ess"].append(ess)
        for name, total in zip(per_token, sums):
            metrics[name].append(total / count if count else 0.0)
        return {"count": count, **dict(zip(per_token, sums))}

    def _log_token_metrics(self, mode: str, terms, inputs, full_kl: torch.Tensor | None = None) -> None:
        # `kl` is what the loss uses (the exact KL, or the estimate); `kl_full` the exact KL beside an estimate
        extra = {} if full_kl is None else {"kl_full": full_kl}
        sums = self._log_completion_metrics(
            mode, terms.nll, kl=terms.kl, entropy=terms.entropy, mean_token_accuracy=terms.is_top1, **extra
        )
        metrics = self._metrics[mode]
        if self.args.anchored:
            metrics["kl_coef"].append(self.current_kl_coef)
        if mode == "train":
            self._add_step_kl(sums["kl"], sums["count"])
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free: one row of packed tokens
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += (
                self.accelerator.gather_for_metrics(local.reshape(1)).sum().item() // self._tp_size
            )
        metrics["num_tokens"] = [self._total_train_tokens]

    # ------------------------------------------------------------------ lambda schedules and adaptive anchoring

    def _kl_controller_callback(self) -> AdaptiveKLCallback | None:
        """The callback that holds the adaptive controller (None without `kl_target`), looked up each time:
        transformers' own callback restore (`restore_callback_states_from_checkpoint`) replaces the instance."""
        if self.args.kl_target is None:
            return None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, AdaptiveKLCallback):
                return callback
        return None

    def _add_step_kl(self, kl_sum: float, count: float) -> None:
        """Give the controller one training micro-batch's KL, summed over the tokens of every process (so that every
        process computes the same lambda); it updates from the whole optimizer step's KL at the step's end."""
        callback = self._kl_controller_callback()
        if callback is not None:
            callback.add_kl(kl_sum, count)


def _as_asft_config(args) -> ASFTConfig:
    """An `ASFTConfig` from another `TrainingArguments` (an `SFTConfig`, say): every field they share keeps its value,
    and the ASFT fields get their defaults, which a warning names (an SFTConfig's `loss_type="nll"` with the default
    `kl_coef` trains SFT+KL, not ASFT)."""
    values = args.to_dict()
    for name in values:
        if name.endswith("_token"):  # `to_dict` replaces every `*_token` field (hub_token, eos_token, ...) by a mask
            values[name] = getattr(args, name)
    shared = {k: v for k, v in values.items() if k in ASFTConfig.__dataclass_fields__}
    converted = ASFTConfig(**shared)
    settings = ", ".join(
        f"{name}={getattr(converted, name)!r} ({'kept' if name in shared else 'default'})"
        for name in ("loss_type", "kl_coef", "kl_direction", "disable_dropout")
    )
    logger.warning(
        f"`args` is a {type(args).__name__}, converted to an ASFTConfig that trains {converted.method_name}: "
        f"{settings}; 'kept' comes from the {type(args).__name__}, 'default' is ASFTConfig's. The paper's ASFT is "
        "loss_type='dft' with kl_coef > 0 (SFTConfig's own default loss_type is 'nll'): pass an ASFTConfig to choose "
        "them."
    )
    return converted


class _FusedOutputsRecorder:
    """The model as `SFTTrainer.compute_loss` sees it, keeping the outputs of its fused-head call (fused_lm_head=True).

    Lives for one `compute_loss` call, so it holds the model and those outputs no longer than that.
    """

    def __init__(self, model):
        self.model = model
        self.outputs = None

    def __call__(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        if kwargs.get("fused_lm_head") and getattr(outputs, "log_probs", None) is not None:
            self.outputs = outputs
        return outputs

    def __getattr__(self, name):
        return getattr(self.model, name)

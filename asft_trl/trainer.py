"""`ASFTTrainer`: TRL's `SFTTrainer` with the ASFT loss and a frozen reference model, in the manner of TRL's DPO.

What this module adds to SFTTrainer, and nothing else:
- the reference model (built, checked, frozen and prepared for DeepSpeed/FSDP; or adapters switched off under PEFT);
- `compute_loss` for `kl_coef > 0` (or a DFT weight floor): by default the chunked, fused loss from both models'
  hidden states (`asft_trl.losses.fused`, reached through `asft_trl.lm_head`), else the plain one from full logits;
  with `kl_coef == 0` (and no floor) the loss is TRL's own, untouched;
- the ASFT metrics (`kl`, `nll`, `dft_weight_mean`, `dft_weight_ess`) through TRL's `_metrics` mechanism;
- early, explanatory errors for data TRL would fail on later (see `asft_trl.data.checks`).
"""

from __future__ import annotations

import logging
import textwrap
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from trl import SFTTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import disable_dropout_in_model, maybe_gather_lm_head_ctx

from . import lm_head
from . import reference as ref_utils
from .config import ASFTConfig
from .data.checks import check_dataset_format, report_dropped
from .losses import asft_loss, chunked_asft_loss, weight_stats

logger = logging.getLogger(__name__)


class ASFTTrainer(SFTTrainer):
    """Trainer for Anchored Supervised Fine-Tuning (ASFT).

    Takes everything [`~trl.SFTTrainer`] takes, plus `ref_model`, and an [`ASFTConfig`] as `args`.

    Args:
        model: the model to fine-tune, as a path/Hub id or a loaded model (a `PeftModel` included).
        ref_model: the anchor, as a model or a path/Hub id. Default: the starting model (a frozen copy for full
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
            name = model if isinstance(model, str) else ref_utils.get_config_model_id(model.config)
            args = ASFTConfig(f"{(name or 'model').split('/')[-1]}-ASFT")
        elif not isinstance(args, ASFTConfig):
            dict_args = args.to_dict()
            dict_args["hub_token"] = args.hub_token  # to_dict hides the hub_token
            args = ASFTConfig(**{k: v for k, v in dict_args.items() if k in ASFTConfig.__dataclass_fields__})
        if ref_model is not None and not isinstance(ref_model, str) and ref_model is model:
            raise ValueError(
                "`model` and `ref_model` are the same object, so the anchor would move with the policy. Omit "
                "`ref_model`: a frozen copy of the starting model (or, under PEFT, the adapters switched off) is used."
            )
        if ref_model is None and args.ref_model_name_or_path is not None:
            ref_model = args.ref_model_name_or_path
        # Filled in by `_prepare_dataset`, which SFTTrainer.__init__ calls
        self.dropped_examples: dict[str, int] = {}
        self._early_reference_check(model, ref_model, args)

        super().__init__(model, args, *pos_args, **kwargs)

        # The loss is normalised by `num_items_in_batch`, so the Trainer must count it for every model (it only does
        # for models whose forward takes **kwargs) and must not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._policy_lm = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._fused_capture = None
        lm_head.patch_forward(self._policy_lm, on_default_call=self._capture_fused_outputs)
        self._ref_lm = None  # the reference's own causal LM, when it is a separate model
        self.ref_model = self._build_reference(ref_model, args)
        if args.sync_ref_model and self.ref_model is not None:
            # TRL's own callback (TR-DPO): ref = alpha * policy + (1 - alpha) * ref every `ref_model_sync_steps` steps,
            # gathering ZeRO-3 partitions itself; it is given the prepared reference, as DPOTrainer does
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        self.use_fused_loss = self._fused_loss_applies(args)

    # ------------------------------------------------------------------ reference model

    def _early_reference_check(self, model, ref_model, args: ASFTConfig) -> None:
        """Catch a reference with another vocabulary before any data is tokenised, where that can be known early.

        When TRL will resize the policy (a cloned chat template) the sizes are only comparable after set-up, so the
        check is left to `_build_reference`.
        """
        if args.kl_coef == 0 or ref_model is None or args.chat_template_path is not None:
            return
        if isinstance(model, str):
            policy_vocab = ref_utils.reference_vocab_size_from_path(model, args.trust_remote_code)
        else:
            policy_vocab = ref_utils.output_vocab_size(model)
        if isinstance(ref_model, str):
            ref_vocab = ref_utils.reference_vocab_size_from_path(ref_model, args.trust_remote_code)
        else:
            ref_vocab = ref_utils.output_vocab_size(ref_model)
        ref_utils.check_same_vocabulary(policy_vocab, ref_vocab, repr(ref_model if isinstance(ref_model, str) else
                                                                   type(ref_model).__name__))

    def _build_reference(self, ref_model, args: ASFTConfig):
        """Return the reference model to keep, or None when the adapters-off policy (or nothing) is the reference."""
        policy = self.accelerator.unwrap_model(self.model)
        if args.disable_dropout:
            disable_dropout_in_model(policy)
        if args.kl_coef == 0:
            if ref_model is not None:
                logger.warning("kl_coef=0: the reference model given is not used (no KL term), and is not loaded.")
            return None
        if is_peft_model(policy):
            # Without a named reference the anchor is the policy's own base weights: nothing separate to lighten or
            # sync; and TRL's sync pairs the policy's parameters (adapters included) with the reference's
            ref_utils.refuse_options_without_separate_reference(
                args.ref_model_dtype if ref_model is None else None,
                args.ref_model_quantization if ref_model is None else None,
                args.sync_ref_model,
            )
        if ref_model is None and is_peft_model(policy):
            return None  # same network, adapters switched off in `_reference_logits`

        init_kwargs = dict(args.ref_model_init_kwargs or args.model_init_kwargs or {})
        init_kwargs = ref_utils.lighter_init_kwargs(
            init_kwargs, args.ref_model_dtype, args.ref_model_quantization, policy.dtype
        )
        distributed_type = str(args.distributed_state.distributed_type).split(".")[-1]
        if ref_model is None and args.ref_model_quantization is not None:
            # bitsandbytes quantises while loading, so the starting model is loaded again from the policy's path
            ref_model = ref_utils.policy_path_for_quantised_reference(policy)
        if isinstance(ref_model, str):
            name = repr(ref_model)
            ref_model = ref_utils.load_reference(
                ref_model, init_kwargs, distributed_type=distributed_type, trust_remote_code=args.trust_remote_code
            )
        elif ref_model is None:
            name = "(a copy of the starting model)"
            ref_model = ref_utils.default_reference(
                policy, init_kwargs, distributed_type=distributed_type, trust_remote_code=args.trust_remote_code
            )
            ref_model = ref_utils.cast_reference(ref_model, args.ref_model_dtype)
        else:
            name = type(ref_model).__name__
            if args.ref_model_quantization is not None and not ref_utils.is_quantised(ref_model):
                raise ValueError(
                    f"ref_model_quantization={args.ref_model_quantization!r} can't quantise the {name} passed as "
                    "`ref_model`: bitsandbytes quantises while loading. Pass the reference's path instead (`ref_model` "
                    "or `ref_model_name_or_path`), or load it yourself with a `BitsAndBytesConfig`."
                )
            ref_model = ref_utils.cast_reference(ref_model, args.ref_model_dtype)
        ref_utils.check_same_vocabulary(ref_utils.output_vocab_size(policy), ref_utils.output_vocab_size(ref_model), name)
        if args.sync_ref_model:
            ref_utils.check_syncable(policy, ref_model, name)
        ref_utils.freeze(ref_model, disable_dropout=True)
        lm_head.patch_forward(ref_model)
        self._ref_lm = ref_model

        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    @staticmethod
    def _uses_own_loss(args: ASFTConfig) -> bool:
        """Whether the loss is this package's rather than TRL's own SFT/DFT loss: with an anchor, or a weight floor."""
        return args.kl_coef > 0 or args.dft_weight_floor > 0

    @property
    def current_kl_coef(self) -> float:
        """lambda for the current optimisation step."""
        return self.args.kl_coef

    def _fused_loss_applies(self, args: ASFTConfig) -> bool:
        """Whether the fused loss runs; where it can't, say why once and use the plain loss."""
        if not args.use_fused_loss or not self._uses_own_loss(args):
            return False
        problem = lm_head.fused_head_problem(self._policy_lm)
        if problem is None and self._ref_lm is not None:
            problem = lm_head.fused_head_problem(self._ref_lm)
        if problem is None and self.aux_loss_enabled:
            problem = "the MoE router's auxiliary loss is enabled"
        if problem is None and self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
            problem = "FSDP1 keeps the head's parameters flattened outside the forward (FSDP2 is supported)"
        if problem is not None:
            logger.warning(f"The fused ASFT loss is not used because {problem}; the plain loss builds full logits.")
            return False
        return True

    def _run_reference(self, model, model_inputs: dict[str, Any], **kwargs):
        """The anchor's forward on exactly the policy's inputs (same positions, same packing information)."""
        with torch.no_grad():
            if self.ref_model is not None:
                return self.ref_model(**model_inputs, **kwargs)
            peft_model = self.accelerator.unwrap_model(model)
            with ref_utils.adapters_disabled(peft_model, deterministic=not self.args.disable_dropout):
                return model(**model_inputs, **kwargs)

    # ------------------------------------------------------------------ data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        check_dataset_format(dataset, args.dataset_text_field, formatting_func is not None, dataset_name)
        n_before = len(dataset) if isinstance(dataset, Dataset) and not packing else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        self.dropped_examples[dataset_name] = report_dropped(n_before, prepared, dataset_name, args.max_length)
        return prepared

    # ------------------------------------------------------------------ loss

    def _capture_fused_outputs(self, kwargs: dict, outputs) -> None:
        """Keep the per-token log-probabilities of TRL's fused LM head, so that the `kl_coef == 0` path (TRL's own
        loss, untouched) still logs the DFT weight statistics without any extra computation."""
        if kwargs.get("fused_lm_head") and getattr(outputs, "log_probs", None) is not None:
            self._fused_capture = (outputs.log_probs.detach(), outputs.label_mask)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._uses_own_loss(self.args):
            self._fused_capture = None
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self._fused_capture is not None:
                log_probs, mask = self._fused_capture
                self._log_completion_metrics("train" if self.model.training else "eval", -log_probs[mask])
                self._fused_capture = None
            return result
        return self._compute_anchored_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_anchored_loss(self, model, inputs, return_outputs, num_items_in_batch):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        # Context/sequence parallelism passes labels already shifted
        shifted = "shift_labels" in inputs
        labels = inputs["shift_labels"] if shifted else inputs["labels"][:, 1:]
        mask = labels != -100
        anchored = self.args.kl_coef > 0
        loss_kwargs = dict(
            kl_coef=self.current_kl_coef if anchored else 0.0,
            loss_type=self.args.loss_type,
            kl_direction=self.args.kl_direction,
            num_items_in_batch=num_items_in_batch,
            dft_weight_floor=self.args.dft_weight_floor,
        )

        if self.use_fused_loss:
            ref_hidden = None
            if anchored:
                ref_hidden = self._run_reference(model, model_inputs, asft_hidden_states=True).last_hidden_state
                ref_hidden = ref_hidden if shifted else ref_hidden[:, :-1]
            result = {}

            def fused_loss(policy_lm, backbone_outputs):
                hidden = backbone_outputs.last_hidden_state
                hidden = hidden if shifted else hidden[:, :-1]
                weight, bias = lm_head.head_parameters(policy_lm)
                # With the model split across devices (`device_map`) the backbone can end where the head is not
                on_head = mask.to(weight.device)
                # Under PEFT the anchor is the same network with adapters off, so its head is the policy's own
                ref_weight, ref_bias = (weight, bias) if self._ref_lm is None else lm_head.head_parameters(self._ref_lm)
                if not anchored:
                    ref_weight = ref_bias = None
                heads = {id(t): t for t in (weight, bias, ref_weight, ref_bias) if t is not None}
                with maybe_gather_lm_head_ctx(*heads.values()):
                    result["loss"], result["terms"] = chunked_asft_loss(
                        hidden.to(weight.device)[on_head],
                        weight,
                        labels.to(weight.device)[on_head],
                        None if ref_hidden is None else ref_hidden.to(weight.device)[on_head],
                        ref_weight,
                        bias=bias,
                        ref_bias=ref_bias,
                        head=lm_head.head_transform(policy_lm.config),
                        # None: the same head (and transform) as the policy's
                        ref_head=None if self._ref_lm is None else lm_head.head_transform(self._ref_lm.config),
                        chunk_size=self.args.loss_chunk_size,
                        **loss_kwargs,
                    )
                return CausalLMOutputWithPast(loss=result["loss"])

            outputs = model(**model_inputs, asft_loss_fn=fused_loss)
            loss, terms = outputs.loss, result["terms"]
            if return_outputs:  # the logits were never built; only `compute_metrics` users ask for them
                with torch.no_grad():
                    outputs = model(**model_inputs)
        else:
            outputs = model(**model_inputs)
            policy_logits = outputs.logits if shifted else outputs.logits[:, :-1]
            ref_logits = None
            if anchored:
                ref_logits = self._run_reference(model, model_inputs).logits
                ref_logits = (ref_logits if shifted else ref_logits[:, :-1])[mask]
            loss, terms = asft_loss(policy_logits[mask], labels[mask], ref_logits, **loss_kwargs)
        # Like TRL: `num_items_in_batch` counts the tokens of every process, and DDP averages gradients across them
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        self._log_token_metrics(mode, terms, inputs)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ metrics

    def _gathered_sums(self, *values: torch.Tensor) -> list[float]:
        local = torch.stack([v.detach().float().sum() for v in values])
        return self.accelerator.gather_for_metrics(local.unsqueeze(0)).sum(0).tolist()

    def _log_completion_metrics(self, mode: str, nll: torch.Tensor, **per_token: torch.Tensor) -> None:
        """Log the mean `nll`, the DFT weight statistics of p(y_t) = exp(-nll), and the mean of each `per_token` term.

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

    def _log_token_metrics(self, mode: str, terms, inputs) -> None:
        self._log_completion_metrics(
            mode, terms.nll, kl=terms.kl, entropy=terms.entropy, mean_token_accuracy=terms.is_top1
        )
        metrics = self._metrics[mode]
        if self.args.kl_coef > 0:
            metrics["kl_coef"].append(self.current_kl_coef)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free: one row of packed tokens
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local.reshape(1)).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

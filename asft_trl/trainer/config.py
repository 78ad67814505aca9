"""`ASFTConfig`: TRL's `SFTConfig` plus the anchor (reference model and KL term) of Anchored Supervised Fine-Tuning.

Every field is documented once, in the class docstring (TRL's format); its `metadata["help"]`, which `--help` prints,
is filled from there when this module is imported (`parameter_docs`), so the two cannot drift apart. All validation
happens in `__post_init__`, before any model or data is loaded.
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch
from trl import SFTConfig

from ..losses import KL_DIRECTIONS, KL_ESTIMATORS, LOSS_TYPES
from ..reference.loading import REF_MODEL_DTYPES, REF_MODEL_QUANTIZATIONS
from .kl_control import KL_COEF_SCHEDULES, parse_milestones
from .normalization import DFT_NORMALIZATIONS, refuse_weights_under_deepspeed


def _accelerator_available() -> bool:
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def _bf16_accelerator_available() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _check_choice(name: str, value, choices, fix: str) -> None:
    """Refuse a value outside `choices`: the message names the field and the value, and `fix` says what to use."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported. {fix}")


def method_name(loss_type: str, kl_coef: float) -> str:
    """The paper's name for a combination of the two switches: SFT, DFT, SFT+KL or ASFT."""
    if kl_coef == 0:
        return "DFT" if loss_type == "dft" else "SFT"
    return "ASFT" if loss_type == "dft" else "SFT+KL"


@dataclass
class ASFTConfig(SFTConfig):
    r"""
    Configuration class for the [`ASFTTrainer`].

    ASFT = DFT's probability-weighted SFT loss + `kl_coef` x KL to the frozen starting model. The paper's four methods
    are two switches of this config: SFT (`loss_type="nll"`, `kl_coef=0`), DFT (`"dft"`, `0`), SFT+KL (`"nll"`, `>0`)
    and ASFT (`"dft"`, `>0`, the default). Every field of [`~trl.SFTConfig`] applies unchanged, except
    `use_liger_kernel`, which is refused with the ASFT loss (Liger's loss is SFT's, and its kernels would reach the
    policy but not the reference); three defaults differ, documented at the end.

    Parameters:
        > Parameters that control the ASFT objective

        kl_coef (`float`, *optional*, defaults to `0.05`):
            Weight lambda of the KL anchor. `0.05` is the paper's main-table value; the authors' code defaults to
            `0.1`. With `0`, no reference model is built and the loss is TRL's own SFT/DFT loss.
        kl_direction (`str`, *optional*, defaults to `"forward"`):
            `"forward"` computes KL(reference || policy) over the full vocabulary, as every public ASFT
            implementation does; `"reverse"` computes KL(policy || reference), the paper's ablation.
        loss_type (`str`, *optional*, defaults to `"dft"`):
            Task term: `"dft"` weights each token's NLL by its detached probability (DFT), `"nll"` is plain SFT.

        > Parameters that schedule or adapt lambda (all off by default: lambda stays `kl_coef`, the paper's method)

        kl_coef_schedule (`str`, *optional*, defaults to `"constant"`):
            How lambda moves with the optimizer step: `"constant"` (`kl_coef` throughout, the paper's),
            `"constant_with_warmup"` (linear from 0 to `kl_coef` over `kl_coef_warmup_steps`, then constant),
            `"cosine"` (half a cosine from `kl_coef` to `kl_coef_final` over the run, after an optional warm-up) or
            `"by_step"` (piecewise constant, `kl_coef_milestones`). Needs `kl_coef > 0`: `kl_coef` is the peak/start.
        kl_coef_warmup_steps (`float`, *optional*, defaults to `0`):
            Warm-up of `"constant_with_warmup"` and `"cosine"`: a number of optimizer steps, or a ratio of the run's
            steps when below 1 (as `warmup_steps`). The KL is still measured and logged while lambda is small.
        kl_coef_final (`float`, *optional*, defaults to `0.0`):
            Lambda at the end of a `"cosine"` schedule. Above `kl_coef` it makes the anchor tighten over the run.
        kl_coef_milestones (`dict[int, float]` or `str`, *optional*):
            For `"by_step"`: {step: lambda}; lambda is `kl_coef` until the first milestone and becomes `v` once `s`
            optimizer steps have been taken. A mapping in YAML, a JSON object on the command line
            (`'{"100": 0.02}'`).
        kl_target (`float`, *optional*):
            Adaptive anchoring: after every optimizer step, lambda is moved (starting from `kl_coef`) to hold the
            measured per-token KL in nats (the logged `kl`) near this target, in the manner of the adaptive KL
            controller of RLHF (Ziegler et al., 2019). Unset: no controller. Not combinable with a schedule.
        kl_horizon (`float`, *optional*, defaults to `10`):
            Horizon of the controller in optimizer steps: lambda <- lambda x (1 + clip(kl/kl_target - 1) / kl_horizon).
            A KL off target moves lambda by at most a factor exp(kl_error_clip) every `kl_horizon` steps: with the
            defaults about 1.2x per 10 steps, 7x per 100, so it matters in a run of tens of steps and settles within a
            few hundred, while one noisy batch moves lambda by a factor of at most 1.02.
        kl_error_clip (`float`, *optional*, defaults to `0.2`):
            Clip of the controller's proportional error kl/kl_target - 1 (0.2 as in Ziegler et al. and TRL's old
            controller), so that one outlying batch cannot move lambda far. In (0, 1).

        > Parameters of the task term and of how the loss is computed

        dft_weight_floor (`float`, *optional*, defaults to `0.0`):
            Floor of the DFT weight: each token's NLL is weighted by max(p(y_t), floor) instead of p(y_t), the known fix
            for DFT not learning tokens the model finds very unlikely (long or unfamiliar completions). `0` is the
            paper's DFT/ASFT. Only for `loss_type="dft"`.

        use_fused_loss (`bool`, *optional*, defaults to `True`):
            Compute the ASFT loss from hidden states in chunks, never building the [tokens x vocabulary] logits of the
            policy or the reference (`asft_trl.losses.fused`). `False` uses the plain implementation, which builds
            both models' full logits. Used whenever the loss is this package's: `kl_coef > 0`, a `dft_weight_floor`,
            or `dft_normalization="weights"`; without any of those the loss is TRL's own. Where the fused loss can't
            run it falls back to the plain one with a warning: an LM head that is not a plain linear layer (adapted or
            trained by PEFT, or quantised), in the policy or a separate reference; the MoE router's auxiliary loss;
            FSDP1.
        loss_chunk_size (`int`, *optional*):
            Completion tokens per chunk of the fused loss. Its extra memory is a few [chunk x vocabulary] float32
            buffers. Default: as many tokens as fit 16M (CPU) or 64M (GPU) logits per buffer.

        > Parameters that control the reference model

        ref_model_name_or_path (`str`, *optional*):
            Path or Hub id of the reference model. By default the reference is the starting model itself: a frozen
            copy for full fine-tuning, the same network with its adapters switched off under PEFT.
        ref_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the reference is loaded from a path.
            Defaults to the policy's `model_init_kwargs`.
        ref_model_dtype (`str`, *optional*):
            Keep a reference model in this dtype (`"float32"`, `"bfloat16"` or `"float16"`) instead of the policy's:
            the default frozen copy is cast, a reference loaded from a path is loaded in it. A bfloat16 reference halves
            the memory of a float32 one. Unset: the reference has the policy's (or `ref_model_init_kwargs`') dtype.
            Needs a separate reference model (full fine-tuning, or a named reference) and `kl_coef > 0`.
        ref_model_quantization (`str`, *optional*):
            Load the reference quantised with bitsandbytes: `"8bit"` (LLM.int8) or `"4bit"` (NF4, computing in
            `ref_model_dtype` or the policy's dtype). The LM head stays unquantised. The reference is loaded from
            `ref_model_name_or_path` or, by default, from the policy's own path. Needs a separate reference model and
            `kl_coef > 0`, and can't be combined with `sync_ref_model`.
        sync_ref_model (`bool`, *optional*, defaults to `False`):
            Move the anchor slowly towards the policy: every `ref_model_sync_steps` optimizer steps the reference
            becomes `ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference`, through TRL's
            `SyncRefModelCallback` (as `DPOConfig.sync_ref_model`, from TR-DPO). Off: the paper's fixed anchor. Needs
            full fine-tuning, an unquantised reference and `kl_coef > 0`.
        ref_model_mixup_alpha (`float`, *optional*, defaults to `0.6`):
            Weight of the policy when the reference is synced (TR-DPO's alpha, as in `DPOConfig`). Only used with
            `sync_ref_model=True`.
        ref_model_sync_steps (`int`, *optional*, defaults to `512`):
            Optimizer steps between two syncs of the reference (TR-DPO's tau, as in `DPOConfig`). Only used with
            `sync_ref_model=True`.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `False`):
            Run the reference once over the datasets before training and store, per completion token, its
            `precompute_ref_topk` most likely tokens with their log-probabilities and the mass of the rest; training
            then keeps no reference model in memory and runs no reference forward. The KL is then taken against the
            top-k plus one tail bucket, a lower bound of the exact KL. With a per-token `kl_estimator`, one
            log-probability per token (the target's) is stored instead. Needs `kl_coef > 0`; not under ZeRO-3.
        precompute_ref_topk (`int`, *optional*, defaults to `64`):
            Reference tokens stored per completion token (k). Disk: 8 k + 4 bytes per completion token.
        precompute_ref_batch_size (`int`, *optional*):
            Batch size of the precomputing pass. Defaults to `per_device_train_batch_size`.
        precompute_ref_cache_dir (`str`, *optional*):
            Folder of the precomputed reference's files, named by a fingerprint of the data, the reference's weights
            and k, so later runs on the same data and reference reuse them. Defaults to `<output_dir>/reference_cache`.
        bf16 (`bool`, *optional*):
            As in TRL (on by default), except that it defaults to `False` where no bf16-capable GPU is present, so a
            CPU-only run works without extra flags.
        activation_checkpointing (`bool`, *optional*, defaults to `True`):
            As in TRL (on by default). `gradient_checkpointing`, transformers' deprecated name for it, is unset by
            default, so that a config which does not use the old name raises no deprecation warning; setting it still
            works, with transformers' warning.
        gradient_checkpointing (`bool`, *optional*):
            transformers' deprecated name for `activation_checkpointing`; unset by default. Set, it must agree with
            `activation_checkpointing`.
        dataloader_pin_memory (`bool`, *optional*, defaults to `True`):
            As in transformers, except that it is switched off where no accelerator is present: pinned memory then
            serves nothing, and PyTorch warns about it on every run.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Switch dropout off in the policy and the reference, so that the KL measures the change of the weights and
            not dropout noise (it is then exactly 0 before the first update).

        > Parameters beyond the paper's loss (off by default: the exact KL, normalised by the token count)

        kl_estimator (`str`, *optional*, defaults to `"full"`):
            `"full"` is the exact KL over the vocabulary (the paper's). `"k1"`, `"k2"`, `"k3"` are Schulman's per-token
            estimates from the target token alone (as NeMo-RL's ASFT; k3 there): with u = log p(y) - log p_ref(y) for
            `kl_direction="forward"` (minus that for `"reverse"`), k1 = -u, k2 = u^2/2, k3 = e^u - 1 - u, u clamped to
            +-20 and the estimate to +-10 nats. They need the reference's log-probability of the target only (no
            reference softmax; with `precompute_ref_log_probs`, one float per token on disk), but on demonstration data
            they estimate a different quantity than the KL and lambda does not carry over (docs/method.md). The logged
            `kl` is the estimate; evaluation also logs the exact KL as `kl_full`. Needs `kl_coef > 0`; k2 is the same
            in both directions, so it takes `kl_direction="forward"` only.
        dft_normalization (`str`, *optional*, defaults to `"tokens"`):
            What the loss of an optimizer step is divided by: `"tokens"`, the number of completion tokens of the whole
            step (the paper's, and TRL's `num_items_in_batch`); `"weights"`, the sum of the DFT weights of the whole
            step over all accumulation micro-batches and processes, which puts DFT's loss and gradient on
            cross-entropy's scale (DFT's is 10-20x smaller). Both terms (task and KL) are divided by it, so the balance
            that lambda sets is the default's; the step's gradients are rescaled once, before clipping. Only for
            `loss_type="dft"`; not under DeepSpeed (which clips inside its own step).
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["ref_model_init_kwargs"]

    # TRL sets the deprecated name to True, which makes transformers warn on every config; the new name carries the
    # same default (resolved in `__post_init__`)
    gradient_checkpointing: bool | None = None

    kl_coef: float = 0.05
    kl_direction: str = field(default="forward", metadata={"choices": list(KL_DIRECTIONS)})
    kl_coef_schedule: str = field(default="constant", metadata={"choices": list(KL_COEF_SCHEDULES)})
    kl_coef_warmup_steps: float = 0
    kl_coef_final: float = 0.0
    kl_coef_milestones: dict[int, float] | str | None = None
    kl_target: float | None = None
    kl_horizon: float = 10.0
    kl_error_clip: float = 0.2
    loss_type: str = field(default="dft", metadata={"choices": list(LOSS_TYPES)})
    dft_weight_floor: float = 0.0
    use_fused_loss: bool = True
    loss_chunk_size: int | None = None
    ref_model_name_or_path: str | None = None
    ref_model_init_kwargs: dict[str, Any] | str | None = None
    ref_model_dtype: str | None = field(default=None, metadata={"choices": list(REF_MODEL_DTYPES)})
    ref_model_quantization: str | None = field(default=None, metadata={"choices": list(REF_MODEL_QUANTIZATIONS)})
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    disable_dropout: bool = True

    precompute_ref_log_probs: bool = False
    precompute_ref_topk: int = 64
    precompute_ref_batch_size: int | None = None
    precompute_ref_cache_dir: str | None = None

    kl_estimator: str = field(default="full", metadata={"choices": list(KL_ESTIMATORS)})
    dft_normalization: str = field(default="tokens", metadata={"choices": list(DFT_NORMALIZATIONS)})

    def __post_init__(self):
        # Checked before SFTConfig's own post-init, so that a bad ASFT field fails before anything else is set up. One
        # method per concern, in this order: the first problem found is the one reported
        self._check_objective()
        self._check_kl_coef_control()
        self._check_task_loss()
        self._check_reference_model()
        self._check_precomputed_reference()
        self._check_liger()
        self._check_estimator_and_normalization()
        self._set_machine_defaults()
        super().__post_init__()
        if self.ref_model_init_kwargs is not None and not isinstance(self.ref_model_init_kwargs, dict):
            raise ValueError(
                f"ref_model_init_kwargs={self.ref_model_init_kwargs!r} must be a dict (or a JSON object string)."
            )

    def _check_objective(self) -> None:
        """`kl_coef` (a number >= 0; YAML may give a string) and `kl_direction`."""
        if isinstance(self.kl_coef, str):
            try:
                self.kl_coef = float(self.kl_coef)
            except ValueError:
                raise ValueError(
                    f"kl_coef={self.kl_coef!r} is not a number. Set kl_coef to a float >= 0, e.g. 0.05."
                ) from None
        if not math.isfinite(self.kl_coef) or self.kl_coef < 0:
            raise ValueError(
                f"kl_coef={self.kl_coef} is invalid: it must be a finite number >= 0. Use 0 for no anchor (SFT/DFT), "
                "or the paper's 0.05 (0.1 in the authors' code)."
            )
        _check_choice(
            "kl_direction",
            self.kl_direction,
            KL_DIRECTIONS,
            "Use 'forward' for KL(reference || policy) (the default) or 'reverse' for KL(policy || reference).",
        )

    def _check_kl_coef_control(self) -> None:
        """lambda schedules and adaptive anchoring: known names, numbers where numbers go, all need an anchor, and at
        most one of them drives lambda."""
        _check_choice(
            "kl_coef_schedule",
            self.kl_coef_schedule,
            KL_COEF_SCHEDULES,
            f"Use one of {', '.join(repr(n) for n in KL_COEF_SCHEDULES)}.",
        )
        for name in ("kl_coef_warmup_steps", "kl_coef_final", "kl_horizon", "kl_error_clip") + (
            ("kl_target",) if self.kl_target is not None else ()
        ):
            try:
                setattr(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a number.") from None
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number.")
        scheduled = self.kl_coef_schedule != "constant"
        if (scheduled or self.kl_target is not None) and not self.anchored:
            what = f"kl_coef_schedule={self.kl_coef_schedule!r}" if scheduled else f"kl_target={self.kl_target}"
            raise ValueError(
                f"{what} needs an anchor, but kl_coef=0 builds no reference model. Set kl_coef > 0 (the schedule's "
                "peak, or the controller's starting lambda), e.g. 0.05."
            )
        if scheduled and self.kl_target is not None:
            raise ValueError(
                f"kl_coef_schedule={self.kl_coef_schedule!r} and kl_target={self.kl_target} both set lambda. Use one: "
                "unset kl_target for a schedule, or set kl_coef_schedule to 'constant' for the adaptive controller."
            )
        warmup = self.kl_coef_warmup_steps
        if warmup < 0 or (warmup >= 1 and warmup != int(warmup)):
            raise ValueError(
                f"kl_coef_warmup_steps={warmup} is invalid: give a whole number of optimizer steps, or a ratio of the "
                "run's steps in (0, 1)."
            )
        if warmup > 0 and self.kl_coef_schedule not in ("constant_with_warmup", "cosine"):
            raise ValueError(
                f"kl_coef_warmup_steps={warmup} only applies to kl_coef_schedule 'constant_with_warmup' or 'cosine' "
                f"(it is {self.kl_coef_schedule!r}). Set one of those, or kl_coef_warmup_steps to 0."
            )
        if self.kl_coef_schedule == "constant_with_warmup" and warmup == 0:
            raise ValueError(
                "kl_coef_schedule='constant_with_warmup' needs kl_coef_warmup_steps > 0 (steps, or a ratio < 1), "
                "e.g. 0.1; with no warm-up use 'constant'."
            )
        if self.kl_coef_final < 0:
            raise ValueError(f"kl_coef_final={self.kl_coef_final} must be >= 0 (lambda at the end of 'cosine').")
        if self.kl_coef_final != 0 and self.kl_coef_schedule != "cosine":
            raise ValueError(
                f"kl_coef_final={self.kl_coef_final} only applies to kl_coef_schedule='cosine' (it is "
                f"{self.kl_coef_schedule!r}). Set the schedule to 'cosine', or leave kl_coef_final at 0."
            )
        if isinstance(self.kl_coef_milestones, str) and self.kl_coef_milestones.strip().lower() in (
            "",
            "none",
            "null",
        ):
            self.kl_coef_milestones = None  # unset from the command line, over a recipe's milestones
        if self.kl_coef_milestones is not None:
            if self.kl_coef_schedule != "by_step":
                raise ValueError(
                    f"kl_coef_milestones is set but kl_coef_schedule={self.kl_coef_schedule!r}. Set kl_coef_schedule "
                    "to 'by_step' to use them, or remove kl_coef_milestones."
                )
            self.kl_coef_milestones = parse_milestones(self.kl_coef_milestones)
        elif self.kl_coef_schedule == "by_step":
            raise ValueError(
                "kl_coef_schedule='by_step' needs kl_coef_milestones: {step: lambda}, e.g. "
                "--kl_coef_milestones '{\"100\": 0.02}' or a mapping in YAML."
            )
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(
                f"kl_target={self.kl_target} must be > 0: the per-token KL in nats to hold (compare the logged kl of a "
                "constant-lambda run), or unset for no controller."
            )
        if self.kl_horizon < 1:
            raise ValueError(f"kl_horizon={self.kl_horizon} must be >= 1 optimizer step (default 10).")
        if not 0 < self.kl_error_clip < 1:
            raise ValueError(
                f"kl_error_clip={self.kl_error_clip} must be in (0, 1) so that lambda stays positive (default 0.2)."
            )

    def _check_task_loss(self) -> None:
        """`loss_type`, `dft_weight_floor` and the fused loss's `loss_chunk_size`."""
        if self.loss_type != "chunked_nll":  # TRL's deprecated alias, renamed by SFTConfig's own post-init
            _check_choice(
                "loss_type", self.loss_type, LOSS_TYPES, "Use 'dft' (DFT/ASFT, the default) or 'nll' (SFT / SFT+KL)."
            )
        if not 0 <= self.dft_weight_floor < 1:
            raise ValueError(
                f"dft_weight_floor={self.dft_weight_floor} is invalid: it must be in [0, 1). Use 0 (the default) for the "
                "paper's DFT weight p(y_t), or a small floor such as 0.1."
            )
        if self.dft_weight_floor > 0 and self.loss_type != "dft":
            raise ValueError(
                f"dft_weight_floor={self.dft_weight_floor} only applies to loss_type='dft' (loss_type={self.loss_type!r} "
                "weights every token by 1). Set dft_weight_floor to 0, or loss_type to 'dft'."
            )
        if self.loss_chunk_size is not None and int(self.loss_chunk_size) < 1:
            raise ValueError(
                f"loss_chunk_size={self.loss_chunk_size} is invalid: it must be a positive number of tokens, or unset "
                "for the automatic size."
            )

    def _check_reference_model(self) -> None:
        """The reference's dtype, quantisation and syncing: known values, and only where a separate reference exists."""
        if self.ref_model_dtype is not None:
            _check_choice(
                "ref_model_dtype",
                self.ref_model_dtype,
                REF_MODEL_DTYPES,
                f"Use one of {list(REF_MODEL_DTYPES)}, or leave it unset for the policy's dtype.",
            )
        if self.ref_model_quantization is not None:
            _check_choice(
                "ref_model_quantization",
                self.ref_model_quantization,
                REF_MODEL_QUANTIZATIONS,
                "Use '8bit' or '4bit' (bitsandbytes), or leave it unset for an unquantised reference.",
            )
        lighter = {
            k: v
            for k, v in (
                ("ref_model_dtype", self.ref_model_dtype),
                ("ref_model_quantization", self.ref_model_quantization),
                ("sync_ref_model", self.sync_ref_model or None),
            )
            if v is not None
        }
        if lighter and not self.anchored:
            name, value = next(iter(lighter.items()))
            raise ValueError(
                f"{name}={value!r} applies to the reference model, but kl_coef=0 builds none (no KL term). Set kl_coef "
                f"> 0 (e.g. 0.05), or unset {name}."
            )
        if self.sync_ref_model and self.ref_model_quantization is not None:
            raise ValueError(
                f"sync_ref_model=True can't update a quantised reference (ref_model_quantization="
                f"{self.ref_model_quantization!r}): its weights are bitsandbytes' integers. Unset one of the two; for a "
                "lighter synced reference use ref_model_dtype='bfloat16'."
            )
        if not 0 < self.ref_model_mixup_alpha <= 1:
            raise ValueError(
                f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} is invalid: it must be in (0, 1] (the policy's "
                "weight in each sync). TR-DPO and TRL use 0.6."
            )
        if int(self.ref_model_sync_steps) < 1:
            raise ValueError(
                f"ref_model_sync_steps={self.ref_model_sync_steps} is invalid: it must be a positive number of "
                "optimizer steps between syncs (TRL's default is 512)."
            )

    def _check_precomputed_reference(self) -> None:
        """`precompute_ref_*`: an anchor to precompute, sizes >= 1, and no option that needs a reference model kept."""
        if not self.precompute_ref_log_probs:
            return
        if not self.anchored:
            raise ValueError(
                "precompute_ref_log_probs=True needs a KL anchor, but kl_coef=0 (no reference is used). Set "
                "kl_coef > 0, or precompute_ref_log_probs to False."
            )
        if int(self.precompute_ref_topk) < 1:
            raise ValueError(
                f"precompute_ref_topk={self.precompute_ref_topk} is invalid: it must be >= 1 (e.g. 64); larger k "
                "makes the KL closer to the exact one."
            )
        if self.precompute_ref_batch_size is not None and int(self.precompute_ref_batch_size) < 1:
            raise ValueError(
                f"precompute_ref_batch_size={self.precompute_ref_batch_size} must be >= 1, or unset to use "
                "per_device_train_batch_size."
            )
        for name in ("sync_ref_model", "ref_model_dtype", "ref_model_quantization"):
            if getattr(self, name) not in (None, False):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} does not go with precompute_ref_log_probs=True: no reference "
                    "model is kept during training (to sync, cast or quantise). Unset one of the two."
                )

    def _check_liger(self) -> None:
        """Liger's kernels only with TRL's own loss."""
        if self.use_liger_kernel and (self.anchored or self.dft_weight_floor > 0):
            raise ValueError(
                "use_liger_kernel=True does not go with the ASFT loss (kl_coef > 0 or a dft_weight_floor): Liger's "
                "fused linear cross-entropy, the part that saves memory, computes SFT's loss, not this one (TRL "
                "switches it off anyway), and its layer kernels are applied to the policy only when training starts, "
                "after the reference was copied, so the reference would run other kernels than the policy and the KL "
                "would not start at 0. The ASFT loss is already chunked (use_fused_loss: no [tokens x vocabulary] "
                "logits). Fix: unset use_liger_kernel (TRL deprecates it for Hub kernels, "
                "model_init_kwargs={'use_kernels': True}), or kl_coef=0 for TRL's own SFT/DFT loss with Liger."
            )

    def _set_machine_defaults(self) -> None:
        """Defaults that depend on the machine (bf16, pinned memory) and transformers' two checkpointing names."""
        if self.bf16 is None and not self.fp16 and not _bf16_accelerator_available():
            # TRL turns bf16 on by default, which stops a CPU-only run before it starts; keep it on where it works
            self.bf16 = False
        if None not in (self.activation_checkpointing, self.gradient_checkpointing) and (
            bool(self.activation_checkpointing) != bool(self.gradient_checkpointing)
        ):
            # transformers would silently ignore the old name: `--gradient_checkpointing false` over a recipe's
            # `activation_checkpointing: true` would change nothing
            raise ValueError(
                f"gradient_checkpointing={self.gradient_checkpointing} and activation_checkpointing="
                f"{self.activation_checkpointing} disagree; gradient_checkpointing is transformers' deprecated name "
                "for activation_checkpointing. Fix: set activation_checkpointing only."
            )
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under the name transformers keeps
        if self.dataloader_pin_memory and not _accelerator_available():
            self.dataloader_pin_memory = False  # nothing to pin for; PyTorch would warn on every run

    def _check_estimator_and_normalization(self) -> None:
        """`kl_estimator` and `dft_normalization`: known values, and only in combinations that mean something."""
        _check_choice(
            "kl_estimator",
            self.kl_estimator,
            KL_ESTIMATORS,
            "Use 'full' (the exact KL, the default) or a per-token estimator 'k1', 'k2' or 'k3'.",
        )
        if self.kl_estimator != "full":
            if not self.anchored:
                raise ValueError(
                    f"kl_estimator={self.kl_estimator!r} estimates the KL anchor, but kl_coef=0 has none. Set kl_coef > "
                    "0 (lambda does not carry over from the exact KL: docs/method.md), or leave kl_estimator at 'full'."
                )
            if self.kl_estimator == "k2" and self.kl_direction != "forward":
                raise ValueError(
                    f"kl_estimator='k2' with kl_direction={self.kl_direction!r}: k2 = (log p(y) - log p_ref(y))^2 / 2 "
                    "is the same for both directions, so the direction means nothing. Leave kl_direction at 'forward'."
                )
            default_topk = type(self).__dataclass_fields__["precompute_ref_topk"].default
            if self.precompute_ref_log_probs and int(self.precompute_ref_topk) != default_topk:
                raise ValueError(
                    f"precompute_ref_topk={self.precompute_ref_topk} does not apply with kl_estimator="
                    f"{self.kl_estimator!r}: the precomputed reference then stores one log-probability per token (the "
                    "target's), not a top-k. Remove precompute_ref_topk, or set kl_estimator to 'full'."
                )
        _check_choice(
            "dft_normalization",
            self.dft_normalization,
            DFT_NORMALIZATIONS,
            "Use 'tokens' (the default: divide by the step's completion tokens) or 'weights' (by the step's sum of DFT "
            "weights).",
        )
        if self.dft_normalization == "weights":
            if self.loss_type != "dft":
                raise ValueError(
                    f"dft_normalization='weights' divides by the sum of the DFT weights, but loss_type="
                    f"{self.loss_type!r} weights every token by 1 (the sum is the token count). Set loss_type to 'dft', "
                    "or dft_normalization to 'tokens'."
                )
            refuse_weights_under_deepspeed(self.dft_normalization, self.deepspeed is not None)

    @property
    def anchored(self) -> bool:
        """Whether the KL anchor is on (`kl_coef > 0`): a reference is built and the loss is this package's. With
        `kl_coef=0` there is no reference at all."""
        return self.kl_coef > 0

    @property
    def method_name(self) -> str:
        """The paper's name for this combination of switches: SFT, DFT, SFT+KL or ASFT."""
        return method_name(self.loss_type, self.kl_coef)


class ParameterDoc(NamedTuple):
    """A field's entry in a docstring written as TRL documents its configs: `name (`type` or `type`, *optional*,
    defaults to `value`):` and the indented text below it."""

    types: tuple[str, ...]
    default: str | None  # the text between the backticks of "defaults to `...`", if any
    text: str


_ENTRY = re.compile(r"^ {8}(\w+) \((.*)\):$")


def parameter_docs(cls) -> dict[str, ParameterDoc]:
    """{field: its docstring entry} from the `Parameters:` section of `cls.__doc__`."""
    entries, name, head, text = {}, None, "", []

    def close():
        if name is not None:
            default = re.search(r"defaults to `(.*)`", head)
            types_ = tuple(re.findall(r"`([^`]+)`", head.split(", *optional*")[0]))
            entries[name] = ParameterDoc(types_, default and default.group(1), " ".join(text))

    for line in cls.__doc__.splitlines():
        entry = _ENTRY.match(line)
        if entry:
            close()
            name, head, text = entry.group(1), entry.group(2), []
        elif name is not None and line.startswith(" " * 12):
            text.append(line.strip())
        else:
            close()
            name = None
    close()
    return entries


def _as_help(text: str) -> str:
    """A docstring entry as plain `--help` text: `"value"` in backticks becomes 'value', other backticks go."""
    return re.sub(r'`"([^"`]*)"`', r"'\1'", text).replace("`", "")


def _help_from_docstring(cls) -> None:
    """Each field the class declares gets its docstring entry as `metadata["help"]` (its other metadata, such as
    `choices`, kept)."""
    docs = parameter_docs(cls)
    for f in fields(cls):
        if f.name in docs and f.name in cls.__dict__.get("__annotations__", {}):
            f.metadata = types.MappingProxyType({**f.metadata, "help": _as_help(docs[f.name].text)})


_help_from_docstring(ASFTConfig)

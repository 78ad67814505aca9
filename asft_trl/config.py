"""`ASFTConfig`: TRL's `SFTConfig` plus the anchor (reference model and KL term) of Anchored Supervised Fine-Tuning.

Every field is documented twice, in the docstring and in `metadata["help"]`, so the same words reach `--help`, the
docs and notebook users. All validation happens in `__post_init__`, before any model or data is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig

from .losses import KL_DIRECTIONS, LOSS_TYPES
from .reference import REF_MODEL_DTYPES, REF_MODEL_QUANTIZATIONS


def _bf16_accelerator_available() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return hasattr(torch, "xpu") and torch.xpu.is_available()


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
    and ASFT (`"dft"`, `>0`, the default). Every field of [`~trl.SFTConfig`] applies unchanged.

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

        dft_weight_floor (`float`, *optional*, defaults to `0.0`):
            Floor of the DFT weight: each token's NLL is weighted by max(p(y_t), floor) instead of p(y_t), the known fix
            for DFT not learning tokens the model finds very unlikely (long or unfamiliar completions). `0` is the
            paper's DFT/ASFT. Only for `loss_type="dft"`.

        use_fused_loss (`bool`, *optional*, defaults to `True`):
            Compute the ASFT loss from hidden states in chunks, never building the [tokens x vocabulary] logits of the
            policy or the reference (`asft_trl.losses.fused`). `False` uses the plain implementation, which builds
            both models' full logits. Only used when `kl_coef > 0`; with `kl_coef=0` the loss is TRL's own.
        loss_chunk_size (`int`, *optional*):
            Completion tokens per chunk of the fused loss. Its extra memory is a few [chunk x vocabulary] float32
            buffers. Default: as many tokens as fit 16M (CPU) or 64M (GPU) logits per buffer.

        > Parameters that control the reference (anchor) model

        ref_model_name_or_path (`str`, *optional*):
            Path or Hub id of the reference model. By default the reference is the starting model itself: a frozen
            copy for full fine-tuning, the same network with its adapters switched off under PEFT.
        ref_model_init_kwargs (`dict[str, Any]`, *optional*):
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
        bf16 (`bool`, *optional*):
            As in TRL (on by default), except that it defaults to `False` where no bf16-capable GPU is present, so a
            CPU-only run works without extra flags.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Switch dropout off in the policy and the reference, so that the KL measures the change of the weights and
            not dropout noise (it is then exactly 0 before the first update).
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["ref_model_init_kwargs"]

    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "Weight lambda of the KL anchor. 0.05 is the paper's main-table value; the authors' code defaults "
            "to 0.1. With 0, no reference model is built and the loss is TRL's own SFT/DFT loss."
        },
    )
    kl_direction: str = field(
        default="forward",
        metadata={
            "help": "'forward' computes KL(reference || policy) over the full vocabulary, as every public ASFT "
            "implementation does; 'reverse' computes KL(policy || reference), the paper's ablation.",
            "choices": list(KL_DIRECTIONS),
        },
    )
    loss_type: str = field(
        default="dft",
        metadata={
            "help": "Task term: 'dft' weights each token's NLL by its detached probability (DFT), 'nll' is plain SFT.",
            "choices": list(LOSS_TYPES),
        },
    )
    dft_weight_floor: float = field(
        default=0.0,
        metadata={
            "help": "Floor of the DFT weight: each token's NLL is weighted by max(p(y_t), floor) instead of p(y_t), the "
            "known fix for DFT not learning tokens the model finds very unlikely. 0 is the paper's DFT/ASFT. Only for "
            "loss_type='dft'."
        },
    )
    use_fused_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the ASFT loss from hidden states in chunks, never building the [tokens x vocabulary] "
            "logits of the policy or the reference. False uses the plain implementation, which builds both models' "
            "full logits. Only used when kl_coef > 0; with kl_coef=0 the loss is TRL's own."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Completion tokens per chunk of the fused loss. Its extra memory is a few [chunk x vocabulary] "
            "float32 buffers. Default: as many tokens as fit 16M (CPU) or 64M (GPU) logits per buffer."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Path or Hub id of the reference model. By default the reference is the starting model itself: a "
            "frozen copy for full fine-tuning, the same network with its adapters switched off under PEFT."
        },
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the reference is loaded from a "
            "path. Defaults to the policy's `model_init_kwargs`."
        },
    )
    ref_model_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Keep a reference model in this dtype instead of the policy's: the default frozen copy is cast, a "
            "reference loaded from a path is loaded in it. A bfloat16 reference halves the memory of a float32 one. "
            "Unset: the policy's (or ref_model_init_kwargs') dtype. Needs a separate reference model (full "
            "fine-tuning, or a named reference) and kl_coef > 0.",
            "choices": list(REF_MODEL_DTYPES),
        },
    )
    ref_model_quantization: str | None = field(
        default=None,
        metadata={
            "help": "Load the reference quantised with bitsandbytes: '8bit' (LLM.int8) or '4bit' (NF4, computing in "
            "ref_model_dtype or the policy's dtype). The LM head stays unquantised. The reference is loaded from "
            "ref_model_name_or_path or, by default, from the policy's own path. Needs a separate reference model and "
            "kl_coef > 0, and can't be combined with sync_ref_model.",
            "choices": list(REF_MODEL_QUANTIZATIONS),
        },
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "Move the anchor slowly towards the policy: every ref_model_sync_steps optimizer steps the "
            "reference becomes ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference, through TRL's "
            "SyncRefModelCallback (as DPOConfig.sync_ref_model, from TR-DPO). Off: the paper's fixed anchor. Needs "
            "full fine-tuning, an unquantised reference and kl_coef > 0."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={
            "help": "Weight of the policy when the reference is synced (TR-DPO's alpha, as in DPOConfig). Only used "
            "with sync_ref_model=True."
        },
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={
            "help": "Optimizer steps between two syncs of the reference (TR-DPO's tau, as in DPOConfig). Only used "
            "with sync_ref_model=True."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Switch dropout off in the policy and the reference, so that the KL measures the change of the "
            "weights and not dropout noise (it is then exactly 0 before the first update)."
        },
    )

    def __post_init__(self):
        # Checked before SFTConfig's own post-init so that a bad ASFT field fails before anything else is set up
        if isinstance(self.kl_coef, str):
            try:
                self.kl_coef = float(self.kl_coef)
            except ValueError:
                raise ValueError(f"kl_coef={self.kl_coef!r} is not a number. Set kl_coef to a float >= 0, e.g. 0.05.")
        if not math.isfinite(self.kl_coef) or self.kl_coef < 0:
            raise ValueError(
                f"kl_coef={self.kl_coef} is invalid: it must be a finite number >= 0. Use 0 for no anchor (SFT/DFT), "
                "or the paper's 0.05 (0.1 in the authors' code)."
            )
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(
                f"kl_direction={self.kl_direction!r} is not supported. Use 'forward' for KL(reference || policy) "
                "(the default) or 'reverse' for KL(policy || reference)."
            )
        if self.loss_type == "chunked_nll":  # TRL's deprecated alias, renamed by SFTConfig below
            pass
        elif self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not supported. Use 'dft' (DFT/ASFT, the default) or 'nll' "
                "(SFT / SFT+KL)."
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
        if self.ref_model_dtype is not None and self.ref_model_dtype not in REF_MODEL_DTYPES:
            raise ValueError(
                f"ref_model_dtype={self.ref_model_dtype!r} is not supported. Use one of {list(REF_MODEL_DTYPES)}, or "
                "leave it unset for the policy's dtype."
            )
        if self.ref_model_quantization is not None and self.ref_model_quantization not in REF_MODEL_QUANTIZATIONS:
            raise ValueError(
                f"ref_model_quantization={self.ref_model_quantization!r} is not supported. Use '8bit' or '4bit' "
                "(bitsandbytes), or leave it unset for an unquantised reference."
            )
        lighter = {k: v for k, v in (("ref_model_dtype", self.ref_model_dtype),
                                      ("ref_model_quantization", self.ref_model_quantization),
                                      ("sync_ref_model", self.sync_ref_model or None)) if v is not None}
        if lighter and self.kl_coef == 0:
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
        if self.bf16 is None and not self.fp16 and not _bf16_accelerator_available():
            # TRL turns bf16 on by default, which stops a CPU-only run before it starts; keep it on where it works
            self.bf16 = False
        super().__post_init__()
        if self.ref_model_init_kwargs is not None and not isinstance(self.ref_model_init_kwargs, dict):
            raise ValueError(
                f"ref_model_init_kwargs={self.ref_model_init_kwargs!r} must be a dict (or a JSON object string)."
            )

    @property
    def method_name(self) -> str:
        """The paper's name for this combination of switches: SFT, DFT, SFT+KL or ASFT."""
        return method_name(self.loss_type, self.kl_coef)

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
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Switch dropout off in the policy and the reference, so that the KL measures the change of the "
            "weights and not dropout noise (it is then exactly 0 before the first update)."
        },
    )

    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Run the reference once over the datasets before training and store, per completion token, its "
            "`precompute_ref_topk` most likely tokens with their log-probabilities and the mass of the rest; training "
            "then keeps no reference model in memory and runs no reference forward. The KL is then taken against the "
            "top-k plus one tail bucket, a lower bound of the exact KL."
        },
    )
    precompute_ref_topk: int = field(
        default=64,
        metadata={"help": "Reference tokens stored per completion token (k). Disk: 8 k + 4 bytes per completion token."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the precomputing pass. Defaults to `per_device_train_batch_size`."},
    )
    precompute_ref_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the precomputed reference's files, named by a fingerprint of the data, the reference's "
            "weights and k, so later runs on the same data and reference reuse them. Defaults to "
            "`<output_dir>/reference_cache`."
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
        if self.precompute_ref_log_probs:
            if self.kl_coef == 0:
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

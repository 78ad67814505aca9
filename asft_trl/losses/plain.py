"""Plain (materialised-logits) implementation of the ASFT loss: the reference every faster path is tested against.

Per completion token t, with p the policy and p_ref the frozen reference (see docs/method.md):

    w_t    = stopgrad(p(y_t | s_t))          DFT weight ("dft"; max(p, floor) with a weight floor); 1 for SFT ("nll")
    task_t = -w_t * log p(y_t | s_t)
    kl_t   = KL(p_ref || p) over the full vocabulary ("forward", the published implementations' choice)
             or KL(p || p_ref) ("reverse", the paper's ablation)
             or, with `kl_estimator` "k1" / "k2" / "k3", Schulman's estimate of that KL from the target token alone
             (`kl_estimate`)
    L      = sum_t (task_t + kl_coef * kl_t) / num_items_in_batch

Everything is computed in float32 whatever the input dtype. This module must stay free of model, trainer and
distributed code: callers select the completion positions and pass rows of logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .topk import TopKReference, complete_log_probs

LOSS_TYPES = ("nll", "dft")
KL_DIRECTIONS = ("forward", "reverse")
KL_ESTIMATORS = ("full", "k1", "k2", "k3")
# The per-token estimators' clamps (NeMo-RL's values, so that runs compare across the two): the log-ratio is clamped to
# +-20 nats, so that exp() stays finite in float32 whatever the two log-probabilities are, and the estimate to +-10
# nats, which bounds any one token's penalty and its gradient (a token past either clamp gets no gradient from it)
ESTIMATOR_LOG_RATIO_CLAMP = 20.0
ESTIMATOR_VALUE_CLAMP = 10.0


@dataclass
class TokenTerms:
    """Per-token pieces of the loss for N scored tokens. Only `task` and `kl` carry gradient."""

    task: torch.Tensor  # [N] w_t * -log p(y_t)
    # [N] the KL term as the loss uses it: the exact per-token KL (>= 0), or the `kl_estimator`'s estimate (k2, k3 >= 0;
    # k1 may be negative); zeros when there is no reference
    kl: torch.Tensor
    nll: torch.Tensor  # [N] -log p(y_t), detached
    weight: torch.Tensor  # [N] DFT weight p(y_t) for "dft", ones for "nll", detached
    entropy: torch.Tensor  # [N] entropy of the policy, detached
    is_top1: torch.Tensor  # [N] bool, the label is the policy's arg-max


def kl_per_token(log_p_from: torch.Tensor, log_p_to: torch.Tensor) -> torch.Tensor:
    """KL(from || to) per row, summed over the last (vocabulary) dimension.

    Written as sum_v [ (to_v - from_v) + from_v * (log from_v - log to_v) ], which equals the textbook
    sum_v from_v * (log from_v - log to_v) (the added terms sum to 0) but is a sum of non-negative terms
    (x - 1 - log x >= 0 with x = to_v / from_v, times from_v): rounding can't make the KL negative, and it is exactly 0
    when the two distributions are equal. Terms that rounding pushes below 0 (where from_v ~ to_v) are clamped, which
    moves the gradient by less than the float32 noise of the textbook form.
    """
    p_from = log_p_from.exp()
    terms = (log_p_to.exp() - p_from) + p_from * (log_p_from - log_p_to)
    return terms.clamp_min(0).sum(-1)


def kl_estimate(
    token_log_p: torch.Tensor, ref_token_log_p: torch.Tensor, estimator: str, kl_direction: str = "forward"
) -> torch.Tensor:
    """Schulman's per-token estimate of the KL from the target token only (http://joschu.net/blog/kl-approx.html).

    For KL(a || b) sampled at x ~ a, with u = log(b(x) / a(x)): k1 = -u, k2 = u^2 / 2, k3 = (e^u - 1) - u. Here x is
    the target token y_t, so for `kl_direction="forward"`, KL(reference || policy), u = log p(y_t) - log p_ref(y_t), and
    for "reverse", KL(policy || reference), u = log p_ref(y_t) - log p(y_t) (NeMo-RL's convention). k2 is the same in
    both directions. u is clamped to +-ESTIMATOR_LOG_RATIO_CLAMP and the estimate to +-ESTIMATOR_VALUE_CLAMP; the
    gradient (through `token_log_p`, the reference is held fixed) is that of the clamped function, so zero past either
    clamp.

    On demonstration data y_t comes from the data, not from either model, so none of these is an unbiased estimate of
    either KL (docs/method.md); each is 0 when the two log-probabilities agree.
    """
    if estimator not in KL_ESTIMATORS[1:]:
        raise ValueError(f"kl_estimator={estimator!r} is not one of {KL_ESTIMATORS[1:]} (a per-token estimator).")
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction={kl_direction!r} is not one of {KL_DIRECTIONS}.")
    log_ratio = token_log_p.float() - ref_token_log_p.detach().float()
    u = (log_ratio if kl_direction == "forward" else -log_ratio).clamp(
        -ESTIMATOR_LOG_RATIO_CLAMP, ESTIMATOR_LOG_RATIO_CLAMP
    )
    if estimator == "k1":
        return (-u).clamp(-ESTIMATOR_VALUE_CLAMP, ESTIMATOR_VALUE_CLAMP)
    value = 0.5 * u * u if estimator == "k2" else torch.expm1(u) - u
    # k2 and k3 are >= 0; the lower clamp only catches a rounding below 0 of k3 near u = 0
    return value.clamp(0.0, ESTIMATOR_VALUE_CLAMP)


def dft_weight(token_log_p: torch.Tensor, loss_type: str, floor: float = 0.0) -> torch.Tensor:
    """The task term's per-token weight: max(p(y_t), floor) for "dft" (DFT's plain probability when floor is 0), 1 for
    "nll". The floor is the known fix for DFT not learning tokens the model finds very unlikely."""
    if loss_type != "dft":
        return torch.ones_like(token_log_p)
    weight = token_log_p.exp()
    return weight.clamp_min(floor) if floor > 0 else weight


def asft_token_terms(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    *,
    loss_type: str = "dft",
    kl_direction: str = "forward",
    dft_weight_floor: float = 0.0,
    ref_topk: TopKReference | None = None,
    kl_estimator: str = "full",
    ref_token_log_probs: torch.Tensor | None = None,
) -> TokenTerms:
    """Per-token ASFT terms for rows of logits.

    Args:
        policy_logits: [N, V] logits of the policy at the scored positions (with grad).
        labels: [N] target token ids (no ignore index: select the positions first).
        ref_logits: [N, V] logits of the reference at the same positions, or None for no KL term.
        loss_type: "dft" (probability-weighted NLL) or "nll" (plain SFT).
        kl_direction: "forward" for KL(ref || policy), "reverse" for KL(policy || ref).
        dft_weight_floor: "dft" weights are max(p(y_t), floor), so tokens the policy finds unlikely still teach it.
        ref_topk: instead of `ref_logits`, a precomputed reference (top-k + tail, `asft_trl.losses.topk`).
        kl_estimator: "full" for the exact KL over the vocabulary; "k1", "k2" or "k3" for Schulman's estimate from
            the target token only (`kl_estimate`), which needs only the reference's log-probability of each target.
        ref_token_log_probs: [N] instead of `ref_logits`, the reference's log-probability of each target token (a
            precomputed reference for a per-token estimator).
    """
    _check_reference_arguments(ref_logits, ref_topk, ref_token_log_probs, kl_estimator, labels.shape[0])
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}.")
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction={kl_direction!r} is not one of {KL_DIRECTIONS}.")
    log_p = F.log_softmax(policy_logits.float(), dim=-1)
    token_log_p = log_p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    nll = -token_log_p
    weight = dft_weight(token_log_p.detach(), loss_type, dft_weight_floor)
    task = weight * nll

    if ref_logits is None and ref_topk is None and ref_token_log_probs is None:
        kl = torch.zeros_like(nll)
    elif kl_estimator != "full":
        if ref_token_log_probs is None:
            ref_token_log_probs = (
                F.log_softmax(ref_logits.detach().float(), dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
            )
        kl = kl_estimate(token_log_p, ref_token_log_probs, kl_estimator, kl_direction)
    else:
        if ref_topk is not None:
            log_p_ref = complete_log_probs(log_p, ref_topk)
        else:
            log_p_ref = F.log_softmax(ref_logits.detach().float(), dim=-1)
        kl = kl_per_token(log_p_ref, log_p) if kl_direction == "forward" else kl_per_token(log_p, log_p_ref)

    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1)
        is_top1 = log_p.argmax(-1) == labels
    return TokenTerms(task=task, kl=kl, nll=nll.detach(), weight=weight.detach(), entropy=entropy, is_top1=is_top1)


def asft_loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    *,
    kl_coef: float = 0.05,
    loss_type: str = "dft",
    kl_direction: str = "forward",
    num_items_in_batch: int | torch.Tensor | None = None,
    dft_weight_floor: float = 0.0,
    ref_topk: TopKReference | None = None,
    kl_estimator: str = "full",
    ref_token_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TokenTerms]:
    """The ASFT loss: (sum_t task_t + kl_coef * kl_t) / num_items_in_batch.

    `num_items_in_batch` is the number of scored tokens in the whole optimisation step (all accumulation
    micro-batches, all processes), as the Trainer passes it; without it the loss is the mean over the given rows.
    With a reference, the KL is measured (and returned in the terms) even when `kl_coef` is 0, as at the start of a
    warm-up schedule; it only enters the loss through `kl_coef`. A precomputed reference comes as `ref_topk` (top-k,
    for the exact KL) or `ref_token_log_probs` (one log-probability per token, for a per-token `kl_estimator`).
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef} is negative; it must be >= 0.")
    terms = asft_token_terms(
        policy_logits,
        labels,
        ref_logits,
        loss_type=loss_type,
        kl_direction=kl_direction,
        dft_weight_floor=dft_weight_floor,
        ref_topk=ref_topk,
        kl_estimator=kl_estimator,
        ref_token_log_probs=ref_token_log_probs,
    )
    total = terms.task.sum()
    if ref_logits is not None or ref_topk is not None or ref_token_log_probs is not None:
        total = total + kl_coef * terms.kl.sum()
    denominator = labels.numel() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1), terms


def _check_reference_arguments(
    ref_live, ref_topk, ref_token_log_probs, kl_estimator: str, n: int, live_name: str = "ref_logits"
) -> None:
    """The reference comes in one form (`ref_live`: the live reference's logits or hidden states, named `live_name`),
    and in one the KL estimator can use."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} is not one of {KL_ESTIMATORS}.")
    given = [
        name
        for name, value in (
            (live_name, ref_live),
            ("ref_topk", ref_topk),
            ("ref_token_log_probs", ref_token_log_probs),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"Give the reference in one form, not both {' and '.join(f'`{g}`' for g in given)}.")
    if kl_estimator == "full" and ref_token_log_probs is not None:
        raise ValueError(
            "`ref_token_log_probs` holds only the reference's log-probability of each target token, which the exact KL "
            f"(kl_estimator='full') can't use: it needs the reference's whole distribution (`{live_name}` or `ref_topk`)."
        )
    if kl_estimator != "full" and ref_topk is not None:
        raise ValueError(
            f"kl_estimator={kl_estimator!r} needs the reference's log-probability of each target token, which a top-k "
            f"reference does not hold for targets outside its top k. Give `ref_token_log_probs` (or `{live_name}`)."
        )
    if ref_token_log_probs is not None and ref_token_log_probs.shape != (n,):
        raise ValueError(
            f"`ref_token_log_probs` has shape {tuple(ref_token_log_probs.shape)}; it needs one value per scored token, "
            f"({n},)."
        )


def weight_stats(weight_sum: torch.Tensor, weight_sq_sum: torch.Tensor, count: torch.Tensor) -> tuple[float, float]:
    """Mean and effective sample size fraction, (sum w)^2 / (n * sum w^2), of the DFT weights from their sums.

    Takes sums rather than the weights so that callers can add them up across processes first.
    """
    n = float(count)
    if n == 0:
        return 0.0, 0.0
    mean = float(weight_sum) / n
    ess = float(weight_sum) ** 2 / (n * float(weight_sq_sum)) if float(weight_sq_sum) > 0 else 0.0
    return mean, ess

"""A reference distribution kept as its top-k log-probabilities plus one tail bucket, and the KL against it.

A precomputed reference stores, per completion token, the k most likely tokens of the reference, their
log-probabilities and the log of the probability mass left over (the tail). Training then needs no reference model.
The KL is taken between the two distributions coarsened to k + 1 outcomes (the top-k tokens, and "any other token"):

    KL_k(q || p) = sum_{v in S} q_v log(q_v / p_v) + Q_T log(Q_T / P_T)      Q_T, P_T: the tail masses, S: the top-k

which is what `complete_log_probs` computes through the full-vocabulary formulas: it fills the reference's tail in
the policy's own shape, q~_v = Q_T p_v / P_T for v outside S, so that KL(q~ || p) = KL_k(q || p) and, with q~ held
fixed, the gradient p - q~ is exactly the gradient of KL_k (likewise for the reverse direction). So both loss
implementations run unchanged on q~. By the data-processing inequality 0 <= KL_k <= KL, the gap closes as k grows
(the top-k sets are nested), and KL_k = KL when k is the vocabulary size.

Pure tensor functions: no models, no files. `asft_trl.reference.cache` does the pass over a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Log-masses are clamped here: an empty or underflowed tail gives exactly-zero probabilities with finite logs, so that
# 0 * log 0 terms stay 0 instead of NaN
_LOG_FLOOR = -200.0


@dataclass
class TopKReference:
    """The reference at N scored tokens: `ids` [N, k], `log_probs` [N, k] and `tail_log_prob` [N] (log of the mass
    outside the top-k; -inf or very negative when the top-k holds it all)."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_prob: torch.Tensor

    def __post_init__(self):
        n, k = self.ids.shape
        if self.log_probs.shape != (n, k) or self.tail_log_prob.shape != (n,):
            raise ValueError(
                f"A top-k reference needs ids [N, k], log_probs [N, k] and tail_log_prob [N]; got "
                f"{tuple(self.ids.shape)}, {tuple(self.log_probs.shape)} and {tuple(self.tail_log_prob.shape)}."
            )

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, start: int, end: int) -> TopKReference:
        return TopKReference(self.ids[start:end], self.log_probs[start:end], self.tail_log_prob[start:end])

    def to(self, device) -> TopKReference:
        return TopKReference(self.ids.to(device), self.log_probs.to(device), self.tail_log_prob.to(device))


def topk_of(log_q: torch.Tensor, k: int) -> TopKReference:
    """Keep the k most likely tokens of each row of reference log-probabilities [N, V], and the tail's log-mass."""
    k = min(k, log_q.shape[-1])
    log_probs, ids = log_q.float().topk(k, dim=-1)
    # 1 - (top-k mass), summed in float64: where the tail is tiny its relative error is large, but its terms in the KL
    # and the gradient scale with the tail mass itself, so the absolute error stays at rounding level (and this avoids
    # two more passes over [N x V])
    tail = (1 - log_probs.double().exp().sum(-1)).clamp_min(0).log().float()
    return TopKReference(ids, log_probs, tail)


def complete_log_probs(log_p: torch.Tensor, ref: TopKReference, out: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary log q~ [N, V]: the reference's top-k log-probabilities, and its tail mass spread over the other
    tokens in proportion to the policy's probabilities `log_p` (detached: q~ is a fixed target).

    `out` may be a preallocated [N, V] float32 buffer (it may not alias `log_p`).
    """
    log_p = log_p.detach()
    ids = ref.ids.long()
    out = torch.empty_like(log_p, dtype=torch.float32) if out is None else out
    out.copy_(log_p)
    out.scatter_(-1, ids, float("-inf"))
    log_policy_tail = torch.logsumexp(out, dim=-1).clamp_min(_LOG_FLOOR)
    shift = ref.tail_log_prob.float().clamp_min(_LOG_FLOOR) - log_policy_tail
    torch.add(log_p, shift.unsqueeze(-1), out=out)
    return out.scatter_(-1, ids, ref.log_probs.float())

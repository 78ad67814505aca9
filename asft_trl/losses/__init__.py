"""The ASFT objective as pure functions of tensors.

Nothing in this package knows about models, trainers or processes: it takes logits (or, later, hidden states and
head weights) and labels, and returns per-token terms and the normalised loss. The trainer wires models to it.
"""

from .plain import (
    KL_DIRECTIONS,
    LOSS_TYPES,
    TokenTerms,
    asft_loss,
    asft_token_terms,
    kl_per_token,
    weight_stats,
)

__all__ = [
    "KL_DIRECTIONS",
    "LOSS_TYPES",
    "TokenTerms",
    "asft_loss",
    "asft_token_terms",
    "kl_per_token",
    "weight_stats",
]

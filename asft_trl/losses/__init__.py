"""The ASFT objective as pure functions of tensors.

Nothing in this package knows about models, trainers or processes. `plain` takes logits and is the reference;
`fused` takes hidden states and head weights and never builds the [tokens x vocab] logits; both return per-token
terms and the normalised loss, and the tests hold them to each other. `topk` holds a precomputed reference (top-k +
tail) that either takes in place of the reference's logits. The trainer wires models to them.
"""

from .fused import HeadTransform, auto_chunk_size, chunked_asft_loss, head_log_probs
from .plain import (
    ESTIMATOR_LOG_RATIO_CLAMP,
    ESTIMATOR_VALUE_CLAMP,
    KL_DIRECTIONS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    TokenTerms,
    asft_loss,
    asft_token_terms,
    dft_weight,
    kl_estimate,
    kl_per_token,
    weight_stats,
)
from .topk import TopKReference, complete_log_probs, topk_of

__all__ = [
    "ESTIMATOR_LOG_RATIO_CLAMP",
    "ESTIMATOR_VALUE_CLAMP",
    "KL_DIRECTIONS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "HeadTransform",
    "TokenTerms",
    "TopKReference",
    "asft_loss",
    "asft_token_terms",
    "auto_chunk_size",
    "chunked_asft_loss",
    "complete_log_probs",
    "dft_weight",
    "head_log_probs",
    "kl_estimate",
    "kl_per_token",
    "topk_of",
    "weight_stats",
]

"""Does a named reference share the policy's tokenizer? Checked from the tokenizers alone, before any weights load.

The KL anchor compares the policy's and the reference's probabilities token id by token id, on the policy's
tokenisation. Equal vocabulary sizes are not enough: LLaMA-2 and Mistral both have 32,000 tokens, with different
ids, and their KL would be silently meaningless. So a named reference's vocabulary (every token and its id, added
tokens included) must be the policy's, or the run is refused with what differs. Special tokens that differ over the
same vocabulary (a base model's eos against its instruct model's) leave the KL well defined, so they are warned
about, not refused; the pad token, which the loss never reads, is not compared. A reference whose tokenizer can't be
loaded (a folder without tokenizer files) is warned about: only the vocabulary sizes are checked then.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# A folder holding none of these has no tokenizer of its own to compare
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_EXAMPLES = 3


@dataclass(frozen=True)
class TokenizerSummary:
    """What of a tokenizer the KL depends on: its vocabulary (token -> id), and its special tokens by role."""

    vocabulary: dict[str, int]
    special_tokens: dict[str, str]  # role (bos_token, eos_token, ...) -> token; pad_token left out


def summarize(tokenizer) -> TokenizerSummary:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    specials = {
        role: str(token)
        for role, token in tokenizer.special_tokens_map.items()
        if role != "pad_token" and isinstance(token, str)
    }
    return TokenizerSummary(dict(tokenizer.get_vocab()), specials)


def load_summary(name_or_path: str, **from_pretrained_kwargs) -> tuple[TokenizerSummary | None, str]:
    """The summary of the tokenizer at `name_or_path` (a folder or a Hub id), or (None, why it could not be read)."""
    if os.path.isdir(name_or_path) and not any(
        os.path.exists(os.path.join(name_or_path, name)) for name in TOKENIZER_FILES
    ):
        return None, f"{name_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in from_pretrained_kwargs.items() if v is not None}
    try:
        return summarize(AutoTokenizer.from_pretrained(name_or_path, **kwargs)), ""
    except Exception as error:  # noqa: BLE001 - a tokenizer that won't load is a reason to warn, not to refuse
        first_line = (str(error).splitlines() or [""])[0]
        return None, f"the tokenizer of {name_or_path!r} could not be loaded ({type(error).__name__}: {first_line})"


def vocabulary_differences(policy: dict[str, int], reference: dict[str, int]) -> str:
    """'' when both map every token to the same id; otherwise what differs, with a few examples."""
    if policy == reference:
        return ""
    moved = sorted((index, token) for token, index in policy.items() if reference.get(token) != index)
    missing = [token for _, token in moved if token not in reference]
    extra = len(reference.keys() - policy.keys())
    parts = [f"the policy's tokenizer has {len(policy):,} tokens and the reference's {len(reference):,}"]
    shown = [(index, token) for index, token in moved if token in reference][:_EXAMPLES]
    if len(moved) > len(missing):
        examples = ", ".join(f"{token!r}: {index} vs {reference[token]}" for index, token in shown)
        parts.append(
            f"{len(moved) - len(missing):,} of the policy's tokens have another id in the reference (e.g. {examples})"
        )
    if missing:
        parts.append(
            f"{len(missing):,} are not in the reference at all (e.g. {', '.join(map(repr, missing[:_EXAMPLES]))})"
        )
    if extra:
        parts.append(f"the reference has {extra:,} tokens the policy lacks")
    return "; ".join(parts)


def special_token_differences(policy: dict[str, str], reference: dict[str, str]) -> str:
    """'' when both give every special role the same token; otherwise 'eos differs: '</s>' vs '<|im_end|>''..."""
    differences = []
    for role in sorted(policy.keys() | reference.keys()):
        if policy.get(role) != reference.get(role):
            name = role.removesuffix("_token").removesuffix("_tokens")
            ours, theirs = (repr(side[role]) if role in side else "none" for side in (policy, reference))
            differences.append(f"{name} differs: {ours} in the policy vs {theirs} in the reference")
    return "; ".join(differences)


def check_same_tokenizer(
    policy: TokenizerSummary, reference: TokenizerSummary, ref_field: str, ref_name: str, policy_name: str
) -> None:
    """Refuse a reference whose vocabulary is not the policy's; warn about special tokens that differ over the same
    vocabulary. `ref_field`: the setting that named it (`ref_model_name_or_path`, `ref_model`)."""
    vocabulary = vocabulary_differences(policy.vocabulary, reference.vocabulary)
    specials = special_token_differences(policy.special_tokens, reference.special_tokens)
    if vocabulary:
        raise ValueError(
            f"{ref_field}={ref_name!r} does not use the policy's tokenizer ({policy_name}): {vocabulary}"
            + (f"; {specials}" if specials else "")
            + ". The KL anchor compares the two models' probabilities token id by token id, so it would compare "
            f"unrelated tokens. Fix: name a reference that uses the policy's tokenizer (a checkpoint of the same model "
            f"family), or leave {ref_field} unset to anchor to the starting model."
        )
    if specials:
        logger.warning(
            f"{ref_field}={ref_name!r} has the policy's vocabulary (every token has the same id) but other special "
            f"tokens: {specials}. The KL is still well defined, but the reference was trained around its own special "
            "tokens, so where the policy's appear (the end of a completion) the anchor pulls towards the reference's "
            "habits. If the reference was meant to be the policy's own starting point, name that checkpoint instead."
        )


def tokenizer_kwargs(init_kwargs: dict | None, trust_remote_code: bool = False) -> dict:
    """The tokenizer's `from_pretrained` arguments from a model's init kwargs: the same revision and cache."""
    init_kwargs = init_kwargs or {}
    return {
        "revision": init_kwargs.get("revision"),
        "cache_dir": init_kwargs.get("cache_dir"),
        "trust_remote_code": trust_remote_code,
    }


def check_reference_tokenizer(
    policy, ref_name: str, ref_field: str, policy_kwargs: dict | None = None, ref_kwargs: dict | None = None
) -> None:
    """`check_same_tokenizer` from what a run names: `policy`, a tokenizer (or processor) or a path to load one
    from; `ref_name`, the reference's path or Hub id. Loads tokenizers only. Warns when either can't be read."""
    if isinstance(policy, str):
        policy_name = repr(policy)
        policy_summary, why_not = load_summary(policy, **(policy_kwargs or {}))
    else:
        policy_name = "the processing_class given"
        policy_summary, why_not = summarize(policy), ""
    reference_summary = None
    if policy_summary is not None:
        reference_summary, why_not = load_summary(ref_name, **(ref_kwargs or {}))
    if reference_summary is None:
        logger.warning(
            f"Could not compare the tokenizers of the policy ({policy_name}) and {ref_field}={ref_name!r}: {why_not}. "
            "Only the vocabulary sizes are checked; if the two tokenizers differ, the KL compares unrelated tokens."
        )
        return
    check_same_tokenizer(policy_summary, reference_summary, ref_field, ref_name, policy_name)

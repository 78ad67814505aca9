"""The precomputed reference: one pass of the reference over the prepared datasets before training, so that training
keeps no reference model in memory and runs no reference forward.

For every completion token the pass stores, for the exact KL (`store="topk"`), the reference's top-k token ids, their
log-probabilities and the log-mass of the rest (`asft_trl.losses.topk` defines the KL against them) as three extra
dataset columns; for a per-token KL estimator (`store="token"`), only the reference's log-probability of the target
token, one float per token in one column. The rows are written to an Arrow file named by a fingerprint of the dataset,
the reference's weights and what is stored (k, or the target's log-probability), so an interrupted pass leaves nothing
half-written, and a second run over the same data and reference (a lambda sweep, a resumed run) reuses the file.

At training time `ReferenceColumnsCollator` takes the columns out of each example before the usual collator sees
them and hands them on as [N, k] (or [N]) tensors for the batch's N completion tokens, in the order the loss visits
them (row-major over the shifted labels), whatever the padding or packing.

This module must not compute losses; it runs a forward it is given and stores what the head says.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, Features, List, Value

from ..losses import HeadTransform, TopKReference, head_log_probs, topk_of

COLUMNS = ("ref_topk_ids", "ref_topk_log_probs", "ref_tail_log_prob")
TOKEN_COLUMN = "ref_token_log_prob"  # store="token": the reference's log-probability of each target token
STORES = ("topk", "token")
_FORMAT_VERSION = 1
# Completion tokens projected over the vocabulary at once during the pass
_TOKENS_PER_CHUNK_ELEMENTS = 1 << 24


def weights_fingerprint(model: torch.nn.Module, skip_adapters: tuple[str, ...] = ()) -> str:
    """A short digest of a model's weights, so that a cache made with other weights is never reused.

    `skip_adapters`: PEFT adapter names whose weights are left out (the reference runs with them off, and a fresh
    adapter's random initialisation must not make the same reference look different).
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if not torch.is_tensor(param) or not param.is_floating_point():
                continue
            if skip_adapters and any(part in skip_adapters for part in name.split(".")):
                continue
            values = param.detach().double()
            digest.update(
                f"{name}:{tuple(param.shape)}:{param.dtype}:{values.sum().item():.10e}:"
                f"{values.abs().sum().item():.10e};".encode()
            )
    return digest.hexdigest()[:16]


def scored_count(collator: Callable, example: dict[str, Any]) -> int:
    """How many completion tokens the loss scores in this example: shifted labels that are not -100, as the trainer
    sees them after collation (packing and padding-free collators mask sequence starts)."""
    labels = collator([example])["labels"]
    return int((labels[:, 1:] != -100).sum())


def add_reference_columns(
    dataset: Dataset,
    *,
    run_backbone: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    head: tuple[torch.Tensor, torch.Tensor | None, HeadTransform],
    collator: Callable,
    k: int,
    batch_size: int,
    cache_dir: str,
    reference_id: str,
    device: torch.device,
    desc: str,
    store: str = "topk",
) -> Dataset:
    """`dataset` with the reference's columns added (see the module docstring), computed or read from `cache_dir`.

    `run_backbone(model_inputs)` returns the reference's final hidden states [B, T, H] for a collated batch; `head` is
    the reference's (weight, bias, transform). `store`: "topk" (k tokens and the tail, for the exact KL) or "token" (the
    target's log-probability, for a per-token KL estimator; `k` is then unused).
    """
    if store not in STORES:
        raise ValueError(f"store={store!r} is not one of {STORES}.")
    stale = [name for name in (*COLUMNS, TOKEN_COLUMN) if name in dataset.column_names]
    if stale:
        dataset = dataset.remove_columns(stale)
    weight, bias, transform = head
    vocab = weight.shape[0]
    k = min(k, vocab)
    # The top-k key is the one earlier versions used (their files stay valid); the token store's differs by `store`
    stored = {"k": k} if store == "topk" else {"store": "token_log_prob"}
    key = json.dumps(
        {
            "dataset": dataset._fingerprint,
            "reference": reference_id,
            **stored,
            "head": repr(transform),
            "version": _FORMAT_VERSION,
        },
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:20]
    os.makedirs(cache_dir, exist_ok=True)
    name = f"reference_top{k}" if store == "topk" else "reference_token"
    cache_file = os.path.join(cache_dir, f"{name}-{fingerprint}.arrow")
    chunk = max(1, _TOKENS_PER_CHUNK_ELEMENTS // vocab)

    def add_columns(batch: dict[str, list]) -> dict[str, list]:
        examples = [dict(zip(batch, values)) for values in zip(*batch.values())]
        inputs = collator(examples)
        counts = [scored_count(collator, example) for example in examples]
        labels = inputs.pop("labels")[:, 1:]
        mask = labels != -100
        inputs = {name: value.to(device) if torch.is_tensor(value) else value for name, value in inputs.items()}
        with torch.no_grad():
            hidden = run_backbone(inputs)[:, :-1]
            hidden = hidden[mask.to(hidden.device)].to(weight.device)
            targets = labels[mask].to(weight.device)
            # At least one (then empty) chunk, so that a batch with no scored token gives empty columns
            parts = []
            for i in range(0, max(1, hidden.shape[0]), chunk):
                log_q = head_log_probs(hidden[i : i + chunk], weight, bias, transform)
                if store == "topk":
                    parts.append(topk_of(log_q, k))
                else:
                    parts.append(log_q.gather(-1, targets[i : i + chunk, None]).squeeze(-1))
        if sum(counts) != hidden.shape[0]:
            raise RuntimeError(
                f"The collated batch scores {hidden.shape[0]} tokens but its examples {sum(counts)} one by one; the "
                "precomputed reference can't be aligned with this collator."
            )
        if store == "token":
            return {TOKEN_COLUMN: [piece.tolist() for piece in torch.cat(parts).cpu().split(counts)]}
        ids = torch.cat([p.ids for p in parts]).to(torch.int32).cpu()
        log_probs = torch.cat([p.log_probs for p in parts]).cpu()
        tail = torch.cat([p.tail_log_prob for p in parts]).cpu()
        out = {name: [] for name in COLUMNS}
        for piece_ids, piece_lp, piece_tail in zip(ids.split(counts), log_probs.split(counts), tail.split(counts)):
            out["ref_topk_ids"].append(piece_ids.tolist())
            out["ref_topk_log_probs"].append(piece_lp.tolist())
            out["ref_tail_log_prob"].append(piece_tail.tolist())
        return out

    if store == "token":
        features = Features({**dataset.features, TOKEN_COLUMN: List(Value("float32"))})
    else:
        features = Features(
            {
                **dataset.features,
                "ref_topk_ids": List(List(Value("int32"))),
                "ref_topk_log_probs": List(List(Value("float32"))),
                "ref_tail_log_prob": List(Value("float32")),
            }
        )
    return dataset.map(
        add_columns,
        batched=True,
        batch_size=batch_size,
        features=features,
        cache_file_name=cache_file,
        new_fingerprint=fingerprint,
        desc=desc,
    )


def mean_topk_mass(dataset: Dataset) -> float:
    """The share of the reference's probability mass its stored top-k holds, averaged over the completion tokens: how
    close the top-k KL is to the exact one (the KL's relative gap is of the order of the mass left out)."""
    import pyarrow.compute as pc

    tails = pc.list_flatten(dataset.data.column("ref_tail_log_prob"))
    if len(tails) == 0:
        return 1.0
    return 1.0 - pc.mean(pc.exp(tails)).as_py()


def pop_reference(inputs: dict[str, Any]) -> TopKReference | torch.Tensor | None:
    """Take the precomputed reference out of a collated batch (the model must not see it): a `TopKReference`, or the
    [N] log-probabilities of the targets (store="token")."""
    if TOKEN_COLUMN in inputs:
        return inputs.pop(TOKEN_COLUMN)
    if COLUMNS[0] not in inputs:
        return None
    ids, log_probs, tail = (inputs.pop(name) for name in COLUMNS)
    return TopKReference(ids, log_probs, tail)


class ReferenceColumnsCollator:
    """Wraps a collator: the precomputed reference's columns bypass it and come back as [N, k] / [N] tensors for the
    batch's completion tokens, concatenated in example order (the order in which the loss visits them)."""

    def __init__(self, collator: Callable, store: str = "topk"):
        if store not in STORES:
            raise ValueError(f"store={store!r} is not one of {STORES}.")
        self.collator = collator
        self.store = store

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        names = COLUMNS if self.store == "topk" else (TOKEN_COLUMN,)
        columns = {name: [] for name in names}
        stripped = []
        for example in examples:
            example = dict(example)
            for name in names:
                if name not in example:
                    raise KeyError(
                        f"An example has no '{name}' column: the dataset was not prepared with the precomputed "
                        "reference (precompute_ref_log_probs=True)."
                    )
                columns[name].append(example.pop(name))
            stripped.append(example)
        batch = self.collator(stripped)
        if self.store == "token":
            batch[TOKEN_COLUMN] = torch.cat(
                [torch.as_tensor(rows, dtype=torch.float32).reshape(-1) for rows in columns[TOKEN_COLUMN]]
            )
            return batch
        # k from any example with completion tokens (an example may have none)
        k = next((len(rows[0]) for rows in columns["ref_topk_ids"] if len(rows)), 1)
        for name, dtype, shape in (
            ("ref_topk_ids", torch.long, (-1, k)),
            ("ref_topk_log_probs", torch.float32, (-1, k)),
            ("ref_tail_log_prob", torch.float32, (-1,)),
        ):
            batch[name] = torch.cat([torch.as_tensor(rows, dtype=dtype).reshape(shape) for rows in columns[name]])
        return batch

"""Medical suite: multiple-choice accuracy from next-token log-probabilities, as in the paper.

For each question the prompt ends in "Answer:" and the model's next-token distribution is read once (one forward pass
per batch of questions; no text is generated). Two rules turn it into a letter (`medical_scoring`):

- `letters` (default): the option letter whose token has the highest log-probability as the next token, over the
  full vocabulary. Every question gets the model's own preference among its options.
- `authors`: the ASFT authors' evaluation code (vLLM, one greedy token, `logprobs=10`): among the ten most likely
  next tokens, those whose text, stripped and upper-cased, is an option letter; the best of them. If none of the
  ten is a letter, their fallback reads a standalone letter in the greedy token's text, and otherwise answers "A".
  Their code keeps, per letter, the last variant it meets in vLLM's rank order (" A" then "A", say), i.e. the lower
  log-probability of the two; this does the same. A model that puts its mass elsewhere (a newline, "The") scores
  "A" on every such question, so this rule's accuracy leans on how often "A" is right: compare `fallbacks`.

Which token is "the letter" (for `letters`): in running text the letter after "Answer:" follows a space, and most
tokenizers (GPT-2/Llama-3/Qwen byte-level BPE, SentencePiece) have a single token for " A". So the letter token is
the one token the tokenizer produces for " X" after the prompt, found by tokenizing `prompt + " X"` and checking that
it is the prompt's tokens plus exactly one more. When " X" is not a single token the bare "X" token is used instead,
and if neither is one token the run stops with an error rather than score a different event.
"""

from __future__ import annotations

import re
import string

from .prompts import medical_prompt

MEDICAL_SCORINGS = ("letters", "authors")
# The authors' evaluation asks vLLM for the top 10 log-probabilities of the first generated token
AUTHORS_TOP_K = 10
# Their fallback's answer when no letter is among the top tokens nor in the greedy token's text
AUTHORS_DEFAULT = "A"


def letter_token_ids(tokenizer, letters: str, probe: str = "Question: ?\n\nOptions:\nA. x\n\nAnswer:") -> list[int]:
    """Token id of each letter as the next token after a prompt ending in "Answer:" (see the module docstring)."""
    base = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in letters:
        for continuation in (f" {letter}", letter):
            full = tokenizer(probe + continuation, add_special_tokens=False)["input_ids"]
            if full[: len(base)] == base and len(full) == len(base) + 1:
                ids.append(full[-1])
                break
        else:
            raise ValueError(
                f"The tokenizer has no single token for {letter!r} or ' {letter}' after 'Answer:'; "
                "the letter log-probability is not defined for it."
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"Option letters {letters!r} share token ids {ids}; cannot tell the options apart.")
    return ids


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward computes its head at given positions only (`logits_to_keep`, transformers' causal
    LMs); a PEFT model passes it on to the model it wraps."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def next_token_scores(model, tokenizer, items: list[dict], batch_size: int = 8, top_k: int = AUTHORS_TOP_K):
    """Per item, from the next-token distribution after its prompt: the log-probability (over the whole vocabulary) of
    each option letter, and the `top_k` most likely tokens as [text, log-probability] in rank order."""
    import torch
    from tqdm.auto import tqdm

    letter_scores, top_tokens, letter_ids = [None] * len(items), [None] * len(items), {}
    keeps_logits = accepts_logits_to_keep(model)
    prompts = [medical_prompt(item["question"], item["options"]) for item in items]
    # Batches of prompts of similar length (longest first), so that little of each batch is padding; results go back
    # to the items' order
    order = sorted(range(len(items)), key=lambda i: -len(tokenizer(prompts[i])["input_ids"]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # right padding: the last real token's logits are exact, positions unchanged
    try:
        for start in tqdm(range(0, len(items), batch_size), desc="Scoring options", unit="batch"):
            indices = order[start : start + batch_size]
            batch = [items[i] for i in indices]
            inputs = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(model.device)
            last = inputs["attention_mask"].sum(dim=1) - 1
            with torch.inference_mode():
                if keeps_logits:  # the head at each row's last position only, not [batch x length x vocabulary]
                    kept = torch.unique(last)
                    logits = model(**inputs, logits_to_keep=kept).logits
                    logits = logits[torch.arange(len(batch)), torch.searchsorted(kept, last)]
                else:
                    logits = model(**inputs).logits[torch.arange(len(batch)), last]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            top = logprobs.topk(top_k, dim=-1)
            for index, row, values, ids, item in zip(indices, logprobs, top.values, top.indices, batch):
                letters = string.ascii_uppercase[: len(item["options"])]
                if letters not in letter_ids:
                    letter_ids[letters] = letter_token_ids(tokenizer, letters)
                letter_scores[index] = row[letter_ids[letters]].tolist()
                top_tokens[index] = [[tokenizer.decode([i]), v] for i, v in zip(ids.tolist(), values.tolist())]
    finally:
        tokenizer.padding_side = side
    return letter_scores, top_tokens


def option_logprobs(model, tokenizer, items: list[dict], batch_size: int = 8) -> list[list[float]]:
    """Next-token log-probabilities (over the whole vocabulary) of each item's option letters."""
    return next_token_scores(model, tokenizer, items, batch_size)[0]


def authors_letter(top_tokens: list, letters: str = "ABCD") -> tuple[str, bool]:
    """The authors' rule (module docstring) on the top tokens, [text, log-probability] in rank order: the letter, and
    whether it came from their fallback rather than from a letter among the top tokens."""
    scores, options = {}, set(letters)
    for text, logprob in top_tokens:
        key = str(text).strip().upper()
        if key in options:
            scores[key] = logprob  # a later (lower-ranked) variant replaces an earlier one, as their dict does
    if scores:
        return max(scores, key=scores.get), False
    greedy = str(top_tokens[0][0]).strip().upper() if top_tokens else ""
    found = re.search(rf"\b([{letters}])\b", greedy)
    return (found.group(1) if found else AUTHORS_DEFAULT), True


def letters_letter(option_scores: dict[str, float]) -> str:
    """Our rule: the option letter with the highest next-token log-probability (the first on a tie)."""
    return max(option_scores, key=option_scores.__getitem__)


def choose(row: dict, scoring: str) -> tuple[str, bool]:
    """The row's predicted letter under `scoring`, and whether the authors' fallback gave it."""
    if scoring == "authors":
        return authors_letter(row["top_logprobs"], "".join(row["option_logprobs"]))
    return letters_letter(row["option_logprobs"]), False


def predict(model, tokenizer, items: list[dict], batch_size: int = 8, scoring: str = "letters") -> list[dict]:
    """Rows with the prompt, each option's log-probability, the top next tokens, the `prediction` letter under
    `scoring` (and `fallback` for the authors' rule) and the gold `answer`."""
    if scoring not in MEDICAL_SCORINGS:
        raise ValueError(f"medical_scoring={scoring!r} is not one of {', '.join(MEDICAL_SCORINGS)}.")
    rows = []
    for item, scores, top in zip(items, *next_token_scores(model, tokenizer, items, batch_size)):
        letters = string.ascii_uppercase[: len(scores)]
        row = {
            "id": item["id"],
            "prompt": medical_prompt(item["question"], item["options"]),
            "option_logprobs": dict(zip(letters, scores)),
            "top_logprobs": top,
            "answer": item["answer"],
        }
        row["prediction"], fallback = choose(row, scoring)
        if scoring == "authors":
            row["fallback"] = fallback
        rows.append(row)
    return rows


def score_rows(rows: list[dict], scoring: str | None = None) -> tuple[dict, list[dict]]:
    """Accuracy of rows holding a `prediction` letter and the gold `answer` letter.

    With `scoring`, the prediction is chosen again by that rule from the rows' `option_logprobs` / `top_logprobs`, so
    earlier generations can be rescored the authors' way (`authors` needs both fields; `letters` keeps a row's own
    `prediction` when it has no `option_logprobs`, as a file written by another tool). The authors' rule also counts
    its `fallbacks`."""
    scored, fallbacks = [], 0
    for index, row in enumerate(rows):
        rescore = scoring == "authors" or (scoring == "letters" and "option_logprobs" in row)
        needed = ("answer", "option_logprobs", "top_logprobs") if scoring == "authors" else ("answer",)
        if not rescore:
            needed = ("prediction", "answer")
        for field in needed:
            if field not in row:
                raise ValueError(
                    f"Medical row {index} has no `{field}` field (it has {sorted(row)})"
                    + (", which medical_scoring='authors' needs." if scoring == "authors" else ".")
                )
        if rescore:
            prediction, fallback = choose(row, scoring)
            row = {k: v for k, v in row.items() if k != "fallback"}  # a flag of the rule it was generated with
            row.update(prediction=prediction, **({"fallback": fallback} if scoring == "authors" else {}))
        fallbacks += bool(row.get("fallback"))
        scored.append({**row, "correct": str(row["prediction"]).strip().upper() == str(row["answer"]).strip().upper()})
    metrics = {"accuracy": sum(r["correct"] for r in scored) / len(scored), "num_problems": len(scored)}
    if scoring == "authors" or any("fallback" in r for r in scored):
        metrics["fallbacks"] = fallbacks
    return metrics, scored

"""Medical suite: multiple-choice accuracy from next-token log-probabilities, as in the paper.

For each question the prompt ends in "Answer:" and the prediction is the option letter whose token has the highest
log-probability as the next token. One forward pass per batch of questions; no text is generated.

Which token is "the letter": in running text the letter after "Answer:" follows a space, and most tokenizers
(GPT-2/Llama-3/Qwen byte-level BPE, SentencePiece) have a single token for " A". So the letter token is the one
token the tokenizer produces for " X" after the prompt, found by tokenizing `prompt + " X"` and checking that it is
the prompt's tokens plus exactly one more. When " X" is not a single token the bare "X" token is used instead, and
if neither is one token the run stops with an error rather than score a different event.
"""

from __future__ import annotations

import string

from .prompts import medical_prompt


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


def option_logprobs(model, tokenizer, items: list[dict], batch_size: int = 8) -> list[list[float]]:
    """Next-token log-probabilities (over the whole vocabulary) of each item's option letters."""
    import torch
    from tqdm.auto import tqdm

    results, letter_ids = [], {}
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # right padding: the last real token's logits are exact, positions unchanged
    try:
        for start in tqdm(range(0, len(items), batch_size), desc="Scoring options", unit="batch"):
            batch = items[start : start + batch_size]
            prompts = [medical_prompt(item["question"], item["options"]) for item in batch]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
            with torch.inference_mode():
                logits = model(**inputs).logits
            last = inputs["attention_mask"].sum(dim=1) - 1
            logprobs = torch.log_softmax(logits[torch.arange(len(batch)), last].float(), dim=-1)
            for row, item in zip(logprobs, batch):
                letters = string.ascii_uppercase[: len(item["options"])]
                if letters not in letter_ids:
                    letter_ids[letters] = letter_token_ids(tokenizer, letters)
                results.append(row[letter_ids[letters]].tolist())
    finally:
        tokenizer.padding_side = side
    return results


def predict(model, tokenizer, items: list[dict], batch_size: int = 8) -> list[dict]:
    """Rows with the prompt, each option's log-probability, the chosen `prediction` letter and the gold `answer`."""
    rows = []
    for item, scores in zip(items, option_logprobs(model, tokenizer, items, batch_size)):
        letters = string.ascii_uppercase[: len(scores)]
        best = max(range(len(scores)), key=scores.__getitem__)
        rows.append(
            {
                "id": item["id"],
                "prompt": medical_prompt(item["question"], item["options"]),
                "option_logprobs": dict(zip(letters, scores)),
                "prediction": letters[best],
                "answer": item["answer"],
            }
        )
    return rows


def score_rows(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Accuracy of rows holding a `prediction` letter and the gold `answer` letter."""
    scored = []
    for index, row in enumerate(rows):
        for field in ("prediction", "answer"):
            if field not in row:
                raise ValueError(f"Medical row {index} has no `{field}` field (it has {sorted(row)}).")
        scored.append({**row, "correct": str(row["prediction"]).strip().upper() == str(row["answer"]).strip().upper()})
    return {"accuracy": sum(r["correct"] for r in scored) / len(scored), "num_problems": len(scored)}, scored

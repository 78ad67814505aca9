"""A tiny generated task for the quickstart: "reverse the order of these words".

Why this task: it needs no download, every answer follows from its prompt (so held-out prompts are learnable),
answers are short (sequences stay under ~52 tokens with SmolLM2's chat template), and SmolLM2-135M-Instruct scores
~0% before training (it paraphrases instead of answering) but >90% after ~80 LoRA steps on 2 CPU cores.

Rows use TRL's conversational prompt/completion form:
    {"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": ...}]}

`ood_checks()` adds a few general-knowledge questions, to see how far fine-tuning drifts the model away from what it
already knew (the drift that the KL anchor of ASFT is meant to limit).
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

from ..evaluation.exact_match import normalize

PROMPT_TEMPLATE = "Reverse the order of these words: {words}"
MIN_WORDS, MAX_WORDS = 3, 4
# Common nouns that are a single token (after a space) for SmolLM2's tokenizer, so sequences stay short.
WORDS = tuple(
    """
    anchor apple basket bottle bread bridge bucket button cactus candle carpet castle chair cloud cookie desert
    dolphin dragon eagle engine falcon feather forest garden glacier guitar hammer harbor horse island jacket
    jungle kettle ladder lamp lemon magnet meadow mirror mountain needle ocean orange orchid oyster parrot
    pencil pepper piano pillow pirate planet puzzle quartz rabbit rainbow river rocket saddle shark shovel
    silver spider stone tiger tomato trumpet tunnel turtle umbrella velvet violin volcano wagon wallet window
    yogurt zebra
    """.split()
)

# (question, answer) pairs the untrained SmolLM2-135M-Instruct gets right, so a drop after fine-tuning means forgetting.
OOD_QUESTIONS = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color are leaves in summer?", "green"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of big?", "small"),
    ("What is the opposite of day?", "night"),
    ("How many legs does a dog have?", "four"),
    ("What is 2 + 2?", "4"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What gas do humans need to breathe?", "oxygen"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What language is spoken in Spain?", "Spanish"),
    ("What language is spoken in France?", "French"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is the boiling point of water in Celsius?", "100"),
)


def _example(prompt: str, answer: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def _sample_words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(MIN_WORDS, MAX_WORDS))


def make_splits(n_train: int = 800, n_eval: int = 64, seed: int = 0) -> DatasetDict:
    """Generate `train` and `test` splits of distinct prompts; the same seed always gives the same splits.

    Prompts are drawn without repetition across both splits, so test accuracy measures the learned rule, not
    memorized examples.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    rows = []
    while len(rows) < n_train + n_eval:
        words = _sample_words(rng)
        if tuple(words) in seen:
            continue
        seen.add(tuple(words))
        rows.append(_example(PROMPT_TEMPLATE.format(words=" ".join(words)), " ".join(reversed(words))))
    return DatasetDict(train=Dataset.from_list(rows[:n_train]), test=Dataset.from_list(rows[n_train:]))


def ood_checks() -> Dataset:
    """Out-of-domain questions, scored with `score(..., match="contains")`, to measure forgetting."""
    return Dataset.from_list([_example(q, a) for q, a in OOD_QUESTIONS])


def _is_correct(generated: str, gold: str, match: str) -> bool:
    generated, gold = normalize(generated), normalize(gold)
    if match == "exact":
        return generated == gold
    if match == "contains":
        return f" {gold} " in f" {generated} "
    raise ValueError(f"match={match!r} is not supported; use 'exact' or 'contains'.")


def score(
    model, tokenizer, dataset: Dataset, max_new_tokens: int = 16, batch_size: int = 16, match: str = "exact"
) -> dict:
    """Accuracy of greedy generation against the gold completions of `dataset`.

    `match="exact"` compares normalized strings; `match="contains"` accepts any answer containing the gold one (for
    the free-form `ood_checks()`). Returns `{"accuracy", "correct", "total", "failures"}`, where `failures` lists up
    to 5 `(prompt, gold, generated)` triples for a quick look.
    """
    from ..evaluation.generation import generate_hf  # torch and transformers: only when scoring

    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only models must generate from right-aligned prompts
    rows = dataset[:]  # plain lists of the columns
    try:
        samples = generate_hf(
            model,
            tokenizer,
            rows["prompt"],
            num_samples=1,
            temperature=0.0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    correct, failures = 0, []
    for prompt, completion, (generated,) in zip(rows["prompt"], rows["completion"], samples):
        gold = completion[-1]["content"]
        if _is_correct(generated, gold, match):
            correct += 1
        elif len(failures) < 5:
            failures.append((prompt[-1]["content"], gold, generated))
    total = len(dataset)
    return {"accuracy": correct / max(total, 1), "correct": correct, "total": total, "failures": failures}

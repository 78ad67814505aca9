"""Shared fixtures: tiny offline models and small datasets. Nothing here reaches the network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

WORDS = ["cat", "dog", "fox", "quick", "brown", "lazy", "hello", "world", "tiny", "corpus", "answer", "four"]


def prompt_completion_rows(n: int = 16) -> list[dict]:
    """Conversational prompt/completion rows with completions of different lengths."""
    rows = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"reverse the word {word}"}],
                "completion": [{"role": "assistant", "content": " ".join([word[::-1]] * (1 + i % 3))}],
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return tiny.build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def other_vocab_model_path(tmp_path_factory) -> str:
    """A tiny model whose LM head has a different vocabulary size from `tiny_model_path`'s."""
    return tiny.build_model(tmp_path_factory.mktemp("tiny_other") / "model", vocab_size=300)


@pytest.fixture
def pc_dataset():
    from datasets import Dataset

    return Dataset.from_list(prompt_completion_rows())


def make_args(output_dir, **overrides):
    """An ASFTConfig for fast CPU tests; overrides win."""
    from asft_trl import ASFTConfig

    defaults = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        logging_steps=1,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        dataset_num_proc=None,
    )
    defaults.update(overrides)
    return ASFTConfig(**defaults)

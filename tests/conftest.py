"""Shared fixtures: tiny offline models and small datasets (built by `tiny.py`, whose helpers the tests import).
Nothing here reaches the network."""

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

# Tests written before the helpers moved to tiny.py (and on branches not merged yet) import these from here
from tiny import WORDS, make_args, prompt_completion_rows  # noqa: E402, F401


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return tiny.build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def other_vocab_model_path(tmp_path_factory) -> str:
    """A tiny model whose LM head has a different vocabulary size from `tiny_model_path`'s."""
    return tiny.build_model(tmp_path_factory.mktemp("tiny_other") / "model", vocab_size=300)


@pytest.fixture(scope="session")
def tied_model_path(tmp_path_factory) -> str:
    """A tiny model whose LM head is tied to its input embeddings."""
    return tiny.build_model(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


@pytest.fixture
def pc_dataset():
    from datasets import Dataset

    return Dataset.from_list(tiny.prompt_completion_rows())


@pytest.fixture
def no_launch(monkeypatch):
    """`asft-trl train` in this process, with accelerate's launch replaced: a test fails if anything is launched."""
    import accelerate.commands.launch as launch

    def launched(args):
        raise AssertionError("accelerate launch was called: the error was not caught before launching")

    monkeypatch.setattr(launch, "launch_command", launched)

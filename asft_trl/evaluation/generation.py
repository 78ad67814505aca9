"""Load the model to evaluate and sample answers from it: vLLM when installed and a GPU is present, batched Hugging
Face `generate` otherwise. Both return the same thing (a list of samples per prompt), so the rest of the evaluation
does not know which ran.

Prompts are chat turns (lists of messages, rendered with the tokenizer's chat template) or plain strings.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def load_model_and_tokenizer(model_path: str, adapter: str | None = None, dtype: str = "auto"):
    """The model in eval mode (with a PEFT adapter on top when given) and its tokenizer, padding on the left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    tokenizer = (
        AutoTokenizer.from_pretrained(adapter or model_path)
        if adapter and _has_tokenizer(adapter)
        else AutoTokenizer.from_pretrained(model_path)
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if torch.cuda.is_available():
        model = model.to("cuda")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only models generate from right-aligned prompts
    return model.eval(), tokenizer


def _has_tokenizer(folder: str) -> bool:
    from pathlib import Path

    return (Path(folder) / "tokenizer_config.json").is_file()


def render_prompts(tokenizer, prompts: list) -> tuple[list[str], bool]:
    """Prompt strings, and whether they were rendered by the chat template (which adds its own special tokens)."""
    chat = [isinstance(p, list) for p in prompts]
    if any(chat) and not all(chat):
        raise ValueError("Prompts mix chat turns and plain strings; render them with one template.")
    if not chat or not chat[0]:
        return list(prompts), False
    if not tokenizer.chat_template:
        raise ValueError("The tokenizer has no chat template; use --template alpaca or --template raw.")
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts], True


def use_vllm(backend: str) -> bool:
    if backend == "hf":
        return False
    import importlib.util

    import torch

    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if backend == "vllm" and not available:
        raise RuntimeError("--backend vllm needs the vllm package and a CUDA GPU: pip install 'asft-trl[vllm]'.")
    return available


def generate_hf(
    model,
    tokenizer,
    prompts: list,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
) -> list[list[str]]:
    """`num_samples` completions per prompt with `model.generate`, `batch_size` prompts at a time."""
    import torch
    from tqdm.auto import tqdm

    texts, templated = render_prompts(tokenizer, prompts)
    if temperature > 0:
        # Only sampling draws random numbers: greedy decoding (the quickstart's held-out scoring, right before training)
        # leaves the caller's random state alone
        torch.manual_seed(seed)
        # top_k=0 switches off the top-k filter many generation configs carry: the paper samples with top_p only.
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        sampling = dict(do_sample=False)
    outputs: list[list[str]] = []
    progress = tqdm(total=len(texts), desc="Generating", unit="prompt")
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=not templated).to(model.device)
        with torch.inference_mode():
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        decoded = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        outputs.extend(decoded[i : i + num_samples] for i in range(0, len(decoded), num_samples))
        progress.update(len(batch))
    progress.close()
    return outputs


def generate_vllm(
    model_path: str,
    adapter: str | None,
    tokenizer,
    prompts: list,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int = 0,
) -> list[list[str]]:
    """Same outputs as `generate_hf`, from vLLM (which batches and shows its own progress bar)."""
    from vllm import LLM, SamplingParams

    texts, _ = render_prompts(tokenizer, prompts)
    llm = LLM(model=model_path, enable_lora=adapter is not None, seed=seed)
    params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, adapter)
    results = llm.generate(texts, params, lora_request=lora, use_tqdm=True)
    return [[sample.text for sample in result.outputs] for result in results]

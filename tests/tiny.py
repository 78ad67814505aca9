"""What the tests share, in every folder of tests/: tiny offline models (a `tokenizers` BPE wrapped as a fast
tokenizer with a chat template, a small Llama or another architecture saved with save_pretrained), small datasets, the
`ASFTConfig` of a fast CPU run, LoRA set-ups, the fused-against-plain training run, and recipes run through the
command line. Nothing here touches the network. (`conftest.py` turns the models and datasets into fixtures.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FIXTURES = TESTS_DIR / "fixtures"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is two plus two ? the answer is four",
    "reverse the word cat : tac",
    "hello world , this is a tiny corpus for a tiny tokenizer",
    "0 1 2 3 4 5 6 7 8 9 abcdefghijklmnopqrstuvwxyz",
]


def build_tokenizer(vocab_size: int = 256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<pad>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Tiny configurations of other architectures whose heads the fused loss reads differently: soft-capping (Gemma2),
# `logit_scale` (Cohere), `logits_scaling` (Granite), an MoE router (Qwen3-MoE), QK-norm (Qwen3, OLMo2), biases on
# q/k/v (Qwen2); Gemma2 and Cohere tie their heads. The head transforms are set where they bite at this scale.
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 8,
            "final_logit_softcapping": 2.0,
            "attn_logit_softcapping": 50.0,
            "query_pre_attn_scalar": 8,
            "sliding_window": 16,
        },
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {
            "logits_scaling": 4.0,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.125,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def build_model(
    path: str | Path,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    architecture: str | None = None,
) -> str:
    """Save a tiny model and the tiny tokenizer to `path`; return the path as a string.

    A Llama (4 heads, 2 key/value heads, MLP 2 x hidden), or with `architecture` (a key of ARCHITECTURES) a model of
    that architecture with the same sizes and its own head (tied or not as the architecture's config has it).
    """
    import torch
    import transformers

    config_name, model_name, extra = (
        ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": tie_word_embeddings})
        if architecture is None
        else ARCHITECTURES[architecture]
    )
    path = Path(path)
    tokenizer = build_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def assert_every_parameter_moved(start: dict, end: dict) -> None:
    """Every parameter in `start` (name -> tensor before training; pass the trainable ones) differs in `end`.

    Per parameter, as TRL's trainer tests check: one global maximum would also pass if a bug froze every layer but
    one (adapters never enabled, a head left out of the optimizer)."""
    import torch

    assert start, "no trainable parameters to compare"
    still = [n for n in start if torch.equal(start[n], end[n])]
    assert not still, f"{len(still)} of {len(start)} trainable parameters did not move: {still[:10]}"


# ---------------------------------------------------------------------------------------------------- data and runs

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


def lora_config(target_modules=("q_proj", "v_proj", "o_proj"), **overrides):
    """The tests' LoRA: rank 4, alpha 8, on `target_modules`; overrides (dropout, modules_to_save, ...) win."""
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": list(target_modules), **overrides})


def sgd_args(output_dir, *, fused: bool, **overrides):
    """The config of a fused-against-plain comparison: plain SGD, no clipping, a constant rate, kl_coef 0.5 so the KL
    term matters, and chunks of 7 tokens so the fused loss runs several; overrides win."""
    settings = dict(
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        use_fused_loss=fused,
        kl_coef=0.5,
        loss_chunk_size=7,
    )
    return make_args(output_dir, **{**settings, **overrides})


def train_moved_policy(model_path, dataset, out, *, fused, peft=False, **overrides):
    """Two plain SGD steps (no clipping) from a policy moved away from its reference, so the KL term matters. Returns
    the trainable parameters after training and the training log entries; checks that every one of them moved."""
    import torch

    from asft_trl import ASFTTrainer

    args = sgd_args(out, fused=fused, **{"max_steps": 2, "learning_rate": 2.0, **overrides})
    trainer = ASFTTrainer(model_path, args=args, train_dataset=dataset, peft_config=lora_config() if peft else None)
    assert trainer.use_fused_loss is fused
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(trainer.model.named_parameters()):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    end = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    motion = max((end[k] - start[k]).abs().max().item() for k in start)
    assert motion > 1e-2  # the weights really moved
    assert_every_parameter_moved(start, end)
    return end, history


# ---------------------------------------------------------------------------------------------------- the command line


def write_recipe(tmp_path: Path, model_path: str, rows: int = 12, **overrides) -> Path:
    """A training recipe on `rows` prompt/completion rows written to a local file; overrides win."""
    import yaml

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in prompt_completion_rows(rows)))
    recipe = {
        "model_name_or_path": model_path,
        "dataset_name": str(data),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        "kl_coef": 0.1,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "gradient_checkpointing": False,
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args, timeout=300):
    """`asft-trl ARGS` in a fresh process, offline."""
    cli = [sys.executable, "-c", "import sys; from asft_trl.scripts.cli import main; sys.exit(main())", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cli, capture_output=True, text=True, timeout=timeout, env=env)


def train_error(capsys, *argv) -> str:
    """Run `asft-trl train ARGV` in this process; it must end with exit status 2 and one line, no traceback."""
    from asft_trl.scripts import cli

    try:
        status = cli.main(["train", *map(str, argv)])
    except SystemExit as exit:  # argparse's own exit
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.strip().splitlines() if "kernels-community" not in line]  # bitsandbytes' import note
    assert "Traceback" not in err and lines[-1].startswith("asft-trl train: error: "), err
    return lines[-1]

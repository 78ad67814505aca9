"""Peak memory and step time of TRL's SFTTrainer against ASFT (fused and plain), on one random model.

    python benchmarks/loss_benchmark.py                       # the full CPU matrix, table + JSON
    python benchmarks/loss_benchmark.py --vocab 151936 --seq 512 --modes lora full   # the targets' row only
    python benchmarks/loss_benchmark.py --device cuda --dtype bfloat16 --hidden 896 --layers 24 --heads 14 \\
        --kv-heads 2 --intermediate 4864 --seq 2048 --out benchmarks/results/gpu.json      # a 0.5B-shaped model

Every (method, vocabulary, sequence length, mode) runs in a fresh process, so one run's memory can't leak into the
next. A step is the Trainer's whole optimisation step: forward, backward and optimizer. The methods:
- `trl_sft`: TRL's `SFTTrainer` (its fused LM head), loss_type "nll";
- `ours_sft`: `ASFTTrainer` with kl_coef=0, loss_type "nll" (must match `trl_sft`);
- `asft_fused`: `ASFTTrainer`, DFT + 0.05 KL, the chunked fused loss (the default);
- `asft_plain`: the same with `use_fused_loss=False` (full logits of policy and reference);
- `asft_precomputed`: `asft_fused` with the precomputed top-`--topk` reference (no reference model during training;
  the pass before training is timed separately as `init_s`).

Memory. CUDA: `torch.cuda.max_memory_allocated` during training. CPU: the process's peak resident memory during
training (VmHWM, reset just before `train()`) minus its resident memory after the imports, with glibc told to return
large blocks at once (`MALLOC_MMAP_THRESHOLD_`) so the peak follows live tensors. Both include the weights, gradients,
optimizer state and activations. A run that needs more than `--memory-limit-gb` (an address-space limit on CPU,
which protects a shared machine) is reported as "OOM".

Nothing here is a test: the figures depend on the machine. Compare ratios taken within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("trl_sft", "ours_sft", "asft_fused", "asft_plain", "asft_precomputed")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<eos>",
    )


def _dataset(cfg):
    """Pre-tokenised random rows: the first half of each sequence is prompt, the second half completion (scored only
    with `completion_only_loss=True`, which every trainer here is given)."""
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    n_rows = cfg["batch"] * (cfg["steps"] + 1)
    seq, prompt = cfg["seq"], cfg["seq"] // 2
    ids = torch.randint(2, cfg["vocab"], (n_rows, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "completion_mask": [[0] * prompt + [1] * (seq - prompt)] * n_rows})


def _model(cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["seq"],
        tie_word_embeddings=cfg["tied"],
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(getattr(torch, cfg["dtype"]))


def _worker(cfg) -> dict:
    """One measurement, in this (fresh) process. Prints the result as the last line of stdout."""
    import resource

    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from asft_trl import ASFTConfig, ASFTTrainer

    cuda = cfg["device"] == "cuda"
    if not cuda:
        limit = _rss_kib("VmSize") * 1024 + int(cfg["memory_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base_rss = _rss_kib("VmRSS")

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    common = dict(
        output_dir=cfg["output_dir"],
        per_device_train_batch_size=cfg["batch"],
        max_steps=cfg["steps"] + 1,  # the first step warms up and is not timed
        max_length=cfg["seq"],
        # The rows are pre-tokenised (no prompt/completion columns), where TRL would score every position unless
        # told to read the completion mask: score the completion half only, as a fine-tuning run does.
        completion_only_loss=True,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        activation_checkpointing=False,
        bf16=cfg["dtype"] == "bfloat16",
        use_cpu=not cuda,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft = None
    if cfg["mode"] == "lora":
        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    method = cfg["method"]
    try:
        model, data, tok = _model(cfg), _dataset(cfg), _tokenizer()
        init_start = time.perf_counter()
        if method == "trl_sft":
            trainer = SFTTrainer(
                model,
                args=SFTConfig(**common, loss_type="nll"),
                train_dataset=data,
                processing_class=tok,
                peft_config=peft,
                callbacks=[StepTimer()],
            )
        else:
            loss = dict(kl_coef=0.0, loss_type="nll") if method == "ours_sft" else dict(kl_coef=0.05, loss_type="dft")
            if method == "asft_precomputed":
                # A fresh folder per run, so the pass is really made (and timed) rather than read back
                loss.update(
                    precompute_ref_log_probs=True,
                    precompute_ref_topk=cfg["topk"],
                    precompute_ref_cache_dir=f"{cfg['output_dir']}/cache-{os.getpid()}",
                )
            args = ASFTConfig(**common, **loss, use_fused_loss=method != "asft_plain")
            trainer = ASFTTrainer(
                model, args=args, train_dataset=data, processing_class=tok, peft_config=peft, callbacks=[StepTimer()]
            )
        init_s = time.perf_counter() - init_start
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        trainer.train()
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "memory" not in str(error).lower():
            raise
        return {**cfg, "status": "OOM", "peak_mib": None, "step_s": None}
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (_rss_kib("VmHWM") - base_rss) / 1024
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    return {
        **cfg,
        "status": "ok",
        "peak_mib": round(peak_mib, 1),
        "step_s": round(statistics.median(times[1:]), 4),
        "step_s_all": [round(t, 4) for t in times],
        "init_s": round(init_s, 2),
        "final_kl": kl[-1] if kl else None,
    }


def _run(cfg) -> dict:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="65536",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    killed = proc.returncode < 0 or "MemoryError" in proc.stderr or "out of memory" in proc.stderr.lower()
    tail = proc.stderr.strip().splitlines()[-3:]
    return {**cfg, "status": "OOM" if killed else "error", "peak_mib": None, "step_s": None, "error": tail}


def _ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def _table(results: list[dict]) -> str:
    by_key = {(r["vocab"], r["seq"], r["mode"], r["method"]): r for r in results}
    head = (
        "| vocab | seq | mode | method | peak MiB | step s | peak / trl_sft | step / trl_sft |\n"
        "|---:|---:|---|---|---:|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        ref = by_key.get((r["vocab"], r["seq"], r["mode"], "trl_sft"), {})
        peak = "OOM" if r["status"] == "OOM" else (r["peak_mib"] if r["status"] == "ok" else r["status"])
        rows.append(
            f"| {r['vocab']} | {r['seq']} | {r['mode']} | {r['method']} | {peak} | {r['step_s'] or '-'} | "
            f"{_ratio(r['peak_mib'], ref.get('peak_mib'))} | {_ratio(r['step_s'], ref.get('step_s'))} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--vocab", nargs="+", type=int, default=[32000, 151936])
    parser.add_argument("--seq", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--topk", type=int, default=64, help="k of the asft_precomputed method")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--tied", action="store_true", help="tie the LM head to the input embeddings")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--memory-limit-gb", type=float, default=12.0)
    parser.add_argument("--out", default="benchmarks/results/loss_benchmark_cpu.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    import torch
    from tqdm import tqdm

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = [
        dict(
            method=m,
            vocab=v,
            seq=s,
            mode=mode,
            batch=args.batch,
            steps=args.steps,
            hidden=args.hidden,
            intermediate=args.intermediate,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            tied=args.tied,
            topk=args.topk,
            device=args.device,
            dtype=args.dtype,
            memory_limit_gb=args.memory_limit_gb,
            output_dir=str(out.parent / "_scratch"),
        )
        for v in args.vocab
        for s in args.seq
        for mode in args.modes
        for m in args.methods
    ]
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "command": " ".join(sys.argv),
    }
    results = []
    for cfg in tqdm(configs, desc="benchmark runs"):
        results.append({**_run(cfg), "load_average": os.getloadavg()[0]})
        tqdm.write(
            f"{cfg['method']:>10} V={cfg['vocab']} T={cfg['seq']} {cfg['mode']}: "
            f"{results[-1]['status']} peak={results[-1]['peak_mib']} MiB step={results[-1]['step_s']} s"
        )
        # Written after every run, so an interrupted matrix keeps what it measured
        out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(_table(results))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

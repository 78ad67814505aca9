"""A notebook cell re-run: does a trainer stay in memory after `del trainer` while its model object lives on?

    python benchmarks/notebook_rerun_memory.py                 # table + benchmarks/results/notebook_rerun_cpu.json
    python benchmarks/notebook_rerun_memory.py --kl-coef 0 --trainers 3

What a notebook user does: load SmolLM2-135M-Instruct once, then run the same cell several times, each building an
`ASFTTrainer` (full fine-tuning, so each trainer has a frozen reference copy and AdamW states), training a few steps and
ending with `del trainer`. The model object stays alive across cells. After each trainer: `gc.collect()`, glibc's
`malloc_trim(0)` (so freed memory is handed back and RSS shows what is still held), then the process RSS and how many
`ASFTTrainer` objects are still alive (weak references), and how many `forward` wrappers the model's forward carries.

Nothing here is a test (tests/trainer/test_notebook_rerun.py is); the RSS depends on the machine and the allocator.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import weakref
from pathlib import Path

DEFAULT_MODEL = Path("outputs/models/SmolLM2-135M-Instruct-Q4_1-dequantized")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then keep freed pages
        pass


def forward_wrappers(model) -> int:
    """How many wrappers sit on the model's instance `forward`: each (TRL's fused head, this package's patch) closes
    over the forward it wraps, down to the class's own."""
    depth, forward = 0, model.__dict__.get("forward")
    while forward is not None and getattr(forward, "__func__", None) is not type(model).forward:
        depth += 1
        inner = None
        for cell in getattr(getattr(forward, "__func__", forward), "__closure__", None) or ():
            value = cell.cell_contents
            if callable(value) and getattr(value, "__name__", None) == "forward" and value is not forward:
                inner = value
        forward = inner
    return depth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the quickstart's offline SmolLM2 copy)")
    parser.add_argument("--trainers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--label", default=None, help="name of this measurement in the JSON (e.g. before/after)")
    parser.add_argument("--out", default="benchmarks/results/notebook_rerun_cpu.json")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_trl import ASFTConfig, ASFTTrainer
    from asft_trl.quickstart.model import HUB_ID, resolve_quickstart_model
    from asft_trl.quickstart.task import make_splits

    path = args.model or (
        str(DEFAULT_MODEL) if DEFAULT_MODEL.is_dir() else resolve_quickstart_model(HUB_ID, cache_dir="outputs/models")
    )
    trim()
    rows = [{"after": "start", "rss_mb": round(rss_mb(), 1)}]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = make_splits(seed=0)["train"].select(range(64))
    trim()
    rows.append({"after": "model loaded", "rss_mb": round(rss_mb(), 1), "forward_wrappers": forward_wrappers(model)})
    for row in rows:
        print(f"{row['after']:>14}: {row['rss_mb']:8.1f} MB")
    alive = []
    for i in range(1, args.trainers + 1):
        trainer = ASFTTrainer(
            model,
            args=ASFTConfig(
                output_dir=f"/tmp/notebook_rerun_{os.getpid()}",
                max_steps=args.steps,
                kl_coef=args.kl_coef,
                per_device_train_batch_size=4,
                max_length=64,
                learning_rate=1e-5,
                report_to="none",
                save_strategy="no",
                logging_steps=1,
                disable_tqdm=True,
                dataset_num_proc=None,
                activation_checkpointing=False,
            ),
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
        alive.append(weakref.ref(trainer))
        del trainer
        trim()
        row = {
            "after": f"trainer {i}",
            "rss_mb": round(rss_mb(), 1),
            "trainers_alive": sum(ref() is not None for ref in alive),
            "forward_wrappers": forward_wrappers(model),
        }
        rows.append(row)
        print(
            f"{row['after']:>14}: {row['rss_mb']:8.1f} MB   trainers alive: {row['trainers_alive']}   "
            f"forward wrappers: {row['forward_wrappers']}",
            flush=True,
        )

    result = {
        "label": args.label,
        "model": path,
        "kl_coef": args.kl_coef,
        "steps": args.steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    previous[args.label or f"kl_coef={args.kl_coef}"] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helper for tests/distributed/test_equivalence.py: a short, deterministic ASFT run that records what it saw.

Run as one process (`python tests/dist_train.py ...`) or several (`python -m torch.distributed.run --nproc_per_node 2
tests/dist_train.py ...`, gloo on CPU). It writes into `--out`:

- `weights.pt` (main process only): the trained model's state dict, moved to CPU;
- `result.json` (main process only): `num_processes`, `world_size`, the Trainer's `log_history`;
- `batches-rank{k}.json` (every process): for each micro-batch the optimizer step it belonged to, the unpadded
  `input_ids` rows it held, the `num_items_in_batch` it was normalised by and its own completion-token count, so the
  test can check that each optimizer step covered the same global set of examples as the single-process run.

`make_dataset()` and `training_args()` are imported by the test too, so the in-process and the launched runs share
one definition of the data and of the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Completion lengths (in words) that differ a lot, in an order such that every micro-batch of every split used by the
# tests holds a different number of completion tokens: a per-micro-batch (or per-process) mean then gives another
# gradient than the mean over the whole optimizer step.
COMPLETION_WORDS = [1, 18, 2, 3, 12, 1, 7, 25, 2, 9, 1, 16, 4, 1, 22, 6, 3, 11, 1, 2, 20, 5, 1, 14]
WORDS = (
    "the quick brown fox jumps over the lazy dog what is two plus two the answer is four reverse the word cat "
    "hello world this is a tiny corpus for a tiny tokenizer"
).split()


def make_dataset(n: int = 24):
    """Prompt/completion examples whose completions have clearly different lengths."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        length = COMPLETION_WORDS[i % len(COMPLETION_WORDS)]
        completion = " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(length))
        rows.append({"prompt": f"example {i} : {WORDS[i % len(WORDS)]} ?", "completion": " " + completion})
    return Dataset.from_list(rows)


def training_args(
    output_dir,
    *,
    batch_size: int,
    grad_accum: int,
    learning_rate: float,
    loss_type: str = "dft",
    kl_coef: float = 0.1,
    max_steps: int = 3,
    **overrides,
):
    """Plain SGD at a constant rate, no clipping, no weight decay, examples in dataset order."""
    from asft_trl import ASFTConfig

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # 0 switches clipping off in the Trainer
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        gradient_checkpointing=False,
        shuffle_dataset=False,  # TRL's own pre-shuffle of the dataset
        train_sampling_strategy="sequential",  # the Trainer's sampler: dataset order
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        disable_tqdm=True,
        kl_coef=kl_coef,
        loss_type=loss_type,
    )
    kwargs.update(overrides)
    return ASFTConfig(**kwargs)


def recording_trainer_class():
    """ASFTTrainer that records, per micro-batch, the optimizer step, the unpadded rows, `num_items_in_batch` and the
    micro-batch's own completion-token count."""
    from asft_trl import ASFTTrainer

    class RecordingASFTTrainer(ASFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
                rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
                n = num_items_in_batch.item() if hasattr(num_items_in_batch, "item") else num_items_in_batch
                local = int((inputs["labels"][:, 1:] != -100).sum())  # this micro-batch's completion tokens
                if not hasattr(self, "recorded_batches"):
                    self.recorded_batches = []
                self.recorded_batches.append(
                    {"step": self.state.global_step, "rows": rows, "num_items": n, "local_items": local}
                )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return RecordingASFTTrainer


# ---------------------------------------------------------------------------------------------------- for the tests
# (tests/distributed, and the trainer and recipe tests that compare a launched run with one in process)

REPO_ROOT = Path(__file__).resolve().parents[1]


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    """The largest absolute difference between two state dicts with the same names, and where it is."""
    assert a.keys() == b.keys(), f"different parameter names: {sorted(a.keys() ^ b.keys())}"
    worst = max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())
    return (a[worst].float() - b[worst].float()).abs().max().item(), worst


def step_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


SUBPROCESS_TIMEOUT = 300


def launch(cmd: list[str], what: str) -> None:
    """Run `cmd` (a launch of this script, or of another) from the repository's root, offline; a failure or a timeout
    fails the calling test with the tails of its output."""
    import subprocess

    import pytest

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-4000:]
        pytest.fail(f"{what} did not finish within {SUBPROCESS_TIMEOUT}s: {' '.join(cmd)}\nstderr tail:\n{tail}")
    if proc.returncode != 0:
        pytest.fail(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"stdout tail:\n{proc.stdout[-2000:]}\nstderr tail:\n{proc.stderr[-6000:]}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="path of the tiny model (tests/tiny.py build_model)")
    parser.add_argument("--out", required=True, help="folder for weights.pt, result.json, batches-rank*.json")
    parser.add_argument("--batch-size", type=int, required=True, help="per-device micro-batch size")
    parser.add_argument("--grad-accum", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--loss-type", default="dft")
    parser.add_argument("--kl-coef", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument(
        "--precompute-topk",
        type=int,
        default=0,
        help="train against the precomputed top-k reference (0: the live reference model)",
    )
    parser.add_argument("--dft-normalization", default="tokens", help="ASFTConfig.dft_normalization")
    parser.add_argument(
        "--no-average-tokens-across-devices",
        action="store_true",
        help="normalise by each process's own token count (the control: must differ)",
    )
    opts = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    args = training_args(
        out / "trainer",
        batch_size=opts.batch_size,
        grad_accum=opts.grad_accum,
        learning_rate=opts.learning_rate,
        loss_type=opts.loss_type,
        kl_coef=opts.kl_coef,
        max_steps=opts.max_steps,
        average_tokens_across_devices=not opts.no_average_tokens_across_devices,
        dft_normalization=opts.dft_normalization,
        **(
            {"precompute_ref_log_probs": True, "precompute_ref_topk": opts.precompute_topk}
            if opts.precompute_topk
            else {}
        ),
    )
    trainer = recording_trainer_class()(
        model=opts.model,
        args=args,
        train_dataset=make_dataset(),
        processing_class=AutoTokenizer.from_pretrained(opts.model),
    )
    trainer.train()

    rank = trainer.accelerator.process_index
    (out / f"batches-rank{rank}.json").write_text(json.dumps(getattr(trainer, "recorded_batches", [])))
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / "weights.pt")
        result = {
            "num_processes": trainer.accelerator.num_processes,
            "world_size": trainer.args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "log_history": trainer.state.log_history,
            "train_dataset_input_ids": [list(row) for row in trainer.train_dataset["input_ids"]],
        }
        (out / "result.json").write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def exit_without_teardown(code: int) -> None:
    """End a launched process: gloo's background threads can abort the interpreter's own teardown ("terminate called
    without an active exception") after every result is written, so leave without running it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())

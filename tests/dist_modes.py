"""Helper for tests/distributed/test_launch_shapes.py: several short ASFT trainings in one launch, each recording what
it ran as.

Run under a shipped accelerate config, the way a user launches a recipe, or as one plain process for the baseline:

    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 2 --mixed_precision no \\
        tests/dist_modes.py --models DIR --out DIR --runs full,tied,lora,resume
    python tests/dist_modes.py --models DIR --out DIR --runs full,tied,lora

Every run trains 3 plain-SGD steps of 8 examples (dataset order; `tests/dist_train.py`'s data and settings), split as
2 examples x 2 accumulation steps per process on 2 processes and 4 x 2 on one. For each run it writes into `--out/RUN/`
(main process):
- `weights.pt`: every parameter of the trained policy, gathered whole, on CPU (and `initial.pt`, the same before
  training, from the one-process baseline);
- `reference.pt`: the reference model's parameters after training, gathered whole (full fine-tuning only);
- `result.json`: the Trainer's log history and the facts that identify the mode, gathered from every process
  (distributed type, ZeRO stage and each process's share of the parameters / optimizer state, DTensor shards, the
  reference's wrapper, the heads and dtypes the loss was given).

`benchmarks/gpu_check.py` launches it on one GPU too (`--device cuda`, 1 process, the `bf16` run). Only test settings
live here: what ASFT does under each mode is the package's and the libraries' own code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> what differs from the common settings. `model` names a folder under --models (tests/tiny.py builds them).
RUNS = {
    "full": dict(model="untied"),  # full fine-tuning, the default reference (a frozen copy; reloaded under ZeRO-3)
    "tied": dict(model="tied"),  # the LM head tied to the input embeddings
    "lora": dict(model="untied", peft=True),  # the reference is the adapters-off policy: no second model
    "resume": dict(model="untied", resume=True),  # stop after step 2 (checkpoint), resume in a new trainer to step 3
    "bf16": dict(model="untied", bf16=True),  # mixed precision: the anchor must be exactly the policy at step 0
    "named": dict(model="untied", named_reference=True),  # the reference loaded from a path (the starting model's)
}
GLOBAL_BATCH, GRAD_ACCUM, STEPS = 8, 2, 3
# See tests/distributed/test_equivalence.py: DFT at random init needs large rates
LEARNING_RATES = {"full": 100.0, "lora": 1000.0}
KL_COEF = 0.1


def lora_config():
    import tiny

    return tiny.lora_config(["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)


def build_trainer(run: str, models: Path, out: Path, world_size: int, device: str = "cpu", **overrides):
    import dist_train
    from transformers import AutoTokenizer

    spec = RUNS[run]
    model_path = str(models / spec["model"])
    args = dist_train.training_args(
        out / "trainer",
        batch_size=GLOBAL_BATCH // (world_size * GRAD_ACCUM),
        grad_accum=GRAD_ACCUM,
        learning_rate=LEARNING_RATES["lora" if spec.get("peft") else "full"],
        kl_coef=KL_COEF,
        max_steps=STEPS,
        bf16=bool(spec.get("bf16")),
        ref_model_name_or_path=model_path if spec.get("named_reference") else None,
        use_cpu=device == "cpu",
        **overrides,
    )
    return dist_train.recording_trainer_class()(
        model=model_path,
        args=args,
        train_dataset=dist_train.make_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=lora_config() if spec.get("peft") else None,
    )


# ------------------------------------------------------------------------------------------ what ran, gathered


def _is_zero3(trainer) -> bool:
    return trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3


def gathered(module, zero3: bool) -> dict:
    """Every parameter of `module`, whole and on CPU, on every process (collective: all processes call it)."""
    from torch.distributed.tensor import DTensor

    named = list(module.named_parameters())
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {name: p.detach().cpu().clone() for name, p in named}
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone() for name, p in named}


def _local_share(params) -> dict:
    """This process's share of the elements of `params` (ZeRO-3 partitions or DTensor shards), and how it holds them."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    if params and all(hasattr(p, "ds_tensor") for p in params):
        local = sum(p.ds_tensor.numel() for p in params)
        return {
            "kind": "zero3_partition",
            "local": local,
            "total": total,
            "empty_outside_forward": all(p.numel() == 0 for p in params),
        }
    if params and all(isinstance(p, DTensor) for p in params):
        local = sum(p.to_local().numel() for p in params)
        placements = sorted({str(p.placements) for p in params})
        return {"kind": "dtensor", "local": local, "total": total, "placements": placements}
    return {"kind": "whole", "local": total, "total": total}


def mode_facts(trainer) -> dict:
    """What this process actually ran as: the numbers a silent fallback would change."""
    from torch.distributed.fsdp import FSDPModule

    state = trainer.accelerator.state
    policy = trainer.accelerator.unwrap_model(trainer.model)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    facts = {
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "num_processes": trainer.accelerator.num_processes,
        "mixed_precision": str(state.mixed_precision),
        "policy": _local_share(policy.parameters()),
        "reference": None,
    }
    if trainer.is_deepspeed_enabled:
        engine = trainer.model_wrapped
        facts["engine"] = type(engine).__name__
        facts["zero_stage"] = engine.zero_optimization_stage()
        optimizer = engine.optimizer
        facts["optimizer"] = type(optimizer).__name__
        partitions = getattr(optimizer, "single_partition_of_fp32_groups", None) or getattr(
            optimizer, "fp32_partitioned_groups_flat", None
        )
        if partitions:
            total = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable)
            facts["optimizer_share"] = {"local": sum(t.numel() for t in partitions), "total": total}
    if trainer.is_fsdp_enabled:
        facts["fsdp_version"] = state.fsdp_plugin.fsdp_version
        facts["policy_is_fsdp_module"] = isinstance(trainer.model_wrapped, FSDPModule) or isinstance(
            trainer.model, FSDPModule
        )
    ref = trainer.ref_model
    if ref is not None:
        inner = getattr(ref, "module", ref)
        facts["reference"] = {
            "wrapper": type(ref).__name__,
            "is_fsdp_module": isinstance(ref, FSDPModule),
            "zero_stage": ref.zero_optimization_stage() if hasattr(ref, "zero_optimization_stage") else None,
            "share": _local_share(inner.parameters()),
            "trainable": sum(p.numel() for p in inner.parameters() if p.requires_grad),
            "is_policy": inner is policy,
        }
    return facts


# What the package was given during the current run, recorded by `install_recorders`
RECORDED: dict[str, list] = {"loss_heads": [], "reference_loads": []}


def install_recorders() -> None:
    """Wrap, once, the fused loss (the dtypes and shapes of the heads it is given) and the loading of a reference
    from a path (the `device_map` it is given; "unset" means TRL's default, "auto" on GPUs)."""
    import asft_trl.reference.lm_head as lm_head_module
    import asft_trl.reference.loading as reference_module

    loss, load = lm_head_module.chunked_asft_loss, reference_module.create_model_from_path

    def recording_loss(hidden, weight, labels, ref_hidden=None, ref_weight=None, **kwargs):
        RECORDED["loss_heads"].append(
            {
                "hidden": str(hidden.dtype),
                "weight": str(weight.dtype),
                "weight_shape": list(weight.shape),
                "ref_hidden": None if ref_hidden is None else str(ref_hidden.dtype),
                "ref_weight": None if ref_weight is None else str(ref_weight.dtype),
                "ref_weight_shape": None if ref_weight is None else list(ref_weight.shape),
                "ref_weight_is_weight": ref_weight is weight,
            }
        )
        return loss(hidden, weight, labels, ref_hidden, ref_weight, **kwargs)

    def recording_load(name_or_path, **kwargs):
        RECORDED["reference_loads"].append(str(kwargs.get("device_map", "unset")))
        return load(name_or_path, **kwargs)

    lm_head_module.chunked_asft_loss = recording_loss
    reference_module.create_model_from_path = recording_load


# ------------------------------------------------------------------------------------------ one run


def run_one(run: str, models: Path, out: Path, device: str = "cpu") -> None:
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = out / run
    run_dir.mkdir(parents=True, exist_ok=True)
    for store in RECORDED.values():
        store.clear()
    if RUNS[run].get("resume"):
        first = build_trainer(run, models, run_dir, world_size, device, save_strategy="steps", save_steps=2)
        first.train()
        checkpoint = run_dir / "trainer" / "checkpoint-2"
        first.accelerator.wait_for_everyone()
        del first
        trainer = build_trainer(run, models, run_dir, world_size, device, save_strategy="no")
        trainer.train(resume_from_checkpoint=str(checkpoint))
        # The optimizer steps this trainer ran itself (0-based): the resume must begin at the checkpoint's step
        resumed_at = min(batch["step"] for batch in trainer.recorded_batches)
    else:
        trainer = build_trainer(run, models, run_dir, world_size, device)
        if world_size == 1:  # the baseline also keeps the starting point, to measure how far training moved
            policy = trainer.accelerator.unwrap_model(trainer.model)
            torch.save(gathered(policy, zero3=False), run_dir / "initial.pt")
        trainer.train()
        resumed_at = None

    zero3 = _is_zero3(trainer)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    weights = gathered(policy, zero3)
    reference = None
    if trainer.ref_model is not None:
        reference = gathered(getattr(trainer.ref_model, "module", trainer.ref_model), zero3)
    facts = mode_facts(trainer)
    facts["loss_heads"] = RECORDED["loss_heads"][:2]
    facts["reference_loads"] = list(RECORDED["reference_loads"])
    all_facts = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(all_facts, facts)
    else:
        all_facts = [facts]
    if trainer.accelerator.is_main_process:
        torch.save(weights, run_dir / "weights.pt")
        if reference is not None:
            torch.save(reference, run_dir / "reference.pt")
        result = {
            "run": run,
            "log_history": trainer.state.log_history,
            "global_step": trainer.state.global_step,
            "resumed_at": resumed_at,
            "facts": all_facts,
        }
        (run_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    trainer.accelerator.wait_for_everyone()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="folder holding the tiny models (untied/, tied/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help=f"comma-separated, from {sorted(RUNS)}")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu: gloo, `use_cpu` (the tests); cuda: one GPU per process (benchmarks/gpu_check.py)",
    )
    parser.add_argument(
        "--fsdp-on-cpu",
        action="store_true",
        help="keep accelerate's FSDP plugin on CPU processes (tests/fsdp2_on_cpu.py)",
    )
    opts = parser.parse_args(argv)

    if opts.fsdp_on_cpu:
        from fsdp2_on_cpu import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    if opts.device == "cpu" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        import deepspeed
        import deepspeed.ops

        # DeepSpeed's CPU shared-memory all-reduce is a C++ op compiled on first use (minutes on a small machine);
        # gloo does the same reductions
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Under torchrun (which `accelerate launch` is, here) with `use_cpu`, nothing else starts DeepSpeed's process
        # group before the model is loaded, and ZeRO-3's `zero.Init` would see a world of one
        deepspeed.init_distributed(dist_backend="gloo")

    install_recorders()
    out = Path(opts.out)
    for run in opts.runs.split(","):
        run_one(run, Path(opts.models), out, opts.device)
    return 0


if __name__ == "__main__":
    from dist_train import exit_without_teardown

    exit_without_teardown(main())

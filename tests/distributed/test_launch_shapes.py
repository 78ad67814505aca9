"""The shipped launch shapes on CPU: DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2, 2 processes (gloo), as a user launches them.

Each shape is one `accelerate launch --config_file recipes/accelerate/<shape>.yaml --num_processes 2` of
`tests/dist_modes.py`, which trains several configurations in turn (full fine-tuning with the default reference, a tied
head, LoRA, a checkpoint resume, bf16), 3 plain-SGD steps each with gradient accumulation 2. Every run is compared with
one plain process (the same script, no distribution): the weights after 3 steps that move them by ~2 must agree to
1e-5. A fallback to DDP (or to no sharding) would give the same numbers, so every run also asserts its mode on every
process: the ZeRO stage and each process's share of the parameters and optimizer state, FSDP2's DTensor shards, and
how the reference is wrapped (or that there is none under LoRA).

accelerate drops FSDP on CPU processes; `tests/fsdp2_on_cpu.py` (test-only) keeps it, so that FSDP2 really runs here.
A user who asks for FSDP on CPU is refused by `asft-trl train` instead (the last test).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import dist_modes
import pytest
import torch
from dist_train import launch, max_abs_diff

import tiny
from tiny import REPO_ROOT

ACCELERATE = REPO_ROOT / "recipes" / "accelerate"
ATOL = 1e-5  # float32, another summation order: ~1e-6 here
MIN_MOTION = 1000 * ATOL
MIN_FINAL_KL = 1e-3

# shape -> (shipped accelerate config, runs in its one launch, extra script flags)
SHAPES = {
    "zero2": ("zero2.yaml", ["full", "tied"], []),
    "zero3": ("zero3.yaml", ["full", "tied", "lora", "resume", "bf16"], []),
    "fsdp2": ("fsdp2.yaml", ["full", "tied", "lora", "bf16", "named"], ["--fsdp-on-cpu"]),
}
BASELINE_RUNS = ["full", "tied", "lora"]
CASES = [(shape, run) for shape, (_, runs, _) in SHAPES.items() for run in runs]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    # Other test sessions may run launches on this machine at the same time: never the default port 29500
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _results(out: Path, runs: list[str]) -> dict:
    results = {}
    for run in runs:
        result = json.loads((out / run / "result.json").read_text())
        for name in ("weights", "reference", "initial"):
            path = out / run / f"{name}.pt"
            result[name] = torch.load(path, map_location="cpu") if path.exists() else None
        results[run] = result
    return results


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("launch-shape-models")
    tiny.build_model(folder / "untied")
    tiny.build_model(folder / "tied", tie_word_embeddings=True)
    return folder


@pytest.fixture(scope="module")
def baseline(models, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one-process")
    launch(
        [
            sys.executable,
            dist_modes.__file__,
            "--models",
            str(models),
            "--out",
            str(out),
            "--runs",
            ",".join(BASELINE_RUNS),
        ],
        "1-process baseline",
    )
    return _results(out, BASELINE_RUNS)


@pytest.fixture(scope="module")
def launched(models, tmp_path_factory):
    """shape -> its runs' results, each shape launched once (on first use) with all its runs."""
    cache: dict[str, dict] = {}

    def get(shape: str) -> dict:
        if shape not in cache:
            config, runs, extra = SHAPES[shape]
            out = tmp_path_factory.mktemp(shape)
            launch(
                [
                    sys.executable,
                    "-m",
                    "accelerate.commands.launch",
                    "--config_file",
                    str(ACCELERATE / config),
                    "--num_processes",
                    "2",
                    "--mixed_precision",
                    "no",
                    "--main_process_port",
                    str(_free_port()),
                    dist_modes.__file__,
                    "--models",
                    str(models),
                    "--out",
                    str(out),
                    "--runs",
                    ",".join(runs),
                    *extra,
                ],
                f"{shape} launch (2 processes)",
            )
            cache[shape] = _results(out, runs)
        return cache[shape]

    return get


def _kl(result: dict) -> list[float]:
    return [entry["kl"] for entry in result["log_history"] if "kl" in entry]


def _losses(result: dict) -> list[float]:
    return [entry["loss"] for entry in result["log_history"] if "loss" in entry]


def _split(share: dict, facts: list[dict]) -> None:
    """Each process holds part of the elements, and together they hold all of them (ZeRO-3 may pad)."""
    assert 0 < share["local"] < share["total"], share
    assert share["total"] <= sum(f["local"] for f in facts) < share["total"] * 1.1, facts


# ------------------------------------------------------------------------------------------ the mode itself


@pytest.mark.parametrize("shape, run", CASES)
def test_the_launch_runs_in_the_mode_it_names(launched, shape, run):
    result = launched(shape)[run]
    facts = result["facts"]
    assert len(facts) == 2 and all(f["num_processes"] == 2 for f in facts)
    lora = run == "lora"
    for f in facts:
        assert f["mixed_precision"] == ("bf16" if run == "bf16" else "no")
        ref = f["reference"]
        if shape.startswith("zero"):
            stage = int(shape[-1])
            assert f["distributed_type"] == "DEEPSPEED" and f["engine"] == "DeepSpeedEngine"
            assert f["zero_stage"] == stage
            # ZeRO-2 and -3 partition the optimizer state (here: the float32 master copy SGD updates)
            assert f["optimizer"].startswith("DeepSpeedZeroOptimizer")
            _split(f["optimizer_share"], [g["optimizer_share"] for g in facts])
            if stage == 3:
                # ... and ZeRO-3 the parameters themselves, which are empty outside a forward
                assert f["policy"]["kind"] == "zero3_partition" and f["policy"]["empty_outside_forward"]
                _split(f["policy"], [g["policy"] for g in facts])
            else:
                assert f["policy"]["kind"] == "whole"
            if not lora:
                # TRL's prepare_deepspeed: an inference engine, partitioned like the policy under ZeRO-3 (the
                # reference reloaded from the policy's path, since partitioned weights can't be copied)
                assert ref["wrapper"] == "DeepSpeedEngine" and ref["trainable"] == 0 and not ref["is_policy"]
                if stage == 3:
                    assert ref["zero_stage"] == 3 and ref["share"]["kind"] == "zero3_partition"
                    _split(ref["share"], [g["reference"]["share"] for g in facts])
                else:
                    assert ref["zero_stage"] == 0 and ref["share"]["kind"] == "whole"
        else:
            assert f["distributed_type"] == "FSDP" and f["fsdp_version"] == 2 and f["policy_is_fsdp_module"]
            assert f["policy"]["kind"] == "dtensor" and f["policy"]["placements"] == ["(Shard(dim=0),)"]
            _split(f["policy"], [g["policy"] for g in facts])
            if not lora:
                assert ref["is_fsdp_module"] and ref["trainable"] == 0 and not ref["is_policy"]  # TRL's prepare_fsdp
                assert ref["share"]["kind"] == "dtensor"
                _split(ref["share"], [g["reference"]["share"] for g in facts])
        # A reference loaded from a path (named, or ZeRO-3's reload of the starting model) is placed by the
        # distributed run (device_map None), not by TRL's default ("auto": every process onto the GPUs it sees)
        loads_reference = run == "named" or (shape == "zero3" and not lora)
        assert set(f["reference_loads"]) == ({"None"} if loads_reference else set()), f["reference_loads"]
        if lora:
            # Under PEFT the anchor is the adapters-off policy: no second model, and the loss gets the policy's head
            assert ref is None
            assert all(call["ref_weight_is_weight"] for call in f["loss_heads"])
        else:
            for call in f["loss_heads"]:
                # The anchor sees its head in the dtype the policy's head has in the loss (bf16 under mixed precision)
                assert call["ref_weight"] == call["weight"], call
                assert call["ref_weight_shape"] == call["weight_shape"]  # whole, not a shard


# ------------------------------------------------------------------------------------------ 2 processes = 1


@pytest.mark.parametrize("shape, run", [case for case in CASES if case[1] != "bf16"])
def test_two_processes_train_like_one(launched, baseline, shape, run):
    result = launched(shape)[run]
    one = baseline["full" if run in ("resume", "named") else run]
    assert result["global_step"] == one["global_step"] == dist_modes.STEPS

    motion, _ = max_abs_diff(one["weights"], one["initial"])
    diff, param = max_abs_diff(result["weights"], one["weights"])
    kl = _kl(result)
    print(f"\n[{shape}/{run}] 2 vs 1 process: max |dw| = {diff:.3g} ({param}); motion {motion:.3g}; kl {kl}")
    assert motion > MIN_MOTION, f"the weights barely moved ({motion:.3g}): the comparison would prove nothing"
    assert diff < ATOL, f"{shape}/{run}: 2 processes differ from 1 by {diff:.3g} in {param} (motion {motion:.3g})"
    # KL is 0 at step 0 (policy = reference) and the anchor is exercised by the end
    assert kl[0] == 0.0 and kl[-1] > MIN_FINAL_KL, kl
    assert _kl(result) == pytest.approx(_kl(one), rel=1e-3, abs=1e-7)
    if run != "resume":  # the resumed trainer's history holds only what it logged after the checkpoint
        assert _losses(result) == pytest.approx(_losses(one), rel=1e-4, abs=1e-7)
    else:
        assert result["resumed_at"] == 2, "the resumed run did not start at the checkpoint's step"

    # The reference's weights never change (gathered whole from its shards or partitions)
    if run != "lora":
        reference, initial = result["reference"], one["initial"]
        assert reference is not None and reference.keys() == initial.keys()
        assert max_abs_diff(reference, initial)[0] == 0.0
    else:
        frozen = [k for k in one["initial"] if "lora_" not in k]
        assert frozen and all(torch.equal(result["weights"][k], one["initial"][k]) for k in frozen)


@pytest.mark.parametrize("shape", [shape for shape, (_, runs, _) in SHAPES.items() if "bf16" in runs])
def test_bf16_anchor_is_exactly_the_policy_at_step_0(launched, shape):
    """Mixed precision: the policy's head reaches the loss in bf16; the reference's must too (not its float32
    master copy gathered whole), or the KL at step 0 is ~1e-6 instead of 0."""
    result = launched(shape)["bf16"]
    for f in result["facts"]:
        assert {call["weight"] for call in f["loss_heads"]} == {"torch.bfloat16"}
    kl = _kl(result)
    assert kl[0] == 0.0 and kl[-1] > MIN_FINAL_KL, kl


@pytest.mark.parametrize("distributed_type", ["NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP"])
def test_a_reference_loaded_from_a_path_is_placed_by_the_distributed_run(monkeypatch, distributed_type):
    """Any distributed run places the reference itself; only a single process keeps the device map it was given."""
    from asft_trl.reference import loading as ref_utils

    seen = {}
    monkeypatch.setattr(ref_utils, "create_model_from_path", lambda path, **kwargs: seen.update(kwargs))
    ref_utils.load_reference(
        "some/reference", {"device_map": "auto"}, distributed_type=distributed_type, trust_remote_code=False
    )
    assert seen["device_map"] == ("auto" if distributed_type == "NO" else None)


# ------------------------------------------------------------------------------------------ the user's command


def test_fsdp2_config_on_cpu_is_refused_not_run_as_ddp(tiny_model_path, tmp_path):
    """`asft-trl train --accelerate_config recipes/accelerate/fsdp2.yaml --use_cpu true` on CPU: accelerate would
    train plain DDP under an FSDP config; the launch stops with the reason and the fix instead."""
    from tiny import run_cli, write_recipe

    recipe = write_recipe(tmp_path, tiny_model_path)
    result = run_cli(
        "train",
        "--config",
        str(recipe),
        "--accelerate_config",
        str(ACCELERATE / "fsdp2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "--use_cpu",
        "true",
    )
    assert result.returncode != 0
    assert "FSDP does not run on CPU processes" in result.stderr and "zero3.yaml" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

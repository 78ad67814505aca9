"""`benchmarks/gpu_check.py --dry-run`: the one-command GPU acceptance check runs all its checks at toy sizes on the CPU,
so the script is known to work before a GPU is lent. What only a GPU can show (the bf16 kernels, real memory and
speed) is the GPU run's; here every check must pass and the report must hold the rows for docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny import REPO_ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check_dry_run.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    failed = {
        name: check.get("problems") or check.get("error")
        for name, check in report.get("checks", {}).items()
        if not check.get("passed")
    }
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    checks = report["checks"]
    assert sorted(checks) == sorted(["parity", "qlora", "zero3", "fsdp2", "benchmark"]) and report["dry_run"]
    assert checks["parity"]["nonzero_kl_at_step_0"] == [0, 0]
    assert checks["qlora"]["linear4bit_modules"] > 0 and checks["qlora"]["second_model"] is False
    assert checks["zero3"]["zero_stage"] == 3 and checks["fsdp2"]["fsdp_version"] == 2
    assert set(checks["benchmark"]["ratios"]) == {"lora"}

    rows = out.with_suffix(".md").read_text()
    for label in ("bf16 fused vs plain", "QLoRA 4-bit", "`zero3.yaml`", "`fsdp2.yaml`", "fused ASFT / TRL SFT"):
        assert label in rows
    assert "FAIL" not in rows


def test_gpu_check_without_a_gpu_says_how_to_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "--dry-run" in proc.stderr


def test_fused_loss_speed_runs_and_times_every_variant(tmp_path):
    """`benchmarks/fused_loss_speed.py` at a toy shape on the CPU: every variant is timed and the JSON holds them."""
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "fused_loss_speed.py"),
            *("--device", "cpu", "--dtype", "float32", "--tokens", "64", "--hidden", "16", "--vocab", "256"),
            *("--chunk-sizes", "0", "16", "--warmup", "1", "--repeats", "2", "--out", str(out)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    variants = [row["variant"] for row in rows]
    assert variants == ["cross_entropy", "plain", "fused chunk auto", "fused chunk 16", "fused_no_reference"]
    assert all(row["ms"] > 0 for row in rows) and rows[2]["chunk"] > 0

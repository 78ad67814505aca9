"""One command that validates ASFT on a CUDA GPU: the paths every GPU user runs by default, which a CPU can't run.

    python benchmarks/gpu_check.py              # one CUDA GPU (H100/H200): about 5 minutes, 8 at most
    python benchmarks/gpu_check.py --dry-run    # the same checks at toy sizes on the CPU (the test suite runs it)
    make gpu-check

Checks, each one recorded as passed or failed with its figures:
- `parity`: the fused loss in bf16 (on CUDA its low-precision branch: bf16 products into float32 through
  `torch.mm`/`torch.addmm(out_dtype=)`) against the plain loss on the same bf16 values at a 0.5B model's head
  (4,096 tokens, hidden 896, V = 151,936): loss, KL and gradients; and KL exactly 0 at step 0;
- `qlora`: a 4-bit (bitsandbytes NF4) model with LoRA trains a few steps: the reference is the adapters-off policy
  (no second model), KL 0 at step 0, the adapters move, the fused loss runs;
- `zero3`, `fsdp2`: one process under the shipped `recipes/accelerate/zero3.yaml` / `fsdp2.yaml` in bf16 trains
  ASFT (`tests/dist_modes.py`, which the CPU tests launch with 2 processes): the mode (ZeRO stage 3 and a partitioned
  reference engine / FSDP2 DTensor parameters and an FSDP-wrapped reference), the heads' dtypes in the loss, KL 0 at
  step 0;
- `benchmark`: `benchmarks/loss_benchmark.py` at a 0.5B-shaped model (Qwen2.5-0.5B's shape, random weights, bf16,
  sequence 2048), TRL's SFTTrainer against fused ASFT, LoRA and full fine-tuning: peak memory and step time ratios.

It writes `--out` (JSON: the machine, every check's figures) and the same path with `.md`: the rows to paste into
docs/benchmarks.md. Exit status 1 if any check failed. Models are random and built locally: nothing is downloaded.
`--dry-run` runs on the CPU with tiny shapes so that the script itself is known to work before a GPU is lent: there the
low-precision branch can't run (its kernels are CUDA-only; the CPU tests emulate it) and FSDP2 needs the tests'
CPU override of accelerate (`tests/fsdp2_on_cpu.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
CHECKS = ("parity", "qlora", "zero3", "fsdp2", "benchmark")
# The 0.5B shape (Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads, 2 key/value heads, MLP 4864, tied head)
SHAPE_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)


def _env() -> dict:
    # Offline, so transformers' Hub kernels (on by default on CUDA since 5.x, fetched at from_pretrained) can't load:
    # USE_HUB_KERNELS=NO keeps from_pretrained on the model's own layers instead of failing.
    return dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", USE_HUB_KERNELS="NO"
    )


def _run(cmd: list[str], timeout: int) -> None:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _peak_mib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------ parity


def check_parity(device, dry: bool) -> dict:
    import torch

    from asft_trl.losses import asft_loss, chunked_asft_loss, fused

    n, h, v = (96, 32, 300) if dry else (4096, SHAPE_05B["hidden"], SHAPE_05B["vocab"])
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden0 = torch.randn(n, h, generator=g).to(device, torch.bfloat16)
    weight0 = (torch.randn(v, h, generator=g) * 0.05).to(device, torch.bfloat16)
    ref_hidden = (hidden0.float() + 0.1 * torch.randn(n, h, generator=g).to(device)).to(torch.bfloat16)
    ref_weight = (weight0.float() + 0.01 * torch.randn(v, h, generator=g).to(device)).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    options = dict(kl_coef=0.05, loss_type="dft", kl_direction="forward")

    def fused_run():
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        loss, terms = chunked_asft_loss(hidden, weight, labels, ref_hidden, ref_weight, **options)
        loss.backward()
        return loss.detach(), terms.kl, hidden.grad.float(), weight.grad.float()

    def plain_run():  # full float32 logits of the same bf16 values
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        logits = hidden.float() @ weight.float().t()
        loss, terms = asft_loss(logits, labels, ref_hidden.float() @ ref_weight.float().t(), **options)
        loss.backward()
        return loss.detach(), terms.kl.detach(), hidden.grad.float(), weight.grad.float()

    results = {}
    for name, run in (("fused", fused_run), ("plain", plain_run)):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        results[name] = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[name] = (*results[name], time.perf_counter() - start, _peak_mib(device))
    (loss_f, kl_f, gh_f, gw_f, t_f, m_f), (loss_p, kl_p, gh_p, gw_p, t_p, m_p) = results["fused"], results["plain"]

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    # Step 0: the reference is the policy (the same head; or its float32 copy, as a float32 reference would be)
    zero_kl = []
    for same_weight in (weight0, weight0.float()):
        _, terms = chunked_asft_loss(hidden0, weight0, labels, hidden0, same_weight, **options)
        zero_kl.append(int(torch.count_nonzero(terms.kl)))
    branch = fused._compute_dtype(hidden0, weight0)
    figures = {
        "tokens": n,
        "hidden": h,
        "vocab": v,
        "matmul_dtype": str(branch).replace("torch.", ""),
        "loss_rel_err": rel(loss_f, loss_p),
        "kl_max_abs_err": float((kl_f - kl_p).abs().max()),
        "grad_hidden_rel_err": rel(gh_f, gh_p),
        "grad_weight_rel_err": rel(gw_f, gw_p),
        "nonzero_kl_at_step_0": zero_kl,
        "fused_s": round(t_f, 4),
        "plain_s": round(t_p, 4),
        "fused_peak_mib": m_f,
        "plain_peak_mib": m_p,
    }
    problems = []
    if figures["loss_rel_err"] > 1e-4 or figures["kl_max_abs_err"] > 1e-4:
        problems.append("loss or KL differs from the plain loss")
    if max(figures["grad_hidden_rel_err"], figures["grad_weight_rel_err"]) > 2e-2:
        problems.append("gradients differ from the plain loss by more than bf16 rounding")
    if any(zero_kl):
        problems.append("KL is not exactly 0 when the reference is the policy")
    if device.type == "cuda" and fused._products_work(device, torch.bfloat16) and branch != torch.bfloat16:
        problems.append("the bf16 products work on this GPU but the loss did not use them")
    return {"passed": not problems, "problems": problems, **figures}


# ------------------------------------------------------------------------------------------ QLoRA


def check_qlora(device, dry: bool, workdir: Path) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import loss_benchmark

    from asft_trl import ASFTConfig, ASFTTrainer

    cfg = dict(
        vocab=512 if dry else 32000,
        hidden=64 if dry else 1024,
        intermediate=128 if dry else 2816,
        layers=2 if dry else 8,
        heads=4 if dry else 16,
        kv_heads=2 if dry else 4,
        seq=64 if dry else 512,
        tied=False,
        dtype="float32" if dry else "bfloat16",
        batch=2 if dry else 4,
        steps=4,
    )
    path = workdir / "qlora-model"
    loss_benchmark._model(cfg).save_pretrained(path)
    compute_dtype = torch.float32 if dry else torch.bfloat16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )
    args = ASFTConfig(
        output_dir=str(workdir / "qlora-run"),
        per_device_train_batch_size=cfg["batch"],
        max_steps=cfg["steps"],
        max_length=cfg["seq"],
        completion_only_loss=True,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=not dry,
        bf16=not dry,
        use_cpu=dry,
        disable_tqdm=True,
        kl_coef=0.05,
        model_init_kwargs={"dtype": cfg["dtype"]},
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = ASFTTrainer(
        str(path),
        args=args,
        train_dataset=loss_benchmark._dataset(cfg),
        processing_class=loss_benchmark._tokenizer(),
        quantization_config=quantization,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    adapters = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = max(
        (p.detach() - adapters[k]).abs().max().item() for k, p in trainer.model.named_parameters() if k in adapters
    )
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    figures = {
        "steps": trainer.state.global_step,
        "linear4bit_modules": four_bit,
        "second_model": trainer.ref_model is not None,
        "fused_loss": trainer.use_fused_loss,
        "kl": [entry["kl"] for entry in history],
        "loss": [entry["loss"] for entry in history],
        "adapters_moved": moved,
        "peak_mib": _peak_mib(device),
    }
    problems = []
    if four_bit == 0:
        problems.append("no 4-bit layers")
    if figures["second_model"]:
        problems.append("a second model was built under PEFT")
    if figures["kl"][0] != 0.0 or not all(map(_finite, figures["loss"])):
        problems.append("KL at step 0 is not 0, or a loss is not finite")
    if moved <= 0:
        problems.append("the adapters did not move")
    if not figures["fused_loss"]:
        problems.append("the fused loss was not used")
    return {"passed": not problems, "problems": problems, **figures}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# ------------------------------------------------------------------------------------------ ZeRO-3, FSDP2


def check_launch_shape(shape: str, dry: bool, workdir: Path, timeout: int) -> dict:
    sys.path.insert(0, str(TESTS_DIR))
    import tiny

    models = workdir / "models"
    if not (models / "untied").exists():
        tiny.build_model(models / "untied", hidden_size=64)
    out = workdir / shape
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "recipes" / "accelerate" / f"{shape}.yaml"),
        "--num_processes",
        "1",
        "--mixed_precision",
        "no" if dry else "bf16",
        "--main_process_port",
        str(_free_port()),
        str(TESTS_DIR / "dist_modes.py"),
        "--models",
        str(models),
        "--out",
        str(out),
        "--runs",
        "bf16",
        "--device",
        "cpu" if dry else "cuda",
    ]
    if dry and shape == "fsdp2":
        cmd.append("--fsdp-on-cpu")
    _run(cmd, timeout)
    result = json.loads((out / "bf16" / "result.json").read_text())
    facts = result["facts"][0]
    kl = [entry["kl"] for entry in result["log_history"] if "kl" in entry]
    heads = facts["loss_heads"][0]
    figures = {
        "distributed_type": facts["distributed_type"],
        "zero_stage": facts.get("zero_stage"),
        "fsdp_version": facts.get("fsdp_version"),
        "policy": facts["policy"]["kind"],
        "reference": facts["reference"] and facts["reference"]["wrapper"],
        "mixed_precision": facts["mixed_precision"],
        "head_dtypes": [heads["weight"], heads["ref_weight"]],
        "kl": kl,
    }
    problems = []
    if shape == "zero3" and not (
        facts["distributed_type"] == "DEEPSPEED"
        and facts.get("zero_stage") == 3
        and facts["reference"]["zero_stage"] == 3
    ):
        problems.append("not a ZeRO-3 run with a ZeRO-3 reference")
    if shape == "fsdp2" and not (
        facts["distributed_type"] == "FSDP"
        and facts.get("fsdp_version") == 2
        and facts["policy"]["kind"] == "dtensor"
        and facts["reference"]["is_fsdp_module"]
    ):
        problems.append("not an FSDP2 run with an FSDP2 reference")
    if heads["weight"] != "torch.bfloat16" or heads["ref_weight"] != heads["weight"]:
        problems.append("the heads do not reach the loss in bf16, both")
    if kl[0] != 0.0 or not all(map(_finite, kl)):
        problems.append("KL at step 0 is not 0")
    return {"passed": not problems, "problems": problems, **figures}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ loss benchmark


def check_benchmark(dry: bool, workdir: Path, timeout: int) -> dict:
    out = workdir / "loss_benchmark.json"
    if dry:
        shape = [
            "--vocab",
            "512",
            "--seq",
            "64",
            "--hidden",
            "64",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--intermediate",
            "128",
            "--batch",
            "2",
            "--steps",
            "1",
            "--modes",
            "lora",
        ]
    else:
        shape = [
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--hidden",
            str(SHAPE_05B["hidden"]),
            "--layers",
            str(SHAPE_05B["layers"]),
            "--heads",
            str(SHAPE_05B["heads"]),
            "--kv-heads",
            str(SHAPE_05B["kv_heads"]),
            "--intermediate",
            str(SHAPE_05B["intermediate"]),
            "--tied",
            "--vocab",
            str(SHAPE_05B["vocab"]),
            "--seq",
            "2048",
            "--batch",
            "4",
            "--steps",
            "3",
            "--modes",
            "lora",
            "full",
        ]
    _run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "loss_benchmark.py"),
            *shape,
            "--methods",
            "trl_sft",
            "asft_fused",
            "--out",
            str(out),
        ],
        timeout,
    )
    rows = json.loads(out.read_text())["results"]
    by = {(r["mode"], r["method"]): r for r in rows}
    ratios = {}
    for mode in sorted({r["mode"] for r in rows}):
        sft, asft = by.get((mode, "trl_sft")), by.get((mode, "asft_fused"))
        if sft and asft and sft["status"] == asft["status"] == "ok":
            ratios[mode] = {
                "peak_ratio": round(asft["peak_mib"] / sft["peak_mib"], 3),
                "step_ratio": round(asft["step_s"] / sft["step_s"], 3),
            }
    problems = [f"{r['method']} {r['mode']}: {r['status']}" for r in rows if r["status"] != "ok"]
    return {"passed": not problems, "problems": problems, "ratios": ratios, "rows": rows}


# ------------------------------------------------------------------------------------------ report


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"`benchmarks/gpu_check.py{' --dry-run' if report['dry_run'] else ''}` on {machine['device']} "
        f"(torch {machine['torch']}, {machine['date']}):",
        "",
        "| check | result | figures |",
        "|---|---|---|",
    ]
    c = report["checks"]

    def status(name):
        if name not in c:
            return "not run"
        return (
            "pass"
            if c[name].get("passed")
            else "FAIL: " + "; ".join(c[name].get("problems") or [c[name].get("error", "")])
        )

    if "parity" in c and "loss_rel_err" in c["parity"]:
        p = c["parity"]
        lines.append(
            f"| bf16 fused vs plain ({p['tokens']:,} tokens, hidden {p['hidden']}, V = {p['vocab']:,}) | {status('parity')} | "
            f"products in {p['matmul_dtype']}; loss rel. err. {p['loss_rel_err']:.1e}, KL {p['kl_max_abs_err']:.1e}, "
            f"grads {max(p['grad_hidden_rel_err'], p['grad_weight_rel_err']):.1e}; KL at step 0: "
            f"{'exactly 0' if not any(p['nonzero_kl_at_step_0']) else p['nonzero_kl_at_step_0']}; "
            f"{p['fused_s']} s / {p['plain_s']} s, peak {p['fused_peak_mib']} / {p['plain_peak_mib']} MiB (fused / plain) |"
        )
    if "qlora" in c and "steps" in c["qlora"]:
        q = c["qlora"]
        lines.append(
            f"| QLoRA 4-bit + LoRA, {q['steps']} steps | {status('qlora')} | {q['linear4bit_modules']} 4-bit layers, "
            f"second model: {q['second_model']}, fused loss: {q['fused_loss']}, KL {q['kl'][0]} -> {q['kl'][-1]:.3g}, "
            f"peak {q['peak_mib']} MiB |"
        )
    for shape in ("zero3", "fsdp2"):
        if shape in c and "kl" in c[shape]:
            s = c[shape]
            mode = f"ZeRO stage {s['zero_stage']}" if shape == "zero3" else f"FSDP{s['fsdp_version']}"
            lines.append(
                f"| `{shape}.yaml`, 1 process, bf16 | {status(shape)} | {s['distributed_type']} ({mode}), policy "
                f"{s['policy']}, reference {s['reference']}, heads {' / '.join(s['head_dtypes'])}, KL {s['kl'][0]} -> "
                f"{s['kl'][-1]:.3g} |"
            )
        elif shape in c:
            lines.append(f"| `{shape}.yaml`, 1 process, bf16 | {status(shape)} | |")
    for name in ("parity", "qlora"):
        if name in c and "error" in c[name]:
            lines.append(f"| {name} | {status(name)} | |")
    if "benchmark" in c:
        b = c["benchmark"]
        ratios = ", ".join(
            f"{mode}: peak {r['peak_ratio']} x, step {r['step_ratio']} x" for mode, r in b.get("ratios", {}).items()
        )
        lines.append(f"| loss benchmark, fused ASFT / TRL SFT | {status('benchmark')} | {ratios} |")
        if b.get("rows"):
            lines += ["", "| V | seq | mode | method | peak MiB | step s |", "|---:|---:|---|---|---:|---:|"]
            for r in b["rows"]:
                lines.append(
                    f"| {r['vocab']:,} | {r['seq']} | {r['mode']} | {r['method']} | {r['peak_mib']} | {r['step_s']} |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the script itself)")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    parser.add_argument(
        "--out",
        default=None,
        help="JSON report (default benchmarks/results/gpu_check.json, or gpu_check_dry_run.json)",
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds for each launched step")
    args = parser.parse_args(argv)
    for key, value in _env().items():
        os.environ.setdefault(key, value)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); "
            "`--dry-run` runs its checks at toy sizes on the CPU."
        )
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = Path(
        args.out
        or REPO_ROOT / "benchmarks" / "results" / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "dry_run": args.dry_run,
        "machine": {
            "device": torch.cuda.get_device_name(0)
            if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__,
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "checks": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        workdir = Path(tmp)
        for name in args.checks:
            began = time.perf_counter()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                if name == "parity":
                    result = check_parity(device, args.dry_run)
                elif name == "qlora":
                    result = check_qlora(device, args.dry_run, workdir)
                elif name in ("zero3", "fsdp2"):
                    result = check_launch_shape(name, args.dry_run, workdir, args.timeout)
                else:
                    result = check_benchmark(args.dry_run, workdir, args.timeout * 2)
            except Exception as error:  # a broken check is reported with the others, not lost
                result = {
                    "passed": False,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            result["seconds"] = round(time.perf_counter() - began, 1)
            report["checks"][name] = result
            print(
                f"[gpu_check] {name}: {'pass' if result['passed'] else 'FAIL'} ({result['seconds']} s) "
                f"{result.get('problems') or result.get('error') or ''}",
                flush=True,
            )
            # Written after every check, so an interrupted run keeps what it measured
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    rows = markdown(report)
    out.with_suffix(".md").write_text(rows)
    print(rows)
    print(f"written: {out} and {out.with_suffix('.md')} ({report['seconds']} s)")
    return 0 if all(check["passed"] for check in report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

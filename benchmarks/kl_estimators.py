"""How the exact KL behaves when ASFT trains with a per-token KL estimator (`kl_estimator` k1 / k2 / k3) instead of
the exact KL, on the quickstart (SmolLM2-135M-Instruct + LoRA, the generated word-order task).

    python benchmarks/kl_estimators.py                  # the runs below, then table + JSON + PNG
    python benchmarks/kl_estimators.py --steps 40 --runs full k3 k3_reverse

Every run is the package's own command, `asft-trl train --config recipes/quickstart.yaml` with the overrides listed
in RUNS (printed before each run) plus the same short-run overrides for all: `--max_steps`, evaluation on the 64
held-out prompts every `--eval_steps` steps (`eval_kl_full`: the exact KL on the held-out completions beside the
estimate the run trains with). Same data, steps, learning rate, seed and batch: matched cost per run (the estimators
save only the reference head's softmax, a small share of a step here; the seconds per step are reported).

The DFT baseline (no anchor) runs with kl_coef = 1e-6 so that the KL is still measured: an anchor 50,000 times weaker
than the recipe's, which moves nothing.

Writes `--out` (JSON of every run's curves and end figures) and `--png` (the curves), and prints a markdown table. Runs whose
output folder already holds a finished run with the same overrides are read back, not trained again. Nothing here is a
test: the figures depend on the machine (time) and on the generated task.

    python benchmarks/kl_estimators.py --loss-cost-only   # the fused loss alone: exact KL vs k3 vs one stored float

times the fused loss's forward + backward alone on SmolLM2-135M's head shape (576 x 49,152) for 512 completion tokens:
the exact KL and k3 with a live reference (both project the reference head), k3 from one stored float per token, and
DFT without reference, interleaved, the median of `--reps`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# name -> (overrides, what it is)
RUNS = {
    "dft": (["--kl_coef", "1e-6"], "DFT, no anchor (lambda 1e-6, so that the KL is measured)"),
    "full": ([], "ASFT, exact forward KL (the default)"),
    "k1": (["--kl_estimator", "k1"], "ASFT, k1 forward"),
    "k2": (["--kl_estimator", "k2"], "ASFT, k2"),
    "k3": (["--kl_estimator", "k3"], "ASFT, k3 forward"),
    "k3_reverse": (["--kl_estimator", "k3", "--kl_direction", "reverse"], "ASFT, k3 reverse (NeMo-RL's)"),
    # lambda does not carry over: the same estimators at a tenth of the recipe's lambda
    "k2_lambda_0.005": (["--kl_estimator", "k2", "--kl_coef", "0.005"], "ASFT, k2, lambda 0.005"),
    "k3_lambda_0.005": (["--kl_estimator", "k3", "--kl_coef", "0.005"], "ASFT, k3 forward, lambda 0.005"),
    "k3_reverse_lambda_0.005": (
        ["--kl_estimator", "k3", "--kl_direction", "reverse", "--kl_coef", "0.005"],
        "ASFT, k3 reverse, lambda 0.005",
    ),
}
DEFAULT_RUNS = ("dft", "full", "k1", "k2", "k3", "k3_reverse")


def common_overrides(args) -> list[str]:
    return [
        "--max_steps",
        str(args.steps),
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(args.eval_steps),
        "--logging_steps",
        str(args.eval_steps),
        "--per_device_eval_batch_size",
        "16",
    ]


def train(name: str, args) -> Path:
    out = Path(args.output_dir) / name
    overrides = RUNS[name][0] + common_overrides(args)
    marker = out / "kl_estimators_overrides.json"
    if (out / "held_out.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == overrides:
        print(f"[{name}] reusing the finished run in {out}")
        return out
    cmd = [
        str(Path(sys.executable).with_name("asft-trl")),
        "train",
        "--config",
        "recipes/quickstart.yaml",
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        "true",
        *overrides,
    ]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    print(f"[{name}] {time.perf_counter() - start:.0f} s wall", flush=True)
    marker.write_text(json.dumps(overrides))
    return out


def final_kls(out: Path) -> dict:
    """The trained adapter's exact forward KL(reference || policy) and reverse KL(policy || reference) per token, and its NLL, on
    the 64 held-out completions (the same measure for every run, whatever direction it trained with). Cached in the
    run folder."""
    cached = out / "kl_estimators_final.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_trl.diagnostics.drift import DriftProbe
    from asft_trl.losses import kl_per_token
    from asft_trl.quickstart.model import HUB_ID, resolve_quickstart_model
    from asft_trl.quickstart.task import make_splits

    test = make_splits(seed=0)["test"]  # the recipe's held-out split (dataset asft/quickstart, seed 0)
    pairs = [(row["prompt"][0]["content"], row["completion"][0]["content"]) for row in test]
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(resolve_quickstart_model(HUB_ID, "outputs/models"))
    policy = PeftModel.from_pretrained(base, out).eval()
    probe = DriftProbe(tokenizer, pairs, batch_size=16, name="task")
    reference_log_probs = probe.reference_log_probs(policy)  # adapters off
    sums = {"forward": 0.0, "reverse": 0.0, "nll": 0.0}
    count = 0
    with torch.no_grad():
        for (inputs, targets), log_q in zip(probe._batches("cpu"), reference_log_probs):
            mask = targets != -100
            log_p = torch.log_softmax(policy(**inputs).logits[:, :-1][mask].float(), -1)
            sums["forward"] += kl_per_token(log_q, log_p).sum().item()
            sums["reverse"] += kl_per_token(log_p, log_q).sum().item()
            sums["nll"] += -log_p.gather(-1, targets[mask][:, None]).sum().item()
            count += int(mask.sum())
    result = {f"final_{key}": value / count for key, value in sums.items()}
    cached.write_text(json.dumps(result))
    return result


def collect(name: str, out: Path) -> dict:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    held_out = json.loads((out / "held_out.json").read_text())

    def series(key):  # one value per step (the end-of-run report repeats the last evaluation)
        return sorted({e["step"]: e[key] for e in history if key in e}.items())

    exact = series("eval_kl_full") or series("eval_kl")  # the default's eval_kl is the exact KL
    runtime = next(e["train_runtime"] for e in history if "train_runtime" in e)
    steps = max(e["step"] for e in history)
    return {
        "name": name,
        "what": RUNS[name][1],
        "overrides": RUNS[name][0],
        "exact_kl_eval": exact,
        "trained_kl": series("kl"),
        "eval_trained_kl": series("eval_kl"),
        "drift_kl": series("drift_kl"),
        "eval_nll": series("eval_nll"),
        "accuracy_before": held_out["before"].get("task_accuracy"),
        "accuracy_after": held_out["after"].get("task_accuracy"),
        "nll_after": held_out["after"].get("eval_nll"),
        "seconds_per_step": runtime / steps,
        "direction": "reverse" if "reverse" in RUNS[name][0] else "forward",
        **final_kls(out),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| run | exact KL in the run's direction, held-out, steps 10 / 20 / 30 / 40 | trained `kl` at the end | "
        "exact forward / reverse KL at the end | drift KL at the end | held-out NLL | exact match |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        exact = " / ".join(f"{v:.2f}" for _, v in r["exact_kl_eval"])
        trained = r["trained_kl"][-1][1] if r["trained_kl"] else float("nan")
        drift = r["drift_kl"][-1][1] if r["drift_kl"] else float("nan")
        lines.append(
            f"| {r['what']} | {exact} | {trained:.2f} | {r['final_forward']:.2f} / {r['final_reverse']:.2f} "
            f"| {drift:.2f} | {r['nll_after']:.3f} | {r['accuracy_after']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    from asft_trl.diagnostics.plot import save_figure

    panels = [
        (
            "exact_kl_eval",
            "exact KL per token, held-out task prompts\n(solid: forward KL(ref || policy); dashed: "
            "the reverse runs' reverse KL, x: their forward KL at the end)",
        ),
        ("trained_kl", "the KL term as trained (`kl`: estimate or exact), training batches"),
        ("drift_kl", "drift: exact KL(reference || policy), 16 general prompts"),
        ("eval_nll", "NLL per completion token, held-out task prompts"),
    ]
    fig = Figure(figsize=(13, 10), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, panels):
        for r in results:
            points = r[key]
            if points:
                reverse = key == "exact_kl_eval" and r["direction"] == "reverse"
                (line,) = ax.plot(
                    [s for s, _ in points],
                    [v for _, v in points],
                    "--" if reverse else "-",
                    marker="o",
                    ms=3,
                    label=r["what"] if key == "exact_kl_eval" else None,
                )
                if reverse:
                    ax.plot([points[-1][0]], [r["final_forward"]], "x", ms=9, mew=2, color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1.0)  # k1's estimate is negative
    fig.legend(loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle("ASFT on the quickstart (SmolLM2-135M + LoRA): the exact KL under each kl_estimator", fontsize=11)
    save_figure(fig, path)


def loss_cost(reps: int, tokens: int = 512, hidden_size: int = 576, vocab: int = 49152) -> dict[str, float]:
    import statistics

    import torch

    from asft_trl.losses import chunked_asft_loss

    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.05
    ref_hidden = hidden + 0.1 * torch.randn(tokens, hidden_size)
    labels = torch.randint(0, vocab, (tokens,))
    stored = torch.log_softmax(ref_hidden @ weight.t(), -1).gather(-1, labels[:, None]).squeeze(-1)
    live = dict(ref_hidden=ref_hidden, ref_weight=weight)
    cases = {
        "exact KL, live reference": dict(live, kl_coef=0.05),
        "k3, live reference": dict(live, kl_coef=0.05, kl_estimator="k3"),
        "k3, one stored float per token": dict(ref_token_log_probs=stored, kl_coef=0.05, kl_estimator="k3"),
        "DFT alone (no reference)": dict(kl_coef=0.0),
    }
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, kwargs in cases.items():
            h = hidden.clone().requires_grad_()
            start = time.perf_counter()
            chunked_asft_loss(h, weight, labels, **kwargs)[0].backward()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="outputs/kl_estimators")
    parser.add_argument("--out", default="benchmarks/results/kl_estimators_cpu.json")
    parser.add_argument("--png", default="docs/kl_estimators_quickstart.png")
    parser.add_argument("--loss-cost-only", action="store_true", help="only time the fused loss (no training runs)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    if args.loss_cost_only:
        cost = loss_cost(args.reps)
        base = cost["exact KL, live reference"]
        for name, seconds in cost.items():
            print(f"| {name} | {seconds:.2f} s | {seconds / base:.2f} |")
        path = Path(args.out).with_name("kl_estimators_loss_cost_cpu.json")
        path.write_text(
            json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "seconds": cost}, indent=2)
        )
        return 0
    results = [collect(name, train(name, args)) for name in args.runs]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "steps": args.steps,
                "common_overrides": common_overrides(args),
                "runs": results,
            },
            indent=2,
        )
    )
    plot(results, Path(args.png))
    print(table(results))
    print(f"Wrote {out} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a run tells a person at its end: held-out metrics before and after, final loss and KL, where the model went.

Only reads the trainer's state and runs evaluation; it never changes the model or the files of the run.
"""

from __future__ import annotations

from ..evaluation.benchmarks import TASK_METRICS

# eval_kl is the KL term as trained (the exact KL, or a kl_estimator's estimate); eval_kl_full the exact KL beside an
# estimate
HELD_OUT_KEYS = ("eval_loss", "eval_nll", "eval_kl", "eval_kl_full", "eval_mean_token_accuracy")


def held_out_report(trainer, eval_dataset, script_args) -> dict:
    """Evaluate on the held-out split: the trainer's eval metrics, plus the task metric when the recipe names one."""
    metrics = trainer.evaluate()
    report = {key: metrics[key] for key in HELD_OUT_KEYS if key in metrics}
    metric = TASK_METRICS.get(getattr(script_args, "held_out_metric", None))
    if metric is not None:
        subset = eval_dataset.select(range(min(script_args.held_out_size, len(eval_dataset))))
        result = metric(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, subset)
        report["task_accuracy"] = result["accuracy"]
        report["task_examples_wrong"] = [list(f) for f in result["failures"]]
    return report


def held_out_missing_note(test_split: str, splits) -> str:
    """Why a run has no held-out numbers before and after training: the split it names is not in the data."""
    return (
        f"No held-out evaluation: the dataset has no {test_split!r} split (its splits: {sorted(splits)}), so "
        "nothing was evaluated before and after training. Fix: set dataset_test_split to one of its splits."
    )


def _last(history: list[dict], key: str):
    for entry in reversed(history):
        if key in entry:
            return entry[key]
    return None


def print_summary(trainer, before: dict, after: dict, note: str | None = None) -> None:
    args = trainer.args
    history = trainer.state.log_history
    lines = [
        "",
        f"== {args.method_name} run finished (loss_type={args.loss_type}, kl_coef={args.kl_coef}, "
        f"kl_direction={args.kl_direction}) ==",
        f"  steps: {trainer.state.global_step}   train runtime: {_last(history, 'train_runtime') or 0:.1f}s",
        f"  final train loss: {_fmt(_last(history, 'loss'))}   final KL to the reference: {_fmt(_last(history, 'kl'))}"
        f"   DFT weight ESS: {_fmt(_last(history, 'dft_weight_ess'))}",
    ]
    preflight = getattr(trainer, "preflight_report", None) or {}
    prior = preflight.get("answer_tokens") or {}
    if prior.get("warned"):
        lines.append(
            f"  weak prior: {prior['low_p_share']:.0%} of the completion tokens started below p {prior['low_p']:g} "
            "(DFT/ASFT barely learn them) -- see the warning at the start"
        )
    unlearnable = [e for e in preflight.get("special_tokens") or [] if e["warned"]]
    if unlearnable:
        lines.append(
            "  special tokens DFT may not learn (starting model's mean probability): "
            + ", ".join(f"{e['token']!r} {e['mean_probability']:.2g}" for e in unlearnable)
            + " -- see the warning at the start"
        )
    dropped = {k: v for k, v in getattr(trainer, "dropped_examples", {}).items() if v}
    if dropped:
        lines.append(f"  examples dropped (completion truncated to nothing): {dropped}")
    empty = {k: v for k, v in getattr(trainer, "empty_completions", {}).items() if v}
    if empty:
        lines.append(f"  examples with an empty completion (trained to stop after the prompt): {empty}")
    if note:
        lines.append(f"  {note}")
    if before or after:
        lines.append(f"  {'held-out':<28} {'before':>9}  {'after':>9}")
        for key in sorted(set(before) | set(after)):
            if not isinstance(before.get(key, after.get(key)), (int, float)):
                continue
            lines.append(f"    {key:<26} {_fmt(before.get(key)):>9}  {_fmt(after.get(key)):>9}")
    lines.append(f"  model saved to: {args.output_dir}")
    trainer.accelerator.print("\n".join(lines))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"

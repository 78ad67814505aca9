"""`asft-trl plot RUN_DIR [RUN_DIR ...] [--metrics kl,loss,...] [--out FILE.png]`: training curves of one or more runs.

Reads each run's `trainer_state.json` (its `log_history`: training metrics such as `loss`, `nll`, `kl`,
`dft_weight_ess`, `drift_kl`, and eval metrics such as `eval_kl`) and draws one panel per metric, one line per run,
labelled by method and lambda (from the run's `asft_run.json`, which `asft-trl train` and the studies write).
A metric asked for with `--metrics` that a run did not log is reported and skipped for that run, never an error; of the
default metrics, each run draws those it logged, without a word about the others. Only reads runs; writes one PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..utils.io import write_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
RUN_INFO_FILE = "asft_run.json"
DEFAULT_METRICS = ("loss", "nll", "kl", "dft_weight_ess", "drift_kl")
# What each metric is, for the panel titles: a figure should be readable without reading code
DESCRIPTIONS = {
    "loss": "training loss (task term + kl_coef x KL)",
    "nll": "NLL per completion token (training batches)",
    "kl": "KL(reference || policy) per token, training batches (a kl_estimator's estimate when set)",
    "eval_kl": "KL term per token, held-out split",
    "eval_kl_full": "exact KL to the reference per token, held-out split",
    "dft_weight_mean": "mean DFT weight p(y_t)",
    "dft_weight_ess": "ESS fraction of the DFT weights",
    "entropy": "policy entropy per token",
    "mean_token_accuracy": "token accuracy (training batches)",
    "drift_kl": "held-out drift: KL(reference || policy), general prompts",
    "kl_coef": "lambda (kl_coef) used at each step",
    "drift_nll": "NLL of general-prompt answers",
    "task_kl": "KL(reference || policy), held-out task prompts",
    "task_nll": "NLL, held-out task prompts",
    "trainset_kl": "KL(reference || policy), fixed training sample",
    "trainset_nll": "NLL, fixed training sample",
    "trainset_ess": "ESS fraction of p(y_t), fixed training sample",
    "trainset_low_p": "share of training answer tokens with p < 0.1",
    "learning_rate": "learning rate",
    "grad_norm": "gradient norm",
}


def describe(metric: str, runs) -> str:
    """A panel's subtitle. The training `kl` follows each run's `kl_direction` (read from its asft_run.json): a panel
    of reverse-KL runs says KL(policy || reference), one of both directions says which is which. The drift probes
    always measure KL(reference || policy)."""
    text = DESCRIPTIONS.get(metric, "")
    if metric == "kl":
        directions = {(run.info or {}).get("kl_direction", "forward") for run in runs}
        if directions == {"reverse"}:
            text = text.replace("KL(reference || policy)", "KL(policy || reference)")
        elif "reverse" in directions:
            text = text.replace(
                "KL(reference || policy)", "KL (forward: reference || policy; reverse: policy || reference)"
            )
    return text


@dataclass
class Run:
    path: Path
    label: str
    history: list[dict]
    info: dict | None = None  # the run's asft_run.json (its settings), when it has one

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        points = [(e["step"], e[metric]) for e in self.history if metric in e and "step" in e]
        points = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
        return [s for s, _ in points], [v for _, v in points]


def run_label(info: dict) -> str:
    """ "ASFT λ=0.05", "DFT", "SFT+KL λ=0.1": the paper's method name, and lambda when there is a KL term."""
    name = info.get("method_name") or "?"
    kl_coef = info.get("kl_coef")
    label = f"{name} λ={kl_coef:g}" if kl_coef else name
    if kl_coef and info.get("kl_target") is not None:  # lambda starts at kl_coef and follows the KL target
        label += f" → KL {info['kl_target']:g}"
    elif kl_coef and info.get("kl_coef_schedule") not in (None, "constant"):
        label += f" {info['kl_coef_schedule']}"
    if kl_coef and info.get("kl_estimator") not in (None, "full"):  # a per-token estimate, and which way
        label += f" {info['kl_estimator']}" + (" reverse" if info.get("kl_direction") == "reverse" else "")
    if info.get("dft_normalization") == "weights":
        label += " /Σw"
    return label


def with_varying_kl_coef(runs: list[Run], metrics) -> list[str]:
    """`metrics`, plus the `kl_coef` panel when some run's lambda changed during the run (a schedule or the
    adaptive controller): a constant lambda is already in the legend."""
    metrics = list(metrics)
    if "kl_coef" not in metrics and any(len(set(run.series("kl_coef")[1])) > 1 for run in runs):
        metrics.append("kl_coef")
    return metrics


def find_state_file(run_dir: str | os.PathLike) -> Path:
    """`RUN_DIR/trainer_state.json`, else the one in the run's latest `checkpoint-N/`."""
    run_dir = Path(run_dir)
    if (run_dir / STATE_FILE).is_file():
        return run_dir / STATE_FILE
    checkpoints = sorted(
        run_dir.glob(f"checkpoint-*/{STATE_FILE}"),
        key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1,
    )
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(
        f"No {STATE_FILE} in {str(run_dir)!r} or its checkpoint-*/ folders. Fix: pass the output_dir of a finished "
        "`asft-trl train` run (it writes one at the end), or of a run that saved checkpoints."
    )


def load_run(run_dir: str | os.PathLike) -> Run:
    state_file = find_state_file(run_dir)
    with open(state_file) as f:
        history = json.load(f).get("log_history", [])
    info_file = Path(run_dir) / RUN_INFO_FILE
    info = None
    if info_file.is_file():
        with open(info_file) as f:
            info = json.load(f)
        label = run_label(info)
    else:
        label = Path(run_dir).resolve().name
        logger.warning("%s has no %s: labelled by its folder name %r.", run_dir, RUN_INFO_FILE, label)
    return Run(Path(run_dir), label, history, info)


def unique_labels(runs: list[Run]) -> None:
    """Two runs of the same method and lambda get their folder names appended, so the legend tells them apart."""
    counts = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.path.resolve().name})"


def _panels(n: int):
    """A figure with `n` panels, three to a row, and its axes in reading order (spare ones removed by `_finish`)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed (Agg canvas)

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows + 0.6), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False).ravel()


def _finish(fig, axes, n: int, title: str | None, legend_title: str | None = None) -> None:
    """Remove the spare panels and draw one legend (each label once) below the first `n`, and the title."""
    for ax in axes[n:]:
        fig.delaxes(ax)
    handles = {}
    for ax in axes[:n]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncols=min(len(handles), 6),
        fontsize=9,
        title=legend_title,
    )
    if title:
        fig.suptitle(title)


def plot_runs(runs: list[Run], metrics: list[str], title: str | None = None, warn_missing: bool = True):
    """One panel per metric that at least one run logged, one line per run. Returns (figure, missing), where
    `missing` lists (metric, run label) pairs that were not logged (also logged as warnings, with `warn_missing`)."""
    missing = [(m, r.label) for m in metrics for r in runs if not r.series(m)[0]]
    for metric, label in missing if warn_missing else ():
        logger.warning("Metric %r was not logged by run %r: no line for it.", metric, label)
    drawn = [m for m in metrics if any(r.series(m)[0] for r in runs)]
    if not drawn:
        raise ValueError(
            f"None of the metrics {metrics} was logged by any of the runs. Metrics they logged: "
            f"{sorted(available_metrics(runs))}. Fix: choose some of those with --metrics."
        )
    fig, axes = _panels(len(drawn))
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for ax, metric in zip(axes, drawn):
        for run in runs:
            steps, values = run.series(metric)
            if steps:
                ax.plot(
                    steps,
                    values,
                    marker="o" if len(steps) < 15 else None,
                    markersize=3,
                    color=colors[run.label],
                    label=run.label,
                )
        ax.set_title(f"{metric}\n{describe(metric, runs)}".strip(), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _finish(fig, axes, len(drawn), title)
    return fig, missing


def plot_run_groups(groups: dict[str, list[Run]], metrics: list[str], title: str | None = None):
    """One panel per metric, one line per group of runs (e.g. the seeds of one method): the mean over the group's runs
    at each step they all logged, and a band from their minimum to their maximum. Returns the figure.

    A step some run of a group did not log is left out for that group (a band needs every run); a metric no group
    logged gets no panel, as in `plot_runs`.
    """

    def band(runs: list[Run], metric: str):
        series = [dict(zip(*run.series(metric))) for run in runs]
        steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
        values = [[s[step] for s in series] for step in steps]
        return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]

    drawn = [m for m in metrics if any(band(runs, m)[0] for runs in groups.values() if runs)]
    if not drawn:
        raise ValueError(f"None of the metrics {metrics} was logged by every run of any group.")
    fig, axes = _panels(len(drawn))
    for ax, metric in zip(axes, drawn):
        for i, (label, runs) in enumerate(groups.items()):
            if not runs:
                continue
            steps, mean, low, high = band(runs, metric)
            if steps:
                ax.plot(
                    steps,
                    mean,
                    color=f"C{i % 10}",
                    label=f"{label} (n={len(runs)})",
                    marker="o" if len(steps) < 15 else None,
                    markersize=3,
                )
                ax.fill_between(steps, low, high, color=f"C{i % 10}", alpha=0.2, linewidth=0)
        ax.set_title(
            f"{metric}\n{describe(metric, [run for group in groups.values() for run in group])}".strip(), fontsize=9
        )
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _finish(fig, axes, len(drawn), title, legend_title="line: mean over seeds; band: min to max")
    return fig


def available_metrics(runs: list[Run]) -> set[str]:
    keys = set()
    for run in runs:
        for entry in run.history:
            keys.update(k for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch"))
    return keys


def save_figure(fig, out: str | os.PathLike) -> Path:
    """Write the PNG under a temporary name first, so a failure never leaves a broken or half-replaced file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110))


def plot_run_dirs(run_dirs, metrics=None, out=None, title=None):
    """Load the runs, draw them and save the PNG. Returns (path written, figure, missing metric/run pairs)."""
    runs = [load_run(d) for d in run_dirs]
    unique_labels(runs)
    if metrics:
        fig, missing = plot_runs(runs, list(metrics), title)
    else:
        # The defaults include what only some runs log (`drift_kl` needs log_drift, `kl` a KL term): a run that never
        # asked for one is not warned about it, and a default no run logged gets no panel
        defaults = [m for m in with_varying_kl_coef(runs, DEFAULT_METRICS) if any(run.series(m)[0] for run in runs)]
        fig, missing = plot_runs(runs, defaults or list(DEFAULT_METRICS), title, warn_missing=False)
        missing = []
    if out is None:
        out = Path(run_dirs[0]) / "curves.png" if len(run_dirs) == 1 else Path("curves.png")
    return save_figure(fig, out), fig, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asft-trl plot", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a run (or several runs).")
    parser.add_argument(
        "--metrics",
        default=None,
        help=f"Comma-separated metrics from the runs' logs (default: {','.join(DEFAULT_METRICS)}, "
        "and kl_coef when a run's lambda varied). Eval metrics carry an eval_ prefix, e.g. eval_kl.",
    )
    parser.add_argument(
        "--out", default=None, help="PNG to write (default: RUN_DIR/curves.png for one run, ./curves.png for several)."
    )
    parser.add_argument("--title", default=None, help="Figure title.")
    args = parser.parse_args(argv)
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    if metrics is not None and not metrics:
        parser.error("--metrics is empty; give at least one metric name, e.g. --metrics kl,loss")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        out, _, missing = plot_run_dirs(args.run_dirs, metrics, args.out, args.title)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"asft-trl plot: {error}\n")
    print(f"Wrote {out}" + (f" ({len(missing)} metric/run pairs not logged, see the warnings)" if missing else ""))
    return 0


def save_run_info(trainer) -> None:
    """Save `trainer_state.json` (the curves) and `asft_run.json` (what `run_label` reads) into the output dir."""
    if not trainer.is_world_process_zero():
        return
    args = trainer.args
    trainer.save_state()
    info = {
        "method_name": getattr(args, "method_name", None),
        "loss_type": getattr(args, "loss_type", None),
        "kl_coef": getattr(args, "kl_coef", None),
        "kl_direction": getattr(args, "kl_direction", None),
        "kl_coef_schedule": getattr(args, "kl_coef_schedule", None),
        "kl_target": getattr(args, "kl_target", None),
        "kl_estimator": getattr(args, "kl_estimator", None),
        "dft_normalization": getattr(args, "dft_normalization", None),
        # The starting model's prior on the completions and its probability of their special tokens (DFT runs;
        # diagnostics.preflight)
        "preflight": getattr(trainer, "preflight_report", None),
    }
    with open(Path(args.output_dir) / RUN_INFO_FILE, "w") as f:
        json.dump(info, f, indent=2)


def write_run_curves(trainer, metrics=DEFAULT_METRICS) -> Path | None:
    """At the end of a training run: save `trainer_state.json` and `asft_run.json` into the output dir and draw
    `curves.png` there (the metrics of `metrics` that the run logged). Main process only. A plotting failure is
    logged, never raised: the run itself has finished."""
    if not trainer.is_world_process_zero():
        return None
    args = trainer.args
    save_run_info(trainer)
    try:
        run = load_run(args.output_dir)
        # e.g. no `kl` without a KL term: not worth a warning here
        logged = [m for m in with_varying_kl_coef([run], metrics) if run.series(m)[0]]
        fig, _ = plot_runs([run], logged or list(metrics), title=f"{run.label} ({Path(args.output_dir).name})")
        out = save_figure(fig, Path(args.output_dir) / "curves.png")
    except Exception as error:  # noqa: BLE001 -- the model is saved; a missing figure must not fail the run
        logger.warning("Could not draw the training curves of %s: %s", args.output_dir, error)
        return None
    return out


if __name__ == "__main__":
    raise SystemExit(main())

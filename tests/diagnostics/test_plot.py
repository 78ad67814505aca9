"""`asft-trl plot`: panels and lines from fixture logs, missing metrics reported (not fatal), end-of-run curves."""

from __future__ import annotations

import json
import logging

import pytest

from asft_trl.diagnostics.plot import load_run, plot_run_dirs, write_run_curves
from asft_trl.scripts import cli


def write_run(
    path, method_name, loss_type, kl_coef, metrics, steps=(5, 10, 15), eval_metrics=(), kl_direction="forward"
):
    """A run folder as `asft-trl train` leaves it: trainer_state.json (log_history) + asft_run.json."""
    path.mkdir(parents=True)
    history = []
    for i, step in enumerate(steps):
        history.append({"step": step, "epoch": step / 100, **{m: 1.0 + 0.1 * i + len(m) for m in metrics}})
        if eval_metrics:
            history.append({"step": step, **{m: 0.5 + 0.1 * i for m in eval_metrics}})
    history.append({"step": steps[-1], "train_runtime": 12.0, "train_loss": 1.0})
    (path / "trainer_state.json").write_text(json.dumps({"global_step": steps[-1], "log_history": history}))
    (path / "asft_run.json").write_text(
        json.dumps(
            {"method_name": method_name, "loss_type": loss_type, "kl_coef": kl_coef, "kl_direction": kl_direction}
        )
    )
    return path


@pytest.fixture
def two_runs(tmp_path):
    asft = write_run(
        tmp_path / "asft",
        "ASFT",
        "dft",
        0.05,
        ["loss", "nll", "kl", "dft_weight_ess", "drift_kl"],
        eval_metrics=["eval_loss", "eval_kl"],
    )
    sft = write_run(tmp_path / "sft", "SFT", "nll", 0.0, ["loss", "nll", "dft_weight_ess", "drift_kl"])
    return asft, sft


def lines_by_panel(fig):
    return {ax.get_title().split("\n")[0]: [line.get_label() for line in ax.get_lines()] for ax in fig.axes}


def test_one_panel_per_metric_one_line_per_run(two_runs, tmp_path):
    out, fig, missing = plot_run_dirs(two_runs, ["loss", "nll", "dft_weight_ess", "drift_kl"], tmp_path / "c.png")
    assert out.is_file() and out.stat().st_size > 1000
    panels = lines_by_panel(fig)
    assert list(panels) == ["loss", "nll", "dft_weight_ess", "drift_kl"]
    assert all(labels == ["ASFT λ=0.05", "SFT"] for labels in panels.values())
    assert missing == []
    xs = fig.axes[0].get_lines()[0].get_xdata()
    assert list(xs) == [5, 10, 15]  # the final summary entry (no metrics) adds no point


def test_kl_panel_names_the_direction_the_runs_trained(tmp_path):
    """The training `kl` is KL(policy || reference) in a reverse-KL run: the panel says so (read from asft_run.json);
    the drift probe measures KL(reference || policy) whatever the run's direction."""

    def subtitles(runs):
        _, fig, _ = plot_run_dirs(runs, ["kl", "drift_kl"], tmp_path / f"{len(runs)}-{runs[0].name}.png")
        return {ax.get_title().split("\n")[0]: ax.get_title().split("\n")[1] for ax in fig.axes}

    forward = write_run(tmp_path / "fwd", "ASFT", "dft", 0.05, ["kl", "drift_kl"])
    reverse = write_run(tmp_path / "rev", "ASFT", "dft", 0.05, ["kl", "drift_kl"], kl_direction="reverse")
    assert subtitles([forward])["kl"].startswith("KL(reference || policy)")
    assert subtitles([reverse])["kl"].startswith("KL(policy || reference)")
    both = subtitles([forward, reverse])["kl"]
    assert "forward: reference || policy" in both and "reverse: policy || reference" in both
    assert all(
        subtitles(runs)["drift_kl"] == "held-out drift: KL(reference || policy), general prompts"
        for runs in ([forward], [reverse])
    )


def test_missing_metrics_are_reported_not_fatal(two_runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _, fig, missing = plot_run_dirs(two_runs, ["loss", "kl", "eval_kl", "not_a_metric"], tmp_path / "c.png")
    panels = lines_by_panel(fig)
    # A metric logged by some runs gets a panel with their lines; one logged by none gets no panel
    assert list(panels) == ["loss", "kl", "eval_kl"]
    assert panels["kl"] == ["ASFT λ=0.05"] and panels["eval_kl"] == ["ASFT λ=0.05"]
    assert ("kl", "SFT") in missing and ("not_a_metric", "ASFT λ=0.05") in missing
    assert "'kl' was not logged by run 'SFT'" in caplog.text
    assert "not_a_metric" in caplog.text


def test_default_metrics_warn_about_nothing_a_run_never_asked_for(tmp_path, capsys, caplog):
    """`drift_kl` needs `log_drift`, `kl` a KL term: with the default metrics each run draws what it logged, and
    nothing is said about the rest."""
    asft = write_run(tmp_path / "asft", "ASFT", "dft", 0.05, ["loss", "nll", "kl", "dft_weight_ess"])
    sft = write_run(tmp_path / "sft", "SFT", "nll", 0.0, ["loss", "nll", "dft_weight_ess"])
    with caplog.at_level(logging.WARNING):
        assert cli.main(["plot", str(asft), str(sft), "--out", str(tmp_path / "c.png")]) == 0
    assert "was not logged" not in caplog.text and "not logged" not in capsys.readouterr().out
    _, fig, _ = plot_run_dirs([asft, sft], None, tmp_path / "d.png")
    assert list(lines_by_panel(fig)) == ["loss", "nll", "kl", "dft_weight_ess"]


def test_no_requested_metric_anywhere_is_a_clear_error(two_runs, tmp_path):
    with pytest.raises(ValueError, match="Metrics they logged: .*'drift_kl'"):
        plot_run_dirs(two_runs, ["nope"], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_cli_plot(two_runs, tmp_path, capsys):
    out = tmp_path / "figs" / "curves.png"
    assert cli.main(["plot", *map(str, two_runs), "--metrics", "kl,loss", "--out", str(out)]) == 0
    assert out.is_file() and "Wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", str(tmp_path / "no_such_run")])
    assert exit_info.value.code == 2
    assert "trainer_state.json" in capsys.readouterr().err


def test_run_without_final_state_uses_its_latest_checkpoint_and_folder_name(tmp_path):
    run = tmp_path / "my_run"
    write_run(run / "checkpoint-2", "DFT", "dft", 0.0, ["loss"], steps=(1, 2))
    write_run(run / "checkpoint-10", "DFT", "dft", 0.0, ["loss"], steps=(5, 10))
    loaded = load_run(run)
    assert loaded.series("loss")[0] == [5, 10]
    assert loaded.label == "my_run"  # no asft_run.json at the top level


def test_same_method_twice_is_told_apart(tmp_path):
    a = write_run(tmp_path / "seed0", "DFT", "dft", 0.0, ["loss"])
    b = write_run(tmp_path / "seed1", "DFT", "dft", 0.0, ["loss"])
    _, fig, _ = plot_run_dirs([a, b], ["loss"], tmp_path / "c.png")
    assert lines_by_panel(fig)["loss"] == ["DFT (seed0)", "DFT (seed1)"]


def test_end_of_run_curves(tiny_model_path, pc_dataset, tmp_path):
    from asft_trl import ASFTTrainer
    from tiny import make_args

    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path / "run", kl_coef=0.1, max_steps=2), train_dataset=pc_dataset
    )
    trainer.train()
    out = write_run_curves(trainer)
    assert out == tmp_path / "run" / "curves.png" and out.is_file()
    run = load_run(tmp_path / "run")
    assert run.label == "ASFT λ=0.1" and run.series("kl")[0] == [1, 2]


def test_training_script_writes_its_curves_with_drift(tiny_model_path, tmp_path, caplog):
    from asft_trl.scripts import train
    from tiny import prompt_completion_rows

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in prompt_completion_rows(8)))
    out = tmp_path / "out"
    train.main(
        *train.parse(
            [
                "--model_name_or_path",
                tiny_model_path,
                "--dataset_name",
                str(data),
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "2",
                "--logging_steps",
                "1",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
                "--gradient_checkpointing",
                "false",
                "--kl_coef",
                "0",
                "--loss_type",
                "dft",
                "--log_drift",
                "true",
            ]
        )
    )
    assert (out / "curves.png").is_file()
    assert "was not logged" not in caplog.text  # the end-of-run figure draws what the run logged (no `kl` here)
    run = load_run(out)
    assert run.label == "DFT"
    assert run.series("drift_kl")[0] == [0, 1, 2] and run.series("drift_kl")[1][0] == 0.0

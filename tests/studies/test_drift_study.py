"""The drift study (`python -m studies.drift`), end to end on the tiny model: 2 steps per run, so it cannot rot."""

from __future__ import annotations

import json

import pytest

from studies import drift
from studies.drift import BEGIN, END, RunSpec, plan_runs


def test_plan_names_the_four_methods_and_shares_coinciding_runs():
    methods, sweep = plan_runs(0.05, [0.5, 0, 0.05, 0.01, 0.05])
    assert [r.label for r in methods] == ["SFT", "DFT", "SFT+KL λ=0.05", "ASFT λ=0.05"]
    assert [r.kl_coef for r in sweep] == [0, 0.01, 0.05, 0.5]
    assert len(dict.fromkeys(methods + sweep)) == 6  # DFT and ASFT 0.05 are trained once
    assert RunSpec("dft", 0.0) in methods and sweep[0] == RunSpec("dft", 0.0)


def test_row_counts_take_the_training_recipes_names_and_the_old_flags_warn():
    """`--dataset_size` / `--dataset_test_size` as in a training recipe; `--n_train` / `--n_eval` (the old names)
    still work, with a FutureWarning, and the run folders' stored settings keep the old keys (reusable)."""
    from studies.drift import _settings, make_parser

    parser = make_parser()
    args = parser.parse_args(["--dataset_size", "8", "--dataset_test_size", "4"])
    assert (args.dataset_size, args.dataset_test_size) == (8, 4)
    assert parser.parse_args([]).dataset_size == 800  # the default survives the alias sharing its destination
    with pytest.warns(FutureWarning, match="--dataset_size"):
        old = parser.parse_args(["--n_train", "8", "--n_eval", "4"])
    assert (old.dataset_size, old.dataset_test_size) == (8, 4)
    assert {"n_train": 8, "n_eval": 4}.items() <= _settings(old).items()


@pytest.mark.slow
def test_two_step_study_on_the_tiny_model(tiny_model_path, tmp_path, capsys):
    doc = tmp_path / "docs" / "study.md"
    doc.parent.mkdir()
    doc.write_text("# My study\n\nHand-written reading of the results.\n")
    argv = [
        "--model",
        tiny_model_path,
        "--output_dir",
        str(tmp_path / "runs"),
        "--doc",
        str(doc),
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--drift_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--dataset_size",
        "8",
        "--dataset_test_size",
        "4",
        "--sweep",
        "0,0.5",
        "--learning_rate",
        "1e-2",
        "--ood_max_new_tokens",
        "4",
        "--max_length",
        "200",
        "--lora_r",
        "4",
    ]
    assert drift.main(argv) == 0
    report = json.loads((tmp_path / "docs" / "study_results.json").read_text())
    assert [r["label"] for r in report["methods"]] == ["SFT", "DFT", "SFT+KL λ=0.05", "ASFT λ=0.05"]
    assert [r["settings"]["kl_coef"] for r in report["sweep"]] == [0.0, 0.5]
    assert report["trained_runs"] == 5 and report["reused_runs"] == 0
    for r in report["methods"] + report["sweep"]:
        assert 0 <= r["in_domain_accuracy"] <= 1 and 0 <= r["ood_accuracy"] <= 1
        assert r["final_drift_kl"] > 0 and r["final_task_kl"] > 0 and r["final_dft_weight_ess"] > 0
        assert (r["final_kl"] is None) == (r["settings"]["kl_coef"] == 0)
    assert (tmp_path / "docs" / "study_methods.png").is_file() and (tmp_path / "docs" / "study_sweep.png").is_file()
    text = doc.read_text()
    assert text.startswith("# My study\n\nHand-written reading") and BEGIN in text and END in text
    assert "| ASFT λ=0.05 |" in text and "study_methods.png" in text

    # A second study with the same settings reuses every run and keeps the text around the generated part
    doc.write_text(text + "\nMore notes after the table.\n")
    assert drift.main(argv) == 0
    report = json.loads((tmp_path / "docs" / "study_results.json").read_text())
    assert report["trained_runs"] == 0 and report["reused_runs"] == 5
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and text.endswith("More notes after the table.\n")

    # Other settings in the same output folder: refused before anything is overwritten
    with pytest.raises(FileExistsError, match="other settings"):
        drift.main([*argv[:-2], "--lora_r", "2"])


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--sweep", "0,x"], "comma-separated"),
        (["--sweep", "-1"], ">= 0"),
        (["--max_steps", "0"], "max_steps must be > 0"),
        (["--kl_coef", "0"], "kl_coef must be > 0"),
    ],
)
def test_bad_arguments_are_refused(bad, message, capsys):
    with pytest.raises(SystemExit):
        drift.main(bad)
    assert message in capsys.readouterr().err

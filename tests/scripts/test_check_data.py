"""`asft-trl check-data --config X.yaml`: the recipe is validated first, the sample is tokenised and batched as training
would, and the figures are the ones the trainer's own pre-flight check finds when DFT training starts; nothing is
written."""

from __future__ import annotations

import pytest

from asft_trl import ASFTConfig, ASFTTrainer
from asft_trl.scripts import check_data
from asft_trl.scripts.cli import main as asft_main
from tiny import write_recipe


def test_the_figures_are_those_the_trainer_finds_before_training(tiny_model_path, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_path, dataset_size=10, dataset_seed=3)
    argv = ["--config", str(recipe), "--sample_size", "6"]
    report = check_data.run(*check_data.parse(argv))

    # The same recipe trained for a step: the trainer measures its first examples the same way
    script_args, training_args, _, dataset_args, _ = check_data.parse(argv)
    from asft_trl.data import load_training_data
    from asft_trl.data.prepare import prepare_splits

    splits, _ = prepare_splits(load_training_data(script_args, dataset_args), script_args)
    args = ASFTConfig(
        output_dir=str(tmp_path / "trained"),
        max_steps=1,
        per_device_train_batch_size=2,
        kl_coef=0.1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
    )
    trainer = ASFTTrainer(tiny_model_path, args=args, train_dataset=splits["train"].select(range(6)))
    trainer.train()
    trained = trainer.preflight_report
    assert report["examples"] == trained["examples"] == 6
    prior, expected = report["answer_tokens"], trained["answer_tokens"]
    assert prior["count"] == expected["count"] > 0 and prior["warned"] == expected["warned"]
    assert prior["mean_probability"] == pytest.approx(expected["mean_probability"], rel=1e-5)
    assert prior["low_p_share"] == pytest.approx(expected["low_p_share"])
    assert [e["token"] for e in report["special_tokens"]] == [e["token"] for e in trained["special_tokens"]]

    # From the command line: the figures, the warning, and nothing written where the recipe trains
    assert asft_main(["check-data", *argv]) == 0
    out = capsys.readouterr().out
    assert f"share below p 0.1: {prior['low_p_share']:.1%}" in out and f"mean p {prior['mean_probability']:.3f}" in out
    assert "WARNING: Weak prior" in out and "'<|im_end|>'" in out
    assert not (tmp_path / "out").exists()


def test_an_sft_recipe_is_measured_and_told_the_warnings_are_for_dft(tiny_model_path, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_path, loss_type="nll", kl_coef=0.0)
    assert asft_main(["check-data", "--config", str(recipe), "--sample_size", "3"]) == 0
    out = capsys.readouterr().out
    assert "loss_type=nll" in out and "the warnings below are for DFT/ASFT" in out and "WARNING:" in out


def test_a_recipe_with_an_earlier_run_in_output_dir_is_still_checked(tiny_model_path, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "trainer_state.json").write_text("{}")
    assert asft_main(["check-data", "--config", str(recipe), "--sample_size", "2"]) == 0
    assert (tmp_path / "out" / "trainer_state.json").read_text() == "{}"


def exit_status(argv) -> int:
    """`asft-trl ARGV`'s exit status, whether returned or raised (argparse exits on an unknown field)."""
    try:
        return asft_main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sample_size", "0"], "sample_size=0 must be at least 1"),
        (["--kl_coef", "-1"], "kl_coef=-1.0 is invalid"),
        (["--no_such_field", "1"], "no_such_field"),
        (["--dataset_name", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    ],
)
def test_a_bad_recipe_ends_in_one_line_before_anything_loads(
    tiny_model_path, tmp_path, capsys, monkeypatch, extra, message
):
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was refused")

    monkeypatch.setattr("asft_trl.trainer.trainer.ASFTTrainer.__init__", loaded)
    recipe = write_recipe(tmp_path, tiny_model_path)
    assert exit_status(["check-data", "--config", str(recipe), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_without_a_recipe_it_prints_the_usage(capsys):
    assert asft_main(["check-data"]) == 2
    assert "usage: asft-trl check-data --config" in capsys.readouterr().err

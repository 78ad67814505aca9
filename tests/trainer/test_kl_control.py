"""lambda by step: the schedules and the adaptive KL controller (`asft_trl.trainer.kl_control`), their config fields (YAML,
CLI, errors), the trainer that logs and uses them, resume from a checkpoint, and gradient-accumulation invariance."""

from __future__ import annotations

import json
import logging
import math
import shutil

import dist_train  # tests/dist_train.py: the equivalence tests' data and deterministic SGD settings
import pytest
import torch
import yaml
from dist_train import step_losses
from transformers import AutoTokenizer

from asft_trl import ASFTConfig, ASFTTrainer, asft_loss
from asft_trl.trainer.kl_control import AdaptiveKLController, KLCoefSchedule, adaptive_update, parse_milestones
from tiny import make_args

# ---------------------------------------------------------------------------------------------------- schedules


def test_constant_is_kl_coef_at_every_step():
    schedule = KLCoefSchedule("constant", 0.05)
    assert [schedule(s, 100) for s in (0, 1, 50, 99, 1000)] == [0.05] * 5


def test_constant_with_warmup_in_steps_and_as_a_ratio():
    steps = KLCoefSchedule("constant_with_warmup", 0.1, warmup_steps=4)
    assert [steps(s, 100) for s in range(7)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1], abs=1e-15)
    # 0.1 of 25 steps = 2.5, rounded up to 3 as transformers' warmup_steps
    ratio = KLCoefSchedule("constant_with_warmup", 0.3, warmup_steps=0.1)
    assert [ratio(s, 25) for s in range(5)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3], abs=1e-15)


def test_cosine_from_kl_coef_to_final_after_the_warmup():
    down = KLCoefSchedule("cosine", 0.1, final=0.02)
    assert [down(s, 10) for s in (0, 5, 10, 12)] == pytest.approx([0.1, 0.06, 0.02, 0.02], abs=1e-15)
    assert down(2, 10) == pytest.approx(0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi * 0.2)), abs=1e-15)
    warm = KLCoefSchedule("cosine", 0.1, warmup_steps=2, final=0.0)
    assert [warm(s, 10) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.05, 0.1, 0.05, 0.0], abs=1e-15)
    up = KLCoefSchedule("cosine", 0.01, final=0.09)  # a tightening anchor
    assert [up(s, 4) for s in (0, 2, 4)] == pytest.approx([0.01, 0.05, 0.09], abs=1e-15)


def test_by_step_milestones():
    schedule = KLCoefSchedule("by_step", 0.1, milestones={10: 0.0, 3: 0.02})
    assert [schedule(s, 100) for s in (0, 2, 3, 9, 10, 99)] == [0.1, 0.1, 0.02, 0.02, 0.0, 0.0]
    assert KLCoefSchedule("by_step", 0.1, milestones={0: 0.3})(0, 5) == 0.3


def test_milestones_from_yaml_and_json_are_the_same():
    assert parse_milestones({100: 0.02, 5: 0}) == parse_milestones('{"5": 0, "100": "0.02"}') == {5: 0.0, 100: 0.02}


# ---------------------------------------------------------------------------------------------------- controller


def test_controller_raises_lambda_above_target_and_lowers_it_below():
    # clip(kl/target - 1, -0.2, 0.2) / horizon 10: +-2% at most per step
    assert adaptive_update(0.1, kl=0.2, target=0.1, horizon=10, error_clip=0.2) == pytest.approx(0.102)
    assert adaptive_update(0.1, kl=0.0, target=0.1, horizon=10, error_clip=0.2) == pytest.approx(0.098)
    # inside the clip the change is proportional to the error; the horizon divides it
    assert adaptive_update(0.1, kl=0.105, target=0.1, horizon=10, error_clip=0.2) == pytest.approx(0.1005)
    assert adaptive_update(0.1, kl=0.105, target=0.1, horizon=5, error_clip=0.2) == pytest.approx(0.101)
    assert adaptive_update(0.1, kl=0.1, target=0.1, horizon=10, error_clip=0.2) == pytest.approx(0.1)
    assert adaptive_update(0.1, kl=0.5, target=0.1, horizon=10, error_clip=0.5) == pytest.approx(0.105)
    assert adaptive_update(0.1, kl=0.5, target=0.1, horizon=10, error_clip=0.2, n_steps=3) == pytest.approx(0.106)

    controller = AdaptiveKLController(0.1, target=0.05, horizon=10, error_clip=0.2)
    values = [controller.update(kl) for kl in (1.0, 1.0, 0.0)]
    assert values == pytest.approx([0.102, 0.10404, 0.10404 * 0.98])
    assert controller.num_updates == 3 and controller.last_kl == 0.0


def test_controller_state_round_trips():
    first = AdaptiveKLController(0.1, target=0.05, horizon=4, error_clip=0.2)
    for kl in (0.2, 0.01, 0.07):
        first.update(kl)
    second = AdaptiveKLController(0.1, target=0.05, horizon=4, error_clip=0.2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert second == first
    assert [first.update(kl) for kl in (0.3, 0.0)] == [second.update(kl) for kl in (0.3, 0.0)]


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(kl_coef_schedule="linear"), ["kl_coef_schedule='linear'", "'constant_with_warmup'"]),
        (dict(kl_coef=0.0, kl_coef_schedule="cosine"), ["kl_coef_schedule='cosine'", "kl_coef > 0"]),
        (dict(kl_coef=0.0, kl_target=0.1), ["kl_target=0.1", "kl_coef > 0"]),
        (dict(kl_coef_schedule="cosine", kl_target=0.1), ["kl_coef_schedule='cosine'", "kl_target=0.1", "Use one"]),
        (dict(kl_coef_schedule="constant_with_warmup"), ["kl_coef_warmup_steps > 0"]),
        (dict(kl_coef_warmup_steps=10), ["kl_coef_warmup_steps=10", "'constant_with_warmup' or 'cosine'"]),
        (dict(kl_coef_schedule="cosine", kl_coef_warmup_steps=2.5), ["kl_coef_warmup_steps=2.5", "whole number"]),
        (dict(kl_coef_schedule="cosine", kl_coef_warmup_steps=-1), ["kl_coef_warmup_steps=-1"]),
        (dict(kl_coef_final=0.01), ["kl_coef_final=0.01", "'cosine'"]),
        (dict(kl_coef_schedule="cosine", kl_coef_final=-0.1), ["kl_coef_final=-0.1", ">= 0"]),
        (dict(kl_coef_schedule="by_step"), ["needs kl_coef_milestones"]),
        (dict(kl_coef_milestones={5: 0.1}), ["kl_coef_milestones", "'by_step'"]),
        (dict(kl_coef_schedule="by_step", kl_coef_milestones="{5: 0.1}"), ["kl_coef_milestones", "JSON"]),
        (dict(kl_coef_schedule="by_step", kl_coef_milestones={"x": 0.1}), ["kl_coef_milestones", "'x'"]),
        (dict(kl_coef_schedule="by_step", kl_coef_milestones={-1: 0.1}), ["kl_coef_milestones step -1"]),
        (dict(kl_coef_schedule="by_step", kl_coef_milestones={5: -0.1}), ["kl_coef_milestones lambda -0.1"]),
        (dict(kl_target=0.0), ["kl_target=0.0", "> 0"]),
        (dict(kl_target=float("nan")), ["kl_target=nan", "finite"]),
        (dict(kl_target=0.1, kl_horizon=0.5), ["kl_horizon=0.5", ">= 1"]),
        (dict(kl_target=0.1, kl_error_clip=1.0), ["kl_error_clip=1.0", "(0, 1)"]),
    ],
)
def test_bad_values_error_early_naming_field_and_fix(tmp_path, overrides, words):
    with pytest.raises(ValueError) as error:
        ASFTConfig(output_dir=str(tmp_path), **overrides)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_defaults_keep_the_papers_constant_lambda(tmp_path, tiny_model_path, pc_dataset):
    args = ASFTConfig(output_dir=str(tmp_path))
    assert (args.kl_coef_schedule, args.kl_target, args.kl_coef_milestones) == ("constant", None, None)
    trainer = ASFTTrainer(tiny_model_path, args=make_args(tmp_path), train_dataset=pc_dataset)
    assert trainer._kl_coef_schedule is None and trainer._kl_controller_callback() is None
    trainer.state.global_step = 7
    assert trainer.current_kl_coef == 0.05


def test_yaml_and_cli_parse_the_new_fields(tmp_path):
    from asft_trl.scripts.train import parse

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "m",
                "dataset_name": "d",
                "output_dir": str(tmp_path / "out"),
                "kl_coef": 0.1,
                "kl_coef_schedule": "by_step",
                "kl_coef_milestones": {100: 0.02, 500: 0.0},
            }
        )
    )
    _, args, _, _ = parse(["--config", str(recipe)])
    assert args.kl_coef_milestones == {100: 0.02, 500: 0.0}
    _, args, _, _ = parse(["--config", str(recipe), "--kl_coef_milestones", '{"50": 0.05}'])
    assert args.kl_coef_milestones == {50: 0.05}
    _, args, _, _ = parse(
        [
            "--config",
            str(recipe),
            "--kl_coef_schedule",
            "cosine",
            "--kl_coef_milestones",
            "null",
            "--kl_coef_warmup_steps",
            "0.1",
            "--kl_coef_final",
            "0.01",
        ]
    )
    assert (args.kl_coef_schedule, args.kl_coef_warmup_steps, args.kl_coef_final) == ("cosine", 0.1, 0.01)
    _, args, _, _ = parse(
        [
            "--config",
            str(recipe),
            "--kl_coef_schedule",
            "constant",
            "--kl_coef_milestones",
            "null",
            "--kl_target",
            "0.02",
            "--kl_horizon",
            "20",
            "--kl_error_clip",
            "0.3",
        ]
    )
    assert (args.kl_target, args.kl_horizon, args.kl_error_clip) == (0.02, 20.0, 0.3)
    with pytest.raises(ValueError, match="kl_target=0.02.*Use one"):
        parse(["--config", str(recipe), "--kl_target", "0.02"])


# ---------------------------------------------------------------------------------------------------- trainer


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "loss" in entry]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(kl_coef_schedule="constant_with_warmup", kl_coef_warmup_steps=3), [0.0, 0.1 / 3, 0.2 / 3, 0.1, 0.1]),
        (
            dict(kl_coef_schedule="cosine", kl_coef_final=0.02),
            [0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi * s / 5)) for s in range(5)],
        ),
        (dict(kl_coef_schedule="by_step", kl_coef_milestones={2: 0.3, 4: 0.0}), [0.1, 0.1, 0.3, 0.3, 0.0]),
    ],
    ids=["warmup", "cosine", "by_step"],
)
def test_trainer_logs_kl_coef_following_the_schedule(tiny_model_path, pc_dataset, tmp_path, overrides, expected):
    trainer = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path, kl_coef=0.1, max_steps=5, **overrides), train_dataset=pc_dataset
    )
    trainer.train()
    assert logged(trainer, "kl_coef") == pytest.approx(expected, abs=1e-12)
    assert len(logged(trainer, "kl")) == 5  # the KL is measured even where lambda is 0


def test_the_loss_uses_the_scheduled_lambda(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(
        tiny_model_path,
        args=make_args(tmp_path, kl_coef=0.1, kl_coef_schedule="by_step", kl_coef_milestones={3: 0.7}),
        train_dataset=pc_dataset,
    )
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        policy_logits = trainer.model(**inputs).logits[:, :-1]
        ref_logits = trainer.ref_model(**inputs).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    for step, kl_coef in ((2, 0.1), (3, 0.7)):
        trainer.state.global_step = step
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(50))
        expected, _ = asft_loss(
            policy_logits[mask], batch["labels"][:, 1:][mask], ref_logits[mask], kl_coef=kl_coef, num_items_in_batch=50
        )
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# Settings under which the KL rises well above the target within 6 steps, so the controller has work to do
CONTROLLER = dict(kl_coef=0.1, kl_target=0.1, kl_horizon=2, kl_error_clip=0.9)
STEPS = 6


def controlled_run(model_path, output_dir, batch_size=4, grad_accum=1, resume=None, **overrides):
    """Deterministic SGD on the equivalence tests' data (`dist_train`): 6 steps of 4 examples in dataset order."""
    args = dist_train.training_args(
        output_dir,
        batch_size=batch_size,
        grad_accum=grad_accum,
        learning_rate=0.5,
        loss_type="nll",
        max_steps=STEPS,
        **{**CONTROLLER, **overrides},
    )
    torch.manual_seed(0)
    trainer = ASFTTrainer(
        model_path,
        args=args,
        train_dataset=dist_train.make_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_path),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def implied_kl_coefs(kls, kl_coef=CONTROLLER["kl_coef"]):
    """The lambda sequence the controller must produce from per-step KLs `kls`."""
    values = [kl_coef]
    for kl in kls[:-1]:
        values.append(
            adaptive_update(
                values[-1], kl, CONTROLLER["kl_target"], CONTROLLER["kl_horizon"], CONTROLLER["kl_error_clip"]
            )
        )
    return values


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """The controller's reference run: batch 4 x accumulation 1, checkpoints at steps 3 and 6."""
    import tiny

    root = tmp_path_factory.mktemp("kl-controller")
    model_path = tiny.build_model(root / "model")
    trainer = controlled_run(model_path, root / "4x1", save_strategy="steps", save_steps=3)
    return model_path, root, trainer


def test_controller_in_the_trainer_moves_lambda_by_the_measured_kl(controlled):
    _, _, trainer = controlled
    kls, kl_coefs = logged(trainer, "kl"), logged(trainer, "kl_coef")
    assert kls[0] == 0.0 and max(kls) > 1.5 * CONTROLLER["kl_target"]  # below, then above the target
    assert kl_coefs[1] < kl_coefs[0] and max(kl_coefs[i + 1] / kl_coefs[i] for i in range(STEPS - 1)) > 1.2
    # One micro-batch per step: the logged kl is the step's token-weighted KL the controller used
    assert kl_coefs == pytest.approx(implied_kl_coefs(kls), rel=1e-6)


def test_gradient_accumulation_gives_the_same_lambda_and_loss(controlled):
    model_path, root, reference = controlled
    split = controlled_run(model_path, root / "2x2", batch_size=2, grad_accum=2)
    assert logged(split, "kl_coef") == pytest.approx(logged(reference, "kl_coef"), rel=1e-5)
    assert step_losses(split.state.log_history) == pytest.approx(step_losses(reference.state.log_history), rel=1e-5)
    # Teeth: 2x2 logs the mean of its micro-batch means, which is not the step's token-weighted KL; a controller fed
    # that would have produced another lambda sequence
    wrong = implied_kl_coefs(logged(split, "kl"))
    assert max(abs(a / b - 1) for a, b in zip(wrong, logged(reference, "kl_coef"))) > 1e-3


def steps_after(trainer, first, key):
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e and "loss" in e and e["step"] >= first}


@pytest.mark.parametrize("restore_flag", [False, True], ids=["default", "restore_callback_states"])
def test_resumed_run_continues_identically(controlled, tmp_path, restore_flag):
    _, _, full = controlled
    checkpoint = full.args.output_dir + "/checkpoint-3"
    saved = json.loads(open(checkpoint + "/trainer_state.json").read())["stateful_callbacks"]["AdaptiveKLCallback"]
    assert saved["args"]["controller_state"]["num_updates"] == 3
    resumed = controlled_run(
        full.model.name_or_path,
        tmp_path / "resumed",
        resume=checkpoint,
        restore_callback_states_from_checkpoint=restore_flag,
    )
    for key in ("kl_coef", "loss", "kl"):
        after = steps_after(resumed, 4, key)
        assert list(after) == [4, 5, 6]
        assert after == pytest.approx(steps_after(full, 4, key), rel=1e-6), key
    assert resumed._kl_controller_callback().controller.num_updates == STEPS


def test_resume_without_the_saved_state_would_differ(controlled, tmp_path, caplog):
    """The control: the same resume with the controller's state removed from the checkpoint restarts lambda from
    kl_coef, says so, and logs another lambda."""
    _, _, full = controlled
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(full.args.output_dir + "/checkpoint-3", checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["AdaptiveKLCallback"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        resumed = controlled_run(
            full.model.name_or_path, tmp_path / "resumed", resume=str(checkpoint), save_strategy="steps", save_steps=3
        )
    assert "no adaptive KL controller state" in caplog.text
    assert steps_after(resumed, 4, "kl_coef")[4] == CONTROLLER["kl_coef"] != steps_after(full, 4, "kl_coef")[4]
    # and its own checkpoint does carry the state again
    saved = json.loads((tmp_path / "resumed/checkpoint-6/trainer_state.json").read_text())
    assert "AdaptiveKLCallback" in saved["stateful_callbacks"]


def test_evaluation_uses_the_current_lambda_and_leaves_the_controller_alone(tiny_model_path, pc_dataset, tmp_path):
    trainer = ASFTTrainer(
        tiny_model_path,
        args=make_args(tmp_path, kl_coef=0.1, kl_target=0.01),
        train_dataset=pc_dataset,
        eval_dataset=pc_dataset.select(range(4)),
    )
    controller = trainer._kl_controller_callback().controller
    controller.kl_coef = 0.37
    metrics = trainer.evaluate()
    assert metrics["eval_kl_coef"] == 0.37
    assert controller.kl_coef == 0.37 and trainer._kl_controller_callback()._count == 0


# ---------------------------------------------------------------------------------------------------- plot


def test_plot_draws_kl_coef_when_lambda_varies(controlled, tmp_path):
    from asft_trl.diagnostics.plot import plot_run_dirs, write_run_curves

    _, _, trainer = controlled
    assert write_run_curves(trainer) is not None
    _, fig, _ = plot_run_dirs([trainer.args.output_dir], out=tmp_path / "varying.png")
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes]
    assert "kl_coef" in titles and titles[:3] == ["loss", "nll", "kl"]
    kl_coef_axis = fig.axes[titles.index("kl_coef")]
    assert list(kl_coef_axis.get_lines()[0].get_ydata()) == pytest.approx(logged(trainer, "kl_coef"))
    assert kl_coef_axis.get_lines()[0].get_label() == "SFT+KL λ=0.1 → KL 0.1"

    # A constant lambda is in the legend already: no panel for it
    constant = tmp_path / "constant"
    constant.mkdir()
    history = [{"step": s, "loss": 1.0, "kl": 0.1, "kl_coef": 0.05} for s in (1, 2, 3)]
    (constant / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    _, fig, _ = plot_run_dirs([constant], out=tmp_path / "constant.png")
    assert "kl_coef" not in [ax.get_title().split("\n")[0] for ax in fig.axes]

"""The knowledge study (`python -m studies.knowledge`): the generated facts, the never-learned-token measure, the verdict rules, and the study
end to end on the tiny model (reuse, resume after an interruption, the report's markers)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from studies import knowledge
from studies.common import METHOD_KEYS, judge, verdict
from studies.drift import BEGIN as WORD_ORDER_BEGIN
from studies.facts import (
    ATTRIBUTES,
    N_TRAIN_PHRASINGS,
    OCCUPATIONS,
    as_recall_rows,
    make_fact_splits,
    spread_subset,
)
from studies.knowledge import BEGIN, END, HYPOTHESES, answer_token_probs, unlearned_tokens

# ---------------------------------------------------------------------------------------------------- the task


def _prompts(split) -> set[str]:
    return {row["prompt"][0]["content"] for row in split}


def test_splits_are_deterministic_and_the_seed_changes_them():
    a, b, c = make_fact_splits(seed=0), make_fact_splits(seed=0), make_fact_splits(seed=1)
    for name in ("train", "test_phrasings", "test_facts"):
        assert a[name].to_list() == b[name].to_list()
    assert a["train"].to_list() != c["train"].to_list()
    assert (len(a["train"]), len(a["test_phrasings"]), len(a["test_facts"])) == (16 * 4 * 3, 16 * 4 * 2, 4 * 4 * 2)


def test_heldout_phrasings_and_heldout_facts_never_occur_in_training():
    splits = make_fact_splits(n_people=10, n_heldout_people=5, seed=3)
    train, phrasings, facts = splits["train"], splits["test_phrasings"], splits["test_facts"]
    train_text = " ".join(row["prompt"][0]["content"] + " " + row["completion"][0]["content"] for row in train)
    assert not _prompts(train) & _prompts(phrasings) and not _prompts(train) & _prompts(facts)
    assert set(train["phrasing"]) == set(range(N_TRAIN_PHRASINGS))
    assert min(phrasings["phrasing"]) == min(facts["phrasing"]) == N_TRAIN_PHRASINGS
    # No training question is any held-out phrasing of any person, whatever the index column says
    people = set(train["person"]) | set(facts["person"])
    held_out = {a.questions[i].format(name=p) for a in ATTRIBUTES for i in range(N_TRAIN_PHRASINGS, 5) for p in people}
    assert not _prompts(train) & held_out
    # Held-out people: never named in training; trained facts: each in every trained and every held-out phrasing
    assert not set(facts["person"]) & set(train["person"])
    assert not any(person in train_text for person in set(facts["person"]))
    trained_facts = {(r["person"], r["attribute"], r["value"]) for r in train}
    assert {(r["person"], r["attribute"], r["value"]) for r in phrasings} == trained_facts
    assert len(trained_facts) == 10 * len(ATTRIBUTES) and len(train) == len(trained_facts) * N_TRAIN_PHRASINGS


def test_answers_hold_the_value_and_names_never_contain_a_value():
    splits = make_fact_splits(n_people=20, n_heldout_people=5, seed=0)
    rows = splits["train"].to_list() + splits["test_facts"].to_list()
    for row in rows:
        assert row["value"] in row["completion"][0]["content"] and row["person"] in row["completion"][0]["content"]
    values = {r["value"].lower() for r in rows}
    name_words = {w.lower() for r in rows for w in r["person"].split()}
    assert not values & name_words  # "contains the value" cannot be met by repeating the question's name
    assert {r["value"] for r in rows if r["attribute"] == "occupation"} <= set(OCCUPATIONS)
    recall = as_recall_rows(splits["test_facts"])
    assert [r["completion"][0]["content"] for r in recall] == splits["test_facts"]["value"]
    subset = spread_subset(splits["test_facts"], 8)
    assert len(subset) == 8 and set(subset["attribute"]) == {a.name for a in ATTRIBUTES}


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_people=0"):
        make_fact_splits(n_people=0)


# ---------------------------------------------------------------------------------------------------- measures


def test_unlearned_tokens_counts_each_kind():
    base = [torch.tensor([0.01, 0.5, 0.05, 0.9]), torch.tensor([0.02, 0.3])]
    final = [torch.tensor([0.02, 0.95, 0.6, 0.99]), torch.tensor([0.5, 0.05])]
    ids = [[7, 8, 9, 2], [5, 2]]
    out = unlearned_tokens(base, final, ids, end_id=2)
    assert out["low_p_base"] == pytest.approx(3 / 6)  # 0.01, 0.05, 0.02
    assert out["low_p_final"] == pytest.approx(2 / 6)  # 0.02, 0.05 (the second was learned, then lost: not "never")
    assert out["never_learned"] == pytest.approx(1 / 6) and out["still_low"] == pytest.approx(1 / 3)
    assert out["end_p_final"] == pytest.approx((0.99 + 0.05) / 2)
    with pytest.raises(ValueError, match="token for token"):
        unlearned_tokens(base, [final[0]])


def test_answer_token_probs_match_a_plain_forward_on_the_tiny_model(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    pairs = [("reverse the word cat", "tac"), ("what is two plus two ?", "the answer is four")]
    probs, token_ids = answer_token_probs(model, tokenizer, pairs, batch_size=1)
    for (prompt, answer), p, ids in zip(pairs, probs, token_ids):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True
        )
        full_ids, start = list(full["input_ids"]), len(head["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full_ids])).logits[0].float(), -1)
        expected = torch.stack([logp[t - 1, full_ids[t]].exp() for t in range(start, len(full_ids))])
        assert list(ids) == full_ids[start:] and tokenizer.eos_token_id in ids
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-7)
    # The same model before and after: what started below 0.1 stayed there, all of it
    out = unlearned_tokens(probs, probs, token_ids, tokenizer.eos_token_id)
    assert out["never_learned"] == out["low_p_base"] == out["low_p_final"] > 0  # an untrained tiny model
    assert out["still_low"] == 1.0 and 0 < out["end_p_final"] < 1


def test_the_probe_logs_the_low_p_share_and_ess_of_the_same_tokens(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_trl.diagnostics.drift import DriftProbe

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    pairs = [("reverse the word dog", "god"), ("hello", "hello world , this is a tiny corpus")]
    probe = DriftProbe(tokenizer, pairs, name="trainset", low_p_threshold=0.1)
    values = probe.measure(model, reference=model)
    p = torch.cat(probe.token_probs(model)).double()
    assert values["trainset_kl"] == 0.0
    assert values["trainset_low_p"] == pytest.approx((p < 0.1).double().mean().item())
    assert values["trainset_ess"] == pytest.approx((p.sum() ** 2 / (len(p) * (p**2).sum())).item())
    assert set(DriftProbe(tokenizer, pairs).measure(model, reference=model)) == {"drift_kl", "drift_nll"}  # off
    with pytest.raises(ValueError, match="low_p_threshold"):
        DriftProbe(tokenizer, pairs, low_p_threshold=1.5)


# ---------------------------------------------------------------------------------------------------- verdict rules


@pytest.mark.parametrize(
    "effects, expected",
    [
        ([0.2, 0.1, 0.3], "shown"),
        ([0.2, -0.01, 0.3], "not shown"),  # one seed against
        ([0.02, 0.03, 0.01], "not shown"),  # every seed agrees, but the effect is too small
        ([-0.2, -0.1, -0.3], "opposite"),
        ([-0.2, 0.01, -0.3], "not shown"),
        ([0.1, 0.1, 0.1], "shown"),  # the threshold itself counts
        ([0.2, None, 0.3], "not measured"),
        ([], "not measured"),
        ([0.2, math.nan, 0.3], "not measured"),
    ],
)
def test_verdict_rule(effects, expected):
    assert verdict(effects, 0.1) == expected


def _curve(start: float, mid: float, end: float, max_steps: int = 300) -> list[list[float]]:
    return [[0, start], [max_steps // 2, mid], [max_steps, end]]


def _result(kl_mid, kl_end, ess_start, ess_end, low_p, drift, ood, recall, seed_offset=0.0) -> dict:
    eps = seed_offset
    return {
        "settings": {"max_steps": 300},
        "curves": {
            "trainset_kl": _curve(0.0, kl_mid + eps, kl_end + eps),
            "trainset_ess": _curve(ess_start, ess_start, ess_end + eps),
            "drift_kl": _curve(0.0, drift / 2, drift + eps),
        },
        "low_p_final": low_p + eps,
        "ood_accuracy": ood,
        "recall_heldout_phrasings": recall + eps,
    }


def _paper_world(seed: int) -> dict[str, dict]:
    """Results as the paper describes them: DFT drifts and leaves tokens unlearned, ASFT is anchored and best."""
    e = 0.001 * seed
    return {
        "sft": _result(1.0, 1.2, 0.6, 0.6, 0.10, 0.30, 0.70, 0.40, e),
        "dft": _result(1.0, 1.5, 0.6, 0.4, 0.30, 0.50, 0.50, 0.20, e),
        "sft_kl": _result(0.5, 0.5, 0.6, 0.6, 0.10, 0.10, 0.90, 0.45, e),
        "asft": _result(0.4, 0.4, 0.6, 0.55, 0.15, 0.10, 0.95, 0.50, e),
    }


def _reversed_world(seed: int) -> dict[str, dict]:
    """The opposite of every claim: DFT's KL turns down, its ESS rises, it learns more and forgets less."""
    e = 0.001 * seed
    return {
        "sft": _result(1.0, 1.0, 0.6, 0.6, 0.30, 0.50, 0.90, 0.50, e),
        "dft": _result(1.0, 0.5, 0.4, 0.6, 0.10, 0.20, 0.90, 0.70, e),
        "sft_kl": _result(0.5, 0.5, 0.6, 0.6, 0.30, 0.10, 0.90, 0.45, e),
        "asft": _result(0.9, 0.9, 0.6, 0.55, 0.15, 0.40, 0.70, 0.30, e),
    }


def test_every_hypothesis_is_shown_on_paper_like_results_and_opposite_on_reversed_ones():
    shown = judge({seed: _paper_world(seed) for seed in (0, 1, 2)}, HYPOTHESES)
    assert [v["key"] for v in shown] == [h.key for h in HYPOTHESES]
    assert {v["key"]: v["verdict"] for v in shown} == {h.key: "shown" for h in HYPOTHESES}
    h1 = shown[0]
    assert h1["seeds"] == [0, 1, 2] and h1["effects"][0] == pytest.approx(0.5)  # (1.5 - 1.0) / 1.0
    opposite = judge({seed: _reversed_world(seed) for seed in (0, 1, 2)}, HYPOTHESES)
    assert {v["key"]: v["verdict"] for v in opposite} == {h.key: "opposite" for h in HYPOTHESES}


def test_a_seed_against_the_others_makes_it_not_shown_and_incomplete_seeds_do_not_count():
    worlds = {0: _paper_world(0), 1: _paper_world(1), 2: _reversed_world(2)}
    verdicts = {v["key"]: v["verdict"] for v in judge(worlds, HYPOTHESES)}
    assert set(verdicts.values()) == {"not shown"}
    partial = {0: _paper_world(0), 1: {k: v for k, v in _reversed_world(1).items() if k != "asft"}}
    assert {v["verdict"] for v in judge(partial, HYPOTHESES)} == {"shown"}  # only seed 0 has all four methods
    assert judge(partial, HYPOTHESES)[0]["seeds"] == [0]


# ---------------------------------------------------------------------------------------------------- end to end

TINY_ARGS = [
    "--max_steps",
    "4",
    "--logging_steps",
    "1",
    "--probe_steps",
    "2",
    "--save_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--n_people",
    "1",
    "--n_heldout_people",
    "1",
    "--n_recall_seen",
    "4",
    "--recall_max_new_tokens",
    "3",
    "--ood_max_new_tokens",
    "3",
    "--max_length",
    "256",
    "--seeds",
    "0",
    "--lora_r",
    "4",
    "--lora_alpha",
    "8",
    "--learning_rate",
    "1e-2",
    "--warmup_steps",
    "1",
]


@pytest.mark.slow
def test_tiny_study_end_to_end_reuses_finished_runs_and_resumes_an_interrupted_one(
    tiny_model_path, tmp_path, monkeypatch
):
    from transformers import TrainerCallback

    import asft_trl.diagnostics.drift as drift

    doc = tmp_path / "docs" / "study.md"
    doc.parent.mkdir()
    word_order = f"# Studies\n\nHand-written.\n\n{WORD_ORDER_BEGIN}\nword-order table\n<!-- study:end -->\n\nMore.\n"
    doc.write_text(word_order)
    argv = [
        "--model",
        tiny_model_path,
        "--output_dir",
        str(tmp_path / "runs"),
        "--doc",
        str(doc),
        *TINY_ARGS,
    ]

    # The ASFT run is interrupted at step 3, after its checkpoint at step 2: the study stops there
    class Interrupted(Exception):
        pass

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and args.loss_type == "dft" and args.kl_coef > 0:
                raise Interrupted

    real_add = drift.add_drift_callback

    def add_with_interrupt(trainer, *a, **k):
        if k.get("name", "drift") == "drift":
            trainer.add_callback(Interrupt())
        return real_add(trainer, *a, **k)

    monkeypatch.setattr(drift, "add_drift_callback", add_with_interrupt)
    with pytest.raises(Interrupted):
        knowledge.main(argv)
    monkeypatch.setattr(drift, "add_drift_callback", real_add)
    asft_dir = tmp_path / "runs" / "asft" / "seed0"
    assert (asft_dir / "checkpoint-2").is_dir() and not (asft_dir / "results.json").exists()
    finished = {k: (tmp_path / "runs" / k / "seed0" / "results.json").read_text() for k in ("sft", "dft", "sft_kl")}

    # Again: the three finished runs are reused untouched, ASFT resumes from step 2 and the report is written
    assert knowledge.main(argv) == 0
    report = json.loads((tmp_path / "docs" / "study_knowledge_results.json").read_text())
    assert report["trained_runs"] == 1 and report["reused_runs"] == 3
    for key, text in finished.items():
        assert (tmp_path / "runs" / key / "seed0" / "results.json").read_text() == text
    asft = report["runs"]["asft"]["0"]
    assert asft["resumed_from"] == "checkpoint-2" and asft["steps_run"] == 2
    assert [step for step, _ in asft["curves"]["trainset_kl"]] == [0, 2, 4]  # step 0 from before the interruption
    for key in METHOD_KEYS:
        r = report["runs"][key]["0"]
        assert 0 <= r["recall_heldout_phrasings"] <= 1 and 0 <= r["ood_accuracy"] <= 1
        assert 0 <= r["low_p_final"] <= 1 and r["never_learned"] <= r["low_p_base"]
        assert r["curves"]["trainset_kl"][0] == [0, 0.0] and r["curves"]["drift_kl"][-1][1] > 0
        assert bool(r["curves"]["kl"]) == (r["settings"]["kl_coef"] > 0)
    assert [v["key"] for v in report["verdicts"]] == [h.key for h in HYPOTHESES]
    assert (tmp_path / "docs" / "study_knowledge.png").is_file()
    text = doc.read_text()
    assert text.startswith(word_order.split("<!-- study:end -->")[0] + "<!-- study:end -->\n\nMore.\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and "| ASFT λ=0.05 |" in text and "| H10 |" in text

    # The generated part is replaced in place; text written after it survives
    first = json.loads((tmp_path / "docs" / "study_knowledge_results.json").read_text())
    doc.write_text(text + "\nReading of the results.\n")
    assert knowledge.main(argv) == 0
    again = json.loads((tmp_path / "docs" / "study_knowledge_results.json").read_text())
    assert again["reused_runs"] == 4
    assert again["runs_seconds"] == first["runs_seconds"] > 0  # what the runs cost survives a re-render
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and text.endswith("Reading of the results.\n")

    # Other settings in the same output folder: refused before anything is written
    with pytest.raises(FileExistsError, match="other settings"):
        knowledge.main([*argv, "--lora_r", "2"])


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--seeds", "0,0"], "each once"),
        (["--seeds", "a"], "integers"),
        (["--methods", "sft,ppo"], "choose from"),
        (["--max_steps", "0"], "max_steps must be > 0"),
        (["--kl_coef", "0"], "kl_coef must be > 0"),
        (["--max_steps", "100", "--probe_steps", "30"], "multiple of --probe_steps"),
        (["--probe_steps", "12", "--max_steps", "96"], "multiple of --logging_steps"),
        (["--n_heldout_people", "0"], "guessing control"),
    ],
)
def test_bad_arguments_are_refused(bad, message, capsys, monkeypatch):
    def accepted(args):  # an accepted case would otherwise run the real study with its defaults
        raise AssertionError(f"{bad} was not refused")

    monkeypatch.setattr(knowledge, "run_study", accepted)
    with pytest.raises(SystemExit):
        knowledge.main(bad)
    assert message in capsys.readouterr().err


def test_banded_plot_draws_the_mean_and_the_min_max_of_each_group(tmp_path):
    from pathlib import Path

    from asft_trl.diagnostics.plot import Run, plot_run_groups

    def run(values, name):
        return Run(Path(name), name, [{"step": s, "trainset_kl": v} for s, v in zip((0, 10, 20), values)])

    groups = {"DFT": [run([0, 1, 4], "a"), run([0, 3, 2], "b")], "SFT": [run([0, 1, 1], "c")], "none": []}
    fig = plot_run_groups(groups, ["trainset_kl", "not_logged"])
    (ax,) = fig.axes  # one panel: a metric no group logged gets none
    lines = {line.get_label(): line.get_ydata().tolist() for line in ax.get_lines()}
    assert lines == {"DFT (n=2)": [0, 2, 3], "SFT (n=1)": [0, 1, 1]}
    band = ax.collections[0].get_paths()[0].vertices[:, 1].tolist()
    assert min(band) == 0 and max(band) == 4 and 1 in band and 3 in band  # DFT's band spans min..max per step
    with pytest.raises(ValueError, match="None of the metrics"):
        plot_run_groups(groups, ["not_logged"])


def test_the_committed_report_holds_each_generated_part_once():
    from studies.drift import END as WORD_ORDER_END
    from tiny import REPO_ROOT

    text = (REPO_ROOT / "docs" / "study.md").read_text()
    for marker in (WORD_ORDER_BEGIN, WORD_ORDER_END, BEGIN, END):
        assert text.count(marker) == 1
    assert text.index(WORD_ORDER_END) < text.index(BEGIN)

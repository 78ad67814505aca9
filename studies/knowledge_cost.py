"""Cost of the knowledge study's parts on this machine, to size `python -m studies.knowledge` before running it.

    python -m studies.knowledge_cost --steps 6 --rounds 2 -- --num_threads 1
    python -m studies.knowledge_cost -- --per_device_train_batch_size 4 --n_people 24

Everything after `--` is a study option (`python -m studies.knowledge --help`): the study's own trainers are built
(`studies.knowledge.make_trainer`) with the study's defaults unless overridden there. Each method trains
`--steps` optimizer steps per round, the methods interleaved (SFT, DFT, SFT+KL, ASFT, SFT, ...) for `--rounds` rounds,
so a change of load on a shared machine hits every method alike. Every step is timed (wall time, and this process's
CPU time, which a busy machine inflates much less), and each round's first step is dropped (warm-up). Then it times
one measurement of each probe, the end-of-run scoring (recall generation, OOD, the token probabilities of every
training answer) and building one trainer, and prints the estimated wall time of the whole study from those parts.

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
    parser.add_argument("--steps", type=int, default=6, help="Timed steps per method and round (+1 warm-up).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="Write the figures as JSON here too.")
    parser.add_argument("--steps_only", action="store_true", help="Time the training steps only (no probes, scoring).")
    args = parser.parse_args(own)

    import torch

    from asft_trl.quickstart.model import HUB_ID, resolve_quickstart_model

    from .common import time_steps_interleaved
    from .knowledge import (
        METHOD_KEYS,
        answer_token_probs,
        build_data,
        make_parser,
        make_trainer,
        method_specs,
        score_recall_and_ood,
    )

    study = make_parser().parse_args(study_argv)
    if study.num_threads:
        torch.set_num_threads(study.num_threads)
    study.max_steps = args.steps + 1
    study.save_steps = 10**9  # no checkpoints while timing
    model_path = study.model if study.model != HUB_ID else resolve_quickstart_model(study.model, study.model_cache_dir)
    data = build_data(study)
    specs = method_specs(study.kl_coef)

    out = {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_start": os.getloadavg(),
        "settings": {
            k: getattr(study, k)
            for k in ("per_device_train_batch_size", "max_length", "n_people", "lora_r", "kl_coef")
        },
    }
    tmp = tempfile.mkdtemp(prefix="study_knowledge_cost-")
    trainers = {}
    start = time.perf_counter()
    for key in METHOD_KEYS:
        t0 = time.perf_counter()
        trainers[key], probes = make_trainer(specs[key], 0, model_path, data, study, Path(tmp) / key)
        for probe in probes:  # timed on their own below; here they would only add their set-up to every round
            trainers[key].remove_callback(probe)
        out["build_trainer_s"] = time.perf_counter() - t0
    out["methods"], out["load_1min_per_round"] = time_steps_interleaved(trainers, args.rounds)
    if args.steps_only:
        print(json.dumps(out, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2))
        return 0

    # One measurement of each probe, on the ASFT-trained model (one forward pass each; the base is cached)
    from asft_trl.diagnostics.drift import GENERAL_PROMPTS, DriftProbe

    model, tokenizer = trainers["asft"].model, trainers["asft"].processing_class
    probe_s = 0.0
    for pairs in (GENERAL_PROMPTS, data.task_pairs, data.trainset_pairs):
        probe = DriftProbe(tokenizer, pairs, low_p_threshold=0.1)
        reference_log_probs = probe.reference_log_probs(model)
        t0 = time.perf_counter()
        probe.measure(model, reference_log_probs=reference_log_probs)
        probe_s += time.perf_counter() - t0
    out["probe_measurement_s"] = probe_s  # all three probes, once
    t0 = time.perf_counter()
    score_recall_and_ood(model, tokenizer, data, study)
    out["score_recall_ood_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    answer_token_probs(model, tokenizer, data.all_train_pairs)
    out["token_probs_s"] = time.perf_counter() - t0
    out["load_end"] = os.getloadavg()
    out["wall_s"] = time.perf_counter() - start

    # The study's wall time from the parts, per seed and in all
    full = make_parser().parse_args(study_argv)
    n_probes = full.max_steps // full.probe_steps + 1
    per_seed = {
        k: full.max_steps * out["methods"][k]["wall_s_per_step"]
        + n_probes * probe_s
        + out["score_recall_ood_s"]
        + out["token_probs_s"]
        + out["build_trainer_s"]
        for k in METHOD_KEYS
    }
    base_s = out["score_recall_ood_s"] + 2 * out["token_probs_s"]  # the base model generates to the limit: rough
    out["estimate_s"] = {
        "per_run": per_seed,
        "study": base_s + len(full.seeds) * sum(per_seed.values()),
        "for": {"max_steps": full.max_steps, "seeds": full.seeds, "probe_steps": full.probe_steps},
    }
    print(json.dumps(out, indent=2))
    sft = out["methods"]["sft"]["wall_s_per_step"]
    print("\n| method | wall s/step | CPU s/step | wall vs SFT |\n|---|---|---|---|")
    for key, m in out["methods"].items():
        print(f"| {key} | {m['wall_s_per_step']:.2f} | {m['cpu_s_per_step']:.2f} | {m['wall_s_per_step'] / sft:.2f} |")
    print(
        f"\nprobes (3, once) {probe_s:.1f} s; recall+OOD scoring {out['score_recall_ood_s']:.1f} s; token "
        f"probabilities {out['token_probs_s']:.1f} s; building a trainer {out['build_trainer_s']:.1f} s; "
        f"estimated study {out['estimate_s']['study'] / 60:.0f} min at these speeds; load "
        f"{out['load_start']} -> {out['load_end']}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

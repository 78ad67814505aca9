"""`asft-trl eval`: parse the settings, load every benchmark (so bad data fails before a model is loaded), generate
or read predictions, score them, and write `generations.jsonl`, `scored.jsonl`, `results.json` and `results.md`.

    asft-trl eval SUITE --model PATH_OR_ID [--adapter PATH] [--field value ...]
    asft-trl eval SUITE --config eval.yaml [--field value ...]
    asft-trl eval SUITE --predictions generations.jsonl         # score earlier outputs, no model
    asft-trl eval compare RUN1/results.json RUN2/results.json ...
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from ..evaluation.arguments import SUITES, EvalArguments
from ..evaluation.benchmarks import load_benchmark, suite_benchmarks
from ..evaluation.report import build_results, compare_table, markdown_table, read_jsonl, write_jsonl
from ..evaluation.sandbox import SandboxUnavailableError, choose_layer
from ..utils.io import write_atomic

OUTPUT_FILES = ("generations.jsonl", "scored.jsonl", "results.json", "results.md")


def parse_args(argv: list[str]) -> EvalArguments:
    from trl import TrlParser

    if argv and not argv[0].startswith("-"):  # `asft-trl eval math ...`: the suite as a positional word
        argv = ["--suite", argv[0], *argv[1:]]
    parser = TrlParser((EvalArguments,), prog="asft-trl eval")
    (args,) = parser.parse_args_and_config(argv)
    return args


def _check_output_dir(args: EvalArguments) -> Path:
    """Refuse to replace an earlier run's files unless told to, before any work is done."""
    out = Path(args.output_dir)
    writes = OUTPUT_FILES[1:] if args.predictions else OUTPUT_FILES
    existing = [name for name in writes if (out / name).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}. Choose another --output_dir or pass "
            "--overwrite true to replace them."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _score(suite: str, rows: list[dict], args: EvalArguments):
    if suite == "math":
        from ..evaluation.math import score_rows

        return score_rows(rows)
    if suite == "medical":
        from ..evaluation.medical import score_rows

        # Generated rows were chosen by the rule already; saved ones are rescored by the rule asked for
        return score_rows(rows, args.medical_scoring if args.predictions else None)
    if suite == "code":
        from ..evaluation.code import score_rows

        return score_rows(
            rows, timeout=args.timeout, memory_mb=args.memory_mb, workers=args.workers, sandbox=args.sandbox
        )
    from ..evaluation.exact_match import score_rows

    return score_rows(rows)


def _generate_rows(args: EvalArguments, name: str, items: list[dict], model, tokenizer) -> list[dict]:
    """Generation rows of one benchmark: prompt, samples (`prediction`), gold answer (and a code item's tests)."""
    from ..evaluation import generation, prompts

    if args.suite == "medical":
        from ..evaluation.medical import predict

        rows = predict(model, tokenizer, items, args.batch_size, scoring=args.medical_scoring)
        return [{"benchmark": name, **row} for row in rows]
    if args.suite == "math":
        chats = [prompts.math_prompt(item["question"], args.prompt_template) for item in items]
    elif args.suite == "code":
        chats = [prompts.code_prompt(item, args.prompt_template) for item in items]
    else:
        chats = [prompts.quickstart_prompt(item["prompt"], args.prompt_template) for item in items]
    sampling = dict(
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if generation.use_vllm(args.backend):
        samples = generation.generate_vllm(args.model, args.adapter, tokenizer, chats, **sampling)
    else:
        samples = generation.generate_hf(model, tokenizer, chats, batch_size=args.batch_size, **sampling)
    rows = []
    for item, chat, outs in zip(items, chats, samples):
        row = {"benchmark": name, "id": item["id"], "prompt": chat, "prediction": outs, "answer": item.get("answer")}
        if args.suite == "code":  # what --predictions needs to rerun the tests without the Hub
            row.update(
                {k: item[k] for k in ("test", "entry_point", "test_imports", "mode")},
                prompt=item["prompt"],
                model_prompt=chat,
            )
        rows.append(row)
    return rows


def run(args: EvalArguments) -> dict:
    if args.suite == "code":
        # Refused (or warned about running unisolated) now, not after an hour of generation
        print(f"[asft-trl eval] code runs in: {choose_layer(args.sandbox)}", file=sys.stderr)
    out = _check_output_dir(args)
    if args.predictions:
        rows = read_jsonl(args.predictions)
        by_benchmark: dict[str, list[dict]] = {}
        for row in rows:
            by_benchmark.setdefault(row.get("benchmark", Path(args.predictions).stem), []).append(row)
        if args.benchmarks:
            by_benchmark = {k: v for k, v in by_benchmark.items() if k in args.benchmarks}
            if not by_benchmark:
                raise ValueError(f"{args.predictions} has no rows for benchmarks {args.benchmarks}.")
    else:
        files = args.local_files()
        names = args.benchmarks or list(files) or suite_benchmarks(args.suite)
        # Every benchmark is loaded and checked before the model: a bad file fails in seconds, not after an hour.
        items = {
            name: load_benchmark(name, args.suite, files.get(name), args.limit, args.quickstart_seed) for name in names
        }
        from ..evaluation.generation import load_model_and_tokenizer
        from ..utils.paths import resolve_model

        # A registered model (the quickstart's: the Hub when reachable, else the offline GGUF copy) resolves itself
        args.model = resolve_model(args.model, cache_dir=Path("outputs") / "models")
        model, tokenizer = load_model_and_tokenizer(args.model, args.adapter, args.dtype)
        by_benchmark, seconds = {}, {}
        for name, bench_items in items.items():
            print(f"[asft-trl eval] {args.suite}/{name}: {len(bench_items)} items", file=sys.stderr)
            start = time.perf_counter()
            by_benchmark[name] = _generate_rows(args, name, bench_items, model, tokenizer)
            seconds[name] = round(time.perf_counter() - start, 1)
        write_jsonl(out / "generations.jsonl", [row for rows in by_benchmark.values() for row in rows])

    metrics, scored_all = {}, []
    for name, rows in by_benchmark.items():
        metrics[name], scored = _score(args.suite, rows, args)
        if not args.predictions:
            metrics[name]["generation_seconds"] = seconds[name]
        scored_all.extend(scored)
    results = build_results(args.suite, metrics, dataclasses.asdict(args))
    import json

    write_jsonl(out / "scored.jsonl", scored_all)
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    write_atomic(out / "results.md", table)
    print(table)
    print(f"[asft-trl eval] wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        if len(argv) < 2 or argv[1].startswith("-"):
            print("usage: asft-trl eval compare RUN1/results.json [RUN2/results.json ...]", file=sys.stderr)
            return 2
        print(compare_table(argv[1:]))
        return 0
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__.strip() + f"\n\nSuites: {', '.join(SUITES)}. `asft-trl eval math --help` lists every option.")
        if not argv:
            return 2
    try:
        run(parse_args(argv))
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, SandboxUnavailableError) as error:
        # Bad settings or data: one line that says what to fix, not a traceback.
        raise SystemExit(f"asft-trl eval: error: {error}") from error
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The loss alone, warm: fused ASFT against the plain loss and a plain cross-entropy, by chunk size.

    python benchmarks/fused_loss_speed.py                      # CUDA: the 0.5B and 7B head shapes, bf16
    python benchmarks/fused_loss_speed.py --device cpu --tokens 256 --hidden 64 --vocab 2048   # the script itself

`loss_benchmark.py` times whole training steps, where the loss is one part among the backbone's forward and backward
and the reference's forward. This times only the head and the loss, forward and backward, on random bf16 hidden
states and heads (a full-fine-tuning head: the weight gets a gradient too), after warm-up, with CUDA events:

- `cross_entropy`: SFT's loss the simple way: float32 logits of the policy head, `F.cross_entropy` (no reference);
- `plain`: `asft_trl.losses.asft_loss` on float32 logits of both heads (DFT + 0.05 x forward KL);
- `fused`: `chunked_asft_loss`, the same loss from hidden states and heads, at each `--chunk-sizes` (0 = the
  automatic size, `auto_chunk_size`);
- `fused_no_reference`: the same with `kl_coef 0` and no reference head (what DFT alone costs in the fused loss).

Prints a table and writes JSON (median and spread of `--repeats` timed calls, peak memory). Nothing here is a test:
compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asft_trl.losses import asft_loss, auto_chunk_size, chunked_asft_loss  # noqa: E402

# (tokens, hidden, vocab): Qwen2.5-0.5B's head and LLaMA-2-7B's, at 4,096 scored tokens
SHAPES = ((4096, 896, 151936), (4096, 4096, 32000))


def _inputs(tokens: int, hidden: int, vocab: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).to(device, dtype)
    ref_h = (h.float() + 0.1 * torch.randn(tokens, hidden, generator=g).to(device)).to(dtype)
    ref_w = (w.float() + 0.01 * torch.randn(vocab, hidden, generator=g).to(device)).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return h, w, ref_h, ref_w, labels


def _variants(h, w, ref_h, ref_w, labels, chunk_sizes):
    """name -> a function that runs one forward + backward from fresh leaves."""

    def leaves():
        return h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

    def cross_entropy():
        hidden, weight = leaves()
        torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), labels).backward()

    def plain():
        hidden, weight = leaves()
        ref_logits = (ref_h @ ref_w.t()).float()
        loss, _ = asft_loss((hidden @ weight.t()).float(), labels, ref_logits, kl_coef=0.05, loss_type="dft")
        loss.backward()

    def fused(chunk_size):
        def run():
            hidden, weight = leaves()
            loss, _ = chunked_asft_loss(
                hidden, weight, labels, ref_h, ref_w, kl_coef=0.05, loss_type="dft", chunk_size=chunk_size
            )
            loss.backward()

        return run

    def fused_no_reference():
        hidden, weight = leaves()
        loss, _ = chunked_asft_loss(hidden, weight, labels, kl_coef=0.0, loss_type="dft")
        loss.backward()

    runs = {"cross_entropy": cross_entropy, "plain": plain}
    for size in chunk_sizes:
        runs[f"fused chunk {size or 'auto'}"] = fused(size or None)
    runs["fused_no_reference"] = fused_no_reference
    return runs


def _time(run, device: torch.device, warmup: int, repeats: int) -> dict:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        run()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
    return {
        "ms": round(1000 * statistics.median(times), 3),
        "ms_min": round(1000 * min(times), 3),
        "ms_max": round(1000 * max(times), 3),
        "peak_extra_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1) if cuda else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--tokens", type=int, help="one shape instead of the two shipped ones (with --hidden, --vocab)"
    )
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[0, 256, 1024, 2048, 4096])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/fused_loss_speed_cuda.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU here; `--device cpu` with a small shape runs the script itself.")
    dtype = getattr(torch, args.dtype)
    shapes = [(args.tokens, args.hidden, args.vocab)] if args.tokens else list(SHAPES)
    rows = []
    for tokens, hidden, vocab in shapes:
        inputs = _inputs(tokens, hidden, vocab, device, dtype)
        for name, run in _variants(*inputs, args.chunk_sizes).items():
            row = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "variant": name}
            if name == "fused chunk auto":
                row["chunk"] = auto_chunk_size(vocab, device)
            try:
                row.update(_time(run, device, args.warmup, args.repeats))
            except torch.OutOfMemoryError:
                row["ms"] = "OOM"
            rows.append(row)
            print(json.dumps(row), flush=True)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    machine = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["fused_loss_speed.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(
        "\n| tokens | hidden | V | variant | ms (median) | min-max | peak extra MiB |\n|---:|---:|---:|---|---:|---|---:|"
    )
    for r in rows:
        spread = f"{r['ms_min']}-{r['ms_max']}" if "ms_min" in r else "-"
        print(
            f"| {r['tokens']} | {r['hidden']} | {r['vocab']:,} | {r['variant']} | {r['ms']} | {spread} | "
            f"{r.get('peak_extra_mib')} |"
        )
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

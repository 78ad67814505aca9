"""The ASFT gradient does not depend on how an optimizer step's examples are split.

The loss is a sum over the completion tokens of the step divided by `num_items_in_batch` (the step's token count over
all micro-batches and processes), so batch 8 x accumulation 1, 4 x 2 and 2 x 4, and 1 process vs 2 processes, must
reach the same weights after a few plain-SGD steps. The completions have very different lengths, so any per-micro-batch
or per-process averaging gives other weights: the controls check that the comparison would see that.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import dist_train  # tests/dist_train.py: shared data, settings, recording trainer, and how to launch it
import pytest
import torch
from dist_train import launch, max_abs_diff, step_losses

import tiny

GLOBAL_BATCH = 8  # examples per optimizer step in every split
STEPS = 3
# Large enough SGD rates that the weights move by 0.3-2 in 3 steps at random init (where the DFT weight is ~1/V,
# so DFT needs a far larger rate than NLL) and the KL to the reference is clearly > 0 at the last step.
LEARNING_RATES = {"dft": 100.0, "nll": 0.5}
# dft_normalization="weights" divides by the DFT weight sum (~N / V here) instead of N: a rate ~V times smaller
WEIGHTS_LEARNING_RATE = 0.5
KL_COEF = 0.1
ATOL = 2e-5  # float32 noise of a different summation order is ~1e-6 here
MIN_MOTION = 1000 * ATOL  # the weights must move by orders of magnitude more than the tolerance
MIN_FINAL_KL = 5e-3  # per-token KL logged at the last step

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------------- helpers


def step_groups(batches: list[dict]) -> dict[int, Counter]:
    """Optimizer step -> multiset of the (unpadded) token rows it trained on."""
    groups: dict[int, Counter] = {}
    for batch in batches:
        groups.setdefault(batch["step"], Counter()).update(tuple(row) for row in batch["rows"])
    return groups


def expected_groups(dataset_input_ids: list[list[int]]) -> dict[int, Counter]:
    """Step t must cover examples GLOBAL_BATCH*t .. GLOBAL_BATCH*t + GLOBAL_BATCH-1 of the prepared dataset."""
    return {
        t: Counter(tuple(row) for row in dataset_input_ids[GLOBAL_BATCH * t : GLOBAL_BATCH * (t + 1)])
        for t in range(STEPS)
    }


def final_metric(log_history: list[dict], name: str) -> float:
    values = [entry[name] for entry in log_history if name in entry]
    assert values, f"metric {name!r} was never logged: {log_history}"
    return float(values[-1])


def _local_items_per_step(batches: list[dict]) -> dict[int, list[int]]:
    """Step -> completion-token count of each micro-batch in it."""
    counts: dict[int, list[int]] = {}
    for batch in batches:
        counts.setdefault(batch["step"], []).append(batch["local_items"])
    return counts


def train_in_process(
    model_path: str,
    tmp_dir: Path,
    batch_size: int,
    grad_accum: int,
    loss_type: str,
    per_micro_batch_mean: bool = False,
    dft_normalization: str = "tokens",
) -> dict:
    from transformers import AutoTokenizer

    base = dist_train.recording_trainer_class()
    if per_micro_batch_mean and dft_normalization == "weights":
        from asft_trl.trainer.normalization import StepNormalization

        class LastMicroBatchWeightSum(StepNormalization):
            def normalize(self, *args, **kwargs):
                self.weight_sum = 0.0
                return super().normalize(*args, **kwargs)

        class OneMicroBatchWeightSumTrainer(base):
            """The control: the step divided by the DFT weight sum of its last micro-batch only (forgetting to add up
            the step's micro-batches)."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.step_normalization = LastMicroBatchWeightSum(self.args, self.accelerator, self.get_tp_size)

        trainer_cls = OneMicroBatchWeightSumTrainer
    elif per_micro_batch_mean:

        class PerMicroBatchMeanTrainer(base):
            """The control: each micro-batch normalised by its own token count, then divided by the accumulation
            steps (the usual 'mean of micro-batch means' that the token-count normalisation is there to avoid)."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                assert not return_outputs
                loss = super().compute_loss(model, inputs, False, None)
                return loss / self.current_gradient_accumulation_steps

        trainer_cls = PerMicroBatchMeanTrainer
    else:
        trainer_cls = base

    torch.manual_seed(0)
    weights = dft_normalization == "weights"
    args = dist_train.training_args(
        tmp_dir
        / f"{loss_type}-{dft_normalization}-{batch_size}x{grad_accum}{'-control' if per_micro_batch_mean else ''}",
        batch_size=batch_size,
        grad_accum=grad_accum,
        learning_rate=WEIGHTS_LEARNING_RATE if weights else LEARNING_RATES[loss_type],
        loss_type=loss_type,
        kl_coef=KL_COEF,
        max_steps=STEPS,
        dft_normalization=dft_normalization,
    )
    trainer = trainer_cls(
        model=model_path,
        args=args,
        train_dataset=dist_train.make_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_path),
    )
    assert isinstance(trainer._get_train_sampler(), torch.utils.data.SequentialSampler)
    trainer.train()
    assert trainer.state.global_step == STEPS
    return {
        "weights": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "log_history": trainer.state.log_history,
        "batches": trainer.recorded_batches,
        "dataset_input_ids": [list(row) for row in trainer.train_dataset["input_ids"]],
    }


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return tiny.build_model(tmp_path_factory.mktemp("equivalence-model") / "tiny")


@pytest.fixture(scope="module")
def initial_weights(tiny_model) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model).state_dict().items()}


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """Memoised in-process training runs, shared by the tests of this module."""
    cache: dict[tuple, dict] = {}
    tmp_dir = tmp_path_factory.mktemp("equivalence-runs")

    def get(
        batch_size: int,
        grad_accum: int,
        loss_type: str,
        per_micro_batch_mean: bool = False,
        dft_normalization: str = "tokens",
    ) -> dict:
        key = (batch_size, grad_accum, loss_type, per_micro_batch_mean, dft_normalization)
        if key not in cache:
            cache[key] = train_in_process(
                tiny_model, tmp_dir, batch_size, grad_accum, loss_type, per_micro_batch_mean, dft_normalization
            )
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("loss_type", ["dft", "nll"])
def test_batch_times_accumulation_split_gives_same_weights(run, initial_weights, loss_type):
    reference = run(8, 1, loss_type)

    # Every split must train each optimizer step on the same 8 examples (dataset order, no shuffling)
    expected = expected_groups(reference["dataset_input_ids"])
    token_counts = {}
    for batch_size, grad_accum in [(8, 1), (4, 2), (2, 4)]:
        result = run(batch_size, grad_accum, loss_type)
        assert all(len(b["rows"]) == batch_size for b in result["batches"])
        assert step_groups(result["batches"]) == expected, f"{batch_size}x{grad_accum} saw other examples per step"
        # num_items_in_batch is the whole step's completion-token count in every micro-batch of the step
        for step in range(STEPS):
            counts = {b["num_items"] for b in result["batches"] if b["step"] == step}
            assert len(counts) == 1
            token_counts.setdefault(step, set()).update(counts)
    assert all(len(c) == 1 for c in token_counts.values()), f"num_items_in_batch depends on the split: {token_counts}"

    # The data has teeth: the micro-batches of a step hold different numbers of completion tokens, which add up to
    # the step's num_items_in_batch
    for batch_size, grad_accum in [(4, 2), (2, 4)]:
        local = _local_items_per_step(run(batch_size, grad_accum, loss_type)["batches"])
        assert all(len(set(counts)) > 1 for counts in local.values()), f"equal micro-batch token counts: {local}"
        assert all(sum(local[step]) in token_counts[step] for step in range(STEPS)), (local, token_counts)

    motion, motion_param = max_abs_diff(reference["weights"], initial_weights)
    final_kl = final_metric(reference["log_history"], "kl")
    print(f"\n[{loss_type}] max |w_8x1 - w_init| = {motion:.4g} ({motion_param}); final kl = {final_kl:.4g}")
    assert motion > MIN_MOTION, f"weights barely moved ({motion:.3g}): the comparison would prove nothing"
    assert final_kl > MIN_FINAL_KL, f"KL at the last step is {final_kl:.3g}: the anchor term is not exercised"

    for batch_size, grad_accum in [(4, 2), (2, 4)]:
        result = run(batch_size, grad_accum, loss_type)
        diff, param = max_abs_diff(result["weights"], reference["weights"])
        print(f"[{loss_type}] max |w_{batch_size}x{grad_accum} - w_8x1| = {diff:.3g} ({param})")
        assert diff < ATOL, (
            f"{batch_size}x{grad_accum} differs from 8x1 by {diff:.3g} in {param} (tolerance {ATOL}, motion "
            f"{motion:.3g})"
        )
        # Same per-step loss as logged by the Trainer, too
        for ref_entry, entry in zip(step_losses(reference["log_history"]), step_losses(result["log_history"])):
            assert entry == pytest.approx(ref_entry, rel=1e-4, abs=1e-6)


def test_control_per_micro_batch_mean_differs(run):
    """A per-micro-batch mean (the bug the token-count normalisation prevents) must fail the comparison above."""
    reference = run(8, 1, "dft")
    # With one micro-batch per step the control's normalisation is the right one: same weights as the real run
    same = run(8, 1, "dft", per_micro_batch_mean=True)
    diff_same, _ = max_abs_diff(same["weights"], reference["weights"])
    assert diff_same < ATOL, f"the control changes more than the normalisation ({diff_same:.3g} at 8x1)"

    wrong = run(4, 2, "dft", per_micro_batch_mean=True)
    diff, param = max_abs_diff(wrong["weights"], reference["weights"])
    print(f"\n[control] per-micro-batch mean 4x2 vs 8x1: max diff {diff:.4g} ({param}); at 8x1: {diff_same:.3g}")
    assert diff > 100 * ATOL, f"a per-micro-batch mean gives nearly the same weights ({diff:.3g}): no teeth"


def test_weight_normalised_steps_give_the_same_weights_for_every_split(run, initial_weights):
    """dft_normalization="weights": the step's DFT weight sum over all its micro-batches, like num_items_in_batch."""
    reference = run(8, 1, "dft", dft_normalization="weights")
    motion, _ = max_abs_diff(reference["weights"], initial_weights)
    assert motion > MIN_MOTION
    assert final_metric(reference["log_history"], "kl") > MIN_FINAL_KL
    # The normalisation really differs from the token count's: the losses are ~1 / mean weight times larger
    tokens = run(8, 1, "dft")
    ratio = step_losses(reference["log_history"])[0] / step_losses(tokens["log_history"])[0]
    assert ratio == pytest.approx(1 / reference["log_history"][0]["dft_weight_mean"], rel=1e-3) and ratio > 20
    for batch_size, grad_accum in [(4, 2), (2, 4)]:
        result = run(batch_size, grad_accum, "dft", dft_normalization="weights")
        assert step_groups(result["batches"]) == expected_groups(reference["dataset_input_ids"])
        diff, param = max_abs_diff(result["weights"], reference["weights"])
        print(f"\n[weights] max |w_{batch_size}x{grad_accum} - w_8x1| = {diff:.3g} ({param}), motion {motion:.3g}")
        assert diff < ATOL, f"{batch_size}x{grad_accum} differs from 8x1 by {diff:.3g} in {param}"
        for ref_entry, entry in zip(step_losses(reference["log_history"]), step_losses(result["log_history"])):
            assert entry == pytest.approx(ref_entry, rel=1e-4, abs=1e-6)

    # Control: dividing by one micro-batch's weight sum instead of the step's gives other weights
    same = run(8, 1, "dft", per_micro_batch_mean=True, dft_normalization="weights")
    assert max_abs_diff(same["weights"], reference["weights"])[0] < ATOL
    wrong = run(4, 2, "dft", per_micro_batch_mean=True, dft_normalization="weights")
    control_diff, _ = max_abs_diff(wrong["weights"], reference["weights"])
    print(f"[weights] control (last micro-batch's weight sum) 4x2 vs 8x1: {control_diff:.4g}")
    assert control_diff > 100 * ATOL, "one micro-batch's weight sum gives the same weights: the test has no teeth"


# ---------------------------------------------------------------------------------------------------- 2 processes


def _dist_run(
    model: str,
    out: Path,
    *,
    nproc: int,
    batch_size: int,
    grad_accum: int,
    extra: tuple = (),
    learning_rate: float = LEARNING_RATES["dft"],
) -> dict:
    script_args = [
        dist_train.__file__,
        "--model",
        model,
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        str(grad_accum),
        "--learning-rate",
        str(learning_rate),
        "--loss-type",
        "dft",
        "--kl-coef",
        str(KL_COEF),
        "--max-steps",
        str(STEPS),
        *extra,
    ]
    if nproc == 1:
        cmd = [sys.executable, *script_args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *script_args,
        ]
    launch(cmd, f"{nproc}-process training")
    result = json.loads((out / "result.json").read_text())
    result["weights"] = torch.load(out / "weights.pt", map_location="cpu")
    result["batches_per_rank"] = [json.loads((out / f"batches-rank{rank}.json").read_text()) for rank in range(nproc)]
    return result


def test_two_processes_give_same_weights_as_one(tiny_model, initial_weights, tmp_path):
    single = _dist_run(tiny_model, tmp_path / "single", nproc=1, batch_size=4, grad_accum=2)
    double = _dist_run(tiny_model, tmp_path / "double", nproc=2, batch_size=2, grad_accum=2)

    assert single["num_processes"] == 1
    assert double["num_processes"] == 2, f"torchrun did not give 2 processes: {double['num_processes']}"
    assert double["world_size"] == 2
    assert "MULTI_CPU" in double["distributed_type"]

    # Each optimizer step covered the same global 8 examples in both runs, split between the two processes
    expected = expected_groups(single["train_dataset_input_ids"])
    assert step_groups(single["batches_per_rank"][0]) == expected
    merged = [b for rank_batches in double["batches_per_rank"] for b in rank_batches]
    assert step_groups(merged) == expected, "the 2 processes together did not see examples 8t..8t+7 at step t"
    for rank_batches in double["batches_per_rank"]:
        assert len(rank_batches) == STEPS * 2 and all(len(b["rows"]) == 2 for b in rank_batches)
    rank0, rank1 = (step_groups(b) for b in double["batches_per_rank"])
    for step in range(STEPS):
        assert not (rank0[step] & rank1[step]), "both processes trained on the same examples"
        # num_items_in_batch counts the tokens of both processes: the single-process run's count
        single_counts = {b["num_items"] for b in single["batches_per_rank"][0] if b["step"] == step}
        double_counts = {b["num_items"] for r in double["batches_per_rank"] for b in r if b["step"] == step}
        assert single_counts == double_counts and len(single_counts) == 1
        # ... and the two processes hold different numbers of tokens (so a per-process mean would be wrong)
        per_rank = [sum(b["local_items"] for b in r if b["step"] == step) for r in double["batches_per_rank"]]
        assert per_rank[0] != per_rank[1] and sum(per_rank) in single_counts, per_rank

    motion, _ = max_abs_diff(single["weights"], initial_weights)
    diff, param = max_abs_diff(double["weights"], single["weights"])
    final_kl = final_metric(double["log_history"], "kl")
    print(f"\n[2 processes] motion {motion:.4g}, max |w_2proc - w_1proc| = {diff:.3g} ({param}), kl {final_kl:.4g}")
    assert motion > MIN_MOTION
    assert final_kl > MIN_FINAL_KL
    assert diff < ATOL, f"2 processes differ from 1 by {diff:.3g} in {param} (tolerance {ATOL}, motion {motion:.3g})"
    for a, b in zip(step_losses(single["log_history"]), step_losses(double["log_history"])):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)

    # Control: each process normalising by its own token count (then DDP's mean) must give other weights
    control = _dist_run(
        tiny_model,
        tmp_path / "control",
        nproc=2,
        batch_size=2,
        grad_accum=2,
        extra=("--no-average-tokens-across-devices",),
    )
    assert control["num_processes"] == 2
    control_diff, _ = max_abs_diff(control["weights"], single["weights"])
    print(f"[2 processes] control (per-process token count): max diff {control_diff:.4g}")
    assert control_diff > 100 * ATOL, "per-process normalisation gives the same weights: the test has no teeth"


def test_two_processes_with_the_precomputed_reference_train_like_one_with_the_live_one(tiny_model, tmp_path):
    """The stored pass is made once (main process first) and read by the other process; at k = V it is exact."""
    single = _dist_run(tiny_model, tmp_path / "single", nproc=1, batch_size=4, grad_accum=2)
    double = _dist_run(
        tiny_model, tmp_path / "double", nproc=2, batch_size=2, grad_accum=2, extra=("--precompute-topk", str(10**6))
    )
    assert double["num_processes"] == 2
    diff, param = max_abs_diff(double["weights"], single["weights"])
    assert diff < ATOL, f"{diff:.3g} in {param}"
    assert final_metric(double["log_history"], "kl") == pytest.approx(
        final_metric(single["log_history"], "kl"), rel=1e-3
    )
    assert len(list((tmp_path / "double" / "trainer" / "reference_cache").glob("reference_top*.arrow"))) == 1


def test_two_processes_normalised_by_the_weight_sum_train_like_one(tiny_model, initial_weights, tmp_path):
    """dft_normalization="weights": the weight sum is gathered over both processes, as num_items_in_batch is."""
    weights = ("--dft-normalization", "weights")
    single = _dist_run(
        tiny_model,
        tmp_path / "single",
        nproc=1,
        batch_size=4,
        grad_accum=2,
        extra=weights,
        learning_rate=WEIGHTS_LEARNING_RATE,
    )
    double = _dist_run(
        tiny_model,
        tmp_path / "double",
        nproc=2,
        batch_size=2,
        grad_accum=2,
        extra=weights,
        learning_rate=WEIGHTS_LEARNING_RATE,
    )
    assert double["num_processes"] == 2 and "MULTI_CPU" in double["distributed_type"]
    motion, _ = max_abs_diff(single["weights"], initial_weights)
    diff, param = max_abs_diff(double["weights"], single["weights"])
    print(f"\n[2 processes, weights] motion {motion:.4g}, max |w_2proc - w_1proc| = {diff:.3g} ({param})")
    assert motion > MIN_MOTION and final_metric(double["log_history"], "kl") > MIN_FINAL_KL
    assert diff < ATOL, f"2 processes differ from 1 by {diff:.3g} in {param} (tolerance {ATOL})"
    for a, b in zip(step_losses(single["log_history"]), step_losses(double["log_history"])):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)

    # Control: each process dividing by its own weight sum (and token count) gives other weights
    control = _dist_run(
        tiny_model,
        tmp_path / "control",
        nproc=2,
        batch_size=2,
        grad_accum=2,
        extra=(*weights, "--no-average-tokens-across-devices"),
        learning_rate=WEIGHTS_LEARNING_RATE,
    )
    control_diff, _ = max_abs_diff(control["weights"], single["weights"])
    print(f"[2 processes, weights] control (per-process weight sum): max diff {control_diff:.4g}")
    assert control_diff > 100 * ATOL, "per-process normalisation gives the same weights: the test has no teeth"

"""The per-token KL estimators (`kl_estimator` k1 / k2 / k3): values against Schulman's formulas in float64, gradients
against autograd of those formulas (clamps included), the fused loss against the plain one, and the precomputed
reference's one float per token against the live reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tiny
from asft_trl.losses import (
    ESTIMATOR_LOG_RATIO_CLAMP,
    ESTIMATOR_VALUE_CLAMP,
    HeadTransform,
    asft_loss,
    asft_token_terms,
    chunked_asft_loss,
    kl_estimate,
    topk_of,
)

ESTIMATORS = ["k1", "k2", "k3"]
DIRECTIONS = ["forward", "reverse"]
N, H, V = 29, 16, 83


def oracle_estimate(lp: torch.Tensor, lr: torch.Tensor, estimator: str, direction: str) -> torch.Tensor:
    """Schulman's k1/k2/k3 of KL(a || b) at x ~ a, u = log b(x) - log a(x), written out in float64: a is the reference
    for "forward" (KL(ref || policy)), the policy for "reverse"; u and the estimate clamped as documented."""
    u = (lp - lr) if direction == "forward" else (lr - lp)
    u = u.clamp(-ESTIMATOR_LOG_RATIO_CLAMP, ESTIMATOR_LOG_RATIO_CLAMP)
    if estimator == "k1":
        return (-u).clamp(-ESTIMATOR_VALUE_CLAMP, ESTIMATOR_VALUE_CLAMP)
    value = u * u / 2 if estimator == "k2" else torch.exp(u) - 1 - u
    return value.clamp(0.0, ESTIMATOR_VALUE_CLAMP)


def oracle_loss(policy_logits, labels, ref_logits, *, kl_coef, loss_type, estimator, direction, num_items):
    """sum_t (w_t * -log p(y_t) + kl_coef * k(y_t)) / N in float64, token by token."""
    total = torch.zeros((), dtype=torch.float64)
    for t in range(labels.numel()):
        lp = torch.log_softmax(policy_logits[t].double(), -1)[labels[t]]
        lr = torch.log_softmax(ref_logits[t].double(), -1)[labels[t]]
        w = lp.detach().exp() if loss_type == "dft" else 1.0
        total = total + w * -lp + kl_coef * oracle_estimate(lp, lr, estimator, direction)
    return total / num_items


def random_case(n=N, vocab=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(n, vocab, generator=g) * scale).requires_grad_(True)
    ref = torch.randn(n, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (n,), generator=g)
    return policy, ref, labels


# ------------------------------------------------------------------------------------------------ the formulas


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimates_are_schulmans_formulas(estimator, direction):
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(200, generator=g, dtype=torch.float64) * 8  # log p(y), policy
    lr = -torch.rand(200, generator=g, dtype=torch.float64) * 8  # log p_ref(y)
    got = kl_estimate(lp.float(), lr.float(), estimator, direction).double()
    torch.testing.assert_close(got, oracle_estimate(lp, lr, estimator, direction), rtol=1e-5, atol=1e-5)
    if estimator != "k1":
        assert (got >= 0).all()
    # The conventions, spelled out: forward k1 = log p_ref(y) - log p(y); reverse k3 = NeMo-RL's
    # exp(logr) - 1 - logr with logr = log p_ref(y) - log p(y); k2 = the same in both directions
    small = (lp - lr).abs() < 2  # inside the clamps
    if estimator == "k1" and direction == "forward":
        torch.testing.assert_close(got[small], (lr - lp)[small], rtol=1e-5, atol=1e-5)
    if estimator == "k3" and direction == "reverse":
        logr = (lr - lp)[small]
        torch.testing.assert_close(got[small], logr.exp() - 1 - logr, rtol=1e-5, atol=1e-5)
    if estimator == "k2":
        other = "reverse" if direction == "forward" else "forward"
        assert torch.equal(got, kl_estimate(lp.float(), lr.float(), estimator, other).double())


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimates_are_exactly_zero_when_policy_equals_reference(estimator, direction):
    policy, _, labels = random_case(scale=10.0)
    terms = asft_token_terms(policy, labels, policy.detach().clone(), kl_estimator=estimator, kl_direction=direction)
    assert torch.equal(terms.kl, torch.zeros_like(terms.kl))
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    _, fused = chunked_asft_loss(
        hidden,
        weight,
        labels,
        hidden.clone(),
        weight.clone(),
        kl_coef=0.5,
        kl_estimator=estimator,
        kl_direction=direction,
        chunk_size=6,
    )
    assert torch.equal(fused.kl, torch.zeros_like(fused.kl))


# ------------------------------------------------------------------------------------------------ gradients, plain


@pytest.mark.parametrize("loss_type", ["dft", "nll"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_plain_loss_and_gradient_match_autograd_of_the_formula(estimator, direction, loss_type):
    policy, ref, labels = random_case()
    kwargs = dict(kl_coef=0.3, loss_type=loss_type)
    loss, terms = asft_loss(
        policy, labels, ref, num_items_in_batch=40, kl_estimator=estimator, kl_direction=direction, **kwargs
    )
    (grad,) = torch.autograd.grad(loss, policy)
    policy64 = policy.detach().double().requires_grad_(True)
    expected = oracle_loss(
        policy64, labels, ref.double(), num_items=40, estimator=estimator, direction=direction, **kwargs
    )
    (expected_grad,) = torch.autograd.grad(expected, policy64)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert terms.kl.abs().max() > 1e-2  # the two distributions differ: the KL term is exercised


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_closed_form_logit_gradient(estimator, direction):
    """dL/dz = (w - kl_coef k') (p - onehot(y)) per token, k' = d estimate / d log p(y) (docs/method.md)."""
    policy, ref, labels = random_case(n=7, vocab=11)
    loss, _ = asft_loss(
        policy, labels, ref, kl_coef=0.5, num_items_in_batch=1, kl_estimator=estimator, kl_direction=direction
    )
    (grad,) = torch.autograd.grad(loss, policy)
    log_p = torch.log_softmax(policy.detach(), -1)
    lp = log_p.gather(-1, labels[:, None]).squeeze(-1).requires_grad_()
    lr = torch.log_softmax(ref, -1).gather(-1, labels[:, None]).squeeze(-1)
    (slope,) = torch.autograd.grad(oracle_estimate(lp, lr, estimator, direction).sum(), lp)
    w = log_p.exp().gather(-1, labels[:, None]).squeeze(-1)
    expected = (w - 0.5 * slope)[:, None] * (log_p.exp() - torch.nn.functional.one_hot(labels, 11))
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_past_the_clamps_a_token_gets_no_gradient_from_the_estimate(estimator, direction):
    """Tokens whose log-ratio passes +-20 nats, or whose estimate passes 10 nats, are not pulled by the anchor."""
    policy, ref, labels = random_case(n=6, vocab=9, scale=1.0)
    ref = ref.clone()
    # Rows 0-1: the reference all but excludes the target (log-ratio ~ +-40); rows 2-3: a log-ratio of ~ +-3 (k3 past
    # 10 nats forward); rows 4-5: close to the policy, inside every clamp
    ref[0, labels[0]] = ref[1, labels[1]] = -40.0
    ref[2:] = policy[2:].detach()
    ref[2, labels[2]] -= 3.5
    ref[3, labels[3]] += 3.5
    ref[4:] += 0.3 * torch.randn(2, 9, generator=torch.Generator().manual_seed(0))
    terms = asft_token_terms(policy, labels, ref, loss_type="nll", kl_estimator=estimator, kl_direction=direction)
    (grad,) = torch.autograd.grad(terms.kl.sum(), policy)
    assert torch.count_nonzero(grad[:2]) == 0  # past the log-ratio clamp
    assert (terms.kl.abs() <= ESTIMATOR_VALUE_CLAMP).all()
    assert grad[4:].abs().max() > 0
    for row in (2, 3):  # a clamped value has no gradient, an unclamped one has
        clamped = terms.kl[row].abs().item() == ESTIMATOR_VALUE_CLAMP
        assert bool(torch.count_nonzero(grad[row]) == 0) is clamped, (row, terms.kl[row].item())
    if estimator == "k3" and direction == "forward":
        assert terms.kl[2].item() == ESTIMATOR_VALUE_CLAMP  # e^3 - 1 - 3 > 10: the case really reaches the clamp


# ------------------------------------------------------------------------------------------------ fused = plain


def _logits(hidden, weight, bias, head: HeadTransform):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * head.logit_scale
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


def _heads(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g) * 2
    weight = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    ref_hidden = hidden + 0.5 * torch.randn(N, H, generator=g)
    ref_weight = weight + 0.3 * torch.randn(V, H, generator=g)
    ref_bias = None if b is None else b * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, ref_hidden, ref_weight, ref_bias, labels


def _run(
    fused,
    *,
    estimator,
    direction,
    kl_coef=0.3,
    loss_type="dft",
    head=HeadTransform(),
    bias=False,
    chunk_size=5,
    stored=False,
    floor=0.0,
):
    hidden, weight, b, ref_hidden, ref_weight, ref_bias, labels = _heads(bias=bias)
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if b is not None:
        b = b.clone().requires_grad_()
    kwargs = dict(
        kl_coef=kl_coef,
        loss_type=loss_type,
        kl_direction=direction,
        kl_estimator=estimator,
        num_items_in_batch=37,
        dft_weight_floor=floor,
    )
    ref_logits = _logits(ref_hidden, ref_weight, ref_bias, head)
    if stored:  # the precomputed reference: one float per token
        kwargs["ref_token_log_probs"] = torch.log_softmax(ref_logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    if fused:
        live = {} if stored else dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
        loss, terms = chunked_asft_loss(
            hidden, weight, labels, bias=b, head=head, chunk_size=chunk_size, **live, **kwargs
        )
    else:
        loss, terms = asft_loss(_logits(hidden, weight, b, head), labels, None if stored else ref_logits, **kwargs)
    loss.backward()
    grads = [hidden.grad, weight.grad] + ([b.grad] if b is not None else [])
    return loss.detach(), terms, grads


@pytest.mark.parametrize("loss_type", ["dft", "nll"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_matches_plain(estimator, direction, loss_type):
    (loss_p, terms_p, grads_p), (loss_f, terms_f, grads_f) = (
        _run(fused, estimator=estimator, direction=direction, loss_type=loss_type) for fused in (False, True)
    )
    torch.testing.assert_close(loss_f, loss_p, atol=1e-5, rtol=1e-5)
    for name in ("kl", "nll", "weight", "entropy"):
        torch.testing.assert_close(getattr(terms_f, name), getattr(terms_p, name).detach(), atol=1e-5, rtol=1e-4)
    for gf, gp in zip(grads_f, grads_p):
        torch.testing.assert_close(gf, gp, atol=1e-5, rtol=1e-4)
    assert terms_f.kl.abs().max() > 1e-2


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_matches_plain_with_bias_scale_softcap_floor_and_chunks(estimator, direction):
    head = HeadTransform(logit_scale=0.7, softcap=4.0)
    for chunk_size in (1, 7, 1000):
        (loss_p, _, grads_p), (loss_f, _, grads_f) = (
            _run(
                fused,
                estimator=estimator,
                direction=direction,
                head=head,
                bias=True,
                chunk_size=chunk_size,
                floor=0.01,
            )
            for fused in (False, True)
        )
        torch.testing.assert_close(loss_f, loss_p, atol=1e-5, rtol=1e-5)
        assert len(grads_f) == 3
        for gf, gp in zip(grads_f, grads_p):
            torch.testing.assert_close(gf, gp, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_stored_float_per_token_gives_the_live_references_loss_and_gradients(estimator, direction):
    live = _run(True, estimator=estimator, direction=direction)
    for fused in (True, False):
        loss, terms, grads = _run(fused, estimator=estimator, direction=direction, stored=True)
        torch.testing.assert_close(loss, live[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(terms.kl.detach(), live[1].kl, atol=1e-5, rtol=1e-4)
        for g, g_live in zip(grads, live[2]):
            torch.testing.assert_close(g, g_live, atol=1e-5, rtol=1e-4)


def test_the_fused_clamps_match_the_plain_ones():
    """The clamp regions through the fused loss's closed-form gradient (a reference far from the policy)."""
    hidden, weight, _, ref_hidden, _, _, labels = _heads(seed=4)
    ref_weight = weight.clone()
    ref_weight[labels[:10]] -= 8.0  # the reference finds these targets far less likely: log-ratios past the clamps
    for estimator in ESTIMATORS:
        for direction in DIRECTIONS:
            results = []
            for fused in (False, True):
                h = hidden.clone().requires_grad_()
                kwargs = dict(
                    kl_coef=1.0, loss_type="nll", kl_direction=direction, kl_estimator=estimator, num_items_in_batch=1
                )
                if fused:
                    loss, terms = chunked_asft_loss(h, weight, labels, ref_hidden, ref_weight, chunk_size=8, **kwargs)
                else:
                    loss, terms = asft_loss(h @ weight.t(), labels, ref_hidden @ ref_weight.t(), **kwargs)
                loss.backward()
                results.append((terms.kl.detach(), h.grad))
            (kl_p, g_p), (kl_f, g_f) = results
            assert (kl_p.abs() == ESTIMATOR_VALUE_CLAMP).any() or estimator == "k1"
            torch.testing.assert_close(kl_f, kl_p, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g_f, g_p, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ errors


def test_references_an_estimator_cannot_use_are_refused():
    policy, ref, labels = random_case()
    token = torch.log_softmax(ref, -1).gather(-1, labels[:, None]).squeeze(-1)
    topk = topk_of(torch.log_softmax(ref, -1), 4)
    with pytest.raises(ValueError, match="whole distribution"):
        asft_loss(policy, labels, ref_token_log_probs=token)
    with pytest.raises(ValueError, match="top-k"):
        asft_loss(policy, labels, ref_topk=topk, kl_estimator="k3")
    with pytest.raises(ValueError, match="not both"):
        asft_loss(policy, labels, ref, ref_token_log_probs=token, kl_estimator="k3")
    with pytest.raises(ValueError, match="one value per scored token"):
        asft_loss(policy, labels, ref_token_log_probs=token[:-1], kl_estimator="k3")
    with pytest.raises(ValueError, match="kl_estimator"):
        asft_loss(policy, labels, ref, kl_estimator="k4")
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    with pytest.raises(ValueError, match="not both"):
        chunked_asft_loss(hidden, weight, labels, hidden, weight, ref_token_log_probs=token, kl_estimator="k1")
    with pytest.raises(ValueError, match="whole distribution"):
        chunked_asft_loss(hidden, weight, labels, ref_token_log_probs=token)
    assert not math.isnan(kl_estimate(torch.tensor([-1e4]), torch.tensor([0.0]), "k3").item())


# ------------------------------------------------------------------------------------------------ in the trainer


@pytest.mark.parametrize("estimator, direction", [("k3", "forward"), ("k1", "reverse"), ("k2", "forward")])
def test_fused_and_plain_trainers_train_the_same(tiny_model_path, pc_dataset, tmp_path, estimator, direction):
    kwargs = dict(kl_estimator=estimator, kl_direction=direction)
    plain, h_plain = tiny.train_moved_policy(tiny_model_path, pc_dataset, tmp_path / "p", fused=False, **kwargs)
    fused, h_fused = tiny.train_moved_policy(tiny_model_path, pc_dataset, tmp_path / "f", fused=True, **kwargs)
    assert max((fused[k] - plain[k]).abs().max().item() for k in plain) < 2e-5
    assert abs(h_fused[-1]["kl"]) > 1e-4 and h_fused[-1]["kl"] == pytest.approx(h_plain[-1]["kl"], rel=1e-3)


@pytest.mark.parametrize("case", ["full_fused", "full_plain", "lora_fused"])
def test_one_stored_float_per_token_trains_like_the_live_reference(tiny_model_path, pc_dataset, tmp_path, case):
    from asft_trl.reference import cache as reference_cache

    fused, peft = case.endswith("fused"), case.startswith("lora")
    live, h_live = tiny.train_moved_policy(
        tiny_model_path, pc_dataset, tmp_path / "live", fused=fused, peft=peft, kl_estimator="k3"
    )
    stored, h_stored = tiny.train_moved_policy(
        tiny_model_path,
        pc_dataset,
        tmp_path / "stored",
        fused=fused,
        peft=peft,
        kl_estimator="k3",
        precompute_ref_log_probs=True,
    )
    assert max((stored[k] - live[k]).abs().max().item() for k in live) < 2e-5
    assert h_stored[-1]["kl"] > 1e-4 and h_stored[-1]["kl"] == pytest.approx(h_live[-1]["kl"], rel=1e-3)
    files = list((tmp_path / "stored" / "reference_cache").glob("*.arrow"))
    assert [f.name.split("-")[0] for f in files] == ["reference_token"]
    assert reference_cache.COLUMNS[0] not in pc_dataset.column_names


def test_the_token_store_is_one_float_per_token_and_its_own_file(tiny_model_path, pc_dataset, tmp_path):
    import os

    from asft_trl import ASFTTrainer
    from asft_trl.reference import cache as reference_cache
    from tiny import make_args

    cache = tmp_path / "cache"
    common = dict(precompute_ref_log_probs=True, precompute_ref_cache_dir=str(cache))
    token = ASFTTrainer(
        tiny_model_path, args=make_args(tmp_path / "a", kl_estimator="k3", **common), train_dataset=pc_dataset
    )
    features = token.train_dataset.features
    assert reference_cache.TOKEN_COLUMN in features and reference_cache.COLUMNS[0] not in features
    assert features[reference_cache.TOKEN_COLUMN].feature.dtype == "float32"
    row = token.train_dataset[0]
    assert len(row[reference_cache.TOKEN_COLUMN]) == reference_cache.scored_count(token.data_collator.collator, row)
    first = {f: os.path.getmtime(cache / f) for f in os.listdir(cache)}
    assert [f.split("-")[0] for f in first] == ["reference_token"]
    # Another estimator stores the same numbers: the file is reused, not rewritten; the exact KL's top-k is another file
    ASFTTrainer(tiny_model_path, args=make_args(tmp_path / "b", kl_estimator="k1", **common), train_dataset=pc_dataset)
    assert {f: os.path.getmtime(cache / f) for f in first} == first
    ASFTTrainer(tiny_model_path, args=make_args(tmp_path / "c", **common), train_dataset=pc_dataset)
    assert sorted(f.split("-")[0] for f in os.listdir(cache)) == ["reference_token", "reference_top64"]


def test_evaluation_logs_the_exact_kl_beside_the_estimate(tiny_model_path, pc_dataset, tmp_path):
    from asft_trl import ASFTTrainer
    from tiny import make_args

    trainer = ASFTTrainer(
        tiny_model_path,
        args=make_args(tmp_path, kl_estimator="k3", learning_rate=0.5),
        train_dataset=pc_dataset,
        eval_dataset=pc_dataset,
    )
    trainer.train()
    assert not any("kl_full" in h for h in trainer.state.log_history if "loss" in h)  # training: the estimate only
    estimated = trainer.evaluate()
    trainer.args.kl_estimator = "full"  # the same weights, scored with the exact KL
    exact = trainer.evaluate()
    assert estimated["eval_kl_full"] > 1e-3
    assert estimated["eval_kl_full"] == pytest.approx(exact["eval_kl"], rel=1e-4)
    assert estimated["eval_kl"] != pytest.approx(exact["eval_kl"], rel=1e-2)  # the estimate is another number
    assert "eval_kl_full" not in exact


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(kl_estimator="k4"), ["kl_estimator='k4'", "'full'", "'k3'"]),
        (dict(kl_estimator="k3", kl_coef=0.0), ["kl_estimator='k3'", "kl_coef=0", "kl_coef > 0"]),
        (
            dict(kl_estimator="k2", kl_direction="reverse"),
            ["kl_estimator='k2'", "kl_direction='reverse'", "'forward'"],
        ),
        (
            dict(kl_estimator="k3", precompute_ref_log_probs=True, precompute_ref_topk=16),
            ["precompute_ref_topk=16", "kl_estimator='k3'", "Remove precompute_ref_topk"],
        ),
    ],
)
def test_bad_values_and_combinations_are_refused_with_the_fix(tmp_path, overrides, words):
    from asft_trl import ASFTConfig

    with pytest.raises(ValueError) as error:
        ASFTConfig(output_dir=str(tmp_path), **overrides)
    for word in words:
        assert word in str(error.value)


@pytest.mark.slow  # a real `asft-trl train` launch in a subprocess
def test_options_come_from_a_recipe_and_the_command_line(tiny_model_path, tmp_path):
    from tiny import run_cli, write_recipe

    recipe = write_recipe(
        tmp_path, tiny_model_path, kl_estimator="k3", dft_normalization="weights", precompute_ref_log_probs=True
    )
    result = run_cli("train", "--config", str(recipe), "--kl_estimator", "k2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    info = json.loads((out / "asft_run.json").read_text())
    assert (info["kl_estimator"], info["dft_normalization"]) == ("k2", "weights")
    assert [f.name.split("-")[0] for f in (out / "reference_cache").glob("*.arrow")] == ["reference_token"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses and losses[0] > 1.0  # divided by the weight sum: ~ the weighted-mean NLL, not DFT's ~0.02


def test_a_bad_combination_from_the_command_line_fails_before_launch(tiny_model_path, tmp_path, capsys, monkeypatch):
    """In this process (the launch path itself is the test above's): the recipe's k3 overridden by k2, with a reverse
    direction k2 can't tell apart, ends with exit status 2 and the reason, and nothing is launched."""
    import accelerate.commands.launch as launch

    from tiny import train_error, write_recipe

    monkeypatch.setattr(launch, "launch_command", lambda args: pytest.fail("accelerate launch was called"))
    recipe = write_recipe(
        tmp_path, tiny_model_path, kl_estimator="k3", dft_normalization="weights", precompute_ref_log_probs=True
    )
    line = train_error(capsys, "--config", recipe, "--kl_estimator", "k2", "--kl_direction", "reverse")
    assert "kl_estimator='k2' with kl_direction='reverse'" in line

"""The loss module against a from-scratch computation of the paper's formula (float64, one token at a time)."""

from __future__ import annotations

import math

import pytest
import torch

from asft_trl.losses import asft_loss, asft_token_terms, kl_per_token, weight_stats


def oracle_loss(policy_logits, labels, ref_logits, *, kl_coef, loss_type, kl_direction, num_items):
    """L = sum_t (w_t * -log p(y_t) + kl_coef * KL_t) / N, written out token by token in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in range(labels.numel()):
        log_p = torch.log_softmax(policy_logits[t].double(), -1)
        log_q = torch.log_softmax(ref_logits[t].double(), -1)
        nll = -log_p[labels[t]]
        w = log_p[labels[t]].detach().exp() if loss_type == "dft" else 1.0
        if kl_direction == "forward":
            kl = (log_q.exp() * (log_q - log_p)).sum()
        else:
            kl = (log_p.exp() * (log_p - log_q)).sum()
        total = total + w * nll + kl_coef * kl
    return total / num_items


def random_case(n=12, vocab=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(n, vocab, generator=g) * scale).requires_grad_(True)
    ref = torch.randn(n, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (n,), generator=g)
    return policy, ref, labels


@pytest.mark.parametrize("loss_type", ["dft", "nll"])
@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_loss_and_gradient_match_the_formula(loss_type, kl_direction):
    policy, ref, labels = random_case()
    kwargs = dict(kl_coef=0.3, loss_type=loss_type, kl_direction=kl_direction)
    loss, _ = asft_loss(policy, labels, ref, num_items_in_batch=20, **kwargs)
    (grad,) = torch.autograd.grad(loss, policy)

    policy64 = policy.detach().double().requires_grad_(True)
    expected = oracle_loss(policy64, labels, ref.double(), num_items=20, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, policy64)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["dft", "nll"])
def test_closed_form_logit_gradient(loss_type):
    """dL/dz = w (p - onehot(y)) + lambda (p - p_ref) for the forward KL (docs/method.md), per token, before /N."""
    policy, ref, labels = random_case(n=5, vocab=7)
    loss, _ = asft_loss(policy, labels, ref, kl_coef=0.5, loss_type=loss_type, num_items_in_batch=1)
    (grad,) = torch.autograd.grad(loss, policy)
    p = torch.softmax(policy.detach(), -1)
    w = p.gather(-1, labels[:, None]) if loss_type == "dft" else torch.ones(5, 1)
    expected = w * (p - torch.nn.functional.one_hot(labels, 7)) + 0.5 * (p - torch.softmax(ref, -1))
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_reverse_kl_gradient_closed_form():
    """dKL(p||q)/dz_k = p_k ((log p_k - log q_k) - KL)."""
    policy, ref, labels = random_case(n=4, vocab=9)
    terms = asft_token_terms(policy, labels, ref, loss_type="nll", kl_direction="reverse")
    (grad,) = torch.autograd.grad(terms.kl.sum(), policy)
    log_p, log_q = torch.log_softmax(policy.detach(), -1), torch.log_softmax(ref, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, log_p.exp() * ((log_p - log_q) - kl), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_kl_is_exactly_zero_when_policy_equals_reference(kl_direction):
    policy, _, labels = random_case(scale=10.0)
    terms = asft_token_terms(policy, labels, policy.detach().clone(), kl_direction=kl_direction)
    assert torch.equal(terms.kl, torch.zeros_like(terms.kl))


def test_kl_is_never_negative():
    """Across scales from nearly equal distributions (where rounding matters) to very different ones."""
    for seed in range(20):
        policy, ref, _ = random_case(n=64, vocab=1000, seed=seed, scale=[1e-6, 1e-3, 1.0, 30.0][seed % 4])
        near = policy.detach() + 1e-7 * torch.randn_like(policy)
        for q in (ref, near):
            for a, b in ((q, policy.detach()), (policy.detach(), q)):
                kl = kl_per_token(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
                assert (kl >= 0).all(), kl.min()


def test_kl_matches_textbook_formula_in_float32():
    policy, ref, _ = random_case(n=32, vocab=500, scale=2.0)
    log_p, log_q = torch.log_softmax(policy.detach(), -1), torch.log_softmax(ref, -1)
    textbook = (log_q.exp() * (log_q - log_p)).sum(-1)
    torch.testing.assert_close(kl_per_token(log_q, log_p), textbook, rtol=1e-5, atol=1e-6)


def test_dft_weight_is_detached_probability_and_nll_weight_is_one():
    policy, ref, labels = random_case()
    dft = asft_token_terms(policy, labels, ref, loss_type="dft")
    nll = asft_token_terms(policy, labels, ref, loss_type="nll")
    p_label = torch.softmax(policy.detach(), -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(dft.weight, p_label)
    assert not dft.weight.requires_grad
    assert torch.equal(nll.weight, torch.ones_like(nll.weight))
    torch.testing.assert_close(dft.task, p_label * nll.nll)


def test_dft_weight_floor_changes_only_the_weights_below_it():
    policy, ref, labels = random_case()
    plain = asft_token_terms(policy, labels, ref, loss_type="dft")
    floor = float(plain.weight.median())
    floored = asft_token_terms(policy, labels, ref, loss_type="dft", dft_weight_floor=floor)
    below = plain.weight < floor
    assert below.any() and (~below).any()
    assert torch.equal(floored.weight[~below], plain.weight[~below])
    assert torch.equal(floored.weight[below], torch.full_like(plain.weight[below], floor))
    torch.testing.assert_close(floored.task, floored.weight * floored.nll)
    # The gradient is DFT's with the floored weights: w (p - onehot(y)), still with no gradient through w
    logits = policy.detach().clone().requires_grad_()
    asft_loss(logits, labels, None, kl_coef=0.0, dft_weight_floor=floor, num_items_in_batch=1)[0].backward()
    onehot = torch.nn.functional.one_hot(labels, logits.shape[-1]).float()
    expected = floored.weight[:, None] * (torch.softmax(policy.detach(), -1) - onehot)
    torch.testing.assert_close(logits.grad, expected)


def test_kl_coef_zero_is_the_plain_task_loss_and_still_measures_the_kl():
    policy, ref, labels = random_case()
    loss, terms = asft_loss(policy, labels, ref, kl_coef=0.0, loss_type="dft", num_items_in_batch=7)
    assert loss.item() == pytest.approx((terms.weight * terms.nll).sum().item() / 7, rel=1e-6)
    # Measured for the logs (a warm-up schedule starts at 0), the same KL as with an anchor weight
    _, anchored = asft_loss(policy, labels, ref, kl_coef=0.3, loss_type="dft", num_items_in_batch=7)
    assert (terms.kl > 0).all()
    torch.testing.assert_close(terms.kl, anchored.kl)
    policy.grad = None
    loss.backward()
    no_ref = policy.detach().clone().requires_grad_()
    asft_loss(no_ref, labels, None, kl_coef=0.0, num_items_in_batch=7)[0].backward()
    torch.testing.assert_close(policy.grad, no_ref.grad)


def test_normalisation_is_by_num_items_not_rows():
    policy, ref, labels = random_case(n=6)
    summed, _ = asft_loss(policy, labels, ref, num_items_in_batch=1)
    assert asft_loss(policy, labels, ref, num_items_in_batch=24)[0].item() == pytest.approx(summed.item() / 24)
    assert asft_loss(policy, labels, ref)[0].item() == pytest.approx(summed.item() / 6)


def test_bf16_inputs_are_computed_in_float32():
    policy, ref, labels = random_case()
    loss32, _ = asft_loss(policy, labels, ref.bfloat16().float())
    loss16, terms = asft_loss(policy.bfloat16(), labels, ref.bfloat16())
    assert terms.kl.dtype == torch.float32 and loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kl_coef=-0.1), "kl_coef"),
        (dict(loss_type="focal"), "loss_type"),
        (dict(kl_direction="sideways"), "kl_direction"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    policy, ref, labels = random_case()
    with pytest.raises(ValueError, match=match):
        asft_loss(policy, labels, ref, **{"kl_coef": 0.1, **kwargs})


def test_weight_stats():
    w = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert weight_stats(w.sum(), (w**2).sum(), torch.tensor(4.0)) == pytest.approx((0.5, 1.0))
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mean, ess = weight_stats(w.sum(), (w**2).sum(), torch.tensor(4.0))
    assert mean == pytest.approx(0.25) and ess == pytest.approx(0.25)
    assert weight_stats(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)) == (0.0, 0.0)
    assert not math.isnan(weight_stats(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(3.0))[1])

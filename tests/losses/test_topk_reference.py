"""The top-k + tail reference: exact at k = V, a lower bound whose error shrinks as k grows, the same loss and
gradients through the plain and the fused loss, and gradients equal to those of the coarsened KL written out."""

from __future__ import annotations

import pytest
import torch

from asft_trl.losses import TopKReference, asft_loss, chunked_asft_loss, complete_log_probs, topk_of

N, H, V = 19, 12, 61


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g) * 2
    weight = torch.randn(V, H, generator=g) * 0.5
    ref_hidden = hidden + 0.4 * torch.randn(N, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, ref_hidden, labels


def _reference(ref_hidden, weight, k) -> TopKReference:
    return topk_of(torch.log_softmax(ref_hidden @ weight.t(), -1), k)


def test_topk_of_keeps_the_mass():
    hidden, weight, ref_hidden, _ = _case()
    ref = _reference(ref_hidden, weight, 7)
    assert ref.ids.shape == (N, 7) and ref.log_probs.shape == (N, 7)
    total = torch.logsumexp(torch.cat([ref.log_probs, ref.tail_log_prob[:, None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros(N), atol=1e-5, rtol=0)
    assert (ref.log_probs[:, :-1] >= ref.log_probs[:, 1:]).all()  # the most likely tokens, in order
    assert topk_of(torch.log_softmax(ref_hidden @ weight.t(), -1), 10 * V).ids.shape == (N, V)


def test_completion_keeps_the_top_k_and_spreads_the_tail_like_the_policy():
    hidden, weight, ref_hidden, _ = _case()
    log_p = torch.log_softmax(hidden @ weight.t(), -1)
    ref = _reference(ref_hidden, weight, 5)
    log_q = complete_log_probs(log_p, ref)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(N))
    torch.testing.assert_close(log_q.gather(-1, ref.ids), ref.log_probs)
    outside = torch.ones(N, V, dtype=torch.bool).scatter_(-1, ref.ids, False)
    ratio = (log_q - log_p)[outside].view(N, V - 5)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))  # the same factor Q_T / P_T on every tail token


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_k_equal_to_the_vocabulary_is_the_exact_kl(kl_direction):
    hidden, weight, ref_hidden, labels = _case()
    kwargs = dict(kl_coef=0.3, kl_direction=kl_direction, num_items_in_batch=N)
    results = []
    for ref_kwargs in ({"ref_logits": ref_hidden @ weight.t()}, {"ref_topk": _reference(ref_hidden, weight, V)}):
        logits = (hidden @ weight.t()).requires_grad_()
        loss, terms = asft_loss(logits, labels, **ref_kwargs, **kwargs)
        loss.backward()
        results.append((loss.detach(), terms.kl.detach(), logits.grad))
    (loss_exact, kl_exact, grad_exact), (loss_k, kl_k, grad_k) = results
    assert kl_exact.min() > 1e-3
    torch.testing.assert_close(kl_k, kl_exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_k, loss_exact, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_k, grad_exact, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_the_error_shrinks_as_k_grows(kl_direction):
    hidden, weight, ref_hidden, labels = _case(seed=1)
    logits = hidden @ weight.t()
    exact = asft_loss(logits, labels, ref_hidden @ weight.t(), kl_direction=kl_direction)[1].kl
    errors = []
    for k in (1, 2, 4, 8, 16, 32, V):
        kl_k = asft_loss(logits, labels, ref_topk=_reference(ref_hidden, weight, k), kl_direction=kl_direction)[1].kl
        assert (kl_k <= exact + 1e-5).all()  # coarsening never adds divergence (data-processing inequality)
        errors.append((exact - kl_k).sum().item())
    assert errors[0] > 0.05 * exact.sum().item()  # k = 1 really is an approximation here
    assert all(later <= earlier + 1e-5 for earlier, later in zip(errors, errors[1:])), errors
    assert abs(errors[-1]) < 1e-4


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_gradient_is_that_of_the_coarsened_kl(kl_direction):
    """The completion trick (detached q~) must give the gradient of KL between the (k + 1)-outcome distributions."""
    hidden, weight, ref_hidden, labels = _case(seed=2)
    ref = _reference(ref_hidden, weight, 4)
    logits = (hidden @ weight.t()).requires_grad_()
    asft_loss(
        logits, labels, ref_topk=ref, kl_coef=1.0, loss_type="nll", kl_direction=kl_direction, num_items_in_batch=1
    )[0].backward()

    direct = (hidden @ weight.t()).requires_grad_()
    log_p = torch.log_softmax(direct, -1)
    log_p_coarse = torch.cat(
        [log_p.gather(-1, ref.ids), torch.logsumexp(log_p.scatter(-1, ref.ids, float("-inf")), -1, keepdim=True)], -1
    )
    log_q_coarse = torch.cat([ref.log_probs, ref.tail_log_prob[:, None]], -1)
    src, dst = (log_q_coarse, log_p_coarse) if kl_direction == "forward" else (log_p_coarse, log_q_coarse)
    kl = (src.exp() * (src - dst)).sum()
    nll = -log_p.gather(-1, labels[:, None]).sum()
    (nll + kl).backward()
    torch.testing.assert_close(logits.grad, direct.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
@pytest.mark.parametrize("k", [1, 6, V])
def test_fused_matches_plain_with_a_top_k_reference(kl_direction, k):
    hidden, weight, ref_hidden, labels = _case(seed=3)
    ref = _reference(ref_hidden, weight, k)
    kwargs = dict(kl_coef=0.2, kl_direction=kl_direction, num_items_in_batch=25, dft_weight_floor=0.01)
    h_plain, w_plain = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_p, terms_p = asft_loss(h_plain @ w_plain.t(), labels, ref_topk=ref, **kwargs)
    loss_p.backward()
    h_fused, w_fused = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_f, terms_f = chunked_asft_loss(h_fused, w_fused, labels, ref_topk=ref, chunk_size=4, **kwargs)
    loss_f.backward()
    torch.testing.assert_close(loss_f, loss_p.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms_f.kl, terms_p.kl.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h_fused.grad, h_plain.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w_fused.grad, w_plain.grad, atol=1e-5, rtol=1e-4)


def test_kl_against_itself_is_zero():
    hidden, weight, _, labels = _case()
    log_p = torch.log_softmax(hidden @ weight.t(), -1)
    for k in (1, 5, V):
        _, terms = chunked_asft_loss(hidden, weight, labels, ref_topk=topk_of(log_p, k), kl_coef=0.1)
        assert terms.kl.max() < 1e-6


def test_bad_arguments():
    hidden, weight, ref_hidden, labels = _case()
    ref = _reference(ref_hidden, weight, 3)
    with pytest.raises(ValueError, match="not both"):
        chunked_asft_loss(hidden, weight, labels, ref_hidden, weight, ref_topk=ref)
    with pytest.raises(ValueError, match="not both"):
        asft_loss(hidden @ weight.t(), labels, ref_hidden @ weight.t(), ref_topk=ref)
    with pytest.raises(ValueError, match="tokens"):
        chunked_asft_loss(hidden, weight, labels, ref_topk=ref.rows(0, 5))
    with pytest.raises(ValueError, match="tail_log_prob"):
        TopKReference(ref.ids, ref.log_probs, ref.tail_log_prob[:3])

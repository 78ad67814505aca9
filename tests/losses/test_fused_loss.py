"""The chunked, fused loss against the plain implementation: loss, per-token terms, and gradients."""

from __future__ import annotations

import pytest
import torch

from asft_trl.losses import HeadTransform, asft_loss, chunked_asft_loss

N, H, V = 23, 16, 97


def _inputs(seed=0, dtype=torch.float32, bias=False, tied_ref=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    # The reference: the policy moved a little (as after some training), or the same head under LoRA
    ref_hidden = hidden.detach() + 0.3 * torch.randn(N, H, generator=g).to(dtype)
    ref_weight = weight.detach() if tied_ref else (weight.detach() + 0.2 * torch.randn(V, H, generator=g).to(dtype))
    ref_bias = None if b is None else b.detach() * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, ref_hidden, ref_weight, ref_bias, labels


def _logits(hidden, weight, bias, head: HeadTransform):
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    z = z * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


def _both(
    kl_coef,
    loss_type,
    kl_direction,
    *,
    head=HeadTransform(),
    chunk_size=5,
    dtype=torch.float32,
    bias=False,
    tied_ref=False,
    num_items=40,
    floor=0.0,
):
    """Loss, terms and gradients from the plain and the fused implementation on the same inputs."""
    results = []
    for fused in (False, True):
        hidden, weight, b, ref_hidden, ref_weight, ref_bias, labels = _inputs(
            dtype=dtype, bias=bias, tied_ref=tied_ref
        )
        kwargs = dict(
            kl_coef=kl_coef,
            loss_type=loss_type,
            kl_direction=kl_direction,
            num_items_in_batch=num_items,
            dft_weight_floor=floor,
        )
        if fused:
            loss, terms = chunked_asft_loss(
                hidden,
                weight,
                labels,
                ref_hidden,
                ref_weight,
                bias=b,
                ref_bias=ref_bias,
                head=head,
                chunk_size=chunk_size,
                **kwargs,
            )
        else:
            ref_logits = _logits(ref_hidden, ref_weight, ref_bias, head)
            loss, terms = asft_loss(_logits(hidden, weight, b, head), labels, ref_logits, **kwargs)
        loss.backward()
        grads = [hidden.grad, weight.grad] + ([b.grad] if b is not None else [])
        results.append((loss.detach(), terms, [g.float() for g in grads]))
    return results


@pytest.mark.parametrize("loss_type", ["dft", "nll"])
@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05, 1.0])
def test_fused_matches_plain_fp32(loss_type, kl_direction, kl_coef):
    (loss_p, terms_p, grads_p), (loss_f, terms_f, grads_f) = _both(kl_coef, loss_type, kl_direction)
    assert torch.allclose(loss_f, loss_p, atol=1e-5, rtol=1e-5)
    for name in ("kl", "nll", "weight", "entropy"):
        assert torch.allclose(getattr(terms_f, name), getattr(terms_p, name).detach(), atol=1e-5), name
    assert torch.equal(terms_f.is_top1, terms_p.is_top1)
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, atol=1e-5, rtol=1e-4), (gf - gp).abs().max()
    if kl_coef > 0:
        assert terms_f.kl.min() >= 0 and terms_f.kl.max() > 1e-3  # the reference differs: the test can see the KL


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_fused_matches_plain_with_a_dft_weight_floor(kl_coef):
    (loss_p, terms_p, grads_p), (loss_f, terms_f, grads_f) = _both(kl_coef, "dft", "forward", floor=0.01)
    assert torch.allclose(loss_f, loss_p, atol=1e-5)
    torch.testing.assert_close(terms_f.weight, terms_p.weight)
    assert (terms_f.weight == 0.01).any() and (terms_f.weight > 0.01).any()  # the case has tokens on both sides
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, atol=1e-5, rtol=1e-4)
    (loss_0, *_), _ = _both(kl_coef, "dft", "forward", floor=0.0)
    assert loss_p > loss_0  # raising low weights raises the weighted NLL


def test_without_a_reference_kl_is_zero_and_with_one_it_is_measured_at_kl_coef_zero():
    hidden, weight, _, ref_hidden, ref_weight, _, labels = _inputs()
    loss_none, terms_none = chunked_asft_loss(hidden, weight, labels, kl_coef=0.0)
    loss_ref, terms_ref = chunked_asft_loss(hidden, weight, labels, ref_hidden, ref_weight, kl_coef=0.0)
    assert torch.count_nonzero(terms_none.kl) == 0 and (terms_ref.kl > 0).all()
    torch.testing.assert_close(loss_none, loss_ref)
    with pytest.raises(ValueError, match="together"):
        chunked_asft_loss(hidden, weight, labels, ref_hidden, None, kl_coef=0.0)


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_fused_matches_plain_with_bias_scale_softcap(kl_direction):
    head = HeadTransform(logit_scale=0.7, softcap=4.0)
    (loss_p, _, grads_p), (loss_f, _, grads_f) = _both(0.3, "dft", kl_direction, head=head, bias=True)
    assert torch.allclose(loss_f, loss_p, atol=1e-5)
    assert len(grads_f) == 3
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 7, N, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    (loss_p, _, grads_p), (loss_f, _, grads_f) = _both(0.1, "dft", "forward", chunk_size=chunk_size)
    assert torch.allclose(loss_f, loss_p, atol=1e-5)
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, atol=1e-5, rtol=1e-4)


def test_same_head_as_reference_lora_style():
    """Under LoRA the reference head is the policy's own (frozen) head: only the hidden states differ."""
    (loss_p, _, grads_p), (loss_f, _, grads_f) = _both(0.1, "dft", "forward", tied_ref=True)
    assert torch.allclose(loss_f, loss_p, atol=1e-5)
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, atol=1e-5, rtol=1e-4)


def test_frozen_head_gets_no_gradient_and_hidden_gradient_matches():
    hidden, weight, _, ref_hidden, ref_weight, _, labels = _inputs()
    weight.requires_grad_(False)
    loss, _ = chunked_asft_loss(hidden, weight, labels, ref_hidden, ref_weight, kl_coef=0.1, chunk_size=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    hidden2 = hidden.detach().clone().requires_grad_()
    loss2, _ = asft_loss(hidden2 @ weight.t(), labels, ref_hidden @ ref_weight.t(), kl_coef=0.1)
    loss2.backward()
    assert torch.allclose(hidden.grad, hidden2.grad, atol=1e-5)


def test_kl_is_exactly_zero_when_policy_equals_reference():
    hidden, weight, _, _, _, _, labels = _inputs()
    for direction in ("forward", "reverse"):
        _, terms = chunked_asft_loss(
            hidden,
            weight,
            labels,
            hidden.detach().clone(),
            weight.detach().clone(),
            kl_coef=0.5,
            kl_direction=direction,
            chunk_size=6,
        )
        assert torch.count_nonzero(terms.kl) == 0


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_bf16_inputs_close_to_fp32(kl_direction):
    """bf16 hidden states and weights: float32 math inside; close to the float32 reference on the same bf16 values."""
    (loss_p, terms_p, grads_p), (loss_f, terms_f, grads_f) = _both(0.1, "dft", kl_direction, dtype=torch.bfloat16)
    # Both see the same bf16 inputs and compute in float32; only the gradients are rounded to bf16 on return
    assert torch.allclose(loss_f, loss_p, atol=1e-5)
    assert torch.allclose(terms_f.kl, terms_p.kl.detach(), atol=1e-5)
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, atol=1e-2, rtol=1e-2)


def test_empty_selection_gives_a_differentiable_zero():
    hidden, weight, _, ref_hidden, ref_weight, _, labels = _inputs()
    loss, terms = chunked_asft_loss(
        hidden[:0], weight, labels[:0], ref_hidden[:0], ref_weight, kl_coef=0.1, num_items_in_batch=8
    )
    loss.backward()
    assert loss.item() == 0 and terms.kl.numel() == 0
    assert torch.count_nonzero(weight.grad) == 0


def test_backward_twice_is_refused():
    hidden, weight, _, ref_hidden, ref_weight, _, labels = _inputs()
    loss, _ = chunked_asft_loss(hidden, weight, labels, ref_hidden, ref_weight, kl_coef=0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_bad_arguments_are_refused():
    hidden, weight, _, ref_hidden, ref_weight, _, labels = _inputs()
    with pytest.raises(ValueError, match="loss_type"):
        chunked_asft_loss(hidden, weight, labels, ref_hidden, ref_weight, loss_type="ce")
    with pytest.raises(ValueError, match="ref_hidden"):
        chunked_asft_loss(hidden, weight, labels, kl_coef=0.1)
    with pytest.raises(ValueError, match="do not match"):
        chunked_asft_loss(hidden, weight, labels, ref_hidden, ref_weight[:-1], kl_coef=0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_asft_loss(hidden, weight, labels, ref_hidden, ref_weight, chunk_size=0)

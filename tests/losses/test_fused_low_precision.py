"""The fused loss's low-precision branch (every GPU user's default in bf16), tested on the CPU.

On CUDA, with bf16/fp16 hidden states or heads (or autocast), the fused loss multiplies in that dtype into float32
results through `torch.mm(..., out_dtype=)` and `torch.addmm(..., out_dtype=, out=)`. Those kernels exist for CUDA
only, so here the two calls are routed through an emulation with their semantics (low-precision operands, products
and sums in float32: a bf16 x bf16 product is exact in float32), the branch is held to the plain loss in bf16, and the
exact calls run on the meta device, which knows their signatures. Where a torch lacks the calls (before 2.8, or
`addmm` into a float32 `out` before 2.10), the loss must fall back to float32, and the declared torch floor must be
one the dependencies accept.
"""

from __future__ import annotations

import contextlib
import re
from importlib.metadata import requires

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from test_fused_loss import _both, _inputs

import tiny
from asft_trl.losses import chunked_asft_loss, fused

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture
def emulated(monkeypatch):
    """Route the branch's two calls through a CPU emulation; return the calls made (name, operand dtype, shapes)."""
    calls = []

    def products_in_float32(a, b, out=None):
        assert a.dtype == b.dtype and a.dtype in LOW, (a.dtype, b.dtype)  # the branch hands over low precision
        product = a.float() @ b.float()
        calls.append(("addmm" if out is not None else "mm", a.dtype, tuple(a.shape), tuple(b.shape)))
        if out is None:
            return product
        assert out.dtype == torch.float32
        return out.add_(product)

    monkeypatch.setattr(fused, "_low_precision_products", lambda device, dtype: True)
    monkeypatch.setattr(fused, "_products_in_float32", products_in_float32)
    return calls


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_low_precision_branch_matches_the_plain_loss(emulated, dtype, kl_direction):
    (loss_p, terms_p, grads_p), (loss_f, terms_f, grads_f) = _both(0.1, "dft", kl_direction, dtype=dtype)
    # The branch really ran, in `dtype`: the projections and the hidden-state gradient (mm), the head's (addmm)
    assert {name for name, *_ in emulated} == {"mm", "addmm"}
    assert {operand for _, operand, *_ in emulated} == {dtype}
    # Logits are float32 sums of exact products of the same rounded inputs as the plain loss's: the loss and the KL
    # agree to float32 rounding
    assert torch.allclose(loss_f, loss_p, atol=1e-5)
    assert torch.allclose(terms_f.kl, terms_p.kl.detach(), atol=1e-5) and (terms_f.kl > 1e-3).all()
    assert torch.allclose(terms_f.nll, terms_p.nll, atol=1e-5)
    # The gradients go through dL/dz rounded to `dtype`: close to the plain ones, and not the float32 branch's
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, atol=1e-2, rtol=1e-2), (gf - gp).abs().max()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "_low_precision_products", lambda device, dtype: False)
        ((_, _, grads_fp32),) = _both(0.1, "dft", kl_direction, dtype=dtype)[1:]
    assert any(not torch.equal(gf, g32) for gf, g32 in zip(grads_f, grads_fp32)), "the branch changed nothing"


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_low_precision_branch_kl_is_exactly_zero_at_step_0(emulated, dtype, kl_direction):
    """Policy = reference: the same head (under LoRA the very tensor; under FSDP2 the reference's gathered in the
    policy head's dtype; or a float32 copy of the same values) gives exactly 0, not rounding noise."""
    hidden, weight, _, _, _, _, labels = _inputs(dtype=dtype)
    for ref_weight in (weight, weight.detach().clone(), weight.detach().float()):
        loss, terms = chunked_asft_loss(
            hidden,
            weight,
            labels,
            hidden.detach().clone(),
            ref_weight,
            kl_coef=0.5,
            kl_direction=kl_direction,
            chunk_size=6,
        )
        assert torch.count_nonzero(terms.kl) == 0
        loss.backward()
        hidden.grad = weight.grad = None


def test_the_exact_calls_run_on_the_meta_device(monkeypatch):
    """The meta device knows `mm.dtype` and `addmm.dtype_out`: the real calls, with the loss's shapes, give float32
    results and accumulate into the given `out`."""
    a = torch.empty(5, 8, dtype=torch.bfloat16, device="meta")
    b = torch.empty(8, 3, dtype=torch.bfloat16, device="meta")
    product = fused._products_in_float32(a, b)
    assert product.dtype == torch.float32 and product.shape == (5, 3) and product.device.type == "meta"
    out = torch.empty(5, 3, dtype=torch.float32, device="meta")
    assert fused._products_in_float32(a, b, out) is out

    # The whole loss, forward and backward, through the real calls on meta tensors
    calls = []
    real = fused._products_in_float32

    def spy(a, b, out=None):
        calls.append(("addmm" if out is not None else "mm", a.dtype, b.dtype, None if out is None else out.dtype))
        return real(a, b, out)

    monkeypatch.setattr(fused, "_low_precision_products", lambda device, dtype: True)
    monkeypatch.setattr(fused, "_products_in_float32", spy)
    # The loss switches autocast off on its device; the meta device has no autocast to switch
    autocast = torch.autocast
    monkeypatch.setattr(
        torch,
        "autocast",
        lambda device_type, **kwargs: (
            contextlib.nullcontext() if device_type == "meta" else autocast(device_type, **kwargs)
        ),
    )
    n, h, v = 11, 16, 40
    hidden = torch.empty(n, h, dtype=torch.bfloat16, device="meta", requires_grad=True)
    weight = torch.empty(v, h, dtype=torch.bfloat16, device="meta", requires_grad=True)
    labels = torch.zeros(n, dtype=torch.long, device="meta")
    loss, terms = chunked_asft_loss(
        hidden, weight, labels, hidden.detach(), weight.detach(), kl_coef=0.1, chunk_size=4
    )
    loss.backward()
    assert loss.dtype == torch.float32 and terms.kl.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16 and weight.grad.shape == (v, h)
    chunks = 3  # 11 tokens in chunks of 4
    assert calls.count(("mm", torch.bfloat16, torch.bfloat16, None)) == 3 * chunks  # policy, reference, grad hidden
    assert calls.count(("addmm", torch.bfloat16, torch.bfloat16, torch.float32)) == chunks  # the head's gradient


# ------------------------------------------------------------------------------------------ where the calls fail


def test_the_calls_are_tried_and_a_failure_means_float32(monkeypatch):
    cpu = torch.device("cpu")
    # This CPU build has no such kernels ("Could not run 'aten::mm.dtype' ... from the 'CPU' backend"): the probe says
    # no, as it must for a CUDA torch without them
    assert not fused._products_work(cpu, torch.bfloat16)
    assert not fused._low_precision_products(cpu, torch.bfloat16)

    def too_old(a, b, out=None):  # torch < 2.8
        raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")

    def addmm_refuses_float32_out(a, b, out=None):  # torch 2.8, 2.9
        if out is not None:
            raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
        return a.float() @ b.float()

    for broken in (too_old, addmm_refuses_float32_out):
        monkeypatch.setattr(fused, "_products_in_float32", broken)
        assert not fused._products_work(cpu, torch.bfloat16)

    def working(a, b, out=None):
        product = a.float() @ b.float()
        return product if out is None else out.add_(product)

    monkeypatch.setattr(fused, "_products_in_float32", working)
    assert fused._products_work(cpu, torch.bfloat16)


@pytest.mark.parametrize("available", [True, False])
def test_compute_dtype_follows_the_probe(monkeypatch, available):
    monkeypatch.setattr(fused, "_low_precision_products", lambda device, dtype: available)
    hidden, weight = torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.bfloat16)
    assert fused._compute_dtype(hidden, weight) == (torch.bfloat16 if available else torch.float32)
    assert fused._compute_dtype(hidden.half(), weight.float()) == (torch.float16 if available else torch.float32)
    assert fused._compute_dtype(hidden.float(), weight.float()) == torch.float32


def test_fallback_gives_the_float32_branch_values(monkeypatch):
    """Without the calls (an older torch on a GPU), bf16 inputs take the float32 branch: the tested CPU path."""
    monkeypatch.setattr(fused, "_low_precision_products", lambda device, dtype: False)
    (loss_p, _, grads_p), (loss_f, _, grads_f) = _both(0.1, "dft", "forward", dtype=torch.bfloat16)
    assert torch.allclose(loss_f, loss_p, atol=1e-5)
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, atol=1e-2, rtol=1e-2)


def test_the_torch_floor_is_one_the_dependencies_accept():
    """`torch>=` in pyproject.toml is no lower than what transformers (which disables torch below its own floor) and
    the other dependencies require; below 2.10 the fused loss still runs (float32 products, tested above)."""
    pyproject = (tiny.REPO_ROOT / "pyproject.toml").read_text()
    floor = Version(re.search(r'"torch>=([0-9.]+)"', pyproject).group(1))
    for package in ("transformers", "trl", "accelerate", "peft"):
        for line in requires(package) or []:
            requirement = Requirement(line)
            if requirement.name == "torch":
                for spec in requirement.specifier:
                    if spec.operator == ">=":
                        assert floor >= Version(spec.version), f"{package} needs {line}; pyproject says >={floor}"

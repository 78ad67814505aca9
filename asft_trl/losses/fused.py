"""Chunked, fused ASFT loss: the loss and its gradients from hidden states and LM-head weights, never building the
[tokens x vocab] logits of the policy or the reference.

The scored positions are walked in chunks of `chunk_size` tokens. For each chunk, both heads are projected over the
full vocabulary in float32, the per-token task term, DFT weight and KL are computed, and the gradient with respect to
the chunk's hidden states (and, when trainable, the head weight and bias) is formed from the closed-form logit
gradient in the same pass (see docs/method.md):

    forward KL:  dL/dz = w (p - onehot(y)) + kl_coef (p - p_ref)
    reverse KL:  dL/dz = w (p - onehot(y)) + kl_coef p ((log p - log p_ref) - KL)
    k1/k2/k3:    dL/dz = (w - kl_coef k'(y)) (p - onehot(y))     k' = d estimate / d log p(y), `plain.kl_estimate`

so the backward pass only rescales stored gradients. A per-token estimator needs no reference softmax: only the
reference's log-probability of each target token, from a precomputed reference (no reference head at all) or from the
reference head's log-softmax at the target (its matmul and one normalising pass, no exp or sums over the vocabulary).
Peak extra memory is a few [chunk x vocab] float32 buffers plus the float32 gradients of the inputs, whatever the
sequence length and batch size.

`asft_trl.losses.plain` is the reference this module is tested against (loss and gradients). Like it, this module
knows nothing of models, trainers or processes: the caller selects the scored positions and passes the heads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .plain import (
    ESTIMATOR_LOG_RATIO_CLAMP,
    ESTIMATOR_VALUE_CLAMP,
    KL_DIRECTIONS,
    LOSS_TYPES,
    TokenTerms,
    _check_reference_arguments,
    dft_weight,
)
from .topk import TopKReference, complete_log_probs

# [chunk x vocab] float32 elements per buffer when `chunk_size` is not given: 64 MiB on CPU, 256 MiB on a GPU. Smaller
# chunks re-read the head weights (and the head's float32 gradient) more often, which dominates once the matrix
# products are thin
_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}


@dataclass(frozen=True)
class HeadTransform:
    """What a model's head does after `hidden @ weight.T + bias`: z = softcap * tanh(scale * y / softcap)."""

    logit_scale: float = 1.0
    softcap: float | None = None


def auto_chunk_size(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk when none is given: as many as fit a fixed [chunk x vocab] budget for the device."""
    budget = _AUTO_CHUNK_ELEMENTS.get(torch.device(device).type, _AUTO_CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(1, vocab_size))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype on a GPU, else a low-precision input's, multiplied into a float32 result
    where the device can (`_low_precision_products`: CUDA); elsewhere float32 throughout."""
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    else:
        low = [t.dtype for t in (hidden, weight) if t.dtype in (torch.bfloat16, torch.float16)]
        dtype = low[0] if low else torch.float32
    if dtype == torch.float32 or not _low_precision_products(hidden.device, dtype):
        return torch.float32
    return dtype


def _products_in_float32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for bf16/fp16 `a`, `b` (one dtype), accumulated and returned in float32; added into the float32 `out`
    when given. The low-precision branch's two calls, and its only ones: tests emulate them on the CPU."""
    if out is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)


@functools.cache
def _low_precision_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the loss multiplies `dtype` inputs in `dtype` on `device`: on CUDA, where the calls work."""
    return device.type == "cuda" and _products_work(device, dtype)


def _products_work(device: torch.device, dtype: torch.dtype) -> bool:
    """Try `_products_in_float32` once on `device`.

    `torch.mm`/`torch.addmm` take `out_dtype` from torch 2.8 (pytorch#150812), with CUDA kernels only; `addmm` takes a
    float32 `self`/`out` with low-precision inputs from torch 2.10 (pytorch#167931). Where the calls fail, the loss
    multiplies in float32 instead: the same values, at the cost of a float32 copy of each head while it runs.
    """
    try:
        with torch.autocast(device.type, enabled=False):
            a = torch.ones(2, 2, dtype=dtype, device=device)
            out = torch.ones(2, 2, dtype=torch.float32, device=device)
            added = _products_in_float32(a, a, out)
            product = _products_in_float32(a, a)
        return (
            added is out
            and product.dtype == out.dtype == torch.float32
            and bool((out == 3).all())
            and bool((product == 2).all())
        )
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b as float32, computed in `dtype` (products never rounded to it); added into `out` when given."""
    if dtype == torch.float32:
        a, b = a.float(), b.float()
        return a @ b if out is None else out.addmm_(a, b)
    return _products_in_float32(a.to(dtype), b.to(dtype), out)


def _project(hidden, weight, bias, dtype) -> torch.Tensor:
    out = _mm(hidden, weight.t(), dtype)
    if bias is not None:
        out += bias.float()
    return out


def _transform(y: torch.Tensor, head: HeadTransform) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the head transform in place; return the logits and tanh (kept for the gradient) when soft-capping."""
    if head.logit_scale != 1.0:
        y.mul_(head.logit_scale)
    if head.softcap is None:
        return y, None
    t = y.div_(head.softcap).tanh_()
    return t * head.softcap, t


def head_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, head: HeadTransform = HeadTransform()
) -> torch.Tensor:
    """float32 log-probabilities [n, V] of a head over rows of hidden states (for a chunk: callers bound n)."""
    z, _ = _transform(_project(hidden, weight, bias, _compute_dtype(hidden, weight)), head)
    return torch.log_softmax(z, dim=-1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] * b[i, v] without a [rows x vocab] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(-1)).view(-1)


def _kl_estimate_with_slope(
    token_log_p: torch.Tensor, ref_token_log_p: torch.Tensor, estimator: str, kl_direction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`plain.kl_estimate` (the same operations, so the same values) and its derivative with respect to
    `token_log_p`, which is zero past either clamp, as autograd gives it for the clamped function."""
    log_ratio = token_log_p - ref_token_log_p
    raw = log_ratio if kl_direction == "forward" else -log_ratio
    u = raw.clamp(-ESTIMATOR_LOG_RATIO_CLAMP, ESTIMATOR_LOG_RATIO_CLAMP)
    if estimator == "k1":
        value, slope = -u, torch.full_like(u, -1.0)
    elif estimator == "k2":
        value, slope = 0.5 * u * u, u
    else:
        slope = torch.expm1(u)
        value = slope - u
    low = -ESTIMATOR_VALUE_CLAMP if estimator == "k1" else 0.0
    kept = (raw >= -ESTIMATOR_LOG_RATIO_CLAMP) & (raw <= ESTIMATOR_LOG_RATIO_CLAMP)
    kept &= (value >= low) & (value <= ESTIMATOR_VALUE_CLAMP)
    slope = torch.where(kept, slope if kl_direction == "forward" else -slope, 0.0)
    return value.clamp(low, ESTIMATOR_VALUE_CLAMP), slope


def _forward_kl_and_logit_grad(p, log_p, log_q, weight_t, kl_coef):
    """Forward KL(q || p) per token and dL/dz = (w + kl_coef) p - kl_coef q, before the target's column loses w.

    KL = sum q log q - sum q log p, exactly 0 when the two heads agree; clamped at 0 per token against rounding. The
    gradient is written into `p` (no new [chunk x vocab] buffer)."""
    q = log_q.exp()
    kl = (_rowdot(q, log_q) - _rowdot(q, log_p)).clamp_min_(0)
    grad = p.mul_((weight_t + kl_coef).unsqueeze(-1)).sub_(q, alpha=kl_coef)
    return kl, grad


def _reverse_kl_and_logit_grad(p, log_p, neg_entropy, log_q, weight_t, kl_coef):
    """Reverse KL(p || q) per token and dL/dz = p (kl_coef ((log p - log q) - KL) + w), before the target's column
    loses w.

    KL = sum p log p - sum p log q (`neg_entropy` is sum p log p), clamped at 0 per token; the gradient uses the
    unclamped value, as autograd does for the plain loss. It is written into `log_q`'s buffer."""
    q = log_q.exp()
    kl_textbook = neg_entropy - _rowdot(p, log_q)
    kl = kl_textbook.clamp_min(0)
    del q
    grad = torch.sub(log_p, log_q, out=log_q)
    grad.sub_(kl_textbook.unsqueeze(-1)).mul_(kl_coef).add_(weight_t.unsqueeze(-1)).mul_(p)
    return kl, grad


@dataclass(frozen=True)
class _ChunkOptions:
    """The settings of one `_ChunkedASFT` call that are not tensors (autograd passes them through untouched)."""

    kl_coef: float
    loss_type: str
    dft_weight_floor: float
    kl_direction: str
    head: HeadTransform
    ref_head: HeadTransform
    chunk_size: int
    grad_enabled: bool  # whether gradients are formed (not under no_grad, i.e. evaluation)
    dtype: torch.dtype  # of the policy head's matrix products
    ref_dtype: torch.dtype | None  # of the reference head's, when a live reference head is given
    kl_estimator: str


class _ChunkedASFT(torch.autograd.Function):
    """sum_t (task_t + kl_coef * kl_t) for the scored tokens, with the gradients computed during the forward."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        topk_ids,
        topk_log_probs,
        topk_tail,
        ref_token_log_probs,
        labels,
        options: _ChunkOptions,
    ):
        kl_coef, loss_type, floor = options.kl_coef, options.loss_type, options.dft_weight_floor
        kl_direction, kl_estimator, chunk_size = options.kl_direction, options.kl_estimator, options.chunk_size
        head, ref_head, dtype, ref_dtype = options.head, options.ref_head, options.dtype, options.ref_dtype
        grad_enabled = options.grad_enabled
        n = hidden.shape[0]
        device = hidden.device
        # `needs_input_grad` is set under no_grad too (evaluation): no gradients are formed there
        needs_hidden, needs_weight, needs_bias = (grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        # Measured even when kl_coef is 0 (a warm-up), so that it can be logged
        topk = None if topk_ids is None else TopKReference(topk_ids, topk_log_probs, topk_tail)
        use_ref = ref_hidden is not None or topk is not None or ref_token_log_probs is not None

        grad_hidden = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, device=device, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, device=device, dtype=torch.float32) if needs_bias else None
        # Cast once here rather than once per chunk (a no-op when the weights already have the compute dtype)
        w_mm = weight.to(dtype)
        w_ref_mm = ref_weight.to(ref_dtype) if ref_hidden is not None else None

        per_token = {k: torch.zeros(n, device=device, dtype=torch.float32) for k in ("nll", "kl", "entropy")}
        is_top1 = torch.zeros(n, device=device, dtype=torch.bool)
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        rows_all = torch.arange(min(n, chunk_size), device=device)

        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            rows, y = rows_all[: end - start], labels[start:end]
            h = hidden[start:end]

            # Element-wise passes over [chunk x vocab] dominate on CPU: the sums below are row dot products, and
            # every buffer is written once
            z, tanh_p = _transform(_project(h, w_mm, bias, dtype), head)
            log_p = torch.log_softmax(z, dim=-1)
            del z
            token_log_p = log_p[rows, y]
            is_top1[start:end] = log_p.argmax(-1) == y
            p = log_p.exp()
            neg_entropy = _rowdot(p, log_p)
            per_token["entropy"][start:end] = -neg_entropy
            per_token["nll"][start:end] = -token_log_p
            weight_t = dft_weight(token_log_p, loss_type, floor)
            loss_sum += (weight_t * -token_log_p).sum()

            # grad becomes dL/dz for the chunk; `onehot_coef` is what the target's column loses
            onehot_coef = weight_t
            if use_ref and kl_estimator != "full":
                if ref_token_log_probs is not None:
                    ref_token_log_p = ref_token_log_probs[start:end].float()
                else:
                    z_ref, _ = _transform(
                        _project(ref_hidden[start:end], w_ref_mm, ref_bias, w_ref_mm.dtype), ref_head
                    )
                    ref_token_log_p = torch.log_softmax(z_ref, dim=-1)[rows, y]
                    del z_ref
                kl, slope = _kl_estimate_with_slope(token_log_p, ref_token_log_p, kl_estimator, kl_direction)
                per_token["kl"][start:end] = kl
                loss_sum += kl_coef * kl.sum()
                # dL/dz = (w - kl_coef k') (p - onehot(y))
                onehot_coef = weight_t - kl_coef * slope
                grad = p.mul_(onehot_coef.unsqueeze(-1))
            elif use_ref:
                if topk is None:
                    z_ref, _ = _transform(
                        _project(ref_hidden[start:end], w_ref_mm, ref_bias, w_ref_mm.dtype), ref_head
                    )
                    log_q = torch.log_softmax(z_ref, dim=-1)
                    del z_ref
                else:  # top-k + tail: the tail filled in the policy's shape (see `asft_trl.losses.topk`)
                    log_q = complete_log_probs(log_p, topk.rows(start, end))
                if kl_direction == "forward":
                    kl, grad = _forward_kl_and_logit_grad(p, log_p, log_q, weight_t, kl_coef)
                else:
                    kl, grad = _reverse_kl_and_logit_grad(p, log_p, neg_entropy, log_q, weight_t, kl_coef)
                del log_q, p
                per_token["kl"][start:end] = kl
                loss_sum += kl_coef * kl.sum()
            else:
                grad = p.mul_(weight_t.unsqueeze(-1))
            del log_p
            grad[rows, y] -= onehot_coef

            if tanh_p is not None:
                grad.mul_(1 - tanh_p * tanh_p)
            if head.logit_scale != 1.0:
                grad.mul_(head.logit_scale)
            if grad_hidden is not None:
                grad_hidden[start:end] = _mm(grad, w_mm, dtype)
            if grad_weight is not None:
                _mm(grad.t(), h, dtype, out=grad_weight)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            del grad, tanh_p

        ctx.save_for_backward(*(torch.empty(0) if g is None else g for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.consumed = False
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(per_token["nll"], per_token["kl"], per_token["entropy"], is_top1)
        return loss_sum, per_token["nll"], per_token["kl"], per_token["entropy"], is_top1

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.consumed:
            raise RuntimeError("The chunked ASFT loss stores its gradients once; it can't be backpropagated twice.")
        ctx.consumed = True
        grads = []
        for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            # In place: a second weight-sized buffer would raise the peak memory of full fine-tuning
            grads.append(saved.mul_(grad_loss).to(dtype) if saved.numel() else None)
        return (*grads, None, None, None, None, None, None, None, None, None)


def chunked_asft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    head: HeadTransform = HeadTransform(),
    ref_head: HeadTransform | None = None,
    kl_coef: float = 0.05,
    loss_type: str = "dft",
    kl_direction: str = "forward",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    dft_weight_floor: float = 0.0,
    ref_topk: TopKReference | None = None,
    kl_estimator: str = "full",
    ref_token_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TokenTerms]:
    """The ASFT loss, (sum_t task_t + kl_coef * kl_t) / num_items_in_batch, from hidden states and head weights.

    Args:
        hidden: [N, H] final hidden states of the policy at the scored positions (with grad).
        weight: [V, H] the policy's LM-head weight; gets a gradient when it requires one (full fine-tuning).
        labels: [N] target token ids (select the scored positions first: no ignore index).
        ref_hidden: [N, H] the reference's final hidden states at the same positions (no grad needed).
        ref_weight: [V, H] the reference's LM-head weight (under LoRA: the policy's own head).
        bias, ref_bias: [V] head biases, if the heads have them.
        head, ref_head: what each head does to its logits after the matmul (scaling, soft-capping).
            `ref_head` defaults to `head`.
        kl_coef, loss_type, kl_direction, num_items_in_batch, dft_weight_floor: as in `asft_trl.losses.asft_loss`
            (with a reference the KL is measured even when `kl_coef` is 0).
        chunk_size: tokens per chunk; default from a fixed [chunk x vocab] budget (`auto_chunk_size`).
        ref_topk: instead of `ref_hidden`/`ref_weight`, a precomputed reference (top-k + tail) at the N tokens.
        kl_estimator: "full" (the exact KL) or a per-token estimator "k1" / "k2" / "k3", as in
            `asft_trl.losses.asft_loss`.
        ref_token_log_probs: [N] instead of `ref_hidden`/`ref_weight`, the reference's log-probability of each target
            token (a precomputed reference for a per-token estimator).

    Returns the loss and per-token `TokenTerms`; here every term is detached (the gradient flows through the loss).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}.")
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction={kl_direction!r} is not one of {KL_DIRECTIONS}.")
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef} is negative; it must be >= 0.")
    if ref_topk is not None or ref_token_log_probs is not None:
        if ref_hidden is not None or ref_weight is not None:
            stored = "`ref_topk`" if ref_topk is not None else "`ref_token_log_probs`"
            raise ValueError(f"Give the reference as `ref_hidden`/`ref_weight` or as {stored}, not both.")
        if ref_topk is not None and len(ref_topk) != hidden.shape[0]:
            raise ValueError(f"`ref_topk` holds {len(ref_topk)} tokens but there are {hidden.shape[0]} to score.")
    elif kl_coef > 0 and (ref_hidden is None or ref_weight is None):
        raise ValueError("kl_coef > 0 needs `ref_hidden` and `ref_weight` (or `ref_topk` / `ref_token_log_probs`).")
    _check_reference_arguments(
        ref_hidden, ref_topk, ref_token_log_probs, kl_estimator, hidden.shape[0], live_name="ref_hidden"
    )
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("`ref_hidden` and `ref_weight` go together: give both or neither.")
    if ref_hidden is not None:
        if ref_weight.shape != weight.shape or ref_hidden.shape != hidden.shape:
            raise ValueError(
                f"The reference's head {tuple(ref_weight.shape)} / hidden states {tuple(ref_hidden.shape)} do not match "
                f"the policy's {tuple(weight.shape)} / {tuple(hidden.shape)}."
            )
        ref_hidden = ref_hidden.detach()
        ref_weight = ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0], hidden.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    options = _ChunkOptions(
        kl_coef=float(kl_coef),
        loss_type=loss_type,
        dft_weight_floor=float(dft_weight_floor),
        kl_direction=kl_direction,
        head=head,
        ref_head=ref_head or head,
        chunk_size=int(chunk_size),
        grad_enabled=torch.is_grad_enabled(),
        dtype=_compute_dtype(hidden, weight),
        ref_dtype=None if ref_weight is None else _compute_dtype(hidden, ref_weight),
        kl_estimator=kl_estimator,
    )
    # The float32 math must not be recast by an enclosing autocast; the matmul dtype was chosen above
    with torch.autocast(hidden.device.type, enabled=False):
        topk = (None, None, None) if ref_topk is None else (ref_topk.ids, ref_topk.log_probs, ref_topk.tail_log_prob)
        loss_sum, nll, kl, entropy, is_top1 = _ChunkedASFT.apply(
            hidden,
            weight,
            bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            *topk,
            None if ref_token_log_probs is None else ref_token_log_probs.detach(),
            labels.long(),
            options,
        )
    weight_t = dft_weight(-nll, loss_type, dft_weight_floor)
    denominator = labels.numel() if num_items_in_batch is None else num_items_in_batch
    loss = loss_sum / torch.as_tensor(denominator, device=loss_sum.device).clamp(min=1)
    return loss, TokenTerms(task=weight_t * nll, kl=kl, nll=nll, weight=weight_t, entropy=entropy, is_top1=is_top1)

"""Torch reference of `fastrl.ops.token_logprobs`: token statistics of a softmax, in row chunks.

The CPU path, the test oracle of the Triton kernels (`triton_kernels/logprobs.py`) and the
benchmark baseline. It accumulates in fp32 and keeps memory bounded: the statistics are computed
over row chunks of the `(N, V)` logits, so no fp32 copy of the whole logits matrix ever exists.

With z = logits / T, lse = log Σ_j exp(z_j), log p = z − lse:
    logprob   = log p_y = z_y − lse
    entropy   H = −Σ_j p_j log p_j
    gradients d logprob / dz_j = 1[j = y] − p_j
              d H / dz_j       = −p_j (log p_j + H)
    and d/dlogits = (d/dz) / T. Rows whose label is `ignore_index` give 0 and no gradient.
The inputs arrive checked by `fastrl.ops.token_logprobs`; the outputs are a plain tuple that it
wraps into a `TokenStats`. The chunk helpers here are shared with `ref_fused_linear.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Bytes of the fp32 copy of one row chunk of logits. The chunk also needs about three temporaries
# of this size (log p, p and the gradient), so the working set stays a small multiple of it.
FP32_CHUNK_BYTES = 64 * 2**20

_FP32_MIN = torch.finfo(torch.float32).min


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 chunk of logits takes about `FP32_CHUNK_BYTES`."""
    return max(1, FP32_CHUNK_BYTES // (4 * max(vocab_size, 1)))


def chunk_forward(
    z: Tensor,
    labels: Tensor,
    ignore_index: int,
    with_entropy: bool,
    control_ids: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Statistics of one chunk of scaled fp32 logits `z` `[C, V]`, which it overwrites.

    Returns `lse [C]`, `logprobs [C]`, `entropy [C]` or None, `control_probs [C, K]` or None.
    """
    valid = labels != ignore_index  # [C]
    lse = torch.logsumexp(z, dim=-1)  # [C]
    logp = z.sub_(lse[:, None])  # [C, V]
    label_logp = logp.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)  # [C]
    label_logp = torch.where(valid, label_logp, 0.0)  # [C]
    probs = logp.exp()  # [C, V]
    control = probs.index_select(1, control_ids) if control_ids is not None else None  # [C, K]
    entropy = None
    if with_entropy:
        # Clamping keeps 0 · log 0 = 0 for vocabulary entries masked with −inf.
        plogp = probs.mul_(logp.clamp_(min=_FP32_MIN))  # [C, V]
        entropy = torch.where(valid, -plogp.sum(dim=-1), 0.0)  # [C]
    return lse, label_logp, entropy, control


def chunk_grad_z(
    z: Tensor,
    labels: Tensor,
    ignore_index: int,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logprobs: Tensor | None,
    grad_entropy: Tensor | None,
) -> Tensor:
    """Gradient with respect to the scaled logits `z` `[C, V]` (overwritten and returned)."""
    valid = labels != ignore_index  # [C]
    rows = z.shape[0]
    g_lp = z.new_zeros(rows) if grad_logprobs is None else grad_logprobs.float()  # [C]
    g_lp = torch.where(valid, g_lp, 0.0)  # [C]
    logp = z.sub_(lse[:, None])  # [C, V]
    probs = logp.exp()  # [C, V]
    if grad_entropy is not None and entropy is not None:
        g_h = torch.where(valid, grad_entropy.float(), 0.0)  # [C]
        # coefficient of −p_j: g_lp + g_H (log p_j + H)
        coef = logp.clamp_(min=_FP32_MIN).add_(entropy[:, None]).mul_(g_h[:, None])  # [C, V]
        coef.add_(g_lp[:, None])
    else:
        coef = logp.copy_(g_lp[:, None].expand_as(logp))  # [C, V]
    grad_z = coef.mul_(probs).neg_()  # [C, V]
    # Where p_j = 0 (a −inf logit) the gradient is 0, as in the kernel: with |g_H| > 1 the
    # clamped log p_j times g_H overflows to ±inf, and inf · 0 would be NaN.
    grad_z.masked_fill_(probs == 0, 0.0)
    grad_z.scatter_add_(1, torch.where(valid, labels, 0)[:, None], g_lp[:, None])
    return grad_z


def scaled_chunk(logits_chunk: Tensor, temperature: float) -> Tensor:
    """A fresh fp32 copy of one chunk divided by the temperature `[C, V]`."""
    z = logits_chunk.to(torch.float32, copy=True)  # [C, V]
    return z.div_(temperature) if temperature != 1.0 else z


def empty_f32(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        labels: Tensor,
        temperature: float,
        with_entropy: bool,
        control_ids: Tensor | None,
        ignore_index: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, vocab = logits.shape
        rows = chunk_rows(vocab)
        lse = logits.new_empty(n, dtype=torch.float32)  # [N]
        logprobs = torch.empty_like(lse)  # [N]
        entropy = torch.empty_like(lse) if with_entropy else empty_f32(logits)  # [N]
        k = 0 if control_ids is None else control_ids.numel()
        control = logits.new_empty(n if control_ids is not None else 0, k, dtype=torch.float32)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = scaled_chunk(logits[start:end], temperature)  # [C, V]
            stats = chunk_forward(z, labels[start:end], ignore_index, with_entropy, control_ids)
            lse[start:end], logprobs[start:end] = stats[0], stats[1]
            if stats[2] is not None:
                entropy[start:end] = stats[2]
            if stats[3] is not None:
                control[start:end] = stats[3]
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(control)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, control

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None, _grad_control):
        logits, labels, lse, entropy = ctx.saved_tensors
        n, vocab = logits.shape
        rows = chunk_rows(vocab)
        has_entropy = entropy.numel() == n and grad_entropy is not None
        grad_logits = torch.empty_like(logits)  # [N, V]
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = scaled_chunk(logits[start:end], ctx.temperature)  # [C, V]
            grad_z = chunk_grad_z(
                z,
                labels[start:end],
                ctx.ignore_index,
                lse[start:end],
                entropy[start:end] if has_entropy else None,
                None if grad_logprobs is None else grad_logprobs[start:end],
                grad_entropy[start:end] if has_entropy else None,
            )
            grad_logits[start:end] = grad_z.div_(ctx.temperature)
        return grad_logits, None, None, None, None, None


def optional_outputs(
    logprobs: Tensor, entropy: Tensor, control: Tensor, with_entropy: bool, has_control: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The Function's outputs, with None for the statistics that were not asked for."""
    return logprobs, entropy if with_entropy else None, control if has_control else None


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    control_ids: Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probability of each label, entropy and control-token probabilities, chunked over rows.

    Args:
        logits: `(N, V)` logits of any float dtype; only one fp32 row chunk exists at a time.
        labels: `(N,)` int64 target ids; rows equal to `ignore_index` give 0 and no gradient.
        temperature: the logits are divided by it (> 0).
        with_entropy: compute the entropy (it carries gradient like the logprobs).
        control_ids: `(K,)` int64 ids on the logits' device whose probabilities are returned,
            detached, or None.
        ignore_index: label value of rows to skip.

    Returns:
        `logprobs (N,)`, `entropy (N,)` or None, `control_probs (N, K)` or None, all float32.
    """
    logprobs, entropy, control = _TokenLogprobsFunction.apply(
        logits, labels, float(temperature), with_entropy, control_ids, ignore_index
    )
    return optional_outputs(logprobs, entropy, control, with_entropy, control_ids is not None)

"""Fused LM head + token statistics: `token_logprobs(hidden @ weight.T, ...)` in row chunks.

The Triton backend of `fastrl.ops.fused_linear_token_logprobs`, which checks the inputs and wraps
the returned tuple; the torch reference is `fastrl/ops/ref_fused_linear.py`. The op returns
logprobs and entropy whose loss gradient is only known later (the policy loss runs after it), so
the gradient cannot be produced during the forward as a fused cross-entropy would. Instead:

Forward, per chunk of C rows: logits = hidden_chunk @ weight.T by a torch matmul (cuBLAS on GPU)
in the input dtype with fp32 accumulation, written into one reused `(C, V)` buffer, then the Triton
row kernel of `logprobs.py` (one online-softmax pass) for lse, logprob, entropy and control
probabilities. Saved for backward: hidden, weight, labels, lse `(N,)` and entropy `(N,)`; never
the logits.

Backward, per chunk: recompute the logits into the buffer, run the Triton backward kernel in place
(the buffer becomes d(logits), combining the logprob and entropy gradients), then
d(hidden)_chunk = d(logits) @ weight and d(weight) += d(logits).T @ hidden_chunk, accumulated in
fp32 (cuBLAS fp32 output from bf16/fp16 inputs on GPU) and cast to the weight dtype at the end.

FLOPs: forward 2·N·H·V; backward 2·N·H·V (recompute) + 4·N·H·V (the two gradient matmuls), so
8·N·H·V in all against 6·N·H·V for an unfused head that keeps the `(N, V)` logits. Memory: one
`(C, V)` chunk in the input dtype, plus an fp32 `(V, H)` weight-gradient accumulator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .logprobs import _empty, new_stats, stats_backward, stats_forward

__all__ = ["default_chunk_rows", "fused_linear_token_logprobs"]

# Bytes of the one reused `(C, V)` logits buffer, in the input dtype. Large chunks keep the two
# backward matmuls compute bound; at V = 152k and bf16 this is about 880 rows.
CHUNK_BUFFER_BYTES = 256 * 2**20


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: about `CHUNK_BUFFER_BYTES` of logits, a multiple of 128 when that large."""
    rows = max(1, CHUNK_BUFFER_BYTES // (dtype.itemsize * max(vocab, 1)))
    return rows - rows % 128 if rows >= 128 else rows


def _accumulate_weight_grad(grad_weight: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """`grad_weight (V, H) fp32 += grad_logits.T (V, C) @ hidden (C, H)`."""
    if hidden.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.T, hidden)
    elif hidden.device.type == "cuda":
        try:  # fp32 output straight from the half-precision GEMM (torch >= 2.8)
            torch.addmm(
                grad_weight, grad_logits.T, hidden, out_dtype=torch.float32, out=grad_weight
            )
        except (RuntimeError, TypeError):
            grad_weight.add_(grad_logits.T @ hidden)
    else:
        grad_weight.addmm_(grad_logits.T.float(), hidden.float())


class _FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        temperature: float,
        with_entropy: bool,
        control_ids: Tensor | None,
        ignore_index: int,
        rows: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        lse, logprobs, entropy, control = new_stats(n, with_entropy, control_ids, hidden.device)
        buffer = _empty((min(rows, n), vocab), hidden.dtype, hidden.device)  # [C, V]
        for start in range(0, n, rows):
            end = min(start + rows, n)
            logits = torch.mm(hidden[start:end], weight.T, out=buffer[: end - start])  # [c, V]
            stats_forward(
                logits,
                labels[start:end],
                lse[start:end],
                logprobs[start:end],
                entropy[start:end] if with_entropy else None,
                control_ids,
                control[start:end] if control_ids is not None else None,
                temperature,
                ignore_index,
            )
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.with_entropy = with_entropy
        ctx.rows = rows
        ctx.mark_non_differentiable(control)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, control

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None, _grad_control):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = ctx.rows
        grad_hidden = (
            _empty(tuple(hidden.shape), hidden.dtype, hidden.device) if need_hidden else None
        )
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_weight
            else None
        )  # [V, H]
        buffer = _empty((min(rows, n), vocab), hidden.dtype, hidden.device)  # [C, V]
        for start in range(0, n, rows):
            end = min(start + rows, n)
            h = hidden[start:end]  # [c, H]
            logits = torch.mm(h, weight.T, out=buffer[: end - start])  # [c, V]
            stats_backward(
                logits,
                logits,  # in place: the buffer becomes d(logits)
                labels[start:end],
                lse[start:end],
                entropy[start:end] if ctx.with_entropy else None,
                None if grad_logprobs is None else grad_logprobs[start:end],
                None if grad_entropy is None or not ctx.with_entropy else grad_entropy[start:end],
                ctx.temperature,
                ctx.ignore_index,
            )
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, logits, h)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    control_ids: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`token_logprobs(hidden @ weight.T, ...)` holding one row chunk of logits at a time (Triton).

    Args:
        hidden: `(N, H)` final hidden states.
        weight: `(V, H)` LM-head weight, same dtype as `hidden`.
        labels: `(N,)` int64 target ids.
        chunk_size: rows per chunk (>= 1); by default `default_chunk_rows`.
        temperature, with_entropy, control_ids, ignore_index: as in `logprobs.token_logprobs`.

    Returns:
        `logprobs (N,)`, `entropy (N,)` or None, `control_probs (N, K)` or None, all float32.
    """
    vocab = weight.shape[0]
    rows = chunk_size if chunk_size is not None else default_chunk_rows(vocab, hidden.dtype)
    labels = labels.to(device=hidden.device, dtype=torch.long).contiguous()
    logprobs, entropy, control = _FusedLinearTokenLogprobsFunction.apply(
        hidden, weight, labels, float(temperature), with_entropy, control_ids, ignore_index, rows
    )
    return logprobs, entropy if with_entropy else None, control if control_ids is not None else None

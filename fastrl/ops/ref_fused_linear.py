"""Torch reference of `fastrl.ops.fused_linear_token_logprobs`: the LM head in row chunks.

The CPU path, the test oracle of `triton_kernels/fused_linear.py` and the benchmark baseline. Each
row chunk's logits are computed, turned into token statistics by the chunk helpers of
`ref_logprobs.py`, and dropped; the backward recomputes them, so the `(N, V)` logits never exist.
The inputs arrive checked by `fastrl.ops.fused_linear_token_logprobs`; the outputs are a plain
tuple.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrl.ops.ref_logprobs import (
    chunk_forward,
    chunk_grad_z,
    chunk_rows,
    empty_f32,
    optional_outputs,
    scaled_chunk,
)


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
        n = hidden.shape[0]
        lse = hidden.new_empty(n, dtype=torch.float32)  # [N]
        logprobs = torch.empty_like(lse)  # [N]
        entropy = torch.empty_like(lse) if with_entropy else empty_f32(hidden)  # [N]
        k = 0 if control_ids is None else control_ids.numel()
        control = hidden.new_empty(n if control_ids is not None else 0, k, dtype=torch.float32)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = scaled_chunk(hidden[start:end] @ weight.T, temperature)  # [C, V]
            stats = chunk_forward(z, labels[start:end], ignore_index, with_entropy, control_ids)
            lse[start:end], logprobs[start:end] = stats[0], stats[1]
            if stats[2] is not None:
                entropy[start:end] = stats[2]
            if stats[3] is not None:
                control[start:end] = stats[3]
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.rows = rows
        ctx.mark_non_differentiable(control)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, control

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None, _grad_control):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n = hidden.shape[0]
        has_entropy = entropy.numel() == n and grad_entropy is not None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, n, ctx.rows):
            end = min(start + ctx.rows, n)
            h = hidden[start:end]  # [C, H]
            z = scaled_chunk(h @ weight.T, ctx.temperature)  # [C, V]
            grad_z = chunk_grad_z(
                z,
                labels[start:end],
                ctx.ignore_index,
                lse[start:end],
                entropy[start:end] if has_entropy else None,
                None if grad_logprobs is None else grad_logprobs[start:end],
                grad_entropy[start:end] if has_entropy else None,
            ).div_(ctx.temperature)  # [C, V] gradient w.r.t. the logits
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_z.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.T, h.float())  # [V, H]
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
    """`token_logprobs(hidden @ weight.T, ...)` without materialising the `(N, V)` logits.

    Each row chunk's logits are computed by a matmul in the input dtype (fp32 accumulation,
    rounded to that dtype as an unfused LM head would be) and upcast to fp32. The backward
    recomputes them per chunk and accumulates the weight gradient in fp32.

    Args:
        hidden: `(N, H)` final hidden states.
        weight: `(V, H)` LM-head weight.
        labels: `(N,)` int64 target ids.
        chunk_size: rows per chunk (>= 1); by default about `FP32_CHUNK_BYTES` of fp32 logits.
        temperature, with_entropy, control_ids, ignore_index: as in `ref_logprobs.token_logprobs`.

    Returns:
        `logprobs (N,)`, `entropy (N,)` or None, `control_probs (N, K)` or None, all float32.
    """
    rows = chunk_size if chunk_size is not None else chunk_rows(weight.shape[0])
    logprobs, entropy, control = _FusedLinearTokenLogprobsFunction.apply(
        hidden, weight, labels, float(temperature), with_entropy, control_ids, ignore_index, rows
    )
    return optional_outputs(logprobs, entropy, control, with_entropy, control_ids is not None)

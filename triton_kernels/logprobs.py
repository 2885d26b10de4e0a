"""Triton token statistics: label logprob, entropy and control-token probabilities of a softmax.

The Triton backend of `fastrl.ops.token_logprobs`, which checks the inputs and wraps the returned
tuple; the torch reference is `fastrl/ops/ref_logprobs.py`. With z = logits / T,
lse = log Σ_j exp(z_j) and log p = z − lse,

    logprob = z_y − lse,  entropy H = −Σ_j p_j log p_j = lse − Σ_j p_j z_j,
    d logprob / dz_j = 1[j = y] − p_j,  dH / dz_j = −p_j (log p_j + H),  d/dlogits = (d/dz) / T.

Forward: one program per row, one pass over the vocabulary in blocks of `BLOCK_V` with an online
softmax (running max m, s = Σ exp(z − m), t = Σ exp(z − m)(z − m)), so lse = m + log s and
H = log s − t / s. The label logit and the K control logits are read once more after the pass
(scattered loads of one row, which is still in L2) and turned into log p / p with lse.
Saved for backward: the logits (copied only if their column stride is not 1), labels,
lse `(N,)` and entropy `(N,)`.

Backward: one program per row reads the logits once more and writes d(logits) once, combining the
logprob and the entropy gradients; `inplace_backward=True` writes it into the logits buffer
(no `(N, V)` allocation; the caller must not need the logits afterwards).

Rows whose label is `ignore_index` get logprob 0, entropy 0 and zero gradient, but their control
probabilities are computed (probe positions need not carry a label). Their logits are not read
(forward without control ids, and backward, which only writes their zero gradient). All
statistics are accumulated in fp32 whatever the logits dtype; the gradient has the logits dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["block_size", "token_logprobs"]

# Vocabulary block of one loop step: large on GPU (memory bound, few loop steps), small under the
# Triton interpreter (CPU tensors) so that tests exercise several blocks and tails cheaply.
GPU_BLOCK_V = 4096
INTERPRET_BLOCK_V = 256

_FP32_MIN = tl.constexpr(-3.4028234663852886e38)  # torch.finfo(torch.float32).min
# Initial running max: finite, so that exp(m − m_new) and (m − m_new)·s stay NaN-free.
_INIT_MAX = tl.constexpr(-3.0e38)


def block_size(vocab: int, device: torch.device) -> int:
    """Vocabulary block: a power of two, at most `GPU_BLOCK_V` (`INTERPRET_BLOCK_V` off CUDA)."""
    cap = GPU_BLOCK_V if device.type == "cuda" else INTERPRET_BLOCK_V
    return max(16, min(cap, triton.next_power_of_2(max(vocab, 1))))


def _launch_opts(block: int, device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    return {"num_warps": 8 if block >= 2048 else 4}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every kernel output (a seam the tests use to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    lse_ptr,
    logprobs_ptr,
    entropy_ptr,
    control_ids_ptr,
    control_ptr,
    V,
    K,
    ignore_index,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    HAS_CONTROL: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    # Ignored rows are read only for their control probabilities (an empty range otherwise).
    read_end = V if HAS_CONTROL else tl.where(valid, V, 0)

    m = tl.full([], _INIT_MAX, tl.float32)  # running max of z
    s = tl.zeros([], tl.float32)  # Σ exp(z − m)
    t = tl.zeros([], tl.float32)  # Σ exp(z − m)(z − m)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf"))
        z = z.to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if WITH_ENTROPY:
            d = tl.where(e > 0.0, z - m_new, 0.0)  # 0 · log 0 = 0 for −inf logits and tails
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * d, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    s = tl.where(s > 0.0, s, 1.0)  # rows not read (or all −inf) give finite, unused values
    log_s = tl.log(s)
    lse = m + log_s
    if HAS_CONTROL:
        tl.store(lse_ptr + row, lse)
    else:
        tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))

    in_range = valid & (label >= 0) & (label < V)
    # An out-of-range label is not read (no illegal access); it gives logprob −inf.
    z_label = tl.load(row_ptr + label, mask=in_range, other=float("-inf")).to(tl.float32)
    tl.store(logprobs_ptr + row, tl.where(valid, z_label * inv_temp - lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_s - t / s, 0.0))

    if HAS_CONTROL:
        koffs = tl.arange(0, BLOCK_K)
        kmask = koffs < K
        ids = tl.load(control_ids_ptr + koffs, mask=kmask, other=0)
        z_ctrl = tl.load(row_ptr + ids, mask=kmask, other=0.0).to(tl.float32) * inv_temp
        tl.store(control_ptr + row * K + koffs, tl.exp(z_ctrl - lse), mask=kmask)


@triton.jit
def _token_stats_bwd_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    grad_stride_row,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    V,
    ignore_index,
    inv_temp,
    HAS_GRAD_LOGPROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * grad_stride_row
    offs = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    g_lp = tl.zeros([], tl.float32)
    if HAS_GRAD_LOGPROBS:
        g_lp = tl.where(valid, tl.load(grad_logprobs_ptr + row).to(tl.float32), 0.0)
    g_h = tl.zeros([], tl.float32)
    entropy = tl.zeros([], tl.float32)
    if HAS_GRAD_ENTROPY:
        g_h = tl.where(valid, tl.load(grad_entropy_ptr + row).to(tl.float32), 0.0)
        entropy = tl.load(entropy_ptr + row)

    read_end = tl.where(valid, V, 0)  # ignored rows only get zeros written: nothing is read
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=cols < read_end, other=0.0).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        # d/dz_j = 1[j = y] g_lp − p_j (g_lp + g_H (log p_j + H))
        if HAS_GRAD_ENTROPY:
            coef = g_lp + g_h * (tl.maximum(logp, _FP32_MIN) + entropy)
        else:
            coef = g_lp
        grad = tl.where(p > 0.0, -p * coef, 0.0) + tl.where(cols == label, g_lp, 0.0)
        grad = tl.where(valid, grad * inv_temp, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers (shared with fused_linear.py)
# --------------------------------------------------------------------------------------------


def stats_forward(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    logprobs: Tensor,
    entropy: Tensor | None,
    control_ids: Tensor | None,
    control: Tensor | None,
    temperature: float,
    ignore_index: int,
) -> None:
    """Fill `lse`, `logprobs`, `entropy` and `control` `(N,)`/`(N, K)` from `logits (N, V)`.

    `logits` must have unit column stride; the outputs are contiguous fp32.
    """
    n, vocab = logits.shape
    if n == 0:
        return
    block = block_size(vocab, logits.device)
    k = 0 if control_ids is None else control_ids.numel()
    _token_stats_fwd_kernel[(n,)](
        logits,
        logits.stride(0),
        labels,
        lse,
        logprobs,
        entropy if entropy is not None else lse,
        control_ids if k > 0 else labels,
        control if k > 0 else lse,
        vocab,
        k,
        ignore_index,
        1.0 / temperature,
        WITH_ENTROPY=entropy is not None,
        HAS_CONTROL=k > 0,
        BLOCK_V=block,
        BLOCK_K=triton.next_power_of_2(max(k, 1)),
        **_launch_opts(block, logits.device),
    )


def stats_backward(
    logits: Tensor,
    grad_logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logprobs: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
) -> None:
    """Write d(logits) `(N, V)` into `grad_logits` (may be `logits` itself: in place).

    `grad_entropy` is used only with `entropy`; a missing gradient counts as zero.
    """
    n, vocab = logits.shape
    if n == 0:
        return
    has_glp = grad_logprobs is not None
    has_gh = grad_entropy is not None and entropy is not None
    if has_glp:
        grad_logprobs = grad_logprobs.float().contiguous()
    if has_gh:
        grad_entropy = grad_entropy.float().contiguous()
    block = block_size(vocab, logits.device)
    _token_stats_bwd_kernel[(n,)](
        logits,
        logits.stride(0),
        grad_logits,
        grad_logits.stride(0),
        labels,
        lse,
        entropy if has_gh else lse,
        grad_logprobs if has_glp else lse,
        grad_entropy if has_gh else lse,
        vocab,
        ignore_index,
        1.0 / temperature,
        HAS_GRAD_LOGPROBS=has_glp,
        HAS_GRAD_ENTROPY=has_gh,
        BLOCK_V=block,
        **_launch_opts(block, logits.device),
    )


def new_stats(
    n: int, with_entropy: bool, control_ids: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output buffers `lse, logprobs, entropy, control` (empty entropy/control when not asked)."""
    lse = _empty((n,), torch.float32, device)
    logprobs = _empty((n,), torch.float32, device)
    entropy = _empty((n if with_entropy else 0,), torch.float32, device)
    k = 0 if control_ids is None else control_ids.numel()
    control = _empty((n if control_ids is not None else 0, k), torch.float32, device)
    return lse, logprobs, entropy, control


# --------------------------------------------------------------------------------------------
# Autograd function and public op
# --------------------------------------------------------------------------------------------


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
        inplace_backward: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = logits if logits.stride(-1) == 1 else logits.contiguous()  # [N, V]
        lse, logprobs, entropy, control = new_stats(x.shape[0], with_entropy, control_ids, x.device)
        stats_forward(
            x,
            labels,
            lse,
            logprobs,
            entropy if with_entropy else None,
            control_ids,
            control if control_ids is not None else None,
            temperature,
            ignore_index,
        )
        ctx.save_for_backward(x, labels, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.with_entropy = with_entropy
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(control)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, control

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None, _grad_control):
        x, labels, lse, entropy = ctx.saved_tensors
        x = x.detach()
        grad = x if ctx.inplace_backward else _empty(tuple(x.shape), x.dtype, x.device)
        stats_backward(
            x,
            grad,
            labels,
            lse,
            entropy if ctx.with_entropy else None,
            grad_logprobs,
            grad_entropy if ctx.with_entropy else None,
            ctx.temperature,
            ctx.ignore_index,
        )
        if ctx.inplace_backward:
            # Anything else that saved these logits for its backward now fails loudly.
            torch.autograd.graph.increment_version(x)
        return grad, None, None, None, None, None, None


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    control_ids: Tensor | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probability of each label, entropy and control-token probabilities (Triton).

    Args:
        logits: `(N, V)` fp32/bf16/fp16 logits (CUDA, or CPU under `TRITON_INTERPRET=1`).
        labels: `(N,)` int64 target ids; rows equal to `ignore_index` give 0 and no gradient.
        temperature: the logits are divided by it (> 0).
        with_entropy: compute the entropy (it carries gradient like the logprobs).
        control_ids: `(K,)` contiguous int64 ids in [0, V) on the logits' device whose
            probabilities are returned, detached, or None.
        ignore_index: label value of rows to skip.
        inplace_backward: write d(logits) into the logits buffer instead of a new tensor; only
            when nothing else needs the logits after this op's backward.

    Returns:
        `logprobs (N,)`, `entropy (N,)` or None, `control_probs (N, K)` or None, all float32.
    """
    labels = labels.to(device=logits.device, dtype=torch.long).contiguous()
    logprobs, entropy, control = _TokenLogprobsFunction.apply(
        logits,
        labels,
        float(temperature),
        with_entropy,
        control_ids,
        ignore_index,
        inplace_backward,
    )
    return logprobs, entropy if with_entropy else None, control if control_ids is not None else None

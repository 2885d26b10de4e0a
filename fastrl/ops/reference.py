"""Torch reference implementations of the `fastrl.ops` kernels.

These are the CPU path, the test oracle of the Triton/CUDA kernels and the benchmark baseline. They
accumulate in fp32 and keep memory bounded: the token statistics are computed over row chunks of
the `(N, V)` logits, so no fp32 copy of the whole logits matrix ever exists.

Token statistics, with z = logits / T, lse = log Σ_j exp(z_j), log p = z − lse:
    logprob   = log p_y = z_y − lse
    entropy   H = −Σ_j p_j log p_j
    gradients d logprob / dz_j = 1[j = y] − p_j
              d H / dz_j       = −p_j (log p_j + H)
    and d/dlogits = (d/dz) / T. Rows whose label is `ignore_index` give 0 and no gradient.

Policy losses share three pieces kept here so every loss in `fastrl.algo.losses` uses the same
code: `clipped_surrogate` (PPO clip with optional dual clip), `combine_token_loss` (KL penalty,
entropy bonus, aggregation, statistics) and `aggregate_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Bytes of fp32 logits processed per row chunk. The chunk also needs about three temporaries of
# this size (log p, p and the gradient), so the working set stays a small multiple of it.
CHUNK_BYTES = 64 * 2**20

LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3")

_FP32_MIN = torch.finfo(torch.float32).min


@dataclass
class TokenStats:
    """Per-token statistics of a softmax over the vocabulary.

    Attributes:
        logprobs: `(N,)` float32 log-probability of each label (0 on ignored rows).
        entropy: `(N,)` float32 entropy of each row (0 on ignored rows), or None.
        control_probs: `(N, K)` float32 probabilities of the control token ids, without gradient,
            on every row (ignored rows included, since probe positions need not carry a label),
            or None.
    """

    logprobs: Tensor
    entropy: Tensor | None
    control_probs: Tensor | None


# --------------------------------------------------------------------------------------------
# Token statistics (shared by the plain and the fused LM-head paths)
# --------------------------------------------------------------------------------------------


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 chunk of logits takes about `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * max(vocab_size, 1)))


def _as_index(control_ids: Tensor | Sequence[int] | None, device: torch.device) -> Tensor | None:
    if control_ids is None:
        return None
    return torch.as_tensor(control_ids, dtype=torch.long, device=device).reshape(-1)


def _check_token_inputs(rows: int, labels: Tensor, temperature: float) -> None:
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _chunk_forward(
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


def _chunk_grad_z(
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


def _scaled_chunk(logits_chunk: Tensor, temperature: float) -> Tensor:
    """A fresh fp32 copy of one chunk divided by the temperature `[C, V]`."""
    z = logits_chunk.to(torch.float32, copy=True)  # [C, V]
    return z.div_(temperature) if temperature != 1.0 else z


def _empty_f32(like: Tensor) -> Tensor:
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
        entropy = torch.empty_like(lse) if with_entropy else _empty_f32(logits)  # [N]
        k = 0 if control_ids is None else control_ids.numel()
        control = logits.new_empty(n if control_ids is not None else 0, k, dtype=torch.float32)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = _scaled_chunk(logits[start:end], temperature)  # [C, V]
            stats = _chunk_forward(z, labels[start:end], ignore_index, with_entropy, control_ids)
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
            z = _scaled_chunk(logits[start:end], ctx.temperature)  # [C, V]
            grad_z = _chunk_grad_z(
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


def _token_stats(
    logprobs: Tensor, entropy: Tensor, control: Tensor, with_entropy: bool, has_control: bool
) -> TokenStats:
    return TokenStats(
        logprobs=logprobs,
        entropy=entropy if with_entropy else None,
        control_probs=control if has_control else None,
    )


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    control_ids: Tensor | Sequence[int] | None = None,
    ignore_index: int = -100,
) -> TokenStats:
    """Log-probability of each label, entropy and control-token probabilities, chunked over rows.

    Args:
        logits: `(N, V)` logits of any float dtype; only one fp32 row chunk exists at a time.
        labels: `(N,)` int64 target ids; rows equal to `ignore_index` give 0 and no gradient.
        temperature: the logits are divided by it.
        with_entropy: compute the entropy (it carries gradient like the logprobs).
        control_ids: `(K,)` ids whose probabilities are returned, detached.
        ignore_index: label value of rows to skip.

    Returns:
        TokenStats with `logprobs (N,)`, `entropy (N,)`, `control_probs (N, K)`, all float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, V), got {tuple(logits.shape)}")
    _check_token_inputs(logits.shape[0], labels, temperature)
    ids = _as_index(control_ids, logits.device)
    logprobs, entropy, control = _TokenLogprobsFunction.apply(
        logits, labels, float(temperature), with_entropy, ids, ignore_index
    )
    return _token_stats(logprobs, entropy, control, with_entropy, ids is not None)


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
        entropy = torch.empty_like(lse) if with_entropy else _empty_f32(hidden)  # [N]
        k = 0 if control_ids is None else control_ids.numel()
        control = hidden.new_empty(n if control_ids is not None else 0, k, dtype=torch.float32)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = _scaled_chunk(hidden[start:end] @ weight.T, temperature)  # [C, V]
            stats = _chunk_forward(z, labels[start:end], ignore_index, with_entropy, control_ids)
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
            z = _scaled_chunk(h @ weight.T, ctx.temperature)  # [C, V]
            grad_z = _chunk_grad_z(
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
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    control_ids: Tensor | Sequence[int] | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> TokenStats:
    """`token_logprobs(hidden @ weight.T, ...)` without materialising the `(N, V)` logits.

    Each row chunk's logits are computed by a matmul in the input dtype (fp32 accumulation,
    rounded to that dtype as an unfused LM head would be) and upcast to fp32. The backward
    recomputes them per chunk and accumulates the weight gradient in fp32.

    Args:
        hidden: `(N, H)` final hidden states.
        weight: `(V, H)` LM-head weight.
        labels: `(N,)` int64 target ids.
        chunk_size: rows per chunk; by default about `CHUNK_BYTES` of fp32 logits.
        temperature, with_entropy, control_ids, ignore_index: as in `token_logprobs`.

    Returns:
        TokenStats with `logprobs (N,)`, `entropy (N,)`, `control_probs (N, K)`, all float32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) do not match: {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}"
        )
    _check_token_inputs(hidden.shape[0], labels, temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = chunk_size if chunk_size is not None else chunk_rows(weight.shape[0])
    ids = _as_index(control_ids, hidden.device)
    logprobs, entropy, control = _FusedLinearTokenLogprobsFunction.apply(
        hidden, weight, labels, float(temperature), with_entropy, ids, ignore_index, rows
    )
    return _token_stats(logprobs, entropy, control, with_entropy, ids is not None)


# --------------------------------------------------------------------------------------------
# Policy loss pieces shared by every loss in the registry
# --------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(valid)}")


def prepare_loss_inputs(
    logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Check shapes; return the mask as bool `(B, T)` and the advantages as `(B, T)`."""
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and mask must both be (B, T); got {tuple(logprobs.shape)}, "
            f"{tuple(mask.shape)}"
        )
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1]
    if advantages.shape[0] != logprobs.shape[0] or advantages.shape[1] not in (1, mask.shape[1]):
        raise ValueError(f"advantages must be (B,) or (B, T), got {tuple(advantages.shape)}")
    return mask.bool(), advantages.to(logprobs.dtype).expand_as(logprobs)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values (B, T)` where the bool `mask (B, T)` is set (0 if it is nowhere set)."""
    total = torch.where(mask, values, 0.0).sum()
    return total / mask.sum().clamp(min=1)


def aggregate_loss(
    token_loss: Tensor, mask: Tensor, loss_agg: str, norm_len: int | None = None
) -> Tensor:
    """Reduce a per-token loss `(B, T)` over the bool `mask (B, T)` to a scalar.

    `token-mean` Σℓm / Σm; `seq-mean-token-mean` mean over rows of Σ_t ℓm / Σ_t m;
    `seq-mean-token-sum` mean over rows of Σ_t ℓm; `seq-mean-token-sum-norm` Σℓm / (B · norm_len)
    with `norm_len` defaulting to T. Rows without a masked token are left out of every row mean
    (for the `-norm` variant too, so B counts the non-empty rows); an empty mask gives 0.
    """
    _check_choice("loss_agg", loss_agg, LOSS_AGGREGATIONS)
    masked = torch.where(mask, token_loss, 0.0)  # [B, T]
    if loss_agg == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    counts = mask.sum(dim=-1)  # [B]
    row_sums = masked.sum(dim=-1)  # [B]
    if loss_agg == "seq-mean-token-mean":
        row_values = row_sums / counts.clamp(min=1)  # [B]
    elif loss_agg == "seq-mean-token-sum":
        row_values = row_sums  # [B]
    else:
        row_values = row_sums / (norm_len if norm_len is not None else mask.shape[-1])  # [B]
    return row_values.sum() / (counts > 0).sum().clamp(min=1)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate of the policy against the reference, d = ref − logp.

    k1 = −d, k2 = d² / 2, k3 = exp(d) − d − 1 (Schulman's unbiased, non-negative estimator).
    """
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    d = ref_logprobs - logprobs  # [B, T]
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    return torch.expm1(d) - d


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per token: pg = max(−A·r, −A·clip(r, 1−clip_low, 1+clip_high)).

    With `dual_clip = c` (> 1), tokens with A < 0 get pg = min(pg, −A·c).

    Args:
        ratio: `(B, T)` importance ratio.
        advantages: `(B, T)` advantages.

    Returns:
        pg `(B, T)` and bool `(B, T)` indicators `clip_low`, `clip_high` (the clipped branch is
        active, i.e. the token gives no gradient) and `dual_clip`.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    pg = torch.maximum(unclipped, clipped)  # [B, T]
    r = ratio.detach()  # [B, T]
    flags = {
        "clip_low": (advantages < 0) & (r < 1.0 - clip_low),
        "clip_high": (advantages > 0) & (r > 1.0 + clip_high),
    }
    if dual_clip is not None:
        bound = -advantages * dual_clip  # [B, T]
        flags["dual_clip"] = (advantages < 0) & (pg.detach() > bound)
        pg = torch.where(advantages < 0, torch.minimum(pg, bound), pg)  # [B, T]
    return pg, flags


def combine_token_loss(
    pg: Tensor,
    logprobs: Tensor,
    mask: Tensor,
    flags: dict[str, Tensor],
    ratio: Tensor,
    *,
    ref_logprobs: Tensor | None,
    entropy: Tensor | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    loss_agg: str,
    norm_len: int | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Add the KL penalty and entropy bonus to a policy-gradient token loss and aggregate it.

    ℓ = pg + kl_coef·KL − entropy_coef·entropy, reduced by `aggregate_loss`.

    Args:
        pg: `(B, T)` policy-gradient token loss.
        logprobs: `(B, T)` current log-probabilities (for the KL term).
        mask: `(B, T)` bool loss mask.
        flags: bool `(B, T)` clip indicators keyed `clip_low`, `clip_high` and optionally
            `dual_clip`; each becomes a `*_frac` statistic.
        ratio: `(B, T)` importance ratio, for `ratio_mean`.

    Returns:
        The scalar loss and statistics as detached 0-dim float tensors (no host synchronisation):
        `loss`, `pg_loss`, `clip_frac` (= `clip_frac_low` + `clip_frac_high`), `clip_frac_low`,
        `clip_frac_high`, `dual_clip_frac` (with a dual clip), `kl` (token mean; 0 without a
        reference), `ratio_mean`, `entropy` (token mean, when given).
    """
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    token_loss = pg  # [B, T]
    zero = logprobs.new_zeros(())
    kl_mean = zero
    if ref_logprobs is not None:
        # Padding may hold arbitrary values: zero d there so exp(d) cannot poison the gradient.
        safe_ref = torch.where(mask, ref_logprobs, logprobs.detach())  # [B, T]
        kl = kl_penalty(logprobs, safe_ref, kl_estimator)  # [B, T]
        kl_mean = masked_mean(kl.detach(), mask)
        if kl_coef != 0.0:
            token_loss = token_loss + kl_coef * kl  # [B, T]
    if entropy is not None and entropy_coef != 0.0:
        token_loss = token_loss - entropy_coef * entropy  # [B, T]
    loss = aggregate_loss(token_loss, mask, loss_agg, norm_len)
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "pg_loss": aggregate_loss(pg.detach(), mask, loss_agg, norm_len),
            "kl": kl_mean,
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }
        fracs = {name: masked_mean(flag.to(pg.dtype), mask) for name, flag in flags.items()}
        stats["clip_frac_low"] = fracs["clip_low"]
        stats["clip_frac_high"] = fracs["clip_high"]
        stats["clip_frac"] = fracs["clip_low"] + fracs["clip_high"]
        if "dual_clip" in fracs:
            stats["dual_clip_frac"] = fracs["dual_clip"]
        if entropy is not None:
            stats["entropy"] = masked_mean(entropy.detach(), mask)
    return loss, stats


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level clipped PPO/GRPO loss with KL penalty and entropy bonus.

    Args:
        logprobs: `(B, T)` current log-probabilities (with gradient).
        old_logprobs: `(B, T)` log-probabilities of the sampling policy.
        advantages: `(B,)` per sequence or `(B, T)` per token.
        mask: `(B, T)` loss mask (bool or 0/1).
        ref_logprobs: `(B, T)` reference-policy log-probabilities for the KL term.
        entropy: `(B, T)` token entropies for the bonus and the statistics.
        clip_low, clip_high: the ratio is clipped to [1 − clip_low, 1 + clip_high].
        dual_clip: bound c > 1 on the loss of negative-advantage tokens (−A·c).
        kl_coef, kl_estimator: weight and estimator (k1, k2, k3) of the KL penalty.
        entropy_coef: weight of the entropy bonus.
        loss_agg, norm_len: aggregation, see `aggregate_loss`.

    Returns:
        The scalar loss and the statistics of `combine_token_loss` (detached 0-dim tensors).
    """
    mask, advantages = prepare_loss_inputs(logprobs, advantages, mask)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # [B, T]
    ratio = log_ratio.exp()  # [B, T]
    pg, flags = clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)
    return combine_token_loss(
        pg,
        logprobs,
        mask,
        flags,
        ratio,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        loss_agg=loss_agg,
        norm_len=norm_len,
    )


# --------------------------------------------------------------------------------------------
# Packing of padded batches into varlen sequences
# --------------------------------------------------------------------------------------------


def _segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Row index of each of the `total` packed positions `(total,)` int64."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def pack(x: Tensor, mask: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Keep the positions where `mask (B, T)` is nonzero, in row-major order.

    Args:
        x: `(B, T, ...)` padded values.
        mask: `(B, T)` bool or 0/1.
        total: number of set positions. Without it the count is read from the device (one host
            synchronisation); with it nothing synchronises (`torch.nonzero_static`).

    Returns:
        packed `(total, ...)` and int32 `cu_seqlens (B+1,)`.
    """
    if x.shape[:2] != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} does not start with mask's shape {tuple(mask.shape)}")
    flat_mask = mask.reshape(-1).bool()  # [B*T]
    if total is None:
        total = int(flat_mask.sum())
    index = torch.nonzero_static(flat_mask, size=total).squeeze(1)  # [total]
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, index)  # [total, ...]
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)  # [B+1]
    cu_seqlens[1:] = mask.bool().sum(dim=1).cumsum(0)
    return packed, cu_seqlens


def unpack(packed: Tensor, cu_seqlens: Tensor, mask: Tensor) -> Tensor:
    """Inverse of `pack`: `(total, ...)` back to `(B, T, ...)` with zeros where `mask` is unset."""
    bool_mask = mask.bool()  # [B, T]
    out_shape = (*mask.shape, *packed.shape[1:])
    if packed.shape[0] == 0:
        return packed.new_zeros(out_shape)
    # packed index of (b, t) = cu_seqlens[b] + (number of set positions before t in row b)
    rank = bool_mask.cumsum(dim=1) - 1  # [B, T]
    index = (cu_seqlens[:-1, None].long() + rank).clamp(0, packed.shape[0] - 1)  # [B, T]
    gathered = packed.index_select(0, index.reshape(-1)).reshape(out_shape)  # [B, T, ...]
    keep = bool_mask.reshape(*mask.shape, *([1] * (packed.dim() - 1)))  # [B, T, 1...]
    return torch.where(keep, gathered, 0)


def position_ids(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """Position of each packed token within its sequence, `(total,)` int64, restarting at 0.

    `total` defaults to `cu_seqlens[-1]`, read from the device (one synchronisation).
    """
    if total is None:
        total = int(cu_seqlens[-1])
    segments = _segment_ids(cu_seqlens, total)  # [total]
    positions = torch.arange(total, device=cu_seqlens.device)  # [total]
    return positions - cu_seqlens.long()[segments]


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Sum of packed `values (total, ...)` per sequence: `(B, ...)`, 0 for empty sequences."""
    segments = _segment_ids(cu_seqlens, values.shape[0])  # [total]
    out = values.new_zeros(cu_seqlens.shape[0] - 1, *values.shape[1:])  # [B, ...]
    return out.index_add(0, segments, values)

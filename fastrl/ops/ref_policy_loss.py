"""Torch reference of `fastrl.ops.policy_loss`, and the pieces every policy loss shares.

The CPU path, the test oracle of `triton_kernels/policy_loss.py` and the benchmark baseline. The
three pieces are kept here so every loss in `fastrl.algo.losses` uses the same code:
`clipped_surrogate` (PPO clip with optional dual clip), `combine_token_loss` (KL penalty, entropy
bonus, aggregation, statistics) and `aggregate_loss`.

The checks of the options and shapes live here too, each with its message: `fastrl.ops.policy_loss`
runs them once before it dispatches, and the pieces run theirs for the losses that call them
directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The values of `loss_agg` and `kl_estimator`.
LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3")


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(valid)}")


def check_loss_shapes(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> None:
    """`logprobs` and `mask` `(B, T)`, `advantages` `(B,)` or `(B, T)`."""
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and mask must both be (B, T); got {tuple(logprobs.shape)}, "
            f"{tuple(mask.shape)}"
        )
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    if (
        adv.dim() != 2
        or adv.shape[0] != logprobs.shape[0]
        or adv.shape[1] not in (1, mask.shape[1])
    ):
        raise ValueError(f"advantages must be (B,) or (B, T), got {tuple(advantages.shape)}")


def check_dual_clip(dual_clip: float | None) -> None:
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")


def check_kl_reference(kl_coef: float, ref_logprobs: Tensor | None) -> None:
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")


# --------------------------------------------------------------------------------------------
# Pieces shared by every policy loss
# --------------------------------------------------------------------------------------------


def prepare_loss_inputs(
    logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Check shapes; return the mask as bool `(B, T)` and the advantages as `(B, T)`."""
    check_loss_shapes(logprobs, advantages, mask)
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1]
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
    check_choice("loss_agg", loss_agg, LOSS_AGGREGATIONS)
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
    check_choice("kl_estimator", estimator, KL_ESTIMATORS)
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
    check_dual_clip(dual_clip)
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
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_kl_reference(kl_coef, ref_logprobs)
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

    The arguments are those of `fastrl.ops.policy_loss`, which checks them and passes them in
    this order.

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

"""Policy losses as pure functions in a registry, plus the SFT loss.

Every policy loss takes `(logprobs, old_logprobs, advantages, mask)` as `(B, T)` tensors
(`advantages` may be `(B,)`) and the keyword set of `fastrl.ops.policy_loss`, and returns
`(loss, stats)`. They differ only in the per-token policy-gradient term; the KL penalty, entropy
bonus, aggregation and statistics are shared (`fastrl.ops.reference.combine_token_loss`).

    ppo    r_t = exp(logp_t − old_t), clipped surrogate per token (GRPO/PPO); the fused kernel path.
    gspo   GSPO (Zheng et al., 2025): one ratio per sequence, s_i = exp(mean_t(logp_t − old_t)),
           clipped like PPO. Written in the GSPO-token form r_t = sg(s_i)·exp(logp_t − sg(logp_t)),
           whose value is s_i and whose gradient is s_i ∇logp_t, so `(B, T)` advantages work too.
           With `loss_agg="seq-mean-token-mean"` (the paper's choice) and `(B,)` advantages it is
           exactly sequence-level GSPO. The paper's clip ranges are far smaller (about 3e-4 / 4e-4)
           than the shared 0.2 defaults.
    cispo  CISPO (MiniMax-M1): ℓ_t = −A · sg(clip(r_t, 1−clip_low, 1+clip_high)) · logp_t; the
           clipped importance weight carries no gradient, so every token keeps a gradient.
           It has no dual clip.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from fastrl import ops
from fastrl.ops.reference import (
    aggregate_loss,
    clipped_surrogate,
    combine_token_loss,
    prepare_loss_inputs,
)


class PolicyLoss(Protocol):
    """Signature shared by every entry of `POLICY_LOSSES` (that of `fastrl.ops.policy_loss`)."""

    def __call__(
        self,
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
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


def gspo_loss(
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
    """GSPO: PPO clipping on the length-normalised sequence ratio (see the module docstring).

    Shapes and returns as `fastrl.ops.policy_loss`.
    """
    mask, advantages = prepare_loss_inputs(logprobs, advantages, mask)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # [B, T]
    seq_log_ratio = log_ratio.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # [B]
    token_log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach()[:, None]  # [B, T]
    ratio = torch.where(mask, token_log_ratio, 0.0).exp()  # [B, T]
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


def cispo_loss(
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
    """CISPO: REINFORCE weighted by the clipped, stop-gradient importance ratio.

    `clip_frac_low` / `clip_frac_high` count tokens whose weight was clipped, whatever the sign
    of the advantage. Shapes and returns as `fastrl.ops.policy_loss`; `dual_clip` must be None.
    """
    if dual_clip is not None:
        raise ValueError("cispo has no dual clip; pass dual_clip=None")
    mask, advantages = prepare_loss_inputs(logprobs, advantages, mask)
    ratio = torch.where(mask, logprobs - old_logprobs, 0.0).exp()  # [B, T]
    r = ratio.detach()  # [B, T]
    weight = r.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    pg = -advantages * weight * logprobs  # [B, T]
    flags = {"clip_low": r < 1.0 - clip_low, "clip_high": r > 1.0 + clip_high}
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


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo": ops.policy_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered under `name` (ppo, gspo, cispo)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid values: {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def sft_loss(logprobs: Tensor, mask: Tensor, *, loss_agg: str = "token-mean") -> Tensor:
    """Negative log-likelihood of the masked (response) tokens.

    Args:
        logprobs: `(B, T)` log-probabilities of the target tokens.
        mask: `(B, T)` tokens to train on.
        loss_agg: aggregation, see `fastrl.ops.reference.aggregate_loss`.

    Returns:
        Scalar loss (0 for an empty mask).
    """
    return aggregate_loss(-logprobs, mask.bool(), loss_agg)

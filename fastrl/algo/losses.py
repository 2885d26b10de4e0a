"""The one home of fastrl's losses: the policy-loss registry, LUFFY's shaping, SFT and mixed SFT
(CHORD), truncated-IS weights and micro-batch weights, plus `RLLoss`, the RL step's loss with its
hyperparameters bound once and called with tensors only.

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
    luffy  LUFFY's policy shaping for off-policy (expert) rows: ℓ_t = −A · p_t / (p_t + γ).

Shape letters: B rows (sequences) of a micro-batch, T positions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
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


def luffy_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    gamma: float = 0.1,
    loss_agg: str = "token-mean",
    norm_len: int | None = None,
) -> Tensor:
    """LUFFY's policy shaping on off-policy tokens: ℓ_t = −A · p_t / (p_t + γ), unclipped.

    The gradient, A · γ / (p + γ)² · ∇p, favours low-probability expert tokens. Shapes as the policy
    losses: `logprobs`, `mask` (B, T); `advantages` (B,) or (B, T).
    """
    mask = mask.bool()
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    p = torch.where(mask, logprobs, 0.0).exp()  # [B, T]
    return aggregate_loss(-adv * p / (p + gamma), mask, loss_agg, norm_len)


def mixed_sft_weight(
    weight: float, final_weight: float, schedule: str, step: int, total: int
) -> float:
    """mu at RL step `step` (0-based) of `total`: constant, or linear / cosine decay from `weight`
    to `final_weight`."""
    if schedule == "constant" or total <= 1:
        return weight
    frac = min(1.0, step / (total - 1))
    if schedule == "linear":
        return weight + (final_weight - weight) * frac
    return final_weight + (weight - final_weight) * 0.5 * (1 + math.cos(math.pi * frac))


def mixed_sft_loss(
    logprobs: Tensor, mask: Tensor, *, chord_phi: bool = False, loss_agg: str = "token-mean"
) -> Tensor:
    """NLL of the masked expert tokens; with `chord_phi`, each token weighted by sg(p (1 − p))."""
    mask = mask.bool()
    token_loss = -logprobs
    if chord_phi:
        p = torch.where(mask, logprobs, 0.0).detach().exp()  # [B, T]
        token_loss = token_loss * p * (1 - p)
    return aggregate_loss(token_loss, mask, loss_agg)


def tis_weights(old: Tensor, engine: Tensor, sampled: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights `(B, T)`: min(π_old / π_engine, cap) per token, the
    engine having sampled what the trainer's old policy scores. Rows that the engine did not sample
    in this context (`sampled (B,)` False: expert and hinted members) weigh 1."""
    tis = (old.detach() - engine).exp().clamp(max=cap)  # [B, T]
    return torch.where(sampled[:, None], tis, 1.0)  # [B, T]


def microbatch_weight(
    loss_agg: str, tokens: float, rows: float, n_tokens: float, n_rows: float
) -> float:
    """A micro-batch's share of a step whose loss is aggregated over the whole batch: its loss
    tokens over the batch's (`token-mean`), otherwise its rows with a loss token over the batch's.
    The weighted sum of the micro-batches' own aggregates is then the batch's aggregate."""
    if loss_agg == "token-mean":
        return tokens / max(1, n_tokens)
    return rows / max(1, n_rows)


@dataclass(frozen=True)
class RLLoss:
    """The RL step's loss, hyperparameters bound (`rl_loss`); called with tensors only.

    Rows flagged `shaped` (OPS expert members under LUFFY) take `luffy`; the others take `policy`.
    Each part is the aggregate over its own rows; they are mixed back by the rows (or tokens) each
    stands for, so the sum equals the aggregate over the whole micro-batch.
    """

    policy: Callable[..., tuple[Tensor, dict[str, Tensor]]]  # (logp, old, adv, mask, ref=, ent=)
    luffy: Callable[[Tensor, Tensor, Tensor], Tensor] | None  # (logp, adv, mask)
    loss_agg: str
    tis_cap: float | None  # truncated IS (`tis_weights`), None when off
    uses_all_tokens: bool  # a KL or entropy term: rows with advantage 0 still have a gradient

    def __call__(
        self,
        logprobs: Tensor,  # [B, T]
        old_logprobs: Tensor,  # [B, T]
        advantages: Tensor,  # [B] or [B, T]
        mask: Tensor,  # [B, T] float or bool
        shaped: Tensor,  # [B] bool
        *,
        ref_logprobs: Tensor | None = None,  # [B, T]
        entropy: Tensor | None = None,  # [B, T]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.luffy is None:
            shaped = torch.zeros_like(shaped)
        plain_mask = mask * ~shaped[:, None]  # [B, T]
        loss = logprobs.new_zeros(())
        stats: dict[str, Tensor] = {}
        if plain_mask.any():
            loss, stats = self.policy(
                logprobs, old_logprobs, advantages, plain_mask,
                ref_logprobs=ref_logprobs, entropy=entropy,
            )  # fmt: skip
        if self.luffy is not None and shaped.any():
            shaped_mask = mask * shaped[:, None]  # [B, T]
            shaped_loss = self.luffy(logprobs, advantages, shaped_mask)
            if self.loss_agg == "token-mean":
                a, b = plain_mask.sum(), shaped_mask.sum()
            else:
                a, b = (plain_mask.sum(1) > 0).sum(), (shaped_mask.sum(1) > 0).sum()
            loss = (loss * a + shaped_loss * b) / (a + b)
        return loss, stats


def rl_loss(
    name: str,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    loss_agg: str,
    norm_len: int | None,
    luffy_gamma: float | None = None,
    tis_cap: float | None = None,
) -> RLLoss:
    """Bind the RL loss once: the policy loss `name` of `POLICY_LOSSES` with its hyperparameters,
    and LUFFY's shaping with `luffy_gamma` (None: no row is shaped)."""
    policy = functools.partial(
        get_policy_loss(name),
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        loss_agg=loss_agg,
        norm_len=norm_len,
    )
    luffy = None
    if luffy_gamma is not None:
        luffy = functools.partial(
            luffy_loss, gamma=luffy_gamma, loss_agg=loss_agg, norm_len=norm_len
        )
    return RLLoss(policy, luffy, loss_agg, tis_cap, kl_coef > 0 or entropy_coef > 0)

"""RL algorithm pieces: group advantages and the policy-loss registry."""

from fastrl.algo.advantages import group_advantages, zero_variance_groups
from fastrl.algo.losses import POLICY_LOSSES, get_policy_loss, sft_loss

__all__ = [
    "POLICY_LOSSES",
    "get_policy_loss",
    "group_advantages",
    "sft_loss",
    "zero_variance_groups",
]

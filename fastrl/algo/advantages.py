"""Group-relative advantage estimators for GRPO-style training.

Each prompt is sampled several times; the samples of one prompt form a group (`group_ids`) and each
reward is compared with the others of its group:
    grpo    (r − mean_g) / (std_g + eps), std_g the population std (divides by n, not n − 1)
    drgrpo  r − mean_g (Dr. GRPO: no std normalisation)
    rloo    r − mean of the other members of the group (leave-one-out); 0 for singleton groups
"""

from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense group index `(N,)` in [0, G) and the number of groups G (one host sync)."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, unique.numel()


def _group_sum(values: Tensor, index: Tensor, groups: int) -> Tensor:
    return values.new_zeros(groups).index_add(0, index, values)  # [G]


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, estimator: str = "grpo", eps: float = 1e-6
) -> Tensor:
    """Advantage of each sample relative to its group.

    Args:
        rewards: `(N,)` float rewards.
        group_ids: `(N,)` integer group labels (any values, members need not be contiguous).
        estimator: `grpo`, `drgrpo` or `rloo` (see the module docstring).
        eps: added to the group std by `grpo`.

    Returns:
        `(N,)` advantages in the rewards' float dtype (float32 at least), computed in float64.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid values: {', '.join(ESTIMATORS)}")
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must both be (N,); got {tuple(rewards.shape)}, "
            f"{tuple(group_ids.shape)}"
        )
    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.double()  # [N]
    index, groups = _group_index(group_ids)
    counts = _group_sum(torch.ones_like(r), index, groups)  # [G]
    sums = _group_sum(r, index, groups)  # [G]
    if estimator == "rloo":
        others = (counts[index] - 1).clamp(min=1)  # [N]
        adv = torch.where(counts[index] > 1, r - (sums[index] - r) / others, 0.0)  # [N]
        return adv.to(out_dtype)
    centred = r - (sums / counts)[index]  # [N]
    if estimator == "drgrpo":
        return centred.to(out_dtype)
    variance = _group_sum(centred.square(), index, groups) / counts  # [G]
    return (centred / (variance.sqrt()[index] + eps)).to(out_dtype)


def zero_variance_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Bool `(N,)`: True for members of groups whose rewards are all equal.

    Such groups have zero advantage under every estimator, so dynamic sampling drops them.
    """
    index, groups = _group_index(group_ids)
    empty = rewards.new_zeros(groups)  # [G]
    high = empty.scatter_reduce(0, index, rewards, "amax", include_self=False)  # [G]
    low = empty.scatter_reduce(0, index, rewards, "amin", include_self=False)  # [G]
    return (high == low)[index]

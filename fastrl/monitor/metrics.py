"""Per-step metrics of RL rows: what the sampled episodes did (`rollout_metrics`) and what the
trained tokens show (`token_metrics`: entropy, the engine-vs-trainer logprob gap, and the
control-token probes at their positions, `probe_rows` and `turn_start_rows`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from fastrl.algo.advantages import zero_variance_groups
from fastrl.models import control_token_ids
from fastrl.monitor.states import state_fractions
from fastrl.rollout.types import Trajectory
from fastrl.train.batch import Batch

CONTROL_KEYS = ("open_json", "im_end", "tool_call")


class ProbeIds(NamedTuple):
    """The token ids the `ctrl/*` metrics look at."""

    control: tuple[int, ...]  # ids of CONTROL_KEYS, in that order
    newline: int  # `\n`: what follows `<tool_call>` (the `ctrl/p_*` probe position)
    end_call: int | None  # `</tool_call>`: after it the turn should end


def probe_ids(tokenizer: Any) -> ProbeIds:
    """The `ProbeIds` of `tokenizer` (ValueError when a control token is not a single token)."""
    ctrl = control_token_ids(tokenizer)
    return ProbeIds(
        control=tuple(ctrl[k] for k in CONTROL_KEYS),
        newline=tokenizer.encode("\n", add_special_tokens=False)[0],
        end_call=ctrl["end_tool_call"],
    )


def turn_start_rows(batch: Batch) -> torch.Tensor:
    """Bool [N] over target positions: the model is about to write a turn's first token (the
    first trained position of each run of trained positions)."""
    mask = batch.target_mask
    before = torch.zeros_like(mask)
    before[:, 1:] = mask[:, :-1]
    return (mask & ~before)[mask]


def probe_rows(batch: Batch, tool_call_id: int, newline_id: int) -> torch.Tensor:
    """Bool [N] over target positions: the model is about to write what follows `<tool_call>\\n`."""
    ids = batch.input_ids
    at = torch.zeros_like(batch.target_mask)
    at[:, 1:] = (ids[:, 1:] == newline_id) & (ids[:, :-1] == tool_call_id)
    return at[batch.target_mask]


def rollout_metrics(played: list[Trajectory]) -> dict[str, float]:
    """Reward, success and shape of the sampled episodes; hinted and expert members apart."""
    own = [t for t in played if t.source == "policy"]
    sampled = [t for t in played if t.source != "expert"]
    row: dict[str, float] = {
        "reward/mean": float(np.mean([t.reward for t in own])),
        "success/mean": float(np.mean([t.success for t in own])),
        "rollout/truncated": float(np.mean([t.truncated for t in own])),
        "rollout/turns": float(np.mean([len(t.turn_spans) for t in own])),
    }
    for source in ("hinted", "expert"):
        members = [t for t in played if t.source == source]
        if members:
            row[f"supervision/{source}_success"] = float(np.mean([t.success for t in members]))
    # Groups whose members all got the same reward (advantage 0 under every estimator: no
    # signal; TRL's frac_reward_zero_std), and groups one of the policy's own samples solved.
    gids = [t.group_id for t in played]
    flat = zero_variance_groups(torch.tensor([t.reward for t in played]), torch.tensor(gids))
    n_groups = len(set(gids))
    row["rollout/frac_reward_zero_std"] = (
        len({g for g, f in zip(gids, flat.tolist()) if f}) / n_groups
    )
    solved = {t.group_id for t in played if t.source == "policy" and t.success}
    row["rollout/solved_groups"] = len(solved) / n_groups
    row.update(state_fractions([s for t in sampled for s in t.info.get("states", [])]))
    return row


def token_metrics(add, batch, logp, entropy, ctrl_probs, ids: ProbeIds | None) -> None:
    """Entropy, engine-vs-trainer logprob gap and, with `ctrl_probs` (the probabilities of
    `ids.control` at every trained position), the control-token probes; each recorded through
    `add(key, value, weight)`."""
    mask = batch.target_mask.float()  # [B, T]
    n = mask.sum().item()
    if n == 0:
        return
    add("entropy", (entropy.detach() * mask).sum().item() / n, n)
    sampled = mask * batch.sampled[:, None]  # [B, T]
    n_sampled = sampled.sum().item()
    if n_sampled:
        gap = (logp.detach() - batch.engine_logprobs).abs() * sampled  # [B, T]
        add("rollout/logprob_diff_mean", gap.sum().item() / n_sampled, n_sampled)
        add("rollout/logprob_diff_max", gap.max().item(), n_sampled)
    if ctrl_probs is None or ids is None:
        return
    # Mean over every trained token (ctrl_probs rows are the target positions, in order).
    for k, key in enumerate(CONTROL_KEYS):
        add(f"ctrl/mean_p_{key}", ctrl_probs[:, k].mean().item(), n)
    probe = probe_rows(batch, ids.control[2], ids.newline)
    if probe.any():
        for k, key in enumerate(CONTROL_KEYS):
            add(f"ctrl/p_{key}", ctrl_probs[probe, k].mean().item(), probe.sum().item())
    starts = turn_start_rows(batch)  # [N]
    for k, key in enumerate(CONTROL_KEYS[1:], start=1):
        add(f"ctrl/turn_p_{key}", ctrl_probs[starts, k].mean().item(), starts.sum().item())
    if ids.end_call is not None:
        # Right after `</tool_call>` the turn should end: p(<|im_end|>) falls when it does not.
        after = (batch.input_ids == ids.end_call)[batch.target_mask]  # [N]
        if after.any():
            add("ctrl/after_call_p_im_end", ctrl_probs[after, 1].mean().item(), after.sum().item())

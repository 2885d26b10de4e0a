"""Spike alarms on the control-token probability series (PAPER.md §2).

Every RL step logs, at the probe positions right after `<tool_call>` and its newline, the mean
probability of the JSON opener `{"` (healthy), of `<|im_end|>` and of `<tool_call>` (the two
collapse modes): `ctrl/p_open_json`, `ctrl/p_im_end`, `ctrl/p_tool_call`; and at the start of
every assistant turn (its first generated token) the probabilities of `<|im_end|>` (an empty turn)
and `<tool_call>`: `ctrl/turn_p_im_end`, `ctrl/turn_p_tool_call`; and right after `</tool_call>`,
where the turn should end, p(`<|im_end|>`): `ctrl/after_call_p_im_end` (a drop means calls run on
into stray text). The paper publishes no
alarm rule. `SpikeAlarm` has three:

- the spike rule (`spikes`): an exponential moving average of each sampled series' mean and
  variance, firing when a new value lies more than `threshold` standard deviations from the
  average *before* it is folded in, once at least `min_history` values have been seen. Collapse
  shows as a jump up of p(`<|im_end|>`) or p(`<tool_call>`) and a drop of p(`{"`), so the rule
  watches the side that matters for each series; the z-scores are logged as `ctrl/z_<name>`.
  Sampled series are noisy and a fast collapse leaves the average no history, so this rule tends
  to fire late (docs/EXPERIMENTS.md).
- the health rule (`health_threshold`): the trainer scores the weights each update produced on a
  fixed set of held-out expert trajectories before anything samples with them
  (`fastrl.eval.health_probe`: the mean NLL of the expert's own tokens at the control positions,
  `ctrl/health_nll`, and over every assistant token, `ctrl/health_nll_all`), and the rule fires
  when either rises more than `health_threshold` nats above its value on the weights RL started
  from (`ctrl/health_drift`, `ctrl/health_drift_all`). Teacher-forced on fixed data it has no
  sampling noise, and it looks one step ahead of every sampled metric.
- the pollution rule (`pollution_threshold`): the share of the step's sampled turns that are
  structurally polluted (`state/pollution`: a call body holding `<tool_call>`, stray text around
  a call, ...; fastrl.monitor.states) rising more than `pollution_threshold` above its value on
  the first RL step's samples (`ctrl/pollution_drift`). It sees what the health probe cannot when
  a supervision mode trains on expert trajectories like the probe's own (OPS, mixed SFT): the
  expert's tokens stay likely while the policy's own samples fill with control tokens, before
  success falls (docs/EXPERIMENTS.md).

Those probes sit in the policy's own samples, so they mix decisions. The *decision probe* holds
the positions still: on a fixed set of held-out expert trajectories (`monitor.decision_probe_tasks`
test tasks), teacher-forced, at each assistant message after a user question or a tool result,
p(`<tool_call>`) where the expert makes a turn's last call and a teacher that stops early answers
instead (`ctrl/habit_p_tool_call`: the decision that teacher gets wrong; it should rise as RL
unlearns the habit), where the expert calls right after the question and a teacher that guesses
answers instead (`ctrl/first_p_tool_call`), where it calls again elsewhere
(`ctrl/continue_p_tool_call`) and where it answers (`ctrl/answer_p_tool_call`: it should stay
low).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from fastrl.rollout.types import Trajectory

# series -> direction of the dangerous move (+1: up, -1: down)
WATCHED = {
    "ctrl/p_im_end": 1,
    "ctrl/p_tool_call": 1,
    "ctrl/p_open_json": -1,
    "ctrl/turn_p_im_end": 1,
    "ctrl/after_call_p_im_end": -1,
}


# the health probe's drifts the health rule watches: control positions, and every token
HEALTH_WATCHED = ("ctrl/health_drift", "ctrl/health_drift_all")
# every drift a rule of the alarm compares with its threshold
ALARM_DRIFTS = (*HEALTH_WATCHED, "ctrl/pollution_drift")


class SpikeAlarm:
    """`ctrl/alarm` over the metric rows: the EMA spike, health-drift and pollution-drift rules."""

    def __init__(
        self,
        threshold: float = 4.0,
        min_history: int = 5,
        alpha: float = 0.1,
        min_std: float = 0.01,
        health_threshold: float = 0.0,
        spikes: bool = True,
        pollution_threshold: float = 0.0,
    ):
        self.threshold = threshold
        self.health_threshold = health_threshold  # nats of ctrl/health_drift; 0: off
        self.pollution_threshold = pollution_threshold  # share of turns; 0: off
        self.spikes = spikes  # the EMA z-score rule on the sampled series
        self.min_history = min_history
        self.alpha = alpha
        self.min_std = min_std  # floors the std so a perfectly flat series does not alarm on noise
        self.stats: dict[str, list[float]] = {}  # series -> [count, mean, var]
        # The health probe (`ctrl/health_nll*`) of the weights RL started from.
        self.health_start: dict[str, float] | None = None
        # `state/pollution` of the first RL step's samples (the weights RL started from).
        self.pollution_start: float | None = None

    def update(self, row: dict[str, Any]) -> dict[str, float]:
        """Fold this step's values in; returns `ctrl/alarm` (0/1), `ctrl/z_<name>` and the drifts
        (`ctrl/health_drift*`, `ctrl/pollution_drift`) of the values the row has."""
        out: dict[str, float] = {}
        alarm = False
        for key, direction in WATCHED.items():
            value = row.get(key)
            if value is None or not math.isfinite(value):
                continue
            count, mean, var = self.stats.get(key, [0, value, 0.0])
            std = max(math.sqrt(var), self.min_std)
            z = (value - mean) / std if count else 0.0
            out[f"ctrl/z_{key.removeprefix('ctrl/').removeprefix('p_')}"] = z
            if self.spikes and count >= self.min_history and direction * z > self.threshold:
                alarm = True
            # EMA of mean and variance (West's incremental form).
            delta = value - mean
            mean = mean + self.alpha * delta if count else value
            var = (1 - self.alpha) * (var + self.alpha * delta * delta) if count else 0.0
            self.stats[key] = [count + 1, mean, var]
        for key, start in (self.health_start or {}).items():
            if key in row:
                out[key.replace("health_nll", "health_drift", 1)] = row[key] - start
        for key in HEALTH_WATCHED:
            drift = out.get(key)
            if self.health_threshold and drift is not None and drift > self.health_threshold:
                alarm = True
        pollution = row.get("state/pollution")
        if pollution is not None and math.isfinite(pollution):
            if self.pollution_start is None:
                self.pollution_start = pollution
            drift = pollution - self.pollution_start
            out["ctrl/pollution_drift"] = drift
            if self.pollution_threshold and drift > self.pollution_threshold:
                alarm = True
        out["ctrl/alarm"] = float(alarm)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": {k: list(v) for k, v in self.stats.items()},
            "health_start": self.health_start,
            "pollution_start": self.pollution_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = {k: list(v) for k, v in state.get("stats", {}).items()}
        self.health_start = state.get("health_start")
        self.pollution_start = state.get("pollution_start")


def gradient_split(
    control_probs: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    control_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy-gradient push on each control token's logit, split in two (PAPER.md §2).

    For a trained token with advantage A, sampled id s and probabilities p, the push on logit k is
    A * (1[k = s] - p_k). Summed over the trained tokens, the *self* part collects the tokens
    where k was sampled (A * (1 - p_k)), the *other* part the rest (-A * p_k: pushed down while
    something else was sampled).

    Args:
        control_probs: `(M, C)` p of each control id at each trained token.
        labels: `(M,)` sampled ids.
        advantages: `(M,)` advantage of each trained token.
        control_ids: the C control token ids.

    Returns:
        (self, other), each `(C,)`: sums over the M tokens.
    """
    ids = torch.tensor(control_ids, device=labels.device)  # [C]
    sampled = (labels[:, None] == ids[None, :]).to(control_probs.dtype)  # [M, C]
    push = advantages[:, None].to(control_probs.dtype) * (sampled - control_probs)  # [M, C]
    return (push * sampled).sum(0), (push * (1 - sampled)).sum(0)


def decision_positions(traj: Trajectory, habit_turns: list[bool]) -> Trajectory:
    """A copy of `traj` with its loss mask on the first token of each assistant message that
    follows a user question or a tool result, and `info["kinds"]`, per such message in order:
    `first` for a call right after the question (where a teacher that guesses answers instead),
    `habit` for the last call of a user turn with `habit_turns[turn]` set (where a teacher that
    stops early answers instead), `continue` for another call after a tool result, `answer`
    for an answer."""
    is_call = [m["role"] == "assistant" and m["content"].lstrip().startswith("<tool_call>")
               for m in traj.messages]  # fmt: skip
    turn_of, last_call, turn = [], {}, -1
    for i, m in enumerate(traj.messages):
        turn += m["role"] == "user"
        turn_of.append(turn)
        if is_call[i]:
            last_call[turn] = i  # ends as the index of each user turn's last call
    assistant = [i for i, m in enumerate(traj.messages) if m["role"] == "assistant"]
    kinds, starts = [], []
    for (start, _), i in zip(traj.turn_spans, assistant, strict=False):
        before = traj.messages[i - 1]["role"]
        if before not in ("user", "tool"):
            continue
        starts.append(start)
        t = turn_of[i]
        if not is_call[i]:
            kinds.append("answer")
        elif before == "user":
            kinds.append("first")
        elif last_call[t] == i and t < len(habit_turns) and habit_turns[t]:
            kinds.append("habit")
        else:
            kinds.append("continue")
    mask = [0] * len(traj.response_ids)
    for start in starts:
        mask[start] = 1
    return dataclasses.replace(traj, loss_mask=mask, info={"kinds": kinds})

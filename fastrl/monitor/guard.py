"""The collapse guard (config block `guard`): act before a collapsing run is lost.

After every RL step the trainer hands the step's metrics to `Guard.observe`. A step's metrics
describe the weights it sampled with (the previous step's result), so snapshots are confirmed one
step late: the weights at RL start and then, every `snapshot_every` steps, the weights after a
healthy step are saved as a candidate (`checkpoints/healthy_candidate`); the next step's metrics
promote it to the healthy snapshot (`checkpoints/healthy`) when healthy, or discard it. Both are
written atomically like every checkpoint, never pruned and never named by `latest`.
A step is unhealthy on `ctrl/alarm` (with `on_alarm`), when `state/collapse` exceeds
`collapse_threshold`, or when `state/pollution` exceeds `pollution_threshold` (off by default).
Then, while actions remain (`max_actions`) and a snapshot exists, the guard asks for a rollback
to the snapshot followed by its action: a corrective SFT phase on the recently failed tasks
(`action=sft`, ETS-style with the `supervision.ets` settings) or none (`action=lower_lr`); every
action also multiplies the RL learning rate by `lr_factor` for the rest of the run.
Every decision is logged and shows in the metrics: `guard/action` (on the step it acted),
`guard/actions` (the count so far), `guard/lr_scale`, `guard/snapshot_step`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastrl.config import GuardConfig
from fastrl.monitor.control_tokens import ALARM_DRIFTS  # named in the guard's log line

log = logging.getLogger(__name__)

SNAPSHOT_TAG = "healthy"
SNAPSHOT_CANDIDATE = "healthy_candidate"


@dataclass
class Decision:
    """What `Guard.observe` asks the trainer to do after a step, in this order."""

    promote: bool = False  # the candidate snapshot becomes the healthy snapshot
    discard: bool = False  # the candidate snapshot is dropped
    save_candidate: bool = False  # save the current weights as the candidate
    rollback: bool = False  # load the healthy snapshot
    action: str | None = None  # "sft" | "lower_lr" after the rollback
    reason: str = ""


class Guard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.actions = 0
        self.lr_scale = 1.0
        self.snapshot_step: int | None = None  # step whose weights the healthy snapshot holds
        self.candidate_step: int | None = None  # same for the unconfirmed candidate

    def unhealthy_reason(self, row: dict[str, Any]) -> str:
        """Why this step's metrics call for action ('' when they do not)."""
        reasons = []
        if self.cfg.on_alarm and row.get("ctrl/alarm"):
            drifts = [f"{k.removeprefix('ctrl/')} {row[k]:+.2f}" for k in ALARM_DRIFTS if k in row]
            reasons.append(f"ctrl/alarm ({', '.join(drifts)})" if drifts else "ctrl/alarm")
        collapse = row.get("state/collapse", 0.0) or 0.0
        if self.cfg.collapse_threshold and collapse > self.cfg.collapse_threshold:
            reasons.append(f"state/collapse {collapse:.2f} > {self.cfg.collapse_threshold}")
        pollution = row.get("state/pollution", 0.0) or 0.0
        if self.cfg.pollution_threshold and pollution > self.cfg.pollution_threshold:
            reasons.append(f"state/pollution {pollution:.2f} > {self.cfg.pollution_threshold}")
        return "; ".join(reasons)

    def observe(self, step: int, row: dict[str, Any]) -> Decision:
        """Decide on step `step` just finished; fills the `guard/*` metrics into `row`."""
        decision = Decision()
        reason = self.unhealthy_reason(row)
        if not reason:
            if self.candidate_step is not None:
                decision.promote = True
                self.snapshot_step, self.candidate_step = self.candidate_step, None
            if self.snapshot_step is None or step - self.snapshot_step >= self.cfg.snapshot_every:
                decision.save_candidate = True
                self.candidate_step = step
        else:
            if self.candidate_step is not None:
                decision.discard = True
                self.candidate_step = None
            if self.actions >= self.cfg.max_actions:
                log.warning("guard: step %d unhealthy (%s); no actions left", step, reason)
            elif self.snapshot_step is None:
                log.warning("guard: step %d unhealthy (%s); no healthy snapshot yet", step, reason)
            else:
                self.actions += 1
                decision.rollback, decision.action, decision.reason = True, self.cfg.action, reason
                self.lr_scale *= self.cfg.lr_factor
                log.warning(
                    "guard: step %d unhealthy (%s): rolling back to the weights of step %d, then "
                    "%sRL learning rate x%g from now on (action %d of %d)",
                    step,
                    reason,
                    self.snapshot_step,
                    "a corrective SFT phase and " if self.cfg.action == "sft" else "",
                    self.lr_scale,
                    self.actions,
                    self.cfg.max_actions,
                )
                row["guard/action"] = f"rollback+{self.cfg.action}"
        row["guard/actions"] = self.actions
        row["guard/lr_scale"] = self.lr_scale
        row["guard/snapshot_step"] = self.snapshot_step if self.snapshot_step is not None else -1
        return decision

    def state_dict(self) -> dict[str, Any]:
        return {
            "actions": self.actions,
            "lr_scale": self.lr_scale,
            "snapshot_step": self.snapshot_step,
            "candidate_step": self.candidate_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actions = state.get("actions", 0)
        self.lr_scale = state.get("lr_scale", 1.0)
        self.snapshot_step = state.get("snapshot_step")
        self.candidate_step = state.get("candidate_step")

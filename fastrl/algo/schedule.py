"""Training schemes as a phase plan (config block `schedule`).

    synchronous:  [warmup SFT] -> rl1 (rl.steps)            supervision acts inside RL steps
    interleaved:  [warmup SFT] -> rl1 -> ets1 -> rl2 -> ets2 -> rl3 ...   (schedule.rl_phases)

The trainer walks the plan in order; the plan index and the step inside the phase are saved in
every checkpoint, so a resumed run continues inside the right phase. Every metric row carries
`phase` (`sft` | `rl`) and `phase/name` (`warmup`, `rl1`, `ets1`, ..., or `guard_sft` for a
corrective phase the guard inserted), which the report shades.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastrl.config import Config


@dataclass(frozen=True)
class Phase:
    """One phase of the plan.

    Attributes:
        kind: warmup (SFT on expert trajectories) | rl | corrective (SFT on the expert
            trajectories of recently failed tasks, plus reflections with PRS).
        name: shown in metrics as `phase/name`.
        steps: optimizer steps for warmup and rl; for corrective, the RL steps looked back
            (its own length follows from the data: epochs over the collected trajectories).
    """

    kind: str
    name: str
    steps: int


def build_plan(cfg: Config) -> list[Phase]:
    """The phases of a run, in order."""
    plan: list[Phase] = []
    if cfg.sft.steps > 0:
        plan.append(Phase("warmup", "warmup", cfg.sft.steps))
    if cfg.schedule.scheme == "synchronous":
        if cfg.rl.steps > 0:
            plan.append(Phase("rl", "rl1", cfg.rl.steps))
        return plan
    window = cfg.supervision.ets.window
    label = "prs" if cfg.supervision.prs.enabled else "ets"
    for i, steps in enumerate(cfg.schedule.rl_phases, start=1):
        if i > 1:
            plan.append(Phase("corrective", f"{label}{i - 1}", window))
        plan.append(Phase("rl", f"rl{i}", steps))
    return plan


def describe(plan: list[Phase]) -> str:
    """One line for the log, e.g. `warmup 600 -> rl1 50 -> ets1 (last 10) -> rl2 100`."""
    return " -> ".join(
        f"{p.name} (last {p.steps})" if p.kind == "corrective" else f"{p.name} {p.steps}"
        for p in plan
    )

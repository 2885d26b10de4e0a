"""What the phases of a run share: `RunState` (where the run is; saved in every checkpoint and
resumed from) and `Run` (the model, engine, data and services, with the checkpoint, safe-point and
evaluation steps every phase takes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastrl.config import Config
from fastrl.envs.base import Task
from fastrl.eval import evaluate_policy
from fastrl.monitor.guard import SNAPSHOT_TAG
from fastrl.monitor.log import MetricLogger
from fastrl.rollout.engines import HFEngine
from fastrl.rollout.loop import Limits
from fastrl.train.checkpoint import rng_state, save_checkpoint, stage_partition
from fastrl.train.distributed import Dist
from fastrl.train.optim import Optimizers, full_weights
from fastrl.train.signals import Interrupted, StopRequest
from fastrl.train.update import StepSpec


# --------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """Where a run is: saved in every checkpoint (`trainer_state.json`), resumed from."""

    plan_index: int = 0  # the phase of the plan being run
    phase_step: int = 0  # optimizer steps done inside it
    step: int = 0  # metric rows written (every SFT and RL step)
    rl_step: int = 0  # RL steps done over all RL phases
    sft_position: int = 0  # task-stream positions: the warm-up, RL sampling, mixed SFT
    rl_position: int = 0
    mix_position: int = 0
    nonfinite_in_a_row: int = 0  # steps in a row with a skipped (non-finite) update
    results: dict[str, float | None] = field(default_factory=dict)  # the summary's successes
    failures: dict = field(default_factory=dict)  # FailureLog.state_dict()
    monitor: dict = field(default_factory=dict)  # SpikeAlarm.state_dict()
    guard: dict = field(default_factory=dict)  # Guard.state_dict()

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class Run:
    """What every phase of a run shares."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: Any
    world: Any
    engine: Any
    limits: Limits
    spec: StepSpec
    state: RunState
    logger: MetricLogger
    optimizers: Optimizers
    train_tasks: list[Task]
    eval_sets: dict[str, list[Task]]
    dist: Dist = field(default_factory=Dist)
    stop: StopRequest = field(default_factory=StopRequest)  # SIGINT/SIGTERM, seen at safe points
    last_saved: float = field(default_factory=time.time)  # when the last checkpoint was written

    def share(self, items: list) -> list:
        """This rank's share of a list every rank drew identically."""
        return items[self.dist.rank :: self.dist.world_size]

    def checkpoint(self, tag: str | None = None) -> Path:
        """Save weights, optimizers and run state as `step_<step>` (named by `latest`), or under
        `tag` (the guard's snapshots, which `latest` never names). Rank 0 writes, with every
        rank's RNG state; the others wait for it."""
        tag = tag or f"step_{self.state.step:06d}"
        self.last_saved = time.time()
        rngs = self.dist.gather_objects(rng_state()) if self.dist.enabled else None
        root = Path(self.cfg.run_dir) / "checkpoints"
        partition = self.optimizers.partition_state()
        parts = stage_partition(root, tag, partition, self.dist) if partition is not None else {}
        with self.full_weights():
            if self.dist.is_main:
                save_checkpoint(
                    self.cfg.run_dir, tag, self.model, self.optimizers,
                    dataclasses.asdict(self.state), keep=self.cfg.keep_checkpoints,
                    point_latest=not tag.startswith(SNAPSHOT_TAG), tokenizer=self.tokenizer,
                    rank_rngs=rngs, extra_files=parts,
                )  # fmt: skip
        self.dist.barrier()
        return root / tag

    def safe_point(self, phase_end: bool = False) -> None:
        """After a logged step or at a phase's end: write a checkpoint when one is due (at every
        phase end, every `checkpoint_every` steps of a phase, `checkpoint_minutes` after the last
        one) or a stop was asked for; then stop (`Interrupted`). Every rank decides alike."""
        cfg, state = self.cfg, self.state
        by_steps = bool(cfg.checkpoint_every) and state.phase_step % cfg.checkpoint_every == 0
        overdue = time.time() - self.last_saved >= 60 * cfg.checkpoint_minutes
        by_time = bool(cfg.checkpoint_minutes) and overdue
        # One collective carries both decisions: 2 x the signal asked for, plus 1 when due.
        mine = 2 * (self.stop.signum or 0) + int(phase_end or by_steps or by_time)
        agreed = int(self.dist.all_max(float(mine)))
        if agreed:
            saved = self.checkpoint()
            if agreed // 2:
                raise Interrupted(agreed // 2, state.step, saved)

    def evaluate(self, split: str) -> dict[str, Any]:
        """Greedy evaluation of `split` on rank 0 (the others wait and get None for success)."""
        self.engine.sync_weights()  # generate with the weights the trainer has now
        with self.generation():
            if not self.dist.is_main:
                self.dist.barrier()
                return {"success": None}
            summary, _ = evaluate_policy(self.engine, self.tokenizer, self.world,
                                         self.eval_sets[split], self.limits,
                                         batch_size=self.cfg.rollout.batch_size)  # fmt: skip
            self.dist.barrier()
        return summary

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Whole weights on this rank (ZeRO-3; otherwise nothing to do). Every rank enters."""
        return full_weights(self.optimizers)

    def generation(self) -> contextlib.AbstractContextManager:
        """What generation needs: the HF engine runs the trainer's own modules, so under ZeRO-3
        they must be whole; vLLM holds its own copy, refreshed by `engine.sync_weights()`."""
        if isinstance(self.engine, HFEngine):
            return self.full_weights()
        return contextlib.nullcontext()

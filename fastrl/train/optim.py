"""The optimizer side of a run: AdamW by role, or one DeepSpeed engine, and the step around it.

`Optimizers` keeps the run's optimizers by role (`sft` for an SFT phase, `rl`) and saves them
together; `run_passes` runs a step's backward passes (the same count on every rank);
`clip_and_step` clips and steps, or skips a step whose gradient is not finite, and
`note_nonfinite` stops a run after too many such steps in a row.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastrl.config import Config
from fastrl.monitor.log import nvtx_range
from fastrl.train.distributed import DeepSpeedOptimizer, Dist

log = logging.getLogger("fastrl.train")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas))


class Optimizers:
    """The run's AdamW optimizers by role (`sft` for an SFT phase, `rl`), saved together.

    The RL optimizer lives through every RL phase of an interleaved plan; an SFT phase's is made
    fresh for the phase and dropped at its end. A resumed run gets back the saved states.
    Under DeepSpeed one engine plays every role: switching roles clears its moments, and each
    rank's partition is saved beside the checkpoint (`optim_rank<r>.pt`, see `Run.checkpoint`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        saved: dict | None = None,
        dist: Dist | None = None,
        checkpoint: Path | None = None,
    ):
        self.model, self.cfg = model, cfg
        self.saved = dict(saved or {})
        self.live: dict[str, torch.optim.AdamW] = {}
        self.dist = dist or Dist()
        self.deepspeed: DeepSpeedOptimizer | None = None
        self.ds_role: str | None = None  # the role whose moments the engine holds
        if self.dist.enabled:
            # One DeepSpeed engine for the whole run (its hooks sit on the parameters); a new
            # phase's optimizer is the same engine with its moments cleared.
            base = make_optimizer(model, cfg, 0.0)
            self.deepspeed = DeepSpeedOptimizer(model, base, cfg, self.dist)
            role = self.saved.pop("deepspeed", {}).get("role")
            if role is not None and checkpoint is not None:
                self._load_partition(checkpoint, role)
            if self.saved:
                log.warning("optimizer states of a single-process run: the AdamW moments restart")
                self.saved = {}
        elif self.saved.pop("deepspeed", None) is not None:
            log.warning("optimizer partitions of a multi-process run: the AdamW moments restart")

    def _load_partition(self, checkpoint: Path, role: str) -> bool:
        path = Path(checkpoint) / f"optim_rank{self.dist.rank}.pt"
        if not path.exists():
            log.warning("%s is missing: the AdamW moments restart", path)
            return False
        assert self.deepspeed is not None
        if not self.deepspeed.load_partition_state(torch.load(path, weights_only=True)):
            return False
        self.ds_role = role
        self.live[role] = self.deepspeed
        return True

    def get(self, role: str, lr: float) -> Any:
        if self.deepspeed is not None:
            if role != self.ds_role:
                self.deepspeed.reset()
                self.ds_role = role
            self.live[role] = self.deepspeed
            return self.deepspeed
        if role not in self.live:
            opt = make_optimizer(self.model, self.cfg, lr)
            if role in self.saved:
                opt.load_state_dict(self.saved.pop(role))
            self.live[role] = opt
        return self.live[role]

    def drop(self, role: str) -> None:
        self.live.pop(role, None)
        self.saved.pop(role, None)

    def state_dict(self) -> dict[str, Any]:
        if self.deepspeed is not None:
            return {"deepspeed": {"role": self.ds_role}}
        return {**self.saved, **{role: opt.state_dict() for role, opt in self.live.items()}}

    def partition_state(self) -> dict[str, Any] | None:
        """This rank's DeepSpeed optimizer partition (None in a single process)."""
        return self.deepspeed.partition_state() if self.deepspeed is not None else None

    def writable_weights(self) -> contextlib.AbstractContextManager:
        """Around loading weights into the model in place (see `DeepSpeedOptimizer`)."""
        if self.deepspeed is None:
            return contextlib.nullcontext()
        return self.deepspeed.writable_weights()

    def rolled_back(self, checkpoint: Path, saved: dict[str, Any] | None, role: str) -> None:
        """The weights of `checkpoint` were loaded in place (inside `writable_weights`): restore
        `role`'s optimizer state saved with them (DeepSpeed: this rank's partition)."""
        if self.deepspeed is not None:
            if (saved or {}).get("deepspeed", {}).get("role") == role == self.ds_role:
                self._load_partition(checkpoint, role)
            return
        if saved and role in saved:
            self.load_state_dict({role: saved[role]})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the given roles (a guard rollback); live optimizers of other roles stay."""
        for role, opt_state in state.items():
            if role in self.live:
                self.live[role].load_state_dict(opt_state)
            else:
                self.saved[role] = opt_state


def full_weights(optimizer: Any) -> contextlib.AbstractContextManager:
    """Whole weights for forwards outside the training passes (ZeRO-3; see DeepSpeedOptimizer).
    Every rank enters."""
    if isinstance(optimizer, Optimizers):
        optimizer = optimizer.deepspeed
    if isinstance(optimizer, DeepSpeedOptimizer):
        return optimizer.full_weights()
    return contextlib.nullcontext()


def backward(optimizer, loss: torch.Tensor) -> None:
    """`loss.backward()`, or through the DeepSpeed engine (which averages over ranks)."""
    if isinstance(optimizer, DeepSpeedOptimizer):
        optimizer.backward(loss)
    else:
        loss.backward()


@dataclass(frozen=True)
class Pass:
    """One backward pass of an update: `fn(group)` runs the forward of the micro-batch `group` and
    returns its weighted loss."""

    group: list  # the micro-batch's trajectories (named in an out-of-memory error)
    fn: Callable[[list], torch.Tensor]

    def __call__(self) -> torch.Tensor:
        return self.fn(self.group)


def run_passes(dist: Dist, model, optimizer, passes: list[Pass]) -> bool:
    """Run the backward passes of one update: each `Pass` returns a weighted loss.

    Under DeepSpeed every rank runs as many passes as the busiest one (gradients are reduced
    during each), padding with zero-weighted passes, and a non-finite loss is not backpropagated
    (a zero pass stands in). Returns whether any rank met a non-finite loss (single process:
    always False; the gradient norm tells, see `clip_and_step`)."""
    if not dist.enabled:
        for i, one in enumerate(passes):
            with reporting_oom(one, i, len(passes)):
                loss = one()
                with nvtx_range("backward"):
                    backward(optimizer, loss)
        return False
    total = int(dist.all_max(len(passes)))
    bad = 0.0
    for i in range(total):
        with reporting_oom(passes[i] if i < len(passes) else None, i, total):
            loss = passes[i]() if i < len(passes) else None
            if loss is not None and not torch.isfinite(loss.detach()).all():
                bad, loss = 1.0, None
            if loss is None:
                loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            with nvtx_range("backward"):
                backward(optimizer, loss)
    return dist.all_max(bad) > 0


@contextlib.contextmanager
def reporting_oom(step: Pass | None, index: int, total: int):
    """Turn an out-of-memory error inside a backward pass into one naming the micro-batch."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        group = step.group if step is not None else []
        lengths = [t.num_tokens for t in group]
        raise RuntimeError(
            f"out of memory in micro-batch {index + 1} of {total}: {len(group)} sequences, "
            f"{sum(lengths)} tokens (longest {max(lengths, default=0)}); lower "
            "optim.max_tokens_per_microbatch or rollout.max_total_tokens"
        ) from e


def clip_and_step(model, optimizer, grad_clip: float, *, skip: bool = False) -> float:
    """Clip and apply the accumulated gradients; returns their norm.

    A non-finite norm (a NaN/inf loss or gradient) skips the update: the gradients are dropped,
    the parameters and optimizer state stay as they were, and the norm is returned for the caller
    to count (`note_nonfinite`). Under DeepSpeed, `skip` (a rank met a non-finite loss, see
    `run_passes`) drops the reduced gradients the same way.
    """
    if isinstance(optimizer, DeepSpeedOptimizer):
        if skip:
            optimizer.zero_grad()
            return math.nan
        return optimizer.step()
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    grad_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.detach().float().norm() for p in params])
    ).item()
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return grad_norm
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def note_nonfinite(in_a_row: int, skipped: int, limit: int, row: dict) -> int:
    """Count updates skipped for a non-finite loss or gradient; returns the steps in a row that
    had one (`in_a_row` is the count before this step) and stops after `limit` in a row."""
    row["skipped_updates"] = skipped
    in_a_row = in_a_row + 1 if skipped else 0
    if skipped:
        log.warning(
            "step %d: %d update(s) skipped for a non-finite loss or gradient (%d step(s) in a row)",
            row.get("step", 0),
            skipped,
            in_a_row,
        )
    if limit and in_a_row >= limit:
        raise RuntimeError(
            f"{in_a_row} steps in a row had a non-finite loss or gradient "
            f"(optim.max_nonfinite_steps={limit}); stopping. The last checkpoint is intact."
        )
    return in_a_row

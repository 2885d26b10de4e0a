"""Metric logging: one JSONL row per step, TensorBoard events beside it, a progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range named `fastrl/<name>` for Nsight Systems on CUDA; nothing elsewhere."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(f"fastrl/{name}")
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


# Metric -> label shown on the progress bar (the bar itself counts the steps).
PROGRESS_FIELDS = {
    "phase": "phase",
    "loss": "loss",
    "reward/mean": "reward",
    "success/mean": "success",
    "throughput/tokens_per_s": "tok/s",
}


class NullLogger:
    """The logger of ranks other than 0: rows are written once, by rank 0."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricLogger:
    """Appends rows to `run_dir/metrics.jsonl` (flushed per row so a killed run keeps them).

    On resume, rows of steps after `resume_step` (written after the checkpoint) are dropped first,
    so the file never holds a step twice.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        progress_total: int | None = None,
        resume_step: int | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        self._bar = None
        if progress_total:
            from tqdm.auto import tqdm

            # Redraws every step on a terminal; into a log file, every 30 s at most.
            self._bar = tqdm(
                total=progress_total,
                initial=resume_step or 0,
                file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 30.0,
            )

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: _plain(v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = int(clean.get("step", 0))
        if self._writer is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)
        if self._bar is not None:
            self._bar.update(1)
            shown = {
                label: f"{clean[k]:.3g}" if isinstance(clean[k], float) else clean[k]
                for k, label in PROGRESS_FIELDS.items()
                if k in clean
            }
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

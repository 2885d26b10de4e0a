"""Metric logging: one JSONL row per step, TensorBoard events beside it, a progress bar; and the
process's log set-up: every record (vLLM's included) to stderr and to the run's `train.log`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import warnings
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


# --- log records: stderr and RUN_DIR/train.log

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# vLLM records fastrl's own engine set-up makes harmless, dropped by message start (see
# fastrl/rollout/engines/vllm.py for each choice):
VLLM_HARMLESS = (
    # the in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0) is how weights sync in place;
    # sampling draws from per-request seeds, not the process's global random state
    "The global random seed is set to",
    # chunked prefill is off on purpose: a partially prefilled seeded request crashes the CPU runner
    "This model does not officially support disabling chunked prefill",
    # they restate VLLMEngine's own default, enforce_eager=True (no torch.compile, no CUDA graphs)
    "Enforce eager set",
    "Inductor compilation was disabled",
    # the engine restores torch.set_num_threads after vLLM's CPU worker replaces it
    "CPU backend doesn't allow to use `torch.set_num_threads`",
    # prompts and outputs are token ids (skip_tokenizer_init=True): no chat template to warm up,
    # and the stop token comes with each request's sampling parameters, not the tokenizer's EOS
    "Chat template warmup failed",
    "Using None for EOS token id because tokenizer is not initialized",
    # Triton is installed for fastrl's own kernels; vLLM's CPU backend does not use it
    "Triton is installed, but doesn't include CPU backend",
)


class _VLLMNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("vllm"):
            return True
        return not str(record.msg).startswith(VLLM_HARMLESS)


class _StderrHandler(logging.StreamHandler):
    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.addFilter(_VLLMNoise())


def setup_logging(level: str | int = "INFO") -> None:
    """Log records of fastrl and of vLLM to stderr through one handler, at `level`.

    Call before vLLM is imported: `VLLM_CONFIGURE_LOGGING=0` keeps vLLM from adding its own
    handler (on stdout by default), so its records propagate here, at `VLLM_LOGGING_LEVEL`
    (default WARNING) and without the lines `VLLM_HARMLESS` names. stdout stays free for results.
    """
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:  # a second call
        root.removeHandler(old)
    root.addHandler(_StderrHandler())
    root.setLevel(level)
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper())
    # vLLM's Triton dispatcher walks torch.distributed's attributes at import and touches the
    # deprecated `reduce_op`; nothing a user of fastrl can change.
    warnings.filterwarnings("ignore", message=".*reduce_op` is deprecated", category=FutureWarning)


class RunLogHandler(logging.Handler):
    """Writes records to a run's `train.log` once the run directory is claimed (`open`); until
    then it holds them, so the file also has what was logged before the directory was ready."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.addFilter(_VLLMNoise())
        self._pending: list[logging.LogRecord] = []
        self._file: Any = None

    def open(self, path: str | Path) -> None:
        if self._file is not None:
            return
        self._file = open(path, "a")
        for record in self._pending:
            self._write(record)
        self._pending = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._pending.append(record)
        else:
            self._write(record)

    def _write(self, record: logging.LogRecord) -> None:
        self._file.write(self.format(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def open_run_log(run_dir: str | Path) -> None:
    """Start writing `run_dir/train.log` where the process logs through a `RunLogHandler`."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogHandler):
            handler.open(Path(run_dir) / "train.log")


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
        open_run_log(run_dir)
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

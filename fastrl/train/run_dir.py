"""A run directory is never clobbered and a resume never silently changes the run.

`claim_run_dir` runs before any work (and before any file is written):
- training into a directory that holds anything without `--resume` is refused; `--overwrite`
  moves the old directory aside (`RUN.old-<time>`) instead of deleting it;
- `--resume` with no intact checkpoint to continue from is refused, unless `resume="auto"`,
  which starts fresh in an empty (or missing) directory;
- a finished run (`summary.json`) has nothing to resume.
`resume_changes` compares the resumed run's `config.yaml` with the new configuration: keys that
change only bookkeeping (`RESUMABLE_KEYS`) and a longer RL phase (`rl.steps`, while RL has not
finished) may change, and the change is recorded in `RUN/resumes.jsonl`; any other changed key is
refused, named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fastrl.config import Config, ConfigError, load_config
from fastrl.train.checkpoint import latest_checkpoint

log = logging.getLogger("fastrl.train")

# Keys a resumed run may change: where and how it reports and saves, not what a step computes.
RESUMABLE_KEYS = (
    "run_dir",
    "progress",
    "tensorboard",
    "threads",
    "checkpoint_every",
    "checkpoint_minutes",
    "keep_checkpoints",
    "model.cache_dir",
    "eval.every",
    "eval.splits",
)


def flat(cfg: Config) -> dict[str, Any]:
    """`cfg` as {dotted key: value}."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", dataclasses.asdict(cfg))
    return out


def dir_problem(path: str | Path) -> str | None:
    """Why a directory cannot be at `path` (or be made there), or None when it can: the path or
    one of its parents is a file, or the deepest existing parent is not writable."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                return f"{p} is a file, not a directory"
            if p != path and not os.access(p, os.W_OK | os.X_OK):
                return f"cannot create {path}: {p} is not writable"
            return None
    return None


def claim_run_dir(run_dir: str | Path, resume: bool | str, overwrite: bool) -> bool:
    """Check `run_dir` before a run starts; returns whether the run resumes (see the module
    docstring). Raises ConfigError (exit 2) naming the directory and the way out."""
    run_dir = Path(run_dir)
    problem = dir_problem(run_dir)
    if problem:
        raise ConfigError(f"run_dir: {problem}")
    busy = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if latest_checkpoint(run_dir) is not None:
            if (run_dir / "summary.json").exists():
                raise ConfigError(
                    f"--resume: {run_dir} holds a finished run (summary.json); nothing to resume"
                )
            return True
        if resume == "auto" and not busy:
            return False
        raise ConfigError(
            f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start "
            + ("fresh (with --overwrite: it is not empty)" if busy else "fresh")
        )
    if busy:
        if not overwrite:
            raise ConfigError(
                f"run_dir: {run_dir} is not empty (an earlier run?); continue it with --resume, "
                "pick another run_dir=..., or pass --overwrite to move it aside"
            )
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), str(aside))
        log.info("--overwrite: moved the old %s to %s", run_dir, aside)
    return False


def resume_changes(run_dir: str | Path, cfg: Config, phases: int) -> dict[str, list]:
    """{key: [saved, new]} of the keys `cfg` changes against the resumed run's `config.yaml`;
    ConfigError naming any key that may not change. Recorded in `run_dir/resumes.jsonl`.
    `phases`: the length of `cfg`'s phase plan (a checkpoint past all of them has ended RL)."""
    state = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    rl_finished = state.get("plan_index", 0) >= phases
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return {}
    old, new = flat(load_config(saved_path, [])), flat(cfg)
    changed = {k: [old.get(k), new[k]] for k in new if old.get(k) != new[k]}
    refused = [k for k in changed if k not in RESUMABLE_KEYS and k != "rl.steps"]
    if refused:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused)
        raise ConfigError(
            f"--resume: the run in {run_dir} was trained with other values of {shown}; resume "
            f"with its own values (a resumed run may change only {', '.join(RESUMABLE_KEYS)} and "
            "rl.steps), or start a new run_dir"
        )
    if "rl.steps" in changed and rl_finished:
        raise ConfigError(
            f"--resume: rl.steps can change only before RL ends; the run in {run_dir} has done "
            f"its {changed['rl.steps'][0]} RL steps"
        )
    if changed:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changed}
        with open(Path(run_dir) / "resumes.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("resuming with changed keys: %s", ", ".join(changed))
    return changed

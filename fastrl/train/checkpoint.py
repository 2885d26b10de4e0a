"""Atomic checkpoints: weights (safetensors), optimizer, RNG states and the trainer's position.

A checkpoint is written into a temporary directory beside its final place and renamed into place,
then `checkpoints/latest` is replaced atomically to name it. A run killed at any moment leaves
either the previous checkpoint or the new one, never a half-written directory that `latest` names.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    tag: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    *,
    keep: int = 2,
    point_latest: bool = True,
) -> Path:
    """Write `run_dir/checkpoints/<tag>` atomically and point `latest` at it.

    With `point_latest=False` (the guard's healthy snapshot) `latest` and pruning are untouched;
    only `step_*` checkpoints are ever pruned."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / tag
    tmp = root / f".{tag}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": rng_state(),
        },
        tmp / "train_state.pt",
    )
    _atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1))
    if final.exists():
        old = root / f".{tag}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if point_latest:
        _atomic_write_text(root / "latest", tag)
        _prune(root, keep, current=tag)
    return final


def promote_checkpoint(root: str | Path, src: str, dst: str) -> Path:
    """Rename checkpoint `root/src` to `root/dst`, replacing it; `dst` always names a complete
    checkpoint (the old one until the rename, then the new one)."""
    root = Path(root)
    final = root / dst
    old = root / f".{dst}.old{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(root / src, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    # Tags are zero-padded step numbers, so name order is age order.
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for path in done[: max(0, len(done) - keep)]:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    restore_rng: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load weights into `model`; return (trainer_state, optimizer_state) and restore RNG states
    (unless `restore_rng=False`: a rollback keeps drawing fresh samples)."""
    path = Path(path)
    load_model(model, str(path / "model.safetensors"))
    blob = torch.load(path / "train_state.pt", weights_only=False)
    if restore_rng:
        set_rng_state(blob["rng"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return trainer_state, blob["optimizer"]

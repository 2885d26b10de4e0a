"""Atomic, verifiable checkpoints: weights, optimizer, RNG states and the trainer's position.

A checkpoint directory holds:
- the model as `save_pretrained` writes it (`config.json`, `model.safetensors`; plus the tokenizer
  when given), so `AutoModelForCausalLM.from_pretrained(dir)` and `fastrl eval --model dir` load it;
  a module without `save_pretrained` gets a plain `model.safetensors`;
- `train_state.pt`: the optimizer state(s) and the RNG states (python, numpy, torch, CUDA), in a
  form `torch.load(weights_only=True)` reads: no pickle of arbitrary objects is ever loaded;
- `trainer_state.json`: the trainer's position (phase, step, data positions, monitor state, ...);
- under DeepSpeed, `optim_rank<r>.pt`: rank r's optimizer partition (weights_only-safe too);
- `manifest.json`, written last: the size and SHA-256 of every other file.
It is written into a temporary directory beside its final place, every file fsynced, and renamed
into place; then `checkpoints/latest` is replaced atomically to name it. A run killed at any
moment leaves the previous checkpoint or the new one, never a half-written directory that `latest`
names. A checkpoint that was damaged afterwards (truncated, overwritten, missing files) fails its
manifest check with `CorruptCheckpoint`; `resume_checkpoint` then falls back to the next older one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_model

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint directory is incomplete or its files do not match their manifest."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from, as plain lists, ints and tensors (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_weights(model: torch.nn.Module, directory: Path, tokenizer: Any = None) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    else:
        save_model(model, str(directory / "model.safetensors"))


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    if not hasattr(model, "save_pretrained"):
        load_model(model, str(path))
        return
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained writes a tied weight once; the other name shares its storage.
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in missing if k not in params or not _is_tied(params, k)]
    if untied or unexpected:
        raise CorruptCheckpoint(
            f"{path}: weights do not match the model (missing {untied[:5]}, unexpected "
            f"{unexpected[:5]})"
        )


def _is_tied(params: dict[str, torch.nn.Parameter], name: str) -> bool:
    ptr = params[name].data_ptr()
    return any(other != name and p.data_ptr() == ptr for other, p in params.items())


def save_checkpoint(
    run_dir: str | Path,
    tag: str,
    model: torch.nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any],
    *,
    keep: int = 2,
    point_latest: bool = True,
    tokenizer: Any = None,
    rank_rngs: list[dict[str, Any]] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write `run_dir/checkpoints/<tag>` atomically and point `latest` at it.

    `optimizer` is anything with `state_dict()` (or None). With `point_latest=False` (the guard's
    snapshots) `latest` and pruning are untouched; only `step_*` checkpoints are ever pruned.
    `rank_rngs`: every rank's `rng_state()` in a multi-process run (this process's otherwise).
    `extra_files`: name -> a file already written (and fsynced) elsewhere on the same file
    system, moved into the checkpoint (each rank's optimizer partition under DeepSpeed).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / tag
    tmp = root / f".{tag}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_weights(model, tmp, tokenizer)
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": rng_state() if rank_rngs is None else rank_rngs[0],
            "rank_rngs": rank_rngs,
        },
        tmp / "train_state.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    for name, path in (extra_files or {}).items():
        os.replace(path, tmp / name)
    manifest = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        manifest[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    _atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        old = root / f".{tag}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if point_latest:
        _atomic_write_text(root / "latest", tag)
        _prune(root, keep, current=tag)
    return final


def stage_partition(root: str | Path, tag: str, partition: Any, dist: Any) -> dict[str, Path]:
    """Write this rank's optimizer partition (DeepSpeed) next to checkpoint `tag`, fsynced, and
    wait for every rank; returns the staged files by name (`save_checkpoint`'s `extra_files`,
    which rank 0 moves in). Every rank calls it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parts = {f"optim_rank{r}.pt": root / f".{tag}.optim_rank{r}.pt"
             for r in range(dist.world_size)}  # fmt: skip
    staged = parts[f"optim_rank{dist.rank}.pt"]
    torch.save(partition, staged)
    with open(staged, "rb+") as f:
        os.fsync(f.fileno())
    dist.barrier()
    return parts


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
    """The checkpoint `latest` names, if it exists (not verified: see `resume_checkpoint`)."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def verify_checkpoint(path: str | Path) -> None:
    """Raise `CorruptCheckpoint` unless every file of `path` matches its manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: no readable {MANIFEST} ({e})") from e
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpoint(f"{path}: {name} has {size} bytes, expected {entry['size']}")
        if _sha256(file) != entry["sha256"]:
            raise CorruptCheckpoint(f"{path}: {name} does not match its SHA-256")


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    restore_rng: bool = True,
) -> tuple[dict[str, Any], Any]:
    """Verify `path`, load its weights into `model` and return (trainer_state, optimizer_state);
    restore the RNG states unless `restore_rng=False` (a rollback keeps drawing fresh samples).
    Raises `CorruptCheckpoint` when the checkpoint is damaged."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        blob = torch.load(path / "train_state.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged checkpoint
        raise CorruptCheckpoint(f"{path}: {type(e).__name__}: {e}") from e
    _load_weights(model, path / "model.safetensors")
    if restore_rng:
        set_rng_state(blob["rng"])
    return trainer_state, blob["optimizer"]


def set_rng_state_of_rank(path: str | Path, rank: int) -> None:
    """Restore rank `rank`'s RNG states saved in the checkpoint at `path` (multi-process runs)."""
    blob = torch.load(Path(path) / "train_state.pt", weights_only=True)
    rngs = blob.get("rank_rngs")
    if rngs and rank < len(rngs):
        set_rng_state(rngs[rank])
    else:
        log.warning(
            "checkpoint %s holds no RNG state for rank %d; keeping the seeded one", path, rank
        )


def resume_checkpoint(
    run_dir: str | Path, model: torch.nn.Module
) -> tuple[Path, dict[str, Any], Any] | None:
    """The newest intact checkpoint of `run_dir`, loaded: (path, trainer_state, optimizer_state).

    Tries the one `latest` names, then older `step_*` ones; each damaged one is reported and
    skipped. None when there is none."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True
    )
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        candidates = [latest] + [p for p in candidates if p != latest]
    for path in candidates:
        try:
            state, optimizer_state = load_checkpoint(path, model)
        except CorruptCheckpoint as e:
            log.error("skipping damaged checkpoint: %s", e)
            continue
        return path, state, optimizer_state
    if candidates:
        log.error("no intact checkpoint in %s; starting from scratch", root)
    return None

"""Tool-use pretraining: a preset trained on procedural tool tasks becomes `<preset>-base`.

A random-init preset knows no chat, no schema and no call syntax; the demo's SFT then has to teach
all of it from the tool world's own eleven tools, and what it learns is tied to them. This stage
first teaches the skill itself on tools that never recur: every transcript of
`fastrl.envs.procedural` invents its tools (names, arguments, types, descriptions) and entities,
and asks in hermes JSON or pythonic list syntax, named in the system prompt. The loss is the SFT
loss on the expert's assistant tokens (calls and answers; tool results and prompts are context),
with the trainer's own `sft_step`.

The tokenizer is fitted on the union of the procedural corpus and the tool world's corpus (the
texts the preset of `env.name` is fitted on), so one tokenizer reads both and the demo can start
from it (`model.name=tiny-base`); the world's texts take more tokens than with the plain preset's
(docs/ARCHITECTURE.md).

    fastrl pretrain                                   # tiny-base into runs/pretrain
    fastrl pretrain model.name=small pretrain.steps=3000 run_dir=runs/small-base

`model.name: tiny-base` in a training config builds the same thing on first use, with the config's
`pretrain.*`, `model.vocab_size`, `model.init_seed` and environment as its recipe, and caches it
under `model.cache_dir` by the recipe's hash. A run is deterministic on CPU: the batches of step
s are drawn from a seed of its own, so a resumed run (a killed build continues from its latest
checkpoint) takes the same steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastrl.algo.supervision import play_experts
from fastrl.config import Config, ConfigError, save_config
from fastrl.envs import get_world
from fastrl.envs.procedural import ProceduralWorld
from fastrl.eval import evaluate_policy
from fastrl.models import (
    BASES,
    PRESET_FORMAT_VERSION,
    PRESETS,
    build_tokenizer,
    init_model,
    load_model,
)
from fastrl.train.build import attention_of, build_engine, limits_of
from fastrl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastrl.train.optim import lr_factor, make_optimizer
from fastrl.train.packing import ATTN_IMPLEMENTATION
from fastrl.train.packing import register as register_packed_attention
from fastrl.train.update import StepSpec, sft_step

log = logging.getLogger("fastrl.pretrain")

# Bump when the stage changes what a recipe builds (generator, loss, data order).
PRETRAIN_FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
# Bases committed to the repository (`fastrl/bases/<name>/`, written by `fastrl pretrain`'s
# final/): a cache miss copies one whose recipe hash is the one asked for instead of training.
SHIPPED_DIR = Path(__file__).resolve().parent / "bases"
EVAL_SPLITS = ("test_hermes", "test_pythonic")


# --- recipe -------------------------------------------------------------------------------------


def preset_of(name: str) -> str:
    """The preset a model name trains: `tiny-base` -> `tiny`; a preset is its own."""
    if name in BASES:
        return BASES[name]
    if name in PRESETS:
        return name
    raise ConfigError(
        f"model.name: pretraining builds a preset ({', '.join(PRESETS)}) or its base "
        f"({', '.join(BASES)}), got {name!r}"
    )


def _world_corpus_digest(cfg: Config) -> str:
    digest = hashlib.sha256()
    for text in get_world(cfg.env.name, cfg.env).tokenizer_corpus(seed=cfg.env.seed):
        digest.update(len(text.encode()).to_bytes(8, "little") + text.encode())
    return digest.hexdigest()


def recipe(cfg: Config) -> dict[str, Any]:
    """Everything a base's weights depend on, as plain JSON: the preset's shape, the tokenizer's
    corpora, the pretraining and optimizer keys, and the code versions."""
    preset = preset_of(cfg.model.name)
    return {
        "preset": preset,
        "shape": dataclasses.asdict(PRESETS[preset]),
        "vocab_size": cfg.model.vocab_size,
        "init_seed": cfg.model.init_seed,
        "world": {"name": cfg.env.name, "corpus_sha256": _world_corpus_digest(cfg)},
        # eval_tasks only scores the result
        "pretrain": {
            k: v for k, v in dataclasses.asdict(cfg.pretrain).items() if k != "eval_tasks"
        },
        "optim": {
            k: getattr(cfg.optim, k)
            for k in ("weight_decay", "betas", "grad_clip", "packing", "max_tokens_per_microbatch")
        },
        # which transcripts fit
        "max_total_tokens": cfg.rollout.max_total_tokens,
        "max_turn_tokens": cfg.rollout.max_turn_tokens,
        "max_obs_tokens": cfg.rollout.max_obs_tokens,
        "format_version": [PRESET_FORMAT_VERSION, PRETRAIN_FORMAT_VERSION],
    }


def recipe_hash(rec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()


def recipe_hash_of(model_dir: str | Path) -> str | None:
    """The recipe hash a base directory records, None when it holds no recipe."""
    path = Path(model_dir) / RECIPE_FILE
    return json.loads(path.read_text())["recipe_hash"] if path.is_file() else None


# --- the stage ----------------------------------------------------------------------------------


def _initial_model(cfg: Config, directory: Path) -> Path:
    """Fit the union tokenizer, build the random-init preset and save both to `directory`."""
    if (directory / "config.json").is_file():
        return directory
    p = cfg.pretrain
    corpus = itertools.chain(
        get_world(cfg.env.name, cfg.env).tokenizer_corpus(seed=cfg.env.seed),
        ProceduralWorld().tokenizer_corpus(p.tasks, p.seed),
    )
    tokenizer = build_tokenizer(corpus, vocab_size=cfg.model.vocab_size)
    model = init_model(PRESETS[preset_of(cfg.model.name)], tokenizer, cfg.model.init_seed)
    staging = Path(tempfile.mkdtemp(prefix=".init.", dir=directory.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    os.replace(staging, directory)
    return directory


def pretrain(
    cfg: Config, run_dir: str | Path | None = None, rec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the pretraining stage of `cfg` into `run_dir` (default `cfg.run_dir`); return the
    summary (also `run_dir/summary.json`). The base lands in `run_dir/final` with its recipe
    (`rec`: `recipe(cfg)`, computed when not given)."""
    run_dir = Path(run_dir or cfg.run_dir)
    p = cfg.pretrain
    rec = rec or recipe(cfg)
    key = recipe_hash(rec)
    t_start = time.time()

    # --- set-up: resume a run of the same recipe, refuse another's
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    checkpoint = latest_checkpoint(run_dir)
    trainer_state: dict[str, Any] = {"step": 0, "recipe_hash": key, "losses": []}
    if checkpoint is not None:
        held = json.loads((checkpoint / "trainer_state.json").read_text()).get("recipe_hash")
        if held != key:
            raise ConfigError(
                f"run_dir: {str(run_dir)!r} holds a pretraining run of another recipe; "
                "choose another run_dir"
            )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    attention = attention_of(cfg)
    if attention == ATTN_IMPLEMENTATION:
        register_packed_attention()
    model, tokenizer, _ = load_model(
        _initial_model(cfg, run_dir / f"init-{key[:16]}"), attn_implementation=attention
    )
    model.train()
    optimizer = make_optimizer(model, cfg, p.lr)
    if checkpoint is not None:
        trainer_state, optimizer_state = load_checkpoint(checkpoint, model)
        optimizer.load_state_dict(optimizer_state)
        log.info("pretrain: resumed from %s (step %d)", checkpoint, trainer_state["step"])

    # --- data: the expert transcripts of the procedural train tasks, tokenised as the trainer does
    world = ProceduralWorld()
    limits = limits_of(cfg)
    trajs = play_experts(
        tokenizer, world, world.tasks("train", p.tasks, p.seed), limits, solved_only=True
    )
    if len(trajs) < p.batch_size:
        raise ConfigError(
            f"pretrain.tasks: only {len(trajs)} transcripts fit rollout.max_total_tokens, fewer "
            f"than pretrain.batch_size={p.batch_size}"
        )
    log.info("pretrain: %d transcripts of %d tasks", len(trajs), p.tasks)
    spec = StepSpec(
        pad_id=tokenizer.pad_token_id,
        max_tokens=cfg.optim.max_tokens_per_microbatch,
        packing=cfg.optim.packing,
        grad_clip=cfg.optim.grad_clip,
    )

    # --- loop (a resumed run drops the metric rows written after its checkpoint)
    warmup = int(p.warmup_ratio * p.steps)
    metrics_path = run_dir / "metrics.jsonl"
    kept = [
        line
        for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
        if json.loads(line)["step"] <= trainer_state["step"]
    ]
    metrics_path.write_text("".join(f"{line}\n" for line in kept))
    metrics = open(metrics_path, "a")  # noqa: SIM115 - closed below
    bar = tqdm(
        total=p.steps, initial=trainer_state["step"], desc="pretrain", disable=not cfg.progress
    )
    last_save = time.time()
    for step in range(trainer_state["step"], p.steps):
        rng = random.Random(f"pretrain/{p.seed}/{step}")
        batch = [trajs[i] for i in rng.sample(range(len(trajs)), p.batch_size)]
        lr = p.lr * lr_factor(step, p.steps, warmup, p.schedule)
        stats = sft_step(model, optimizer, batch, lr, spec)
        trainer_state["step"] = step + 1
        trainer_state["losses"].append(stats["loss"])
        metrics.write(json.dumps({"step": step + 1, "phase": "pretrain", **stats}) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        due = due or (
            cfg.checkpoint_minutes and time.time() - last_save > 60 * cfg.checkpoint_minutes
        )
        if due or step + 1 == p.steps:
            metrics.flush()
            save_checkpoint(
                run_dir,
                f"step_{step + 1:06d}",
                model,
                optimizer,
                trainer_state,
                keep=cfg.keep_checkpoints,
                tokenizer=tokenizer,
            )
            last_save = time.time()
    bar.close()
    metrics.close()
    train_s = time.time() - t_start  # this process's set-up and steps

    # --- the base: weights, tokenizer and recipe in run_dir/final, written atomically
    model.eval()
    final = run_dir / "final"
    staging = Path(tempfile.mkdtemp(prefix=".final.", dir=run_dir))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / RECIPE_FILE).write_text(
        json.dumps({"recipe": rec, "recipe_hash": key}, indent=1, sort_keys=True) + "\n"
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)

    # --- the base's own scores: greedy success on held-out procedural tasks, per syntax (on the
    # engine `rollout.engine` names, as in training)
    scores = {}
    if p.eval_tasks:
        engine, _ = build_engine(cfg, model, str(final), tokenizer.pad_token_id)
        for split in EVAL_SPLITS:
            summary, _ = evaluate_policy(
                engine, tokenizer, world, world.tasks(split, p.eval_tasks, p.seed), limits
            )
            scores[split] = summary["success"]
    losses = trainer_state["losses"]
    head = losses[: max(1, len(losses) // 20)]
    tail = losses[-max(1, len(losses) // 20) :]
    summary = {
        "run_dir": str(run_dir),
        "model_dir": str(final),
        "preset": rec["preset"],
        "recipe_hash": key,
        "steps": p.steps,
        "loss_first": sum(head) / len(head),
        "loss_last": sum(tail) / len(tail),
        "train_s": round(train_s, 1),
        "success": scores,
        "eval_tasks": p.eval_tasks,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# --- the cached base ----------------------------------------------------------------------------


def materialize_base(cfg: Config) -> Path:
    """The directory of `cfg.model.name` (a `<preset>-base`) for `cfg`'s recipe, built on first use.

    `model.cache_dir/<name>-<hash>`, the hash of `recipe(cfg)`. On a miss, a shipped base of the
    same recipe hash (`SHIPPED_DIR/<name>`) is copied in; else the stage runs in
    `model.cache_dir/.<name>-<hash>.build` (a killed build resumes there) and its `final/` is
    renamed into place. Either way a finished directory is never partial.
    """
    rec = recipe(cfg)
    key = recipe_hash(rec)
    cache_dir = Path(cfg.model.cache_dir).expanduser()
    target = cache_dir / f"{cfg.model.name}-{key[:16]}"
    if (target / RECIPE_FILE).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    shipped = SHIPPED_DIR / cfg.model.name
    if recipe_hash_of(shipped) == key:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
        shutil.copytree(shipped, staging, dirs_exist_ok=True)
        try:
            os.replace(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if recipe_hash_of(target) != key:
                raise
        log.info("%s: the shipped base %s (recipe %s)", cfg.model.name, shipped, key[:16])
        return target
    build_dir = cache_dir / f".{target.name}.build"
    log.info("building %s (recipe %s) in %s", cfg.model.name, key[:16], build_dir)
    # Scoring is `fastrl pretrain`'s job; a training run that needs the base only waits for it.
    quiet = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, eval_tasks=0))
    summary = pretrain(quiet, build_dir, rec)
    log.info("built %s: %s", cfg.model.name, json.dumps(summary))
    try:
        os.replace(build_dir / "final", target)
    except OSError:
        if not (target / RECIPE_FILE).is_file():  # else another builder finished first
            raise
    shutil.rmtree(build_dir, ignore_errors=True)
    return target

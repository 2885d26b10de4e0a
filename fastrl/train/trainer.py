"""The training loop, top to bottom: SFT on a teacher's demonstrations, then GRPO on multi-turn
tool use.

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
- trajectories cut by a limit can be masked out of the loss (`rl.mask_truncated`, off by default:
  in multi-turn tool use most cuts are error loops that reach the turn limit, a failure the loss
  should see);
- groups with no reward variance can be dropped or refilled (`rl.dynamic_sampling`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as load_model_weights
from safetensors.torch import save_model as save_model_weights

from fastrl.algo.advantages import group_advantages, zero_variance_groups
from fastrl.algo.losses import get_policy_loss, sft_loss
from fastrl.algo.schedule import Phase, build_plan, describe
from fastrl.algo.supervision import (
    FailureLog,
    corrective_data,
    get_reflector,
    group_sources,
    hint_suffixes,
    luffy_loss,
    mixed_sft_loss,
    mixed_sft_weight,
    play_experts,
    play_teacher,
)
from fastrl.config import Config, ConfigError, save_config
from fastrl.envs import get_world
from fastrl.envs.base import Task, set_tool_timeout
from fastrl.envs.formats import get_format
from fastrl.envs.teacher import applicable
from fastrl.eval import evaluate_policy
from fastrl.models import apply_liger, control_token_ids
from fastrl.monitor.control_tokens import SpikeAlarm, decision_positions, gradient_split
from fastrl.monitor.guard import SNAPSHOT_CANDIDATE, SNAPSHOT_TAG, Decision, Guard
from fastrl.monitor.log import MetricLogger, NullLogger, nvtx_range
from fastrl.monitor.metrics import CONTROL_KEYS, rollout_metrics, token_metrics
from fastrl.monitor.states import healthy_fraction
from fastrl.rollout.engines import HFEngine
from fastrl.rollout.loop import Limits, run_episodes
from fastrl.rollout.types import Trajectory
from fastrl.train.batch import collate, micro_batches, model_device, token_stats
from fastrl.train.build import (
    build_engine,
    build_policy,
    describe_forward,
    limits_of,
    teacher_habits,
    training_device,
)
from fastrl.train.checkpoint import (
    load_checkpoint,
    promote_checkpoint,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state_of_rank,
)
from fastrl.train.distributed import Dist, launched_world_size
from fastrl.train.distributed import setup as setup_distributed
from fastrl.train.optim import (
    Optimizers,
    clip_and_step,
    full_weights,
    lr_factor,
    note_nonfinite,
    run_passes,
)

log = logging.getLogger("fastrl.train")


def task_stream(tasks: list[Task], seed: int, start: int) -> Iterator[tuple[int, Task]]:
    """Endless shuffled passes over `tasks`; yields (position, task) from position `start`."""
    n = len(tasks)
    pos = start
    while True:
        epoch, index = divmod(pos, n)
        order = np.random.default_rng(seed + epoch).permutation(n)
        yield pos, tasks[int(order[index])]
        pos += 1


def decision_probe_set(run: Run) -> list[Trajectory]:
    """The decision probe's data (`monitor.decision_probe_tasks`): held-out expert trajectories
    with a loss mask on each message after a question or a tool result (`decision_positions`)."""
    tasks = run.eval_sets["test"][: run.cfg.monitor.decision_probe_tasks]
    habit_turns = {t.id: ["stop_early" in a for a in applicable(t)] for t in tasks}
    trajs = play_experts(run.tokenizer, run.world, tasks, run.limits, solved_only=True)
    probe = [decision_positions(t, habit_turns[t.task_id]) for t in trajs]
    return [t for t in probe if t.info["kinds"]]


@torch.no_grad()
def decision_probe(run: Run, probe: list[Trajectory], tool_call_id: int) -> dict[str, float]:
    """Mean p(`<tool_call>`) over the probe's positions of each kind: `ctrl/habit_p_tool_call`,
    `ctrl/first_p_tool_call`, `ctrl/continue_p_tool_call` and `ctrl/answer_p_tool_call` (see
    `decision_positions`)."""
    cfg = run.cfg
    probs, kinds = [], []
    for group in micro_batches(probe, cfg.optim.max_tokens_per_microbatch, cfg.optim.packing):
        batch = collate(group, run.pad_id, model_device(run.model))
        _, _, ctrl = token_stats(
            run.model, batch, control_ids=[tool_call_id], packed=cfg.optim.packing
        )
        probs.append(ctrl[:, 0].float().cpu())  # rows: the masked positions, row-major
        kinds += [k for t in group for k in t.info["kinds"]]
    p = torch.cat(probs)
    row = {}
    for kind in ("habit", "first", "continue", "answer"):
        where = torch.tensor([k == kind for k in kinds], dtype=torch.bool)
        if where.any():
            row[f"ctrl/{kind}_p_tool_call"] = p[where].mean().item()
    return row


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


# --------------------------------------------------------------------------- the run
def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if launched_world_size() <= 1 or os.environ.get("RANK", "0") == "0":
        save_config(cfg, run_dir / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = setup_distributed(cfg.distributed.backend)
    if dist.enabled:
        for key, n in (("rl.prompts_per_step", cfg.rl.prompts_per_step),
                       ("sft.batch_size", cfg.sft.batch_size)):  # fmt: skip
            if n % dist.world_size:
                raise ConfigError(f"{key}: {n} must be a multiple of the {dist.world_size} ranks")
    # Sampling differs per rank; the data order (task streams) is the same on every rank.
    random.seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    torch.manual_seed(cfg.seed + dist.rank)

    set_tool_timeout(cfg.env.tool_timeout_s)
    world = get_world(cfg.env.name)
    if dist.enabled and not dist.is_main:
        dist.barrier()  # rank 0 builds and caches a preset first
    model, tokenizer, model_dir = build_policy(cfg)
    if dist.enabled and dist.is_main:
        dist.barrier()
    device = training_device(cfg.model.device)
    model.to(device)
    log.info("training device: %s (model.device=%s)", device, cfg.model.device)
    if cfg.model.liger:
        try:
            apply_liger(model)
        except (ImportError, ValueError) as e:
            raise ConfigError(str(e)) from e
    model.train()
    log.info("training forward: %s", describe_forward(cfg, model))
    plan = build_plan(cfg)
    log.info("phase plan: %s", describe(plan) or "nothing to train")
    limits = limits_of(cfg)
    engine, engine_used = build_engine(cfg, model, model_dir, tokenizer.pad_token_id)
    train_tasks = world.tasks("train", cfg.env.train_tasks, seed=cfg.env.seed)
    eval_sets = {
        split: world.tasks(split, cfg.env.eval_tasks, seed=cfg.env.seed)
        for split in dict.fromkeys(["test", *cfg.eval.splits])
    }

    # Where a resumed run picks up.
    state: dict[str, Any] = {
        "plan_index": 0,  # the phase of `plan` being run
        "phase_step": 0,  # optimizer steps done inside it
        "step": 0,  # metric rows written (every SFT and RL step)
        "rl_step": 0,  # RL steps done over all RL phases
        "sft_position": 0,  # task streams of the warm-up, RL sampling and mixed SFT
        "rl_position": 0,
        "mix_position": 0,
        "results": {},
    }
    saved_optimizers = None
    found = resume_checkpoint(run_dir, model) if resume else None
    ckpt = None
    if found is not None:
        ckpt, state, saved_optimizers = found
        where = plan[state["plan_index"]].name if state["plan_index"] < len(plan) else "the end"
        log.info("resumed from %s (%s, step %d)", ckpt, where, state["step"])
    # Corrective phases are as long as their data, known only when they start.
    progress_total = sum(p.steps for p in plan if p.kind != "corrective") or None
    if dist.is_main:
        logger = MetricLogger(
            run_dir,
            tensorboard=cfg.tensorboard,
            progress_total=progress_total if cfg.progress else None,
            resume_step=state["step"] if ckpt is not None else None,
        )
    else:
        logger = NullLogger()
    if ckpt is not None and dist.enabled:
        set_rng_state_of_rank(ckpt, dist.rank)
    run = Run(
        cfg=cfg,
        model=model,
        tokenizer=tokenizer,
        world=world,
        engine=engine,
        limits=limits,
        state=state,
        logger=logger,
        optimizers=Optimizers(model, cfg, saved_optimizers, dist, ckpt),
        train_tasks=train_tasks,
        eval_sets=eval_sets,
        dist=dist,
    )
    if run.optimizers.deepspeed is not None and hasattr(engine, "gather"):
        engine.gather = run.optimizers.deepspeed.gather  # ZeRO-3: each tensor whole when synced

    if "teacher_success" not in state["results"]:  # the demonstrations' own test success
        habits = teacher_habits(cfg)
        demos = play_teacher(tokenizer, world, eval_sets["test"], limits, habits, cfg.seed)
        state["results"]["teacher_success"] = sum(t.success for t in demos) / len(demos)
        if dist.is_main:
            log.info("teacher success on test: %.3f", state["results"]["teacher_success"])

    def baseline() -> None:  # test success of the policy RL starts from
        if "sft_success" not in state["results"]:
            state["results"]["sft_success"] = run.evaluate("test")["success"]
            if dist.is_main:
                log.info("test success before RL: %.3f", state["results"]["sft_success"])

    while state["plan_index"] < len(plan):
        phase = plan[state["plan_index"]]
        if phase.kind == "warmup":
            sft_phase(run, phase, demonstrated(cfg, train_tasks))
        else:
            baseline()
            if phase.kind == "rl":
                rl_phase(run, phase)
            else:
                corrective_phase(run, phase.name, since=state["rl_step"] - phase.steps + 1)
        state.update(plan_index=state["plan_index"] + 1, phase_step=0)
        run.checkpoint()
    baseline()

    # ----------------------------------------------------------------------- final evaluation
    results = state["results"]
    if "rl_success" not in results:
        for split in cfg.eval.splits:
            results[f"{split}_success" if split != "test" else "rl_success"] = run.evaluate(split)[
                "success"
            ]
        state["results"] = results
        run.checkpoint()
    logger.close()
    final_dir = run_dir / "final"
    with run.full_weights():
        if dist.is_main:
            model.save_pretrained(final_dir)
            tokenizer.save_pretrained(final_dir)
    summary = {
        "teacher_success": results.get("teacher_success"),
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
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary


@dataclass
class Run:
    """What every phase of a run shares."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: Any
    world: Any
    engine: Any
    limits: Limits
    state: dict[str, Any]
    logger: MetricLogger
    optimizers: Optimizers
    train_tasks: list[Task]
    eval_sets: dict[str, list[Task]]
    dist: Dist = field(default_factory=Dist)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def share(self, items: list) -> list:
        """This rank's share of a list every rank drew identically."""
        return items[self.dist.rank :: self.dist.world_size]

    def checkpoint(self, tag: str | None = None) -> Path:
        """Save weights, optimizers and trainer state as `step_<step>` (named by `latest`), or
        under `tag` (the guard's snapshots, which `latest` never names). Rank 0 writes, with
        every rank's RNG state; the others wait for it."""
        tag = tag or f"step_{self.state['step']:06d}"
        rngs = self.dist.gather_objects(rng_state()) if self.dist.enabled else None
        root = Path(self.cfg.run_dir) / "checkpoints"
        partition = self.optimizers.partition_state()
        parts = {}
        if partition is not None:  # each rank stages its own; rank 0 moves them in
            root.mkdir(parents=True, exist_ok=True)
            parts = {f"optim_rank{r}.pt": root / f".{tag}.optim_rank{r}.pt"
                     for r in range(self.dist.world_size)}  # fmt: skip
            staged = parts[f"optim_rank{self.dist.rank}.pt"]
            torch.save(partition, staged)
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            self.dist.barrier()
        with self.full_weights():
            if self.dist.is_main:
                save_checkpoint(
                    self.cfg.run_dir,
                    tag,
                    self.model,
                    self.optimizers,
                    self.state,
                    keep=self.cfg.keep_checkpoints,
                    point_latest=not tag.startswith(SNAPSHOT_TAG),
                    tokenizer=self.tokenizer,
                    rank_rngs=rngs,
                    extra_files=parts,
                )
        self.dist.barrier()
        return root / tag

    def evaluate(self, split: str) -> dict[str, Any]:
        """Greedy evaluation of `split` on rank 0 (the others wait and get None for success)."""
        self.engine.sync_weights()  # generate with the weights the trainer has now
        with self.generation():
            if not self.dist.is_main:
                self.dist.barrier()
                return {"success": None}
            summary, _ = evaluate_policy(
                self.engine,
                self.tokenizer,
                self.world,
                self.eval_sets[split],
                self.limits,
                batch_size=self.cfg.rollout.batch_size,
            )
            self.dist.barrier()
        return summary

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Whole weights on this rank (ZeRO-3; otherwise nothing to do). Every rank enters."""
        return full_weights(self.optimizers)

    def generation(self) -> contextlib.AbstractContextManager:
        """What generation needs: the HF engine runs the trainer's own modules, so under ZeRO-3
        they must be whole; vLLM holds its own copy, refreshed by `engine.sync_weights()` (called
        on every rank: under ZeRO-3 it gathers each tensor)."""
        if isinstance(self.engine, HFEngine):
            return self.full_weights()
        return contextlib.nullcontext()


def sft_step(run: Run, optimizer, trajs: list[Trajectory], lr: float) -> dict[str, Any]:
    """One optimizer step of the SFT loss on `trajs` (this rank's share of the batch, normalised
    by the whole batch's tokens or rows); returns its metrics."""
    cfg = run.cfg
    t0 = time.time()
    for group in optimizer.param_groups:
        group["lr"] = lr
    local_tokens = sum(sum(t.loss_mask) for t in trajs)
    n_tokens, n_rows = run.dist.all_sum([local_tokens, len(trajs)])
    losses = []

    def make_pass(group):
        def run_pass():
            batch = collate(group, run.pad_id, model_device(run.model))
            with nvtx_range("forward"):
                logp, _, _ = token_stats(run.model, batch, packed=cfg.optim.packing)
            if cfg.sft.loss_agg == "token-mean":
                weight = batch.target_mask.sum().item() / max(1, n_tokens)
            else:
                weight = len(group) / max(1, n_rows)
            loss = sft_loss(logp, batch.target_mask.float(), loss_agg=cfg.sft.loss_agg) * weight
            losses.append(loss.item())
            return loss

        run_pass.group = group
        return run_pass

    groups = micro_batches(trajs, cfg.optim.max_tokens_per_microbatch, cfg.optim.packing)
    bad = run_passes(run.dist, run.model, optimizer, [make_pass(g) for g in groups])
    with nvtx_range("optimizer"):
        grad_norm = clip_and_step(run.model, optimizer, cfg.optim.grad_clip, skip=bad)
    (total_loss,) = run.dist.all_sum([sum(losses)])
    dt = time.time() - t0
    return {
        "loss": total_loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "time/train": dt,
        "throughput/tokens_per_s": n_tokens / dt,
    }


def log_sft_row(run: Run, name: str, stats: dict[str, Any], optimizer) -> None:
    state, cfg = run.state, run.cfg
    state["phase_step"] += 1
    state["step"] += 1
    row = {"step": state["step"], "phase": "sft", "phase/name": name, **stats}
    limit = cfg.optim.max_nonfinite_steps
    note_nonfinite(state, int(not math.isfinite(stats["grad_norm"])), limit, row)
    run.logger.log(row)
    # A guard's corrective phase runs inside an RL step: the step's own checkpoint covers it.
    inside_rl = name == "guard_sft"
    if cfg.checkpoint_every and not inside_rl and state["phase_step"] % cfg.checkpoint_every == 0:
        run.checkpoint()


def sft_phase(run: Run, phase: Phase, tasks: list[Task]) -> None:
    """The SFT warm-up: `phase.steps` steps of `sft.batch_size` teacher demonstrations (the
    expert's own while `env.teacher` has no habit)."""
    cfg, state = run.cfg, run.state
    optimizer = run.optimizers.get("sft", cfg.sft.lr)
    warmup = int(cfg.sft.warmup_ratio * phase.steps)
    stream = task_stream(tasks, cfg.seed, state["sft_position"])
    while state["phase_step"] < phase.steps:
        batch_tasks = []
        for _ in range(cfg.sft.batch_size):
            pos, task = next(stream)
            batch_tasks.append(task)
        state["sft_position"] = pos + 1
        mine, habits = run.share(batch_tasks), teacher_habits(cfg)
        if habits.perfect:  # the expert's own trajectories, where they solve their task
            trajs = play_experts(run.tokenizer, run.world, mine, run.limits, solved_only=True)
        else:
            trajs = play_teacher(run.tokenizer, run.world, mine, run.limits, habits, cfg.seed)
        lr = cfg.sft.lr * lr_factor(state["phase_step"], phase.steps, warmup, cfg.sft.schedule)
        log_sft_row(run, phase.name, sft_step(run, optimizer, trajs, lr), optimizer)
    run.optimizers.drop("sft")


def corrective_phase(run: Run, name: str, since: int) -> None:
    """ETS / PRS: SFT on the expert trajectories of tasks with a failed rollout at RL step >=
    `since` (and with PRS on one reflection per such task), `supervision.ets` epochs and lr."""
    cfg, state = run.cfg, run.state
    ets = cfg.supervision.ets
    failures = FailureLog()
    failures.load_state_dict(state.get("failures", {}))
    prs = cfg.supervision.prs
    reflector = get_reflector(prs.reflector, prs.max_reflection_tokens) if prs.enabled else None
    tasks_by_id = {t.id: t for t in run.train_tasks}
    data, n_failed = corrective_data(
        run.tokenizer, run.world, tasks_by_id, failures, max(1, since), run.limits, reflector
    )
    n_reflections = sum(1 for t in data if t.source == "reflection")
    steps = math.ceil(len(data) * ets.epochs / ets.batch_size)
    log.info(
        "%s: SFT on %d failed tasks (%d expert trajectories, %d reflections), %d steps",
        name,
        n_failed,
        len(data) - n_reflections,
        n_reflections,
        steps,
    )
    if not steps:
        return
    rng = np.random.default_rng(cfg.seed + state["rl_step"])
    order = np.concatenate([rng.permutation(len(data)) for _ in range(ets.epochs)])
    optimizer = run.optimizers.get("sft", ets.lr)
    warmup = int(ets.warmup_ratio * steps)
    while state["phase_step"] < steps:
        k = state["phase_step"]
        chosen = [data[int(i)] for i in order[k * ets.batch_size : (k + 1) * ets.batch_size]]
        chosen = run.share(chosen)
        lr = ets.lr * lr_factor(k, steps, warmup, "constant")
        stats = sft_step(run, optimizer, chosen, lr)
        stats.update({"sft/failed_tasks": n_failed, "sft/reflections": n_reflections})
        log_sft_row(run, name, stats, optimizer)
    run.optimizers.drop("sft")
    run.engine.sync_weights()


def sample_groups(
    cfg, engine, tokenizer, world, stream, limits, state, dist: Dist | None = None
) -> tuple[list[Trajectory], list[Trajectory]]:
    """Play one group per task (sampled, hinted and expert members) and apply dynamic sampling.

    Every rank draws the same tasks and plays its share of them (whole groups).
    Returns (kept, played): the trajectories to train on and every trajectory played.
    """
    dist = dist or Dist()
    G = cfg.rl.group_size
    sup = cfg.supervision
    sources = group_sources(G, sup.ops.k, sup.hbg.k)
    sampled_sources = [s for s in sources if s != "expert"]
    kept: list[Trajectory] = []
    n_groups = 0
    rounds = 1 + (cfg.rl.max_refill_rounds if cfg.rl.dynamic_sampling == "refill" else 0)
    played: list[Trajectory] = []
    for _ in range(rounds):
        need = cfg.rl.prompts_per_step - n_groups
        if need <= 0:
            break
        tasks = []
        for _ in range(need):
            pos, task = next(stream)
            tasks.append(task)
        state["rl_position"] = pos + 1
        group_base = state["step"] * 10_000 + len(played)
        drawn = need
        tasks = tasks[dist.rank :: dist.world_size]
        need = len(tasks)
        episodes = [t for t in tasks for _ in sampled_sources]
        episode_sources = sampled_sources * need
        trajs = run_episodes(
            engine,
            tokenizer,
            episodes,
            world.make_env,
            limits=limits,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            group_ids=[group_base + i for i in range(need) for _ in sampled_sources],
            system_suffix=hint_suffixes(episodes, episode_sources) if sup.hbg.k else None,
            # Ids from the position in the run, not a process counter: a resumed run's engine
            # seeds (vLLM derives them from the id) are the uninterrupted run's.
            request_ids=[f"{t.id}#{group_base}.{j}" for j, t in enumerate(episodes)],
        )
        for t, source in zip(trajs, episode_sources):
            t.source = source
        if sup.ops.k:
            trajs += play_experts(
                tokenizer,
                world,
                [t for t in tasks for _ in range(sup.ops.k)],
                limits,
                group_ids=[group_base + i for i in range(need) for _ in range(sup.ops.k)],
            )
        if cfg.rl.format_reward:  # before dynamic sampling, which looks at reward variance
            for t in trajs:
                t.reward += cfg.rl.format_reward * healthy_fraction(t.info.get("states", []))
        played += trajs
        if cfg.rl.dynamic_sampling == "off":
            kept, n_groups = trajs, drawn
            break
        rewards = torch.tensor([t.reward for t in trajs])
        gids = torch.tensor([t.group_id for t in trajs])
        flat = zero_variance_groups(rewards, gids)
        good = [t for t, f in zip(trajs, flat.tolist()) if not f]
        kept += good
        (found,) = dist.all_sum([len({t.group_id for t in good})])
        n_groups += int(found)
    return kept, played


def rl_phase(run: Run, phase: Phase) -> None:
    cfg, model, state = run.cfg, run.model, run.state
    optimizer = run.optimizers.get("rl", cfg.rl.lr)
    ref_model = None
    if cfg.rl.kl_coef > 0:
        # The reference is the policy at the start of RL; it is saved once so that a resumed run
        # keeps measuring KL against the same weights.
        with run.full_weights():  # under ZeRO-3 a fresh module of the gathered weights
            if run.optimizers.deepspeed is not None and run.optimizers.deepspeed.stage == 3:
                ref_model = type(model)(model.config).to(
                    model_device(model), next(model.parameters()).dtype
                )
                ref_model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
            else:
                ref_model = copy.deepcopy(model)
        ref_model.eval().requires_grad_(False)
        ref_path = Path(cfg.run_dir) / "reference.safetensors"
        if ref_path.exists():
            load_model_weights(ref_model, str(ref_path))
        elif run.dist.is_main:
            tmp = ref_path.with_name(".reference.safetensors.tmp")
            save_model_weights(ref_model, str(tmp))
            os.replace(tmp, ref_path)
        run.dist.barrier()
    loss_fn = get_policy_loss(cfg.rl.loss)
    stream = task_stream(run.train_tasks, cfg.seed + 1, state["rl_position"])
    mixed = cfg.supervision.mixed_sft
    mix_stream = task_stream(
        demonstrated(cfg, run.train_tasks), cfg.seed + 2, state["mix_position"]
    )
    ctrl = control_token_ids(run.tokenizer)
    control_ids = [ctrl[k] for k in CONTROL_KEYS]
    newline_id = run.tokenizer.encode("\n", add_special_tokens=False)[0]
    run.engine.sync_weights()  # after SFT or a resume, the engine still holds older weights
    m = cfg.monitor
    alarm = SpikeAlarm(m.alarm_threshold, m.alarm_min_history, m.alarm_alpha)
    alarm.load_state_dict(state.get("monitor", {}))
    failures = FailureLog()
    failures.load_state_dict(state.get("failures", {}))
    guard = Guard(cfg.guard) if cfg.guard.enabled else None
    if guard is not None:
        guard.load_state_dict(state.get("guard", {}))
    if guard is not None and guard.snapshot_step is None and guard.candidate_step is None:
        # The weights RL starts from: promoted to the healthy snapshot once a step confirms them.
        guard.candidate_step = state["step"]
        state["guard"] = guard.state_dict()
        run.checkpoint(SNAPSHOT_CANDIDATE)
    window = cfg.supervision.ets.window
    probe = decision_probe_set(run) if cfg.monitor.decision_probe_tasks else []
    while state["phase_step"] < phase.steps:
        # -- the decision probe, on the policy that samples this step
        probed = decision_probe(run, probe, ctrl["tool_call"]) if probe else {}
        # -- rollout
        t0 = time.time()
        run.engine.wake()
        with nvtx_range("rollout"), run.generation():
            trajs, played = sample_groups(
                cfg, run.engine, run.tokenizer, run.world, stream, run.limits, state, run.dist
            )
        run.engine.sleep()
        t_rollout = time.time() - t0
        rl_step = state["rl_step"] + 1
        failures.record(rl_step, played)
        if run.dist.enabled:  # every rank keeps every rank's failures (corrective data)
            mine = {
                t: failures.examples[t]
                for t in {x.task_id for x in played}
                if failures.last_failed.get(t) == rl_step
            }
            for other in run.dist.gather_objects(mine):
                for tid, example in other.items():
                    failures.last_failed[tid] = rl_step
                    failures.examples[tid] = example
        failures.forget_before(rl_step - window + 1)
        state["failures"] = failures.state_dict()

        # -- advantages and update
        t1 = time.time()
        row: dict[str, Any] = {"step": state["step"] + 1, "phase": "rl", "phase/name": phase.name}
        row.update(rollout_metrics(played))
        row.update(probed)
        row["rollout/kept"] = len(trajs) / max(1, len(played))
        experts = []
        mu = 0.0
        if mixed.weight > 0 or mixed.final_weight > 0:
            mu = mixed_sft_weight(
                mixed.weight, mixed.final_weight, mixed.schedule, state["rl_step"], cfg.rl.steps
            )
            row["sft/mixed_weight"] = mu
        if mu > 0:
            chosen = []
            for _ in range(mixed.batch_size):
                pos, task = next(mix_stream)
                chosen.append(task)
            state["mix_position"] = pos + 1
            experts = play_experts(
                run.tokenizer, run.world, run.share(chosen), run.limits, solved_only=True
            )
        if trajs:
            assign_advantages(trajs, cfg.rl.advantage, cfg.rl.negative_weight)
            trained = loss_members(trajs, cfg.rl.mask_truncated)
            row["rollout/masked_truncated"] = 1 - len(trained) / len(trajs)
            lr_scale = guard.lr_scale if guard is not None else 1.0
            stats = policy_update(
                cfg,
                model,
                ref_model,
                optimizer,
                loss_fn,
                trained,
                trajs,
                run.pad_id,
                cfg.rollout.temperature,
                control_ids,
                newline_id,
                state["rl_step"],
                lr_scale=lr_scale,
                experts=experts,
                mixed_weight=mu,
                dist=run.dist,
                end_call_id=ctrl["end_tool_call"],
            )
            row.update(stats)
        row = run.dist.reduce_row(row)
        row.update(alarm.update(row))
        state["monitor"] = alarm.state_dict()
        limit = cfg.optim.max_nonfinite_steps
        note_nonfinite(state, int(row.get("skipped_updates", 0)), limit, row)
        state["phase_step"] += 1
        state["step"] += 1
        state["rl_step"] = rl_step
        row["time/rollout"] = t_rollout
        row["time/train"] = time.time() - t1
        # vLLM: the new weights are streamed into the engine in place. HF: the engine generates
        # with the trainer's own parameters, so only its cached keys and values are dropped.
        t2 = time.time()
        with nvtx_range("sync"):
            run.engine.sync_weights()
        row["time/sync"] = time.time() - t2
        n_tokens = sum(t.num_tokens for t in played)
        row["throughput/tokens_per_s"] = n_tokens / max(1e-9, time.time() - t0)
        if cfg.eval.every and state["phase_step"] % cfg.eval.every == 0:
            row["eval/test_success"] = run.evaluate("test")["success"]
        decision = guard.observe(state["step"], row) if guard is not None else None
        run.logger.log(row)
        if decision is not None:
            act_on(run, guard, decision)
        if cfg.checkpoint_every and state["phase_step"] % cfg.checkpoint_every == 0:
            run.checkpoint()


def act_on(run: Run, guard: Guard, decision: Decision) -> None:
    """Carry out the guard's decision after an RL step (its metrics are already logged)."""
    state = run.state
    state["guard"] = guard.state_dict()
    root = Path(run.cfg.run_dir) / "checkpoints"
    if decision.promote and run.dist.is_main:  # the candidate's weights produced a healthy step
        promote_checkpoint(root, SNAPSHOT_CANDIDATE, SNAPSHOT_TAG)
    if decision.discard and run.dist.is_main:
        shutil.rmtree(root / SNAPSHOT_CANDIDATE, ignore_errors=True)
    run.dist.barrier()
    if decision.save_candidate:
        run.checkpoint(SNAPSHOT_CANDIDATE)
    if decision.rollback:
        with run.optimizers.writable_weights():
            _, saved = load_checkpoint(root / SNAPSHOT_TAG, run.model, restore_rng=False)
        run.optimizers.rolled_back(root / SNAPSHOT_TAG, saved, "rl")
        run.engine.sync_weights()
        if decision.action == "sft":
            # The RL phase's own step counter is kept aside while the corrective steps count.
            phase_step = state["phase_step"]
            state["phase_step"] = 0
            since = state["rl_step"] - run.cfg.supervision.ets.window + 1
            corrective_phase(run, "guard_sft", since)
            state["phase_step"] = phase_step
    state["guard"] = guard.state_dict()


def loss_members(trajs: list[Trajectory], mask_truncated: bool) -> list[Trajectory]:
    """The trajectories the policy loss trains on: all, or (overlong filtering) the uncut ones.
    Masked ones still count in the advantages of their group and in the loss denominators."""
    return [t for t in trajs if not (mask_truncated and t.truncated)]


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
    *,
    lr_scale: float = 1.0,
    experts: list[Trajectory] | None = None,
    mixed_weight: float = 0.0,
    dist: Dist | None = None,
    end_call_id: int | None = None,
) -> dict[str, float]:
    """`updates_per_step` optimizer steps over mini-batches of `trajs`; returns step metrics.

    `sampled` (a superset of `trajs`) is measured instead when no trajectory carries a signal.
    `phase_step` is the RL step (over every RL phase) the learning-rate schedule is at;
    `lr_scale` multiplies the rate (the guard's `lower_lr`). With `experts` and `mixed_weight`
    (mu), each optimizer step adds mu times the SFT loss of a share of `experts` (mixed SFT).
    """
    rl = cfg.rl
    budget, packing = cfg.optim.max_tokens_per_microbatch, cfg.optim.packing
    uses_all_tokens = rl.kl_coef > 0 or rl.entropy_coef > 0
    ops = cfg.supervision.ops
    luffy = ops.k > 0 and ops.shaping == "luffy"
    experts = experts if mixed_weight > 0 else []
    lr = rl.lr * lr_factor(phase_step, rl.steps, rl.warmup_steps, rl.schedule) * lr_scale
    for group in optimizer.param_groups:
        group["lr"] = lr
    minis = [trajs[i :: rl.updates_per_step] for i in range(rl.updates_per_step)]
    # The ratio's old policy: the trainer before this step's updates.
    old: dict[int, torch.Tensor] = {}
    if rl.updates_per_step > 1:
        with torch.no_grad(), full_weights(optimizer):
            for group in micro_batches(trajs, budget, packing):
                batch = collate(group, pad_id, model_device(model))
                logp, _, _ = token_stats(model, batch, temperature, packed=packing)
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
    dist = dist or Dist()
    expert_minis = [experts[i :: len(minis)] for i in range(len(minis))]
    for mini, expert_mini in zip(minis, expert_minis):
        # Normalisers over the whole batch (every rank's share of it).
        n_tokens, n_rows = dist.all_sum(
            [sum(sum(t.loss_mask) for t in mini), sum(1 for t in mini if any(t.loss_mask))]
        )
        active = [t for t in mini if any(t.loss_mask) and (uses_all_tokens or t.info["advantage"])]
        passes = []
        if expert_mini:
            passes += mixed_passes(cfg, model, expert_mini, pad_id, mixed_weight, dist, add)

        def make_pass(group, n_tokens=n_tokens, n_rows=n_rows):
            def run_pass():
                batch = collate(group, pad_id, model_device(model))
                mask = batch.target_mask.float()  # [B, T]
                with nvtx_range("forward"):
                    logp, entropy, ctrl_probs = token_stats(
                        model, batch, temperature, control_ids, packing
                    )
                old_lp = (
                    torch.nn.utils.rnn.pad_sequence([old[id(t)] for t in group], batch_first=True)
                    if old
                    else logp.detach()
                )  # [B, T]
                ref_lp = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref_lp, _, _ = token_stats(ref_model, batch, temperature, packed=packing)
                adv = torch.tensor(
                    [t.info["advantage"] for t in group], dtype=torch.float32, device=mask.device
                )  # [B]
                g_tokens = mask.sum().item()
                if rl.tis_cap is not None:
                    # Truncated IS: the engine sampled them, the trainer's old policy scores. Expert
                    # and hinted rows have no engine logprobs of this context: weight 1.
                    tis = (
                        (old_lp.detach() - batch.engine_logprobs).exp().clamp(max=rl.tis_cap)
                    )  # [B, T]
                    tis = torch.where(batch.sampled[:, None], tis, 1.0)  # [B, T]
                    adv = adv[:, None] * tis * mask  # [B, T]
                    mean_tis = (tis * mask).sum().item() / max(1.0, g_tokens)
                    add("rollout/tis_weight_mean", mean_tis, g_tokens)
                shaped = torch.tensor(
                    [luffy and t.source == "expert" for t in group],
                    dtype=torch.bool,
                    device=mask.device,
                )  # [B] rows under LUFFY's shaping
                plain_mask = mask * ~shaped[:, None]  # [B, T]
                loss = logp.new_zeros(())
                stats: dict[str, Any] = {}
                with nvtx_range("loss"):
                    if plain_mask.any():
                        loss, stats = loss_fn(
                            logp,
                            old_lp,
                            adv,
                            plain_mask,
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
                    if shaped.any():
                        # Each part is its rows' aggregate; mixed back by the rows (or tokens) it
                        # stands for, the sum equals the aggregate over the whole micro-batch.
                        shaped_mask = mask * shaped[:, None]  # [B, T]
                        shaped_loss = luffy_loss(
                            logp,
                            adv,
                            shaped_mask,
                            gamma=ops.gamma,
                            loss_agg=rl.loss_agg,
                            norm_len=cfg.rollout.max_total_tokens,
                        )
                        if rl.loss_agg == "token-mean":
                            a, b = plain_mask.sum(), shaped_mask.sum()
                        else:
                            a, b = (plain_mask.sum(1) > 0).sum(), (shaped_mask.sum(1) > 0).sum()
                        loss = (loss * a + shaped_loss * b) / (a + b)
                if rl.loss_agg == "token-mean":
                    weight = g_tokens / n_tokens
                else:
                    weight = sum(1 for t in group if any(t.loss_mask)) / max(1, n_rows)
                add("loss", loss.item(), weight)
                for key in ("clip_frac", "kl", "ratio_mean"):
                    if key in stats:
                        add(key, float(stats[key]), g_tokens)
                token_metrics(
                    add, batch, logp, entropy, ctrl_probs, control_ids, newline_id, end_call_id
                )
                if ctrl_probs is not None:
                    trained = batch.target_mask  # [B, T]
                    adv_tok = (
                        adv[trained] if adv.dim() == 2 else adv[trained.nonzero()[:, 0]]
                    )  # [M]
                    g_self, g_other = gradient_split(
                        ctrl_probs.detach(), batch.labels[trained], adv_tok, control_ids
                    )
                    m = max(1.0, g_tokens)
                    pushes = torch.stack([g_self, g_other]).tolist()  # one transfer  # [2, C]
                    for k, key in enumerate(CONTROL_KEYS):  # per trained token
                        add(f"ctrl/grad_self_{key}", pushes[0][k] / m, m)
                        add(f"ctrl/grad_other_{key}", pushes[1][k] / m, m)
                return loss * weight

            run_pass.group = group
            return run_pass

        groups = micro_batches(active, budget, packing) if n_tokens else []
        passes += [make_pass(g) for g in groups]
        if not dist.all_max(len(passes)):
            continue
        bad = run_passes(dist, model, optimizer, passes)
        with nvtx_range("optimizer"):
            grad_norms.append(clip_and_step(model, optimizer, cfg.optim.grad_clip, skip=bad))
    if not grad_norms:
        # No trajectory carried a learning signal (every group agreed): no update, but the
        # policy's token metrics are still measured.
        with torch.no_grad(), full_weights(optimizer):
            signal = [t for t in sampled if any(t.loss_mask)]
            for group in micro_batches(signal, budget, packing):
                batch = collate(group, pad_id, model_device(model))
                logp, entropy, ctrl_probs = token_stats(
                    model, batch, temperature, control_ids, packing
                )
                token_metrics(
                    add, batch, logp, entropy, ctrl_probs, control_ids, newline_id, end_call_id
                )
        sums.update(loss=0.0, clip_frac=0.0, kl=0.0, ratio_mean=1.0)
        counts.update(loss=1.0, clip_frac=1.0, kl=1.0, ratio_mean=1.0)
    out = {k: sums[k] / counts[k] for k in sums if counts[k] > 0}
    out["loss"] = sums.get("loss", 0.0) / max(1, len(grad_norms))  # 0 when only mixed SFT ran
    finite = [g for g in grad_norms if math.isfinite(g)]
    out["grad_norm"] = float(np.mean(finite)) if finite else (grad_norms[0] if grad_norms else 0.0)
    out["skipped_updates"] = len(grad_norms) - len(finite)
    out["lr"] = lr
    return out


def mixed_passes(cfg, model, experts, pad_id: int, weight: float, dist: Dist, add) -> list:
    """The backward passes of mixed SFT: `weight` x the SFT loss of `experts` (this rank's share),
    token-mean over every rank's expert tokens, with CHORD's p(1 - p) weights when configured;
    `add` records the unweighted loss as `sft/mixed_loss`."""
    mixed = cfg.supervision.mixed_sft
    (n_tokens,) = dist.all_sum([sum(sum(t.loss_mask) for t in experts)])

    def make_pass(group):
        def run_pass():
            batch = collate(group, pad_id, model_device(model))
            logp, _, _ = token_stats(model, batch, packed=cfg.optim.packing)
            share = batch.target_mask.sum().item() / max(1, n_tokens)
            loss = mixed_sft_loss(logp, batch.target_mask, chord_phi=mixed.chord_phi) * share
            add("sft/mixed_loss", loss.item(), 1.0)
            return loss * weight

        run_pass.group = group
        return run_pass

    groups = micro_batches(experts, cfg.optim.max_tokens_per_microbatch, cfg.optim.packing)
    return [make_pass(g) for g in groups]

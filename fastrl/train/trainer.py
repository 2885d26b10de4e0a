"""The training loop, top to bottom: SFT on a teacher's demonstrations, then GRPO on multi-turn
tool use.

    fastrl train --config configs/demo.yaml rl.lr=1e-4 run_dir=runs/x [--resume]
    torchrun --nproc-per-node 2 -m fastrl train --config configs/demo.yaml

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

What the loop calls lives beside it: `run` (`RunState`, and `Run`: what the phases share, with
checkpoint, safe point and evaluation), `build` (config to objects), `batch` (micro-batches and the
fused token statistics), `update` (one optimizer step), `optim` (optimizer roles, passes, steps),
`checkpoint`; the losses in `fastrl.algo.losses`, evaluation and probes in `fastrl.eval`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastrl.algo.corrective import FailureLog, corrective_data, get_reflector
from fastrl.algo.losses import mixed_sft_weight
from fastrl.algo.schedule import Phase, build_plan, describe
from fastrl.algo.supervision import (
    Replay,
    demonstrated,
    draw,
    play_experts,
    play_teacher,
    sample_groups,
    task_stream,
)
from fastrl.config import Config
from fastrl.envs import get_world
from fastrl.envs.base import Task
from fastrl.eval import (
    decision_probe,
    decision_probe_set,
    health_probe,
    health_probe_set,
)
from fastrl.monitor.control_tokens import SpikeAlarm
from fastrl.monitor.guard import SNAPSHOT_CANDIDATE, SNAPSHOT_TAG, Decision, Guard
from fastrl.monitor.log import nvtx_range
from fastrl.monitor.metrics import probe_ids, rollout_metrics
from fastrl.train import build
from fastrl.train.checkpoint import (
    load_checkpoint,
    promote_checkpoint,
    resume_checkpoint,
    set_rng_state_of_rank,
)
from fastrl.train.optim import Optimizers, lr_factor, note_nonfinite
from fastrl.train.run import Run, RunState
from fastrl.train.signals import StopRequest
from fastrl.train.update import (
    assign_advantages,
    loss_members,
    policy_update,
    sft_step,
    step_spec,
)

log = logging.getLogger("fastrl.train")


# --------------------------------------------------------------------------- set-up
def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Run `cfg` (continuing its run directory's latest checkpoint with `resume`); returns the
    summary. SIGINT/SIGTERM stop it at the next safe point with a checkpoint (`Interrupted`)."""
    with StopRequest() as stop:
        return run_plan(cfg, resume, stop)


def run_plan(cfg: Config, resume: bool, stop: StopRequest) -> dict[str, Any]:
    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    dist = build.start_process(cfg)
    world = get_world(cfg.env.name, cfg.env)
    model, tokenizer, model_dir = build.build_trainee(cfg, dist)
    plan = build_plan(cfg)
    log.info("phase plan: %s", describe(plan) or "nothing to train")
    limits = build.limits_of(cfg)
    engine, engine_used = build.build_engine(cfg, model, model_dir, tokenizer.pad_token_id)
    train_tasks, eval_sets = build.task_sets(cfg, world)

    state, saved_optimizers, ckpt = RunState(), None, None
    found = resume_checkpoint(run_dir, model) if resume else None
    if found is not None:
        ckpt, saved, saved_optimizers = found
        state = RunState.from_dict(saved)
        where = plan[state.plan_index].name if state.plan_index < len(plan) else "the end"
        log.info("resumed from %s (%s, step %d)", ckpt, where, state.step)
    logger = build.build_logger(cfg, plan, dist, state.step if ckpt is not None else None)
    if ckpt is not None and dist.enabled:
        set_rng_state_of_rank(ckpt, dist.rank)
    optimizers = Optimizers(model, cfg, saved_optimizers, dist, ckpt)
    if optimizers.deepspeed is not None and hasattr(engine, "gather"):
        engine.gather = optimizers.deepspeed.gather  # ZeRO-3: each tensor whole when synced
    run = Run(cfg, model, tokenizer, world, engine, limits, step_spec(cfg, tokenizer), state,
              logger, optimizers, train_tasks, eval_sets, dist, stop)  # fmt: skip

    if "teacher_success" not in state.results:  # the demonstrations' own test success
        habits = build.teacher_habits(cfg)
        demos = play_teacher(tokenizer, world, eval_sets["test"], limits, habits, cfg.seed)
        state.results["teacher_success"] = sum(t.success for t in demos) / len(demos)
        if dist.is_main:
            log.info("teacher success on test: %.3f", state.results["teacher_success"])

    def baseline() -> None:  # success of the policy RL starts from, on every evaluated split
        if not cfg.eval.before_rl:
            return
        for split in ["test", *(s for s in cfg.eval.splits if s != "test")]:
            key = "sft_success" if split == "test" else f"sft_{split}_success"
            if key not in state.results:
                state.results[key] = run.evaluate(split)["success"]
                if dist.is_main:
                    log.info("%s success before RL: %.3f", split, state.results[key])

    # ----------------------------------------------------------------------- the plan
    while state.plan_index < len(plan):
        phase = plan[state.plan_index]
        if phase.kind == "warmup":
            sft_phase(run, phase, demonstrated(train_tasks, cfg.sft.max_expert_calls))
        else:
            baseline()
            if phase.kind == "rl":
                rl_phase(run, phase)
            else:
                corrective_phase(run, phase.name, since=state.rl_step - phase.steps + 1)
        state.plan_index, state.phase_step = state.plan_index + 1, 0
        run.safe_point(phase_end=True)
    baseline()

    # ----------------------------------------------------------------------- final evaluation
    results = state.results
    if "rl_success" not in results:
        no_rl = not any(p.kind == "rl" for p in plan)  # the weights baseline() evaluated
        for split in cfg.eval.splits:
            key = f"{split}_success" if split != "test" else "rl_success"
            before = f"sft_{split}_success" if split != "test" else "sft_success"
            if no_rl and before in results:
                results[key] = results[before]
            else:
                results[key] = run.evaluate(split)["success"]
        run.checkpoint()
    logger.close()
    with run.full_weights():
        if dist.is_main:
            model.save_pretrained(run_dir / "final")
            tokenizer.save_pretrained(run_dir / "final")
    summary = {
        **{k: results.get(k) for k in ("teacher_success", "sft_success", "rl_success",
                                       "format_ood_success", "content_ood_success")},
        **{k: v for k, v in results.items() if k.startswith("sft_") and k != "sft_success"},
        "eval_tasks": cfg.env.eval_tasks,
        "minutes": round((time.time() - t_start) / 60, 2),
        "engine": engine_used,
        "model": cfg.model.name,
        "model_dir": str(model_dir),
        "run_dir": str(run_dir),
    }  # fmt: skip
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary


# --------------------------------------------------------------------------- SFT phases
def log_sft_row(run: Run, name: str, stats: dict[str, Any]) -> None:
    state, cfg = run.state, run.cfg
    state.phase_step += 1
    state.step += 1
    row = {"step": state.step, "phase": "sft", "phase/name": name, **stats}
    skipped = int(not math.isfinite(stats["grad_norm"]))
    limit = cfg.optim.max_nonfinite_steps
    state.nonfinite_in_a_row = note_nonfinite(state.nonfinite_in_a_row, skipped, limit, row)
    run.logger.log(row)
    # A guard's corrective phase runs inside an RL step: the step's own safe point covers it.
    if name != "guard_sft":
        run.safe_point()


def sft_phase(run: Run, phase: Phase, tasks: list[Task]) -> None:
    """The SFT warm-up: `phase.steps` steps of `sft.batch_size` teacher demonstrations (the
    expert's own while `env.teacher` has no habit), plus `sft.replay` pretraining transcripts."""
    cfg, state = run.cfg, run.state
    optimizer = run.optimizers.get("sft", cfg.sft.lr)
    warmup = int(cfg.sft.warmup_ratio * phase.steps)
    habits = build.teacher_habits(cfg)
    stream = task_stream(tasks, cfg.seed, state.sft_position)
    replay = Replay(cfg.pretrain.tasks, cfg.pretrain.seed, cfg.seed) if cfg.sft.replay else None
    while state.phase_step < phase.steps:
        batch_tasks, state.sft_position = draw(stream, cfg.sft.batch_size)
        mine = run.share(batch_tasks)
        if habits.perfect:  # the expert's own trajectories, where they solve their task
            trajs = play_experts(run.tokenizer, run.world, mine, run.limits, solved_only=True)
        else:
            trajs = play_teacher(run.tokenizer, run.world, mine, run.limits, habits, cfg.seed)
        if replay is not None:
            drawn = replay.draw(phase.name, state.phase_step, cfg.sft.replay)
            trajs += play_experts(run.tokenizer, replay.world, run.share(drawn), run.limits,
                                  solved_only=True)  # fmt: skip
        lr = cfg.sft.lr * lr_factor(state.phase_step, phase.steps, warmup, cfg.sft.schedule)
        log_sft_row(run, phase.name, sft_step(run.model, optimizer, trajs, lr, run.spec, run.dist))
    run.optimizers.drop("sft")


def corrective_phase(run: Run, name: str, since: int) -> None:
    """ETS / PRS: SFT on the expert trajectories of tasks with a failed rollout at RL step >=
    `since` (and with PRS on one reflection per such task), `supervision.ets` epochs and lr."""
    cfg, state = run.cfg, run.state
    ets, prs = cfg.supervision.ets, cfg.supervision.prs
    failures = FailureLog()
    failures.load_state_dict(state.failures)
    reflector = get_reflector(prs.reflector, prs.max_reflection_tokens) if prs.enabled else None
    tasks_by_id = {t.id: t for t in run.train_tasks}
    data, n_failed = corrective_data(
        run.tokenizer, run.world, tasks_by_id, failures, max(1, since), run.limits, reflector
    )
    n_reflections = sum(1 for t in data if t.source == "reflection")
    steps = math.ceil(len(data) * ets.epochs / ets.batch_size)
    log.info("%s: SFT on %d failed tasks (%d expert trajectories, %d reflections), %d steps",
             name, n_failed, len(data) - n_reflections, n_reflections, steps)  # fmt: skip
    if not steps:
        return
    rng = np.random.default_rng(cfg.seed + state.rl_step)
    order = np.concatenate([rng.permutation(len(data)) for _ in range(ets.epochs)])
    optimizer = run.optimizers.get("sft", ets.lr)
    warmup = int(ets.warmup_ratio * steps)
    while state.phase_step < steps:
        k = state.phase_step
        batch = order[k * ets.batch_size : (k + 1) * ets.batch_size]
        chosen = run.share([data[int(i)] for i in batch])
        lr = ets.lr * lr_factor(k, steps, warmup, "constant")
        stats = sft_step(run.model, optimizer, chosen, lr, run.spec, run.dist)
        stats.update({"sft/failed_tasks": n_failed, "sft/reflections": n_reflections})
        log_sft_row(run, name, stats)
    run.optimizers.drop("sft")
    run.engine.sync_weights()


# --------------------------------------------------------------------------- RL phase
def rl_phase(run: Run, phase: Phase) -> None:
    cfg, model, state, rl = run.cfg, run.model, run.state, run.cfg.rl
    optimizer = run.optimizers.get("rl", rl.lr)
    ref_model = None
    if rl.kl_coef > 0:
        ref_model = build.build_reference(model, run.optimizers, cfg.run_dir, run.dist)
    stream = task_stream(run.train_tasks, cfg.seed + 1, state.rl_position)
    mixed = cfg.supervision.mixed_sft
    demos = demonstrated(run.train_tasks, cfg.sft.max_expert_calls)
    mix_stream = task_stream(demos, cfg.seed + 2, state.mix_position)
    run.engine.sync_weights()  # after SFT or a resume, the engine still holds older weights
    m = cfg.monitor
    alarm = SpikeAlarm(m.alarm_threshold, m.alarm_min_history, m.alarm_alpha,
                       health_threshold=m.health_threshold, spikes=m.spike_alarm,
                       pollution_threshold=m.pollution_threshold)  # fmt: skip
    alarm.load_state_dict(state.monitor)
    failures = FailureLog()
    failures.load_state_dict(state.failures)
    guard = Guard(cfg.guard) if cfg.guard.enabled else None
    if guard is not None:
        guard.load_state_dict(state.guard)
    if guard is not None and guard.snapshot_step is None and guard.candidate_step is None:
        # The weights RL starts from: promoted to the healthy snapshot once a step confirms them.
        guard.candidate_step = state.step
        state.guard = guard.state_dict()
        run.checkpoint(SNAPSHOT_CANDIDATE)
    ids = run.spec.ids or probe_ids(run.tokenizer)  # raises, naming a missing control token
    probe, health = [], []
    if m.decision_probe_tasks:
        held_out = run.eval_sets["test"][: m.decision_probe_tasks]
        health = health_probe_set(run.tokenizer, run.world, held_out, run.limits)
        probe = decision_probe_set(run.tokenizer, run.world, held_out, run.limits, health)

    def probe_health() -> dict[str, float]:
        return health_probe(model, health, ids, run.spec.pad_id, run.spec.max_tokens,
                            run.spec.packing)  # fmt: skip

    if health and alarm.health_start is None:  # the weights RL starts from
        alarm.health_start = probe_health()
    while state.phase_step < phase.steps:
        t_step = time.time()
        # -- the decision probe, on the policy that samples this step
        probed = {}
        if probe:
            probed = decision_probe(model, probe, ids.control[2], run.spec.pad_id,
                                    run.spec.max_tokens, run.spec.packing)  # fmt: skip
            probed["time/probe"] = time.time() - t_step
        # -- rollout
        t0 = time.time()
        run.engine.wake()
        with nvtx_range("rollout"), run.generation():
            trajs, played, state.rl_position = sample_groups(
                cfg, run.engine, run.tokenizer, run.world, stream, run.limits, state.step, run.dist
            )
        run.engine.sleep()
        t_rollout = time.time() - t0
        rl_step = state.rl_step + 1
        failures.record(rl_step, played)
        if run.dist.enabled:  # every rank keeps every rank's failures (corrective data)
            failures.merge(rl_step, run.dist.gather_objects(failures.mine(rl_step, played)))
        failures.forget_before(rl_step - cfg.supervision.ets.window + 1)
        state.failures = failures.state_dict()

        # -- advantages and update
        t1 = time.time()
        row: dict[str, Any] = {"step": state.step + 1, "phase": "rl", "phase/name": phase.name}
        row.update(rollout_metrics(played))
        row.update(probed)
        row["rollout/kept"] = len(trajs) / max(1, len(played))
        experts, mu = [], 0.0
        if mixed.weight > 0 or mixed.final_weight > 0:
            mu = mixed_sft_weight(mixed.weight, mixed.final_weight, mixed.schedule, state.rl_step,
                                  rl.steps)  # fmt: skip
            row["sft/mixed_weight"] = mu
        if mu > 0:
            chosen, state.mix_position = draw(mix_stream, mixed.batch_size)
            experts = play_experts(run.tokenizer, run.world, run.share(chosen), run.limits,
                                   solved_only=True)  # fmt: skip
        if trajs:
            assign_advantages(trajs, rl.advantage, rl.negative_weight)
            trained = loss_members(trajs, rl.mask_truncated)
            row["rollout/masked_truncated"] = 1 - len(trained) / len(trajs)
            lr = rl.lr * lr_factor(state.rl_step, rl.steps, rl.warmup_steps, rl.schedule)
            lr *= guard.lr_scale if guard is not None else 1.0
            row.update(policy_update(model, optimizer, trained, trajs, lr, run.spec,
                                     ref_model=ref_model, experts=experts, mixed_weight=mu,
                                     dist=run.dist))  # fmt: skip
        if health and row.get("train/updates", 0):
            # -- the health probe looks ahead: it scores the weights this update produced, which
            # sample the next step, so a broken update shows before anything samples with it.
            t_h = time.time()
            row.update(probe_health())
            row["time/health_probe"] = time.time() - t_h
        row = run.dist.reduce_row(row)
        row.update(alarm.update(row))
        state.monitor = alarm.state_dict()
        skipped, limit = int(row.get("skipped_updates", 0)), cfg.optim.max_nonfinite_steps
        state.nonfinite_in_a_row = note_nonfinite(state.nonfinite_in_a_row, skipped, limit, row)
        state.phase_step += 1
        state.step += 1
        state.rl_step = rl_step
        row["time/rollout"] = t_rollout
        row["time/train"] = time.time() - t1

        # -- weight sync: vLLM gets the new weights streamed in place; the HF engine generates
        # with the trainer's own parameters, so only its cached keys and values are dropped. A
        # step without an optimizer step leaves the engine's weights (and prefix cache) current.
        t2 = time.time()
        if row.get("train/updates", 0):
            with nvtx_range("sync"):
                run.engine.sync_weights()
        row["time/sync"] = time.time() - t2
        n_tokens = sum(t.num_tokens for t in played)
        row["throughput/tokens_per_s"] = n_tokens / max(1e-9, time.time() - t0)
        row["rollout/sampled_tokens"] = sum(
            sum(t.loss_mask) for t in played if t.source != "expert"
        )
        row["time/step"] = time.time() - t_step
        if cfg.eval.every and state.phase_step % cfg.eval.every == 0:
            row["eval/test_success"] = run.evaluate("test")["success"]

        # -- monitor, guard, log, checkpoint
        decision = guard.observe(state.step, row) if guard is not None else None
        run.logger.log(row)
        if decision is not None:
            act_on(run, guard, decision)
        run.safe_point()


def act_on(run: Run, guard: Guard, decision: Decision) -> None:
    """Carry out the guard's decision after an RL step (its metrics are already logged)."""
    state = run.state
    state.guard = guard.state_dict()
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
            phase_step, state.phase_step = state.phase_step, 0
            corrective_phase(run, "guard_sft", state.rl_step - run.cfg.supervision.ets.window + 1)
            state.phase_step = phase_step
    state.guard = guard.state_dict()

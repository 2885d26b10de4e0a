"""Evaluation of a policy on a split: greedy success, sampled success and pass@k, the expert
probe (how the policy scores each task's expert trajectory under teacher forcing), and the
trainer's two probes: the decision probe (p(`<tool_call>`) where the expert decides to call or to
answer) and the health probe (the expert's NLL at control positions and over every token, which
the alarm watches on the weights each update produces).

`evaluate_split` builds the policy and engine a config names and runs these (`fastrl.api.evaluate`,
`fastrl eval`); the trainer calls `evaluate_policy` for its own test evaluations.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

import torch
from tqdm import tqdm

from fastrl.algo.supervision import play_experts
from fastrl.config import Config, ConfigError, EnvConfig
from fastrl.envs import get_world
from fastrl.envs.base import Task, set_tool_timeout
from fastrl.envs.teacher import applicable, demonstration
from fastrl.monitor.control_tokens import decision_positions
from fastrl.monitor.metrics import ProbeIds, turn_start_rows
from fastrl.rollout.engines import ScriptedEngine
from fastrl.rollout.loop import Limits, run_episodes
from fastrl.rollout.types import Trajectory
from fastrl.train.batch import collate, micro_batches, model_device, token_stats
from fastrl.train.build import (
    build_engine,
    build_policy,
    limits_of,
    teacher_habits,
    training_device,
)

log = logging.getLogger("fastrl.eval")


def play_in_batches(
    engine,
    tokenizer,
    world,
    tasks: list[Task],
    limits: Limits,
    *,
    temperature: float,
    top_p: float = 1.0,
    batch_size: int = 128,
    request_ids: list[str] | None = None,
    progress: str | None = None,
) -> list[Trajectory]:
    """One episode per entry of `tasks`, `batch_size` episodes per `run_episodes` call; with
    `progress`, a bar of that title on stderr counts the episodes played."""
    trajs: list[Trajectory] = []
    bar = tqdm(total=len(tasks), desc=progress, unit="episode", disable=progress is None)
    for start in range(0, len(tasks), batch_size):
        trajs += run_episodes(
            engine,
            tokenizer,
            tasks[start : start + batch_size],
            world.make_env,
            limits=limits,
            temperature=temperature,
            top_p=top_p,
            request_ids=request_ids[start : start + batch_size] if request_ids else None,
        )
        bar.update(len(tasks[start : start + batch_size]))
    bar.close()
    return trajs


def evaluate_policy(
    engine,
    tokenizer,
    world,
    tasks: list[Task],
    limits: Limits,
    *,
    batch_size: int = 128,
    request_ids: list[str] | None = None,
    progress: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy episodes on `tasks`; returns (summary, one row per task). With `progress`, a bar
    of that title on stderr."""
    trajs = play_in_batches(
        engine,
        tokenizer,
        world,
        tasks,
        limits,
        temperature=0.0,
        batch_size=batch_size,
        request_ids=request_ids,
        progress=progress,
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


def sampled_successes(
    engine,
    tokenizer,
    world,
    tasks: list[Task],
    limits: Limits,
    *,
    samples: int,
    temperature: float,
    top_p: float = 1.0,
    batch_size: int = 128,
    request_ids: list[str] | None = None,
    progress: str | None = None,
) -> list[int]:
    """Solved episodes out of `samples` sampled at `temperature` and `top_p`, per task (in
    `tasks`' order).

    `request_ids`, when given, names every episode, task-major (`samples` per task in a row).
    With `progress`, a bar of that title on stderr.
    """
    solved: dict[str, int] = {t.id: 0 for t in tasks}
    for t in play_in_batches(
        engine,
        tokenizer,
        world,
        [t for t in tasks for _ in range(samples)],
        limits,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        request_ids=request_ids,
        progress=progress,
    ):
        solved[t.task_id] += int(t.success)
    return [solved[t.id] for t in tasks]


@torch.no_grad()
def probe_experts(
    model: torch.nn.Module,
    tokenizer,
    world,
    tasks: list[Task],
    limits: Limits,
    *,
    batch_size: int = 8,
    chunk: int = 1024,
) -> list[dict[str, Any] | None]:
    """Teacher-force each task's expert trajectory through `model`; per task (in `tasks`' order)
    how the policy rates the expert's tokens, or None where the expert does not solve the task.

    The expert's messages are played through the task's environment (as SFT sees them), and every
    token the expert writes is scored given the expert's own prefix. A row holds `expert_tokens`,
    `expert_logprob` (their summed log-probability, nats), `expert_min_prob`, `expert_greedy`
    (every expert token is a most likely token: greedy decoding would write the expert's
    trajectory) and `expert_first_miss`, the first token that is not: its position among the
    expert's tokens, the expert's token and its probability, and the model's top token and its
    probability. A first miss at a probability like 1e-3 is a step that sampling almost never
    takes, so no GRPO group from this policy is rewarded for the expert's way through that task.
    Only the expert's positions go through the LM head, `chunk` rows at a time.
    """
    by_id = {t.task_id: t for t in play_experts(tokenizer, world, tasks, limits, solved_only=True)}
    trajs = [by_id[t.id] for t in tasks if t.id in by_id]
    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(trajs), batch_size):
        part = trajs[start : start + batch_size]
        batch = collate(part, tokenizer.pad_token_id, model_device(model))
        mask = batch.target_mask  # [B, T]
        hidden = base(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state[mask]  # [M, H]
        labels = batch.labels[mask]  # [M]
        label_lp, top_lp, top_id = [], [], []
        for h, y in zip(hidden.split(chunk), labels.split(chunk)):
            logp = head(h).float().log_softmax(-1)  # [m, V]
            label_lp.append(logp.gather(-1, y[:, None])[:, 0])
            best = logp.max(-1)
            top_lp.append(best.values)
            top_id.append(best.indices)
        counts = mask.sum(-1).tolist()
        per_row = zip(
            part,
            torch.cat(label_lp).cpu().split(counts),
            torch.cat(top_lp).cpu().split(counts),
            torch.cat(top_id).cpu().split(counts),
            labels.cpu().split(counts),
        )
        for traj, *scores in per_row:
            rows[traj.task_id] = probe_row(tokenizer, *scores)
    return [rows.get(t.id) for t in tasks]


def probe_row(
    tokenizer,
    label_lp: torch.Tensor,
    top_lp: torch.Tensor,
    top_id: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, Any]:
    """One task's `probe_experts` row from the log-probabilities of the expert's tokens
    (`label_lp`, [n]), the most likely token's (`top_lp`, `top_id`) and the expert's tokens."""
    missed = (label_lp < top_lp).nonzero()[:, 0].tolist()  # a tie is not a miss
    first = None
    if missed:
        i = missed[0]
        first = {
            "index": i,
            "token": tokenizer.decode([int(labels[i])]),
            "prob": math.exp(float(label_lp[i])),
            "top": tokenizer.decode([int(top_id[i])]),
            "top_prob": math.exp(float(top_lp[i])),
        }
    return {
        "expert_tokens": len(labels),
        "expert_logprob": float(label_lp.double().sum()),
        "expert_min_prob": math.exp(float(label_lp.min())) if len(labels) else 1.0,
        "expert_greedy": not missed,
        "expert_first_miss": first,
    }


# --------------------------------------------------------------------------- decision probe
def decision_probe_set(
    tokenizer, world, tasks: list[Task], limits: Limits, experts: list[Trajectory] | None = None
) -> list[Trajectory]:
    """The decision probe's data: the expert trajectories of `tasks` (held out) that solve them
    (`experts` when already played: `health_probe_set`), with a loss mask on each message after
    a question or a tool result (`decision_positions`)."""
    habit_turns = {t.id: ["stop_early" in a for a in applicable(t)] for t in tasks}
    if experts is None:
        experts = play_experts(tokenizer, world, tasks, limits, solved_only=True)
    probe = [decision_positions(t, habit_turns[t.task_id]) for t in experts]
    return [t for t in probe if t.info["kinds"]]


def health_probe_set(tokenizer, world, tasks: list[Task], limits: Limits) -> list[Trajectory]:
    """The health probe's data: the expert trajectories of `tasks` (held out) that solve them,
    every assistant token trained."""
    return play_experts(tokenizer, world, tasks, limits, solved_only=True)


HEALTH_KINDS = ("turn_start", "open", "after_call", "end")


@torch.no_grad()
def health_probe(
    model, probe: list[Trajectory], ids: ProbeIds, pad_id: int, max_tokens: int, packing: bool
) -> dict[str, float]:
    """How well the policy still writes the expert's own control decisions, teacher-forced on the
    fixed probe set: the mean negative log-likelihood of the expert's token at each kind of
    control position, `ctrl/health_nll_<kind>`: `turn_start` (an assistant message's first
    token: `<tool_call>` or the answer's first word), `open` (after `<tool_call>` and after
    `<tool_call>\n`: the call's opener), `after_call` (after `</tool_call>`: the turn ends) and
    `end` (where the expert writes `<|im_end|>`); `ctrl/health_nll` over the union of those
    positions and `ctrl/health_nll_all` over every assistant token. A collapse shows as a rise:
    the policy stops giving the structure it was taught its probability."""
    sums = dict.fromkeys((*HEALTH_KINDS, "control", "all"), 0.0)
    counts = dict.fromkeys(sums, 0)
    tool_call, im_end = ids.control[2], ids.control[1]
    for group in micro_batches(probe, max_tokens, packing):
        batch = collate(group, pad_id, model_device(model))
        logp, _, _ = token_stats(model, batch, packed=packing)
        mask = batch.target_mask
        nll = -logp[mask].double().cpu()  # [N]
        inp = batch.input_ids
        prev = torch.zeros_like(inp)
        prev[:, 1:] = inp[:, :-1]
        opener = (inp == tool_call) | ((inp == ids.newline) & (prev == tool_call))
        after = inp == ids.end_call if ids.end_call is not None else torch.zeros_like(mask)
        where = {
            "turn_start": turn_start_rows(batch).cpu(),
            "open": opener[mask].cpu(),
            "after_call": after[mask].cpu(),
            "end": (batch.labels == im_end)[mask].cpu(),
        }
        where["control"] = torch.stack(list(where.values())).any(0)
        where["all"] = torch.ones_like(where["control"])
        for kind, rows in where.items():
            sums[kind] += nll[rows].sum().item()
            counts[kind] += int(rows.sum())
    row = {}
    for kind in sums:
        if counts[kind]:
            key = "ctrl/health_nll" if kind == "control" else f"ctrl/health_nll_{kind}"
            row[key] = sums[kind] / counts[kind]
    return row


@torch.no_grad()
def decision_probe(
    model, probe: list[Trajectory], tool_call_id: int, pad_id: int, max_tokens: int, packing: bool
) -> dict[str, float]:
    """Mean p(`<tool_call>`) over the probe's positions of each kind: `ctrl/habit_p_tool_call`,
    `ctrl/first_p_tool_call`, `ctrl/continue_p_tool_call` and `ctrl/answer_p_tool_call` (see
    `decision_positions`), teacher-forced in micro-batches of `max_tokens`."""
    probs, kinds = [], []
    for group in micro_batches(probe, max_tokens, packing):
        batch = collate(group, pad_id, model_device(model))
        _, _, ctrl = token_stats(model, batch, control_ids=[tool_call_id], packed=packing)
        probs.append(ctrl[:, 0].float().cpu())  # rows: the masked positions, row-major
        kinds += [k for t in group for k in t.info["kinds"]]
    p = torch.cat(probs)
    row = {}
    for kind in ("habit", "first", "continue", "answer"):
        where = torch.tensor([k == kind for k in kinds], dtype=torch.bool)
        if where.any():
            row[f"ctrl/{kind}_p_tool_call"] = p[where].mean().item()
    return row


# --------------------------------------------------------------------------- a split, end to end
def replay_tasks(
    world, split: str, tasks: list[Task], replay: dict[str, list[str]], policy: str, env: EnvConfig
) -> tuple[list[Task], list[str]]:
    """The tasks of `tasks` that `replay` has an entry for, and the ids of those it has none for
    (logged). ConfigError naming the first entry whose task id `split` does not have (looked up
    among its first max(len(tasks), len(replay), env.eval_tasks) tasks), or when no task of
    `tasks` has an entry."""
    known = {t.id for t in tasks}
    unknown = [i for i in replay if i not in known]
    n = max(len(tasks), len(replay), env.eval_tasks)
    if unknown:
        known |= {t.id for t in world.tasks(split, n, seed=env.seed)}
        unknown = [i for i in unknown if i not in known]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(
            f"--policy {policy}: task id {unknown[0]!r}{more} is not among the first {n} tasks "
            f"of split {split!r} of {world.name} (env.seed={env.seed})"
        )
    missing = [t.id for t in tasks if t.id not in replay]
    if len(missing) == len(tasks):
        raise ConfigError(
            f"--policy {policy}: none of the {len(tasks)} tasks of split {split!r} has an entry"
        )
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        log.warning(
            "%s: %d of %d tasks have no entry and are left out of success (summary.json lists "
            "them as missing_ids): %s", policy, len(missing), len(tasks), shown,
        )  # fmt: skip
    return [t for t in tasks if t.id in replay], missing


def evaluate_split(
    cfg: Config,
    split: str,
    policy: str = "model",
    *,
    replay: dict[str, list[str]] | None = None,
    limit: int | None = None,
    samples: int = 0,
    temperature: float | None = None,
    expert_probe: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build what `cfg` names and evaluate `policy` on `split` (see `fastrl.api.evaluate` for the
    policies and the summary's fields); returns (summary, one row per task). A replay scores only
    the tasks it has an entry for (`replay_tasks`); with `cfg.progress`, bars on stderr count the
    episodes."""
    set_tool_timeout(cfg.env.tool_timeout_s)
    world = get_world(cfg.env.name, cfg.env)
    tasks = world.tasks(split, limit or cfg.env.eval_tasks, seed=cfg.env.seed)
    missing: list[str] = []
    if replay is not None:
        tasks, missing = replay_tasks(world, split, tasks, replay, policy, cfg.env)
    limits = limits_of(cfg)
    net, tokenizer, model_dir = build_policy(cfg)
    net.to(training_device(cfg.model.device))
    request_ids = None
    engine_used = "scripted"
    if policy == "model":  # rollout.engine decides (vLLM when it imports, by default)
        engine, engine_used = build_engine(cfg, net, model_dir, tokenizer.pad_token_id)
        engine.sync_weights()  # the engine generates with exactly the weights loaded here
    elif policy in ("oracle", "teacher"):
        habits = teacher_habits(cfg)
        messages = {
            t.id: t.expert if policy == "oracle" else demonstration(t, habits, cfg.seed)[0]
            for t in tasks
        }
        engine = ScriptedEngine(
            tokenizer, {i: [m for turn in turns for m in turn] for i, turns in messages.items()}
        )
        request_ids = [t.id for t in tasks]
    else:
        engine = ScriptedEngine(tokenizer, replay)
        request_ids = [t.id for t in tasks]
    summary, rows = evaluate_policy(
        engine, tokenizer, world, tasks, limits,
        batch_size=cfg.rollout.batch_size, request_ids=request_ids,
        progress=f"eval {split}" if cfg.progress else None,
    )  # fmt: skip
    summary.update(
        split=split, env=cfg.env.name, policy=policy, model=cfg.model.name, engine=engine_used
    )
    if replay is not None:
        summary.update(missing=len(missing), missing_ids=missing)
    if samples:
        if temperature is None:
            temperature = cfg.rollout.temperature
        solved = sampled_successes(
            engine,
            tokenizer,
            world,
            tasks,
            limits,
            samples=samples,
            temperature=temperature,
            top_p=cfg.rollout.top_p,
            batch_size=cfg.rollout.batch_size,
            progress=f"samples {split}" if cfg.progress else None,
        )
        for row, k in zip(rows, solved):
            row["sampled_successes"] = k
        n = max(1, len(rows))
        summary.update(
            samples=samples,
            temperature=temperature,
            top_p=cfg.rollout.top_p,
            sampled_success=sum(solved) / (n * samples),
            pass_at_k=sum(k > 0 for k in solved) / n,
            solved_only_by_samples=sum(k > 0 and not r["success"] for r, k in zip(rows, solved)),
        )
    if expert_probe:
        probed = probe_experts(net, tokenizer, world, tasks, limits)
        for row, p in zip(rows, probed):
            row.update(p or {})  # no fields where the expert does not solve the task
        probed = [p for p in probed if p is not None]
        misses = sorted(p["expert_first_miss"]["prob"] for p in probed if p["expert_first_miss"])
        n = len(probed)
        summary.update(  # None where no task's expert solves it
            expert_probed=n,
            expert_nll=-sum(p["expert_logprob"] for p in probed) / n if n else None,
            expert_greedy=sum(p["expert_greedy"] for p in probed) / n if n else None,
            expert_first_miss_prob=statistics.median(misses) if misses else None,
        )
    return summary, rows

"""Supervisory signals that keep multi-turn GRPO from collapsing (config block `supervision`), and
the composition of an RL step's groups (`sample_groups`: sampled, hinted and expert members, then
dynamic sampling) from a shuffled task stream (`task_stream`).

- SFT warm-up (the `sft` block): expert trajectories before RL; `fastrl.train.trainer.sft_phase`.
- OPS, off-policy supervision: `ops.k` members of every group are the task's expert trajectory,
  played through the environment (`play_experts`), scored and normalised with the sampled members.
  Their tokens are trained with the policy loss (`shaping=clip`) or with LUFFY's shaping
  (`fastrl.algo.losses.luffy_loss`). They carry no engine logprobs: the logprob-gap metric and
  truncated IS skip them.
- HBG, hint-based guidance: `hbg.k` members are sampled with the task's hint appended to the system
  prompt (`hint_suffixes`); the trained sequence has the plain prompt and the sampled ids. The
  engine's logprobs were computed in the hinted context, so hinted members are left out of the
  logprob-gap metric and of truncated IS; the ratio's old logprobs are the trainer's own forward
  on the plain prompt before the update, as for every member (ratio 1 on the first update).
- ETS and PRS, SFT on recently failed tasks (and on reflections): `fastrl.algo.corrective`.
- Mixed SFT: `fastrl.algo.losses.mixed_sft_loss` on expert trajectories added to each RL update
  with weight `mixed_sft_weight` (constant, linear or cosine from `weight` to `final_weight`),
  optionally with CHORD's per-token weight p(1 - p).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastrl.algo.advantages import zero_variance_groups
from fastrl.config import ConfigError
from fastrl.envs.base import Task
from fastrl.envs.formats import get_format
from fastrl.envs.teacher import Habits, demonstration
from fastrl.monitor.states import healthy_fraction
from fastrl.rollout.engines.scripted import ScriptedEngine
from fastrl.rollout.loop import Limits, run_episodes
from fastrl.rollout.types import Trajectory
from fastrl.train.distributed import Dist

log = logging.getLogger(__name__)

__all__ = [
    "demonstrated",
    "draw",
    "expert_calls",
    "group_sources",
    "hint_suffixes",
    "play_experts",
    "play_scripted",
    "play_teacher",
    "sample_groups",
    "task_stream",
]


# --------------------------------------------------------------------------- group composition
def group_sources(group_size: int, ops_k: int, hbg_k: int) -> list[str]:
    """Source of each member of a group, in order: sampled, then hinted, then expert members."""
    n_policy = group_size - ops_k - hbg_k
    if n_policy < 1:
        raise ValueError(
            f"a group of {group_size} needs a sampled member (ops {ops_k}, hbg {hbg_k})"
        )
    return ["policy"] * n_policy + ["hinted"] * hbg_k + ["expert"] * ops_k


def hint_suffixes(tasks: list[Task], sources: list[str]) -> list[str | None]:
    """The system-prompt addition of each episode: the task's hint for hinted members."""
    out: list[str | None] = []
    for task, source in zip(tasks, sources, strict=True):
        out.append(f"Hint: {task.hint}" if source == "hinted" and task.hint else None)
    return out


def play_scripted(
    tokenizer: Any,
    world: Any,
    tasks: list[Task],
    limits: Limits,
    messages: list[list[str]],
    source: str,
    group_ids: list[int] | None = None,
) -> list[Trajectory]:
    """Episode i sends `messages[i]` (assistant texts, in order) in a fresh environment of
    `tasks[i]`, and is scored. The tokens are what the trainer sees for the policy's own turns
    (the chat template's framing, observations with loss mask 0); `source` names the episodes,
    and their engine logprobs are 0 (there are none)."""
    rids = [f"{t.id}#{source}{i}" for i, t in enumerate(tasks)]
    trajs = run_episodes(
        ScriptedEngine(tokenizer, dict(zip(rids, messages, strict=True))),
        tokenizer,
        tasks,
        world.make_env,
        limits=limits,
        temperature=0.0,
        group_ids=group_ids,
        request_ids=rids,
    )
    for t in trajs:
        t.source = source
    return trajs


def play_experts(
    tokenizer: Any,
    world: Any,
    tasks: list[Task],
    limits: Limits,
    group_ids: list[int] | None = None,
    solved_only: bool = False,
) -> list[Trajectory]:
    """Each task's expert messages played through a fresh environment and scored (`source`
    "expert"). Every entry of `tasks` is one episode (repeat a task for several OPS members).
    With `solved_only`, only the episodes that solve their task and were not cut: the data of
    ETS/PRS, mixed SFT, the probes, and the SFT warm-up while the teacher has no habit."""
    messages = [[m for turn in t.expert for m in turn] for t in tasks]
    trajs = play_scripted(tokenizer, world, tasks, limits, messages, "expert", group_ids)
    return [t for t in trajs if t.success and not t.truncated] if solved_only else trajs


def play_teacher(
    tokenizer: Any, world: Any, tasks: list[Task], limits: Limits, habits: Habits, seed: int
) -> list[Trajectory]:
    """Each task's teacher demonstration (`fastrl.envs.teacher`) played through a fresh
    environment and scored, one trajectory per task in `tasks`' order, kept whether or not it
    solves the task: the SFT warm-up's data. `info["habits"]` names the habit that fired in each
    user turn ("" where none did)."""
    made = [demonstration(t, habits, seed) for t in tasks]
    messages = [[m for turn in turns for m in turn] for turns, _ in made]
    trajs = play_scripted(tokenizer, world, tasks, limits, messages, "teacher")
    for t, (_, fired) in zip(trajs, made, strict=True):
        t.info["habits"] = fired
    return trajs


# --------------------------------------------------------------------------- SFT data
def expert_calls(task: Task) -> int:
    """Number of tool calls in a task's expert solution."""
    fmt = get_format(task.fmt)
    return sum(len(fmt.parse(m).calls) for turn in task.expert for m in turn)


def demonstrated(tasks: list[Task], max_expert_calls: int) -> list[Task]:
    """The train tasks SFT shows the expert (or teacher) trajectories of: those with at most
    `max_expert_calls` expert calls (`sft.max_expert_calls`; 0: all)."""
    if not max_expert_calls:
        return tasks
    chosen = [t for t in tasks if expert_calls(t) <= max_expert_calls]
    log.info(
        "SFT demonstrates %d of %d train tasks (expert calls <= %d)",
        len(chosen),
        len(tasks),
        max_expert_calls,
    )
    if not chosen:
        raise ConfigError("sft.max_expert_calls: no train task has so few expert calls")
    return chosen


class Replay:
    """`sft.replay`: pretraining transcripts mixed into SFT batches. The procedural world's train
    tasks of the base's recipe (`pretrain.tasks`, `pretrain.seed`); each step's draw depends on
    the seed, the phase and the step alone, so a resumed run draws the same."""

    def __init__(self, n_tasks: int, task_seed: int, seed: int):
        from fastrl.envs.procedural import ProceduralWorld

        self.world = ProceduralWorld()
        self.tasks = self.world.tasks("train", n_tasks, task_seed)
        self.seed = seed

    def draw(self, phase: str, step: int, n: int) -> list[Task]:
        rng = random.Random(f"replay/{self.seed}/{phase}/{step}")
        return [self.tasks[i] for i in rng.sample(range(len(self.tasks)), n)]


# --------------------------------------------------------------------------- RL groups
def task_stream(tasks: list[Task], seed: int, start: int) -> Iterator[tuple[int, Task]]:
    """Endless shuffled passes over `tasks`; yields (position, task) from position `start`."""
    n = len(tasks)
    pos = start
    while True:
        epoch, index = divmod(pos, n)
        order = np.random.default_rng(seed + epoch).permutation(n)
        yield pos, tasks[int(order[index])]
        pos += 1


def draw(stream: Iterator[tuple[int, Task]], n: int) -> tuple[list[Task], int]:
    """The next `n` tasks of `stream` and the position after them."""
    pairs = [next(stream) for _ in range(n)]
    return [task for _, task in pairs], pairs[-1][0] + 1


def sample_groups(
    cfg, engine, tokenizer, world, stream, limits, step: int, dist: Dist | None = None
) -> tuple[list[Trajectory], list[Trajectory], int]:
    """Play one group per task (sampled, hinted and expert members) and apply dynamic sampling.

    Every rank draws the same tasks and plays its share of them (whole groups); `step` (the
    metric row being written) numbers the groups. Returns (kept, played, position): the
    trajectories to train on, every trajectory played, and the stream's position after the draw.
    """
    dist = dist or Dist()
    sup = cfg.supervision
    sources = group_sources(cfg.rl.group_size, sup.ops.k, sup.hbg.k)
    sampled_sources = [s for s in sources if s != "expert"]
    kept: list[Trajectory] = []
    played: list[Trajectory] = []
    n_groups, position = 0, None
    rounds = 1 + (cfg.rl.max_refill_rounds if cfg.rl.dynamic_sampling == "refill" else 0)
    for _ in range(rounds):
        drawn = cfg.rl.prompts_per_step - n_groups
        if drawn <= 0:
            break
        tasks, position = draw(stream, drawn)
        group_base = step * 10_000 + len(played)
        tasks = tasks[dist.rank :: dist.world_size]
        need = len(tasks)
        episodes = [t for t in tasks for _ in sampled_sources]
        episode_sources = sampled_sources * need
        trajs = run_episodes(
            engine, tokenizer, episodes, world.make_env, limits=limits,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            group_ids=[group_base + i for i in range(need) for _ in sampled_sources],
            system_suffix=hint_suffixes(episodes, episode_sources) if sup.hbg.k else None,
            # Ids from the position in the run, not a process counter: a resumed run's engine
            # seeds (vLLM derives them from the id) are the uninterrupted run's.
            request_ids=[f"{t.id}#{group_base}.{j}" for j, t in enumerate(episodes)],
        )  # fmt: skip
        for t, source in zip(trajs, episode_sources):
            t.source = source
        if sup.ops.k:
            trajs += play_experts(
                tokenizer, world, [t for t in tasks for _ in range(sup.ops.k)], limits,
                group_ids=[group_base + i for i in range(need) for _ in range(sup.ops.k)],
            )  # fmt: skip
        if cfg.rl.format_reward:  # before dynamic sampling, which looks at reward variance
            for t in trajs:
                t.reward += cfg.rl.format_reward * healthy_fraction(t.info.get("states", []))
        played += trajs
        if cfg.rl.dynamic_sampling == "off":
            kept, n_groups = trajs, drawn
            break
        rewards = torch.tensor([t.reward for t in trajs])
        flat = zero_variance_groups(rewards, torch.tensor([t.group_id for t in trajs]))
        good = [t for t, f in zip(trajs, flat.tolist()) if not f]
        kept += good
        (found,) = dist.all_sum([len({t.group_id for t in good})])
        n_groups += int(found)
    return kept, played, position

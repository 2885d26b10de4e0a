"""The multi-turn agent loop.

All live episodes advance together: one batched engine call per turn, then each episode's message
is parsed in its task's call syntax and stepped in its own environment. The token ids kept are the
ids the engine produced; observations are rendered with the chat template and appended with loss
mask 0. Limits: assistant turns per episode, tokens per turn, tokens per observation, and total
tokens; an episode cut by any of them is marked `truncated`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastrl.envs.base import Env, Task
from fastrl.envs.formats import get_format
from fastrl.monitor.states import classify
from fastrl.rollout.types import Engine, Sampling, Trajectory

_episode_ids = (
    itertools.count()
)  # request ids unique within the process: engines key caches by them


@dataclass
class Limits:
    max_turns: int = 8
    max_turn_tokens: int = 96
    max_obs_tokens: int = 128
    max_total_tokens: int = 1024


@dataclass
class Episode:
    traj: Trajectory
    task: Task
    env: Env
    request_id: str


def _observation_ids(tokenizer: Any, messages: list[dict], max_obs_tokens: int) -> list[int]:
    """Tokens that follow an assistant turn's stop token: the rest of the chat-template frame
    around `messages` and the next assistant header. Over-long contents are cut to the budget."""
    clipped = []
    for msg in messages:
        ids = tokenizer.encode(msg["content"], add_special_tokens=False)
        if len(ids) > max_obs_tokens:
            msg = {**msg, "content": tokenizer.decode(ids[:max_obs_tokens]) + " ...(truncated)"}
        clipped.append(msg)
    text = tokenizer.apply_chat_template(clipped, tokenize=False, add_generation_prompt=True)
    # The template ends every message with "<|im_end|>\n"; the policy's turn ended at <|im_end|>.
    return tokenizer.encode("\n" + text, add_special_tokens=False)


def _prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def run_episodes(
    engine: Engine,
    tokenizer: Any,
    tasks: list[Task],
    make_env: Callable[[], Env],
    *,
    limits: Limits,
    temperature: float = 1.0,
    top_p: float = 1.0,
    group_ids: list[int] | None = None,
    request_ids: list[str] | None = None,
    system_suffix: list[str | None] | None = None,
) -> list[Trajectory]:
    """Play one episode per entry of `tasks` (repeat a task for a group) and score them.

    `system_suffix[i]`, when given, is appended to episode i's system prompt while sampling only:
    the returned `prompt_ids` are those of the plain task, so trained tensors never contain it.
    """
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    episodes: list[Episode] = []
    for i, task in enumerate(tasks):
        env = make_env()
        messages = env.reset(task)
        prompt_ids = _prompt_ids(tokenizer, messages)
        traj = Trajectory(
            task_id=task.id,
            group_id=group_ids[i] if group_ids is not None else i,
            prompt_ids=prompt_ids,
            messages=[dict(m) for m in messages],
        )
        rid = request_ids[i] if request_ids is not None else f"{task.id}#{next(_episode_ids)}"
        episodes.append(Episode(traj, task, env, rid))

    sample_prompts: dict[int, list[int]] = {}
    if system_suffix is not None:
        for i, ep in enumerate(episodes):
            if system_suffix[i]:
                msgs = [dict(m) for m in ep.traj.messages]
                msgs[0]["content"] = msgs[0]["content"] + "\n" + system_suffix[i]
                sample_prompts[i] = _prompt_ids(tokenizer, msgs)

    live = list(range(len(episodes)))
    for _turn in range(limits.max_turns):
        if not live:
            break
        budget = {i: limits.max_total_tokens - episodes[i].traj.num_tokens for i in live}
        live = [i for i in live if budget[i] > 0 or _mark_truncated(episodes[i])]
        if not live:
            break
        max_new = min(limits.max_turn_tokens, max(budget[i] for i in live))
        sampling = Sampling(max_new, temperature, top_p, stop_id)
        prompts = [
            sample_prompts.get(i, episodes[i].traj.prompt_ids) + episodes[i].traj.response_ids
            for i in live
        ]
        outputs = engine.generate(prompts, sampling, [episodes[i].request_id for i in live])
        still_live = []
        for i, out in zip(live, outputs):
            ep = episodes[i]
            traj = ep.traj
            if out.error:  # the engine could not serve this context: end the episode, say why
                traj.truncated = True
                traj.info["status"] = "engine_error"
                traj.info["error"] = out.error
                continue
            ids = out.token_ids[: budget[i]]
            finished = out.finished and len(ids) == len(out.token_ids)
            start = len(traj.response_ids)
            traj.response_ids += ids
            traj.loss_mask += [1] * len(ids)
            traj.engine_logprobs += out.logprobs[: len(ids)]
            traj.turn_spans.append((start, start + len(ids)))
            body = ids[:-1] if finished else ids
            text = tokenizer.decode(body, skip_special_tokens=False)
            traj.messages.append({"role": "assistant", "content": text})
            if not finished:
                traj.truncated = True
                continue
            fmt = get_format(ep.task.fmt)
            parsed = fmt.parse(text)
            observation, done = ep.env.step(text, parsed)
            if done:
                continue
            obs_ids = _observation_ids(tokenizer, observation, limits.max_obs_tokens)
            traj.messages += [dict(m) for m in observation]
            if traj.num_tokens + len(obs_ids) >= limits.max_total_tokens:
                traj.truncated = True
                continue
            traj.response_ids += obs_ids
            traj.loss_mask += [0] * len(obs_ids)
            traj.engine_logprobs += [0.0] * len(obs_ids)
            still_live.append(i)
        live = still_live
    for i in live:
        episodes[i].traj.truncated = True

    for ep in episodes:
        reward, info = ep.env.score()
        ep.traj.reward = float(reward)
        ep.traj.success = bool(info.get("success", reward > 0))
        ep.traj.info = {**info, **ep.traj.info, "truncated": ep.traj.truncated}
        ep.traj.info["states"] = [
            classify(m["content"], ep.task.fmt)
            for m in ep.traj.messages
            if m["role"] == "assistant"
        ]
    return [ep.traj for ep in episodes]


def _mark_truncated(ep: Episode) -> bool:
    ep.traj.truncated = True
    return False

"""The Python API: `load_config(config, overrides)`, `train(config)` and `evaluate(...)`."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

from fastrl.config import Config, ConfigError, apply_overrides, config_from_dict, resolve
from fastrl.config import load_config as load_config_file

log = logging.getLogger("fastrl.eval")


def load_config(
    config: Config | dict | str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """The configuration of a run, complete and checked before any work starts.

    `config` is a YAML file (None: the defaults, the demo), a nested mapping or a `Config`
    (completed in place); `overrides` are `key=value` strings. The environment's defaults
    (`fastrl.envs.config_defaults`, e.g. BFCL's episode limits) fill the keys neither gives, and
    the keys naming a registry entry or a path are checked (`fastrl.train.build.check_registries`,
    `check_paths`). Every problem is a `ConfigError` naming the key.
    """
    from fastrl.train.build import check_paths, check_registries

    cfg = _complete(config, overrides)
    check_registries(cfg)
    check_paths(cfg)
    return cfg


def _complete(config: Config | dict | str | Path | None, overrides: list[str] | None) -> Config:
    """`load_config` without the registry and path checks; the custom world's `eval.splits`,
    when not given, are its task file's splits other than train."""
    from fastrl.envs import config_defaults, splits_of
    from fastrl.envs.custom import CustomWorldError

    if config is None or isinstance(config, (str, Path)):
        cfg = load_config_file(config, overrides, env_defaults=config_defaults)
    elif isinstance(config, dict):
        cfg = config_from_dict(config, env_defaults=config_defaults)
    else:
        cfg = resolve(config, config_defaults)
    if overrides and not (config is None or isinstance(config, (str, Path))):
        resolve(apply_overrides(cfg, overrides), config_defaults)
    if cfg.env.name == "custom" and "eval.splits" not in cfg.explicit:
        try:
            cfg.eval.splits = [s for s in splits_of(cfg.env) if s != "train"]
        except CustomWorldError as e:
            raise ConfigError(str(e)) from None
    return cfg


def _with_objects(
    config: Config | dict | str | Path | None,
    overrides: list[str] | None,
    tools: type | None,
    tasks: list[dict] | str | Path | None,
    reward: Any,
) -> tuple[Config | dict | str | Path | None, list[str] | None]:
    """`config` and `overrides` with the custom world's objects given from Python (`tools`,
    `tasks` as dicts or a JSONL path, `reward`) named by `env.*` overrides."""
    from fastrl.envs.custom import provide

    if tools is None and tasks is None and reward is None:
        return config, overrides
    extra = ["env.name=custom"]
    if tools is not None:
        extra.append(f"env.tools={provide('tools', tools)}")
    if tasks is not None:
        value = provide("tasks", list(tasks)) if isinstance(tasks, list) else str(tasks)
        extra.append(f"env.tasks={value}")
    if reward is not None:
        extra.append(f"env.reward={provide('reward', reward)}")
    if isinstance(config, Config):
        config = copy.deepcopy(config)
    return config, [*(overrides or []), *extra]


def train(
    config: Config | dict | str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    tools: type | None = None,
    tasks: list[dict] | str | Path | None = None,
    reward: Any = None,
) -> dict[str, Any]:
    """Run SFT then RL as configured; returns the run summary (also in run_dir/summary.json).

    `tools` (a class whose public methods are the tools), `tasks` (task dicts or a JSONL path)
    and `reward` (`fn(task, tools, answers) -> float | (float, dict)`) train on the custom world
    without files (fastrl/envs/custom.py); they set `env.name=custom` and `env.tools`,
    `env.tasks`, `env.reward`.

    The run directory is checked first (`fastrl.train.run_dir`): one that holds anything is
    refused without `resume` (continue its latest checkpoint; `"auto"`: or start fresh where
    there is nothing to continue) or `overwrite` (move it aside); a resumed run may change only
    the keys of `RESUMABLE_KEYS` and `rl.steps`. SIGINT/SIGTERM stop the run at the next step with
    a checkpoint (`fastrl.train.signals.Interrupted`).
    """
    from fastrl.algo.schedule import build_plan
    from fastrl.train.run_dir import claim_run_dir, resume_changes
    from fastrl.train.trainer import train as run

    config, overrides = _with_objects(config, overrides, tools, tasks, reward)
    cfg = load_config(config, overrides)
    if os.environ.get("RANK", "0") == "0":  # one process checks; torchrun stops the others
        resume = claim_run_dir(cfg.run_dir, resume, overwrite)
        if resume:
            resume_changes(cfg.run_dir, cfg, phases=len(build_plan(cfg)))
    else:
        from fastrl.train.checkpoint import latest_checkpoint

        resume = bool(resume) and latest_checkpoint(cfg.run_dir) is not None
    return run(cfg, resume=resume)


def evaluate(
    split: str = "test",
    *,
    policy: str = "model",
    model: str | None = None,
    run: str | Path | None = None,
    config: Config | dict | str | Path | None = None,
    overrides: list[str] | None = None,
    env: str | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    samples: int = 0,
    temperature: float | None = None,
    expert_probe: bool = False,
    tools: type | None = None,
    tasks: list[dict] | str | Path | None = None,
    reward: Any = None,
) -> dict[str, Any]:
    """Greedy evaluation of a policy on one split.

    `tools`, `tasks` and `reward` evaluate on the custom world given from Python (see `train`).

    `policy` is `model` (the model at `model`, a local HF directory or a preset, or the model of
    the training run `run`: one of the two is required), `oracle` (each task's expert messages),
    `teacher` (the demonstrations the SFT warm-up imitates: the expert's messages with the
    config's `env.teacher` habits; its success on `test` is a run's `teacher_success`) or
    `replay:FILE.jsonl` (see `read_replay`). With `out`, writes `out/summary.json` and
    `out/results.jsonl`. Returns the summary.

    With `run` (a run directory), the model (and tokenizer, whatever the policy) is `run/final/`,
    or its latest checkpoint when there is no final/ (logged), and the configuration is the run's
    own `run/config.yaml`, so the episode limits are training's; an explicit `config` replaces
    it, and the keys where the two differ are logged.

    A replay is scored on the split's tasks that have an entry in the file: a task without one is
    left out of `success` (and of every mean and `n`) and reported in the summary as `missing`
    (their count) and `missing_ids`. An entry whose task id is not among the split's first
    max(evaluated tasks, entries, `env.eval_tasks`) tasks is refused.

    With `samples` = k > 0 (policy `model` only), each task is also played k times at
    `temperature` (default: the config's `rollout.temperature`, with its `rollout.top_p`, as RL
    samples): the summary adds `sampled_success` (mean over those episodes), `pass_at_k`
    (tasks solved by at least one sample), `solved_only_by_samples` (tasks greedy decoding fails
    that a sample solves) and each row `sampled_successes`. Those are the tasks a GRPO group can
    be rewarded on, so `pass_at_k` bounds what sampling-based RL can teach from this policy.

    With `expert_probe` (policy `model` only), each task's expert trajectory is also scored
    token by token under the policy (teacher forcing; see `fastrl.eval.probe_experts`):
    each row adds the `expert_*` fields, and the summary `expert_probed` (tasks whose expert
    solves them), `expert_nll` (mean negative log-likelihood of an expert trajectory, nats),
    `expert_greedy` (share of probed tasks where greedy decoding would write the expert's
    trajectory) and `expert_first_miss_prob` (median probability of the expert's token at the
    first token where it is not the most likely one; None without misses). With no task probed,
    the means are None.

    Every bad argument is a `ConfigError` (or `ReplayError`, `FileNotFoundError`) raised before
    any episode is played, `out` included.
    """
    from fastrl.envs import splits_of
    from fastrl.eval import evaluate_split
    from fastrl.train.run_dir import dir_problem

    if policy not in ("model", "oracle", "teacher") and not policy.startswith("replay:"):
        raise ConfigError(
            f"--policy must be model, oracle, teacher or replay:FILE.jsonl, got {policy!r}"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit must be a positive integer, got {limit!r}")
    if samples < 0:
        raise ConfigError(f"--samples must be >= 0, got {samples}")
    if samples and policy != "model":
        raise ConfigError(f"--samples needs --policy model (a {policy} policy does not sample)")
    if expert_probe and policy != "model":
        raise ConfigError(f"--expert-probe needs --policy model (a {policy} policy has no model)")
    if samples and temperature is not None and not temperature > 0:
        raise ConfigError(f"--temperature must be > 0 to sample, got {temperature}")
    if model is not None and run is not None:
        raise ConfigError("--model and --run: pass one of them (--run evaluates the run's model)")
    if policy == "model" and model is None and run is None:
        raise ConfigError(
            "--policy model needs --model (a model directory or a preset) or --run RUN_DIR "
            "(a training run: its final/ model and its config)"
        )
    if out is not None:
        problem = dir_problem(out)
        if problem:
            raise ConfigError(f"--out: {problem}")
    replay = read_replay(policy.split(":", 1)[1]) if policy.startswith("replay:") else None
    if run is not None:
        model, config = _run_model_and_config(Path(run), config)
    config, overrides = _with_objects(config, overrides, tools, tasks, reward)
    cfg = _complete(config, overrides)
    if env is not None:
        cfg.env.name = env
    if model is not None:
        cfg.model.name = model
    load_config(cfg)  # completed and checked: --env brings its environment's defaults
    splits = splits_of(cfg.env)
    if split not in splits:
        raise ConfigError(
            f"--split: got {split!r}, expected one of {', '.join(splits)} ({cfg.env.name})"
        )
    if out is not None:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out: cannot create {out}: {e.strerror}") from None
    summary, rows = evaluate_split(
        cfg, split, policy, replay=replay, limit=limit, samples=samples,
        temperature=temperature, expert_probe=expert_probe,
    )  # fmt: skip
    if out is not None:
        out = Path(out)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        with open(out / "results.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return summary


def _run_model_and_config(
    run: Path, config: Config | dict | str | Path | None
) -> tuple[str, Config | dict | str | Path]:
    """The model directory of training run `run` (final/, else its latest checkpoint) and the
    configuration to evaluate with: `config` when given (its differences from the run's
    config.yaml logged), else the run's."""
    from fastrl.train.checkpoint import latest_checkpoint
    from fastrl.train.run_dir import flat

    if not run.is_dir():
        raise ConfigError(f"--run: {run} is not a run directory")
    saved = run / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--run: {run} has no config.yaml (not a training run directory?)")
    model = run / "final"
    if not (model / "config.json").is_file():
        model = latest_checkpoint(run)
        if model is None:
            raise ConfigError(f"--run: {run} has neither final/ nor a checkpoint to evaluate")
        log.warning(
            "--run: %s has no final/ model; evaluating its latest checkpoint %s", run, model
        )
    if config is None:
        return str(model), saved
    theirs, ours = flat(_complete(saved, None)), flat(_complete(config, None))
    changed = [k for k in ours if k != "run_dir" and theirs.get(k) != ours[k]]
    if changed:
        log.warning(
            "--config %s differs from %s in: %s",
            config if isinstance(config, (str, Path)) else "(given)",
            saved,
            ", ".join(f"{k} ({theirs.get(k)!r} -> {ours[k]!r})" for k in changed),
        )
    return str(model), config


class ReplayError(ValueError):
    """A malformed replay file (`fastrl eval --policy replay:FILE.jsonl`)."""


def read_replay(path: str | Path) -> dict[str, list[str]]:
    """Replay file -> {task_id: [assistant messages]}; a malformed line is a clear error.

    Each line is `{"task_id": ..., "messages": [...]}`, a message being the text an assistant
    turn writes, or a mapping with its `content`. Where the mappings carry a `role`, only the
    `assistant` ones are kept: that is the filter that reads eval's own results.jsonl (each row's
    whole conversation: system, user, assistant and tool messages) as a replay.
    """
    scripts: dict[str, list[str]] = {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"replay file not found: {path}")
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReplayError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if isinstance(messages, list):
            messages = [
                m.get("content") if isinstance(m, dict) else m
                for m in messages
                if not isinstance(m, dict) or m.get("role", "assistant") == "assistant"
            ]
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("task_id"), str)
            or not isinstance(messages, list)
            or not all(isinstance(m, str) for m in messages)
        ):
            raise ReplayError(
                f'{path}:{lineno}: expected {{"task_id": str, "messages": [str or '
                f'{{"content": str, "role": ...}}, ...]}}'
            )
        scripts[row["task_id"]] = messages
    return scripts

"""The Python API: `load_config(config, overrides)`, `train(config)` and `evaluate(...)`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastrl.config import Config, ConfigError, apply_overrides, config_from_dict, resolve
from fastrl.config import load_config as load_config_file


def load_config(
    config: Config | dict | str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """The configuration of a run, complete and checked before any work starts.

    `config` is a YAML file (None: the defaults, the demo), a nested mapping or a `Config`
    (completed in place); `overrides` are `key=value` strings. The environment's defaults
    (`fastrl.envs.config_defaults`, e.g. BFCL's episode limits) fill the keys neither gives, and
    the keys naming a registry entry are checked (`fastrl.train.build.check_registries`). Every
    problem is a `ConfigError` naming the key.
    """
    from fastrl.envs import config_defaults
    from fastrl.train.build import check_registries

    if config is None or isinstance(config, (str, Path)):
        cfg = load_config_file(config, overrides, env_defaults=config_defaults)
    else:
        if isinstance(config, dict):
            cfg = config_from_dict(config, env_defaults=config_defaults)
        else:
            cfg = resolve(config, config_defaults)
        if overrides:
            resolve(apply_overrides(cfg, overrides), config_defaults)
    check_registries(cfg)
    return cfg


def train(
    config: Config | dict | str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run SFT then RL as configured; returns the run summary (also in run_dir/summary.json).

    The run directory is checked first (`fastrl.train.run_dir`): one that holds anything is
    refused without `resume` (continue its latest checkpoint; `"auto"`: or start fresh where
    there is nothing to continue) or `overwrite` (move it aside); a resumed run may change only
    the keys of `RESUMABLE_KEYS` and `rl.steps`. SIGINT/SIGTERM stop the run at the next step with
    a checkpoint (`fastrl.train.signals.Interrupted`).
    """
    from fastrl.algo.schedule import build_plan
    from fastrl.train.run_dir import claim_run_dir, resume_changes
    from fastrl.train.trainer import train as run

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
    config: Config | dict | str | Path | None = None,
    overrides: list[str] | None = None,
    env: str | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    samples: int = 0,
    temperature: float | None = None,
    expert_probe: bool = False,
) -> dict[str, Any]:
    """Greedy evaluation of a policy on one split.

    `policy` is `model` (the model at `model`, a local HF directory or a preset; defaults to the
    config's), `oracle` (each task's expert messages), `teacher` (the demonstrations the SFT
    warm-up imitates: the expert's messages with the config's `env.teacher` habits; its success
    on `test` is a run's `teacher_success`) or `replay:FILE.jsonl` (lines of
    `{"task_id": ..., "messages": [assistant message texts in order]}`). With `out`, writes
    `out/summary.json` and `out/results.jsonl`. Returns the summary.

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
    """
    from fastrl.eval import evaluate_split

    if policy not in ("model", "oracle", "teacher") and not policy.startswith("replay:"):
        raise ConfigError(
            f"--policy must be model, oracle, teacher or replay:FILE.jsonl, got {policy!r}"
        )
    if samples < 0:
        raise ConfigError(f"--samples must be >= 0, got {samples}")
    if samples and policy != "model":
        raise ConfigError(f"--samples needs --policy model (a {policy} policy does not sample)")
    if expert_probe and policy != "model":
        raise ConfigError(f"--expert-probe needs --policy model (a {policy} policy has no model)")
    if samples and temperature is not None and not temperature > 0:
        raise ConfigError(f"--temperature must be > 0 to sample, got {temperature}")
    replay = read_replay(policy.split(":", 1)[1]) if policy.startswith("replay:") else None
    cfg = load_config(config, overrides)
    if env is not None:
        cfg.env.name = env
    if model is not None:
        cfg.model.name = model
    load_config(cfg)  # completed and checked again: --env brings its environment's defaults
    summary, rows = evaluate_split(
        cfg, split, policy, replay=replay, limit=limit, samples=samples,
        temperature=temperature, expert_probe=expert_probe,
    )  # fmt: skip
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        with open(out / "results.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return summary


class ReplayError(ValueError):
    """A malformed replay file (`fastrl eval --policy replay:FILE.jsonl`)."""


def read_replay(path: str | Path) -> dict[str, list[str]]:
    """Replay file -> {task_id: [assistant messages]}; a malformed line is a clear error."""
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
            messages = [m.get("content") if isinstance(m, dict) else m for m in messages]
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("task_id"), str)
            or not isinstance(messages, list)
            or not all(isinstance(m, str) for m in messages)
        ):
            raise ReplayError(
                f'{path}:{lineno}: expected {{"task_id": str, "messages": [str or '
                f'{{"content": str}}, ...]}}'
            )
        scripts[row["task_id"]] = messages
    return scripts

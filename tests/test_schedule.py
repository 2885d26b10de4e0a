"""The phase plan of each training scheme."""

import pytest

from fastrl.algo.schedule import build_plan
from fastrl.config import ConfigError, load_config
from fastrl.rollout.loop import Limits

LIMITS = Limits(max_total_tokens=4096)


def test_phase_plans():
    sync = build_plan(load_config(None, ["sft.steps=5", "rl.steps=7"]))
    assert [(p.kind, p.name, p.steps) for p in sync] == [("warmup", "warmup", 5), ("rl", "rl1", 7)]
    cfg = load_config(
        None,
        ["schedule.scheme=interleaved", "schedule.rl_phases=[2,3,4]",
         "supervision.prs.enabled=true", "supervision.ets.window=6"],
    )  # fmt: skip
    assert cfg.rl.steps == 9
    assert [(p.kind, p.name, p.steps) for p in build_plan(cfg)] == [
        ("warmup", "warmup", cfg.sft.steps), ("rl", "rl1", 2), ("corrective", "prs1", 6),
        ("rl", "rl2", 3), ("corrective", "prs2", 6), ("rl", "rl3", 4),
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="rl.steps"):
        load_config(
            None,
            ["schedule.scheme=interleaved", "schedule.rl_phases=[2]", "rl.steps=3",
             "supervision.ets.enabled=true"],
        )  # fmt: skip

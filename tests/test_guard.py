"""The collapse guard: snapshots confirmed a step late, rollbacks and their actions."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrl.cli import main
from fastrl.config import ConfigError, load_config
from fastrl.monitor.guard import Guard
from fastrl.train import trainer as T

SMOKE = ["train", "--config", "configs/smoke.yaml", "eval.splits=[test]"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_guard_confirms_snapshots_a_step_late_and_rolls_back():
    cfg = load_config(None, ["guard.enabled=true", "guard.snapshot_every=2", "guard.max_actions=1"])
    g = Guard(cfg.guard)
    g.candidate_step = 0  # the weights RL starts from
    healthy, alarm = {"ctrl/alarm": 0.0}, {"ctrl/alarm": 1.0}
    d = g.observe(1, dict(healthy))
    assert d.promote and g.snapshot_step == 0 and not d.save_candidate
    d = g.observe(2, dict(healthy))
    assert d.save_candidate and g.candidate_step == 2
    row = dict(alarm)
    d = g.observe(3, row)
    assert d.discard and d.rollback and d.action == "sft" and g.snapshot_step == 0
    assert row["guard/action"] == "rollback+sft" and row["guard/actions"] == 1
    d = g.observe(4, {"state/collapse": 0.9})
    assert not d.rollback  # no actions left
    why = g.unhealthy_reason({"ctrl/alarm": 1.0, "ctrl/health_drift": 0.02,
                              "ctrl/pollution_drift": 0.31})  # fmt: skip
    assert why == "ctrl/alarm (health_drift +0.02, pollution_drift +0.31)"  # which rule fired
    polluted = Guard(load_config(None, ["guard.pollution_threshold=0.5"]).guard)
    assert polluted.unhealthy_reason({"state/pollution": 0.6}) == "state/pollution 0.60 > 0.5"
    assert not polluted.unhealthy_reason({"state/pollution": 0.4, "state/collapse": 0.2})
    lower = Guard(load_config(None, ["guard.action=lower_lr", "guard.lr_factor=0.25"]).guard)
    lower.snapshot_step = 0
    lower.observe(1, dict(alarm))
    assert lower.lr_scale == 0.25
    lower.observe(2, dict(alarm))
    assert lower.lr_scale == 0.0625  # the cut lasts and compounds
    both = Guard(load_config(None, ["guard.lr_factor=0.3"]).guard)  # action sft cuts the rate too
    both.snapshot_step = 0
    assert both.observe(1, dict(alarm)).action == "sft" and both.lr_scale == pytest.approx(0.3)
    keep = Guard(load_config(None, ["guard.lr_factor=1"]).guard)
    keep.snapshot_step = 0
    keep.observe(1, dict(alarm))
    assert keep.lr_scale == 1.0
    with pytest.raises(ConfigError, match=r"guard.lr_factor: got 1.0, expected < 1 with"):
        load_config(None, ["guard.action=lower_lr", "guard.lr_factor=1"])


@pytest.mark.parametrize("action", ["sft", "lower_lr"])
def test_guard_rolls_back_to_the_healthy_snapshot(tmp_path, monkeypatch, action):
    """A collapse cannot be provoked on cue in a smoke run, so the third RL step (step 6 after 3
    SFT steps) is declared unhealthy; everything the guard then does is real. The snapshot is the
    weights after step 4, the last ones a healthy step (5) confirmed; after the rollback the model
    holds them, and the corrective phase or the lower rate follows."""
    run = tmp_path / "run"
    seen = []
    real = T.act_on

    def checked(r, guard, decision):
        real(r, guard, decision)
        if decision.rollback and action == "lower_lr":
            snap = load_file(run / "checkpoints" / "healthy" / "model.safetensors")
            params = dict(r.model.named_parameters())
            seen.append(all(torch.equal(params[k], v) for k, v in snap.items() if k in params))
            seen.append(json.loads(
                (run / "checkpoints" / "healthy" / "trainer_state.json").read_text()
            )["step"])  # fmt: skip

    monkeypatch.setattr(T, "act_on", checked)
    monkeypatch.setattr(
        Guard, "unhealthy_reason", lambda self, row: "test" if row["step"] == 6 else ""
    )
    args = [
        *SMOKE, f"run_dir={run}", "rl.steps=4", "guard.enabled=true", f"guard.action={action}",
        "guard.snapshot_every=1", "supervision.ets.window=4", "supervision.ets.epochs=1",
    ]  # fmt: skip
    assert main(args) == 0
    rows = _rows(run)
    acted = [r for r in rows if "guard/action" in r]
    assert len(acted) == 1 and acted[0]["step"] == 6
    assert acted[0]["guard/action"] == f"rollback+{action}" and acted[0]["guard/snapshot_step"] == 4
    assert not (run / "checkpoints" / "healthy_candidate").exists() or rows[-1]["step"] > 6
    after = rows[rows.index(acted[0]) + 1 :]
    if action == "sft":
        guard_sft = [r for r in after if r["phase/name"] == "guard_sft"]
        assert guard_sft and after[: len(guard_sft)] == guard_sft
        assert all(r["phase"] == "sft" and r["sft/failed_tasks"] >= 1 for r in guard_sft)
    else:
        assert seen == [True, 4]
        rl_after = [r for r in after if r["phase"] == "rl"]
        assert rl_after and all(r["guard/lr_scale"] == 0.5 for r in rl_after)
        assert rl_after[0]["lr"] == pytest.approx(acted[0]["lr"] * 0.5)
    assert sum(r["phase"] == "rl" for r in rows) == 4

"""configs/experiments/: every cell's config is valid as run.sh runs it, and table.py reads runs as
docs/EXPERIMENTS.md defines (fall, alarm lead, collapse)."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from fastrl.config import load_config

EXP = Path(__file__).resolve().parents[1] / "configs" / "experiments"


def _table():
    spec = importlib.util.spec_from_file_location("exp_table", EXP / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(EXP.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_cell_config_is_valid_as_run_sh_runs_it(path):
    cfg = load_config(str(path), ["seed=2", f"run_dir=runs/exp/{path.stem}_s2"])
    assert cfg.run_dir == f"runs/exp/{path.stem}_s2"
    text = path.read_text()
    if "name: runs/exp/sft_base" in text:  # run.sh points it at the seed's SFT checkpoint
        assert cfg.sft.steps == 0 and not cfg.eval.before_rl
    table = _table()
    assert path.stem in (*table.CELLS, "sft_base")  # the table knows every cell


def test_run_sh_is_valid_bash_and_names_every_cell():
    subprocess.run(["bash", "-n", str(EXP / "run.sh")], check=True)
    text = (EXP / "run.sh").read_text()
    for cell in _table().CELLS:
        assert f" {cell}" in text or f"({cell}" in text, cell


def test_fall_lead_and_collapse(tmp_path):
    t = _table()
    assert t.fall_step([0.2, 0.8, 0.5, 0.4, 0.2, 0.1]) == 5  # base 0.5: first < 0.25 after step 3
    assert t.fall_step([0.1, 0.8, 0.6, 0.5, 0.45]) is None  # step 1 is in the baseline window
    assert t.fall_step([0.0, 0.0, 0.0, 0.0]) is None
    run = tmp_path / "sft_rl_high_s1"
    run.mkdir()
    success = [0.3, 0.5, 0.4, 0.3, 0.1, 0.0]
    rows = [{"step": i + 1, "phase": "rl", "success/mean": s, "ctrl/alarm": float(i + 1 in (3, 6))}
            for i, s in enumerate(success)]  # fmt: skip
    rows.insert(3, {"step": 99, "phase": "sft", "loss": 1.0})  # corrective rows are not RL steps
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"rl_success": 0.1, "minutes": 1.0}))
    sft = tmp_path / "sft_base_s1"
    sft.mkdir()
    (sft / "summary.json").write_text(json.dumps({"rl_success": 0.6, "format_ood_success": 0.0}))
    r = t.analyse(run)
    assert r["fall"] == 5 and r["alarms"] == [3, 6] and r["lead"] == 2
    assert r["start"] == 0.6 and r["collapsed"]  # start read from the seed's SFT run
    assert "| sft_rl_high | 1 | 0.60 → 0.10 |" in t.table(tmp_path)
    assert "| +2 (alarm 3, fall 5) |" in t.table(tmp_path)
    (run / "summary.json").write_text(json.dumps({"sft_success": None, "rl_success": 0.1}))
    assert t.analyse(run)["start"] == 0.6  # null: not evaluated before RL


def test_alarm_steps_replays_the_pollution_rule_over_logged_rows(tmp_path):
    t = _table()
    rows = [{"state/pollution": p, "ctrl/alarm": float(i == 4)}
            for i, p in enumerate([0.05, 0.1, 0.31, 0.2, 0.0])]  # fmt: skip
    assert t.alarm_steps(rows, 0.25) == [3, 5]  # 0.31 - 0.05 > 0.25; step 5 was logged
    assert t.alarm_steps(rows, 0.0) == [5]  # rule off: the logged alarm only
    run = tmp_path / "ops_high_s0"
    run.mkdir()
    assert t.pollution_threshold(run) == 0.25  # no config.yaml: the default
    (run / "config.yaml").write_text("monitor:\n  pollution_threshold: 0.4\n")
    assert t.pollution_threshold(run) == 0.4

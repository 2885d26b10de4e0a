"""Run directories are never clobbered, and a resume never silently changes the run."""

import json

import pytest

from fastrl.cli import free_run_dir, main, resume_command
from fastrl.config import ConfigError, load_config, save_config
from fastrl.train.run_dir import claim_run_dir, resume_changes


def _checkpoint(run, plan_index=1):
    """A minimal intact-looking latest checkpoint (what `latest_checkpoint` looks for)."""
    ck = run / "checkpoints" / "step_000003"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"plan_index": plan_index, "step": 3}))
    (run / "checkpoints" / "latest").write_text("step_000003")


def test_a_new_or_empty_run_dir_is_claimed_and_a_used_one_refused(tmp_path):
    assert claim_run_dir(tmp_path / "new", resume=False, overwrite=False) is False
    (tmp_path / "empty").mkdir()
    assert claim_run_dir(tmp_path / "empty", resume=False, overwrite=False) is False
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="is not empty.*--resume.*--overwrite"):
        claim_run_dir(used, resume=False, overwrite=False)
    assert (used / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        claim_run_dir(tmp_path / "file", resume=False, overwrite=False)


def test_overwrite_moves_the_old_run_aside_instead_of_deleting_it(tmp_path):
    used = tmp_path / "run"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    assert claim_run_dir(used, resume=False, overwrite=True) is False
    assert not used.exists()
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_needs_a_checkpoint_unless_asked_to_start_fresh(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        claim_run_dir(run, resume=True, overwrite=False)
    assert claim_run_dir(run, resume="auto", overwrite=False) is False  # nothing there: fresh
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # killed before its first checkpoint
    with pytest.raises(ConfigError, match="no checkpoint.*--overwrite"):
        claim_run_dir(run, resume="auto", overwrite=False)
    _checkpoint(run)
    assert claim_run_dir(run, resume=True, overwrite=False) is True
    (run / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="finished run"):
        claim_run_dir(run, resume=True, overwrite=False)


def test_resume_refuses_changed_keys_and_records_allowed_ones(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", "rl.steps=10"])
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    _checkpoint(run, plan_index=1)  # inside RL (plan: warmup, rl1)
    assert resume_changes(run, load_config(None, [f"run_dir={run}", "rl.steps=10"]), 2) == {}
    assert not (run / "resumes.jsonl").exists()
    with pytest.raises(ConfigError, match=r"rl\.lr \(0\.0001 -> 0\.001\)") as err:
        resume_changes(run, load_config(None, [f"run_dir={run}", "rl.steps=10", "rl.lr=1e-3"]), 2)
    assert "sft.lr" not in str(err.value)
    more = load_config(None, [f"run_dir={run}", "rl.steps=20", "eval.every=5"])
    changed = resume_changes(run, more, phases=2)
    assert changed == {"rl.steps": [10, 20], "eval.every": [0, 5]}
    (record,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert record["changed"] == {"rl.steps": [10, 20], "eval.every": [0, 5]}
    _checkpoint_end = run / "checkpoints" / "step_000003" / "trainer_state.json"
    _checkpoint_end.write_text(json.dumps({"plan_index": 2, "step": 13}))  # RL is over
    with pytest.raises(ConfigError, match="rl.steps can change only before RL ends"):
        resume_changes(run, more, phases=2)


def test_cli_refuses_a_used_run_dir_and_a_resume_without_checkpoint(tmp_path, capsys):
    used = tmp_path / "run"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    args = ["train", "--config", "configs/smoke.yaml", f"run_dir={used}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0]
    assert main(["train", "--config", "configs/smoke.yaml", f"run_dir={tmp_path / 'x'}",
                 "--resume"]) == 2  # fmt: skip
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_demo_picks_a_free_run_dir_and_the_resume_command_is_the_same_line(tmp_path):
    base = tmp_path / "demo"
    assert free_run_dir(str(base)) == str(base)
    base.mkdir()
    assert free_run_dir(str(base)) == str(base)  # empty: used as it is
    (base / "metrics.jsonl").write_text("")
    (tmp_path / "demo-2").mkdir()
    (tmp_path / "demo-2" / "x").write_text("")
    assert free_run_dir(str(base)) == str(tmp_path / "demo-3")
    argv = ["train", "--config", "c.yaml", "rl.lr=1e-4", "--overwrite"]
    assert resume_command(argv) == "fastrl train --config c.yaml rl.lr=1e-4 --resume"

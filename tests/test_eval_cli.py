"""`fastrl eval` cannot be silently wrong, and every bad input is one line and exit 2 at start:
--run (the run's final/ model and config), replays of eval's own results.jsonl, unknown and
missing replay ids, --limit, --out, --split, malformed YAML, run_dir, path-valued keys."""

import json
import logging
import shutil

import pytest

from fastrl.cli import main

SMOKE = ["--config", "configs/smoke.yaml"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished smoke run whose config differs from configs/smoke.yaml in env.eval_tasks."""
    run_dir = tmp_path_factory.mktemp("eval_cli") / "run"
    assert main(["train", *SMOKE, f"run_dir={run_dir}", "env.eval_tasks=3"]) == 0
    return run_dir


def refused(capsys, args: list[str], *words: str) -> str:
    """Run `fastrl ARGS`: exit 2 and exactly one line on stderr holding `words`; nothing on
    stdout. Returns the line."""
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("fastrl: error: ")
    for word in words:
        assert word in lines[0], lines[0]
    assert captured.out == ""
    return lines[0]


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text())


# --------------------------------------------------------------------------- --run and --model
def test_policy_model_needs_model_or_run(capsys, tmp_path):
    out = tmp_path / "o"
    refused(capsys, ["eval", *SMOKE, "--out", str(out)], "--model", "--run RUN_DIR")
    assert not out.exists()
    refused(capsys, ["eval", "--model", "tiny", "--run", str(tmp_path), "--out", str(out)], "one")


def test_run_evaluates_final_with_the_runs_config(run, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["eval", "--run", str(run), "--out", str(out)]) == 0
    summary = summary_of(out)
    assert summary["model"] == str(run / "final")
    assert summary["n"] == 3  # the run's env.eval_tasks, not the default 100 nor smoke's 8
    assert summary["success"] == json.loads((run / "summary.json").read_text())["rl_success"]
    oracle = tmp_path / "oracle"  # any policy: the run's tokenizer and limits
    assert main(["eval", "--run", str(run), "--policy", "oracle", "--out", str(oracle)]) == 0
    assert summary_of(oracle)["success"] == 1.0 and summary_of(oracle)["n"] == 3


def test_explicit_config_wins_over_the_runs_and_differences_are_logged(run, tmp_path, caplog):
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="fastrl.eval"):
        assert main(["eval", "--run", str(run), *SMOKE, "--out", str(out)]) == 0
    assert summary_of(out)["n"] == 8  # configs/smoke.yaml's env.eval_tasks
    (line,) = [r.getMessage() for r in caplog.records if "differs from" in r.getMessage()]
    assert "env.eval_tasks (3 -> 8)" in line and "run_dir" not in line


def test_run_without_final_evaluates_its_latest_checkpoint(run, tmp_path, caplog):
    from fastrl.train.checkpoint import latest_checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final"))
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="fastrl.eval"):
        assert main(["eval", "--run", str(copy), "--out", str(out), "--limit", "2"]) == 0
    assert summary_of(out)["model"] == str(latest_checkpoint(copy))
    assert any("no final/" in r.getMessage() for r in caplog.records)


def test_run_that_is_not_a_run_is_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    refused(capsys, ["eval", "--run", str(tmp_path / "nope"), *out], "is not a run directory")
    refused(capsys, ["eval", "--run", str(tmp_path), *out], "no config.yaml")


# --------------------------------------------------------------------------- replays
def test_replay_of_evals_own_results_scores_the_oracle_and_reports_missing(tmp_path, capsys):
    oracle = tmp_path / "oracle"
    args = ["eval", "--policy", "oracle", *SMOKE, "--out", str(oracle), "--limit", "4"]
    assert main(args) == 0
    results = oracle / "results.jsonl"
    assert any(
        m["role"] != "assistant"
        for m in json.loads(results.read_text().splitlines()[0])["messages"]
    )
    out = tmp_path / "replay"
    args = ["eval", "--policy", f"replay:{results}", *SMOKE, "--out", str(out)]
    assert main([*args, "--limit", "4"]) == 0
    summary = summary_of(out)
    assert (summary["success"], summary["n"], summary["missing"]) == (1.0, 4, 0)

    assert main([*args, "--limit", "6"]) == 0  # two tasks without an entry: not scored
    summary = summary_of(out)
    assert (summary["success"], summary["n"], summary["missing"]) == (1.0, 4, 2)
    assert summary["missing_ids"] == ["synthetic/test/00004", "synthetic/test/00005"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_replay_id_the_split_does_not_have_is_refused(tmp_path, capsys):
    replay = tmp_path / "r.jsonl"
    rows = [("synthetic/test/00000", ["hi"]), ("synthetic/format_ood/00001", ["hi"])]
    replay.write_text("".join(json.dumps({"task_id": i, "messages": m}) + "\n" for i, m in rows))
    out = tmp_path / "o"
    args = ["eval", "--policy", f"replay:{replay}", *SMOKE, "--out", str(out), "--limit", "2"]
    refused(capsys, args, "'synthetic/format_ood/00001'", "first 8 tasks of split 'test'")
    replay.write_text(json.dumps({"task_id": "synthetic/test/00050", "messages": ["hi"]}) + "\n")
    refused(capsys, args, "'synthetic/test/00050'", "first 8 tasks")  # env.eval_tasks: 8
    replay.write_text(json.dumps({"task_id": "synthetic/test/00005", "messages": ["hi"]}) + "\n")
    refused(capsys, args, "none of the 2 tasks")  # of the split, but not evaluated


def test_progress_bar_goes_to_stderr_and_stdout_holds_the_summary(tmp_path, capsys):
    out = tmp_path / "o"
    args = ["eval", "--policy", "oracle", *SMOKE, "--out", str(out), "--limit", "3"]
    assert main([*args, "progress=true"]) == 0
    captured = capsys.readouterr()
    assert "eval test" in captured.err and "3/3" in captured.err
    (line,) = captured.out.splitlines()
    assert json.loads(line)["n"] == 3


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_must_be_positive(limit, tmp_path, capsys):
    args = ["eval", "--policy", "oracle", *SMOKE, "--out", str(tmp_path / "o"), "--limit", limit]
    refused(capsys, args, "--limit must be a positive integer")


def test_out_that_cannot_be_a_directory_is_refused_before_evaluating(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("keep")
    for out in (file, file / "sub"):
        args = ["eval", "--policy", "oracle", *SMOKE, "--out", str(out)]
        refused(capsys, args, "--out", f"{file} is a file")
    assert file.read_text() == "keep"


@pytest.mark.parametrize("env", ["synthetic", "bfcl"])
def test_unknown_split_is_refused(env, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["eval", "--env", env, "--policy", "oracle", "--split", "nope", "--out", str(out)]
    refused(capsys, args, "--split: got 'nope'", "test")
    assert not out.exists()


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  lr: 1\n  steps: [2,\nsft: {steps: 1}\n")
    refused(capsys, ["train", "--config", str(bad)], str(bad), "malformed YAML", "line ")
    out = ["--out", str(tmp_path / "o")]
    refused(capsys, ["eval", "--policy", "oracle", "--config", str(bad), *out], str(bad))


def test_run_dir_that_is_a_file_or_under_one_is_refused(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("keep")
    refused(capsys, ["train", *SMOKE, f"run_dir={file}"], "run_dir", f"{file} is a file")
    refused(capsys, ["train", *SMOKE, f"run_dir={file}/run"], "run_dir", f"{file} is a file")
    assert file.read_text() == "keep"


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.name=no/such/model"], ["model.name", "'no/such/model'", "preset"]),
        (
            [
                "schedule.scheme=interleaved",
                "schedule.rl_phases=[1,1]",
                "supervision.prs.enabled=true",
                "supervision.prs.reflector=no/such/judge",
            ],
            ["supervision.prs.reflector", "'no/such/judge'"],
        ),
    ],
)
def test_path_keys_are_checked_before_any_work(overrides, words, tmp_path, capsys):
    run_dir = tmp_path / "r"
    refused(capsys, ["train", *SMOKE, f"run_dir={run_dir}", *overrides], *words)
    refused(capsys, ["demo", f"run_dir={run_dir}", *overrides], *words)
    assert not run_dir.exists()


def test_model_dir_without_config_json_and_cache_dir_file_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "o")]
    refused(capsys, ["eval", "--model", str(tmp_path / "empty"), *SMOKE, *out], "no config.json")
    (tmp_path / "cache").write_text("")
    args = ["eval", "--policy", "oracle", *SMOKE, *out, f"model.cache_dir={tmp_path}/cache"]
    refused(capsys, args, "model.cache_dir", "is a file")

"""End-to-end runs of configs/smoke.yaml: train, eval CLI, resume after a crash."""

import base64
import json
import statistics
import subprocess
import sys

import pytest
import torch

from fastrl.api import ReplayError, evaluate
from fastrl.cli import main
from fastrl.config import load_config
from fastrl.envs import get_world
from fastrl.envs.teacher import demonstration
from fastrl.train import trainer
from fastrl.train.build import teacher_habits

CONTRACT = [
    "step",
    "phase",
    "reward/mean",
    "success/mean",
    "loss",
    "clip_frac",
    "grad_norm",
    "lr",
    "entropy",
    "rollout/logprob_diff_mean",
    "time/rollout",
    "time/train",
    "time/sync",
    "throughput/tokens_per_s",
    "rollout/logprob_diff_max",
    "state/healthy_call",
    "state/healthy_text",
    "state/pollution",
    "state/collapse",
    "ctrl/alarm",
]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SYNCS_FROM_RL_PHASE = []  # the smoke run's engine syncs made by the RL loop


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from fastrl.rollout.engines.hf import HFEngine

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    real = HFEngine.sync_weights

    def sync_weights(self, named_tensors=None):
        SYNCS_FROM_RL_PHASE.append(sys._getframe(1).f_code.co_name == "rl_phase")
        return real(self, named_tensors)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HFEngine, "sync_weights", sync_weights)
        code = main(["train", "--config", "configs/smoke.yaml", f"run_dir={run_dir}"])
    assert code == 0
    return run_dir


def test_smoke_run_writes_everything(smoke_run, capsys):
    summary = json.loads((smoke_run / "summary.json").read_text())
    for key in (
        "teacher_success",
        "sft_success",
        "rl_success",
        "format_ood_success",
        "content_ood_success",
        "minutes",
        "engine",
        "run_dir",
    ):
        assert key in summary
    # The reported numbers are what the saved model and the teacher's data score: the final
    # model re-evaluated on the same test tasks, and the teacher's demonstrations, which fail
    # exactly where a habit fired (tests/test_teacher.py).
    cfg = load_config("configs/smoke.yaml")
    # Every evaluated split is measured before RL too (what RL then does to it).
    for split in cfg.eval.splits:
        key = "sft_success" if split == "test" else f"sft_{split}_success"
        assert 0 <= summary[key] <= 1, key
    again = evaluate("test", model=str(smoke_run / "final"), config="configs/smoke.yaml")
    assert again["n"] == cfg.env.eval_tasks
    assert summary["rl_success"] == again["success"]
    habits = teacher_habits(cfg)
    tasks = get_world("synthetic").tasks("test", cfg.env.eval_tasks)
    clean = [not any(demonstration(t, habits, cfg.seed)[1]) for t in tasks]
    assert summary["teacher_success"] == sum(clean) / len(clean)
    rows = _rows(smoke_run)
    assert [r["step"] for r in rows] == list(range(1, 6))
    assert [r["phase"] for r in rows] == ["sft"] * 3 + ["rl"] * 2
    # The engine is synced when RL starts and after each step that changed the weights.
    updated = [r["train/updates"] > 0 for r in rows if r["phase"] == "rl"]
    assert sum(SYNCS_FROM_RL_PHASE) == 1 + sum(updated)
    for key in CONTRACT:
        assert key in rows[-1], key
    states = [
        rows[-1][f"state/{s}"] for s in ("healthy_call", "healthy_text", "pollution", "collapse")
    ]
    assert sum(states) == pytest.approx(1.0)
    rl = [r for r in rows if r["phase"] == "rl"]  # the alarm's pollution rule: from RL start
    assert rl[0]["ctrl/pollution_drift"] == 0.0
    drift = rl[1]["state/pollution"] - rl[0]["state/pollution"]
    assert rl[1]["ctrl/pollution_drift"] == pytest.approx(drift)
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN
    assert rows[0]["loss"] > 0
    assert (smoke_run / "config.yaml").exists()
    assert list((smoke_run / "tb").iterdir())
    assert (smoke_run / "final" / "config.json").exists()


def test_report_draws_a_real_run(smoke_run, capsys):
    capsys.readouterr()
    assert main(["report", str(smoke_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # stdout: the JSON summary only
    out = json.loads(lines[0])
    html = (smoke_run / "report.html").read_text()
    # a synchronous run: no corrective SFT phase between RL steps
    assert len(out["plots"]) == 6 and out["skipped"] == ["sft_corrective.png"]
    for plot in out["plots"]:
        data = open(plot, "rb").read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert base64.b64encode(data).decode() in html  # embedded, not linked
    assert "warmup" in html and "rl1" in html  # the phases of the run


def test_eval_cli_model_and_oracle_and_replay(smoke_run, tmp_path, capsys):
    out = tmp_path / "oracle"
    assert (
        main(
            [
                "eval",
                "--env",
                "synthetic",
                "--split",
                "test",
                "--policy",
                "oracle",
                "--config",
                "configs/smoke.yaml",
                "--out",
                str(out),
                "--limit",
                "5",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] == 1.0 and summary["n"] == 5
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["success"] for r in rows)

    out = tmp_path / "teacher"  # the demonstrations SFT imitated, scored as the run scored them
    args = ["eval", "--policy", "teacher", "--config", "configs/smoke.yaml", "--out", str(out)]
    assert main(args) == 0
    teacher = json.loads((out / "summary.json").read_text())
    assert (
        teacher["success"]
        == json.loads((smoke_run / "summary.json").read_text())["teacher_success"]
    )
    assert teacher["success"] < 1.0  # the smoke config keeps the demo's habits

    replay = tmp_path / "replay.jsonl"
    lines = []
    for i, row in enumerate(rows):
        msgs = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        if i == 0:
            msgs = ["<tool_call>\n{broken\n</tool_call>"]  # one task answered badly
        lines.append(json.dumps({"task_id": row["task_id"], "messages": msgs}))
    replay.write_text("\n".join(lines) + "\n")
    out = tmp_path / "replay"
    assert (
        main(
            [
                "eval",
                "--split",
                "test",
                "--policy",
                f"replay:{replay}",
                "--config",
                "configs/smoke.yaml",
                "--out",
                str(out),
                "--limit",
                "5",
            ]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["success"] == pytest.approx(0.8)

    out = tmp_path / "model"
    assert (
        main(
            [
                "eval",
                "--split",
                "format_ood",
                "--policy",
                "model",
                "--model",
                str(smoke_run / "final"),
                "--config",
                "configs/smoke.yaml",
                "--out",
                str(out),
                "--limit",
                "3",
            ]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["n"] == 3


def test_eval_samples_pass_at_k_and_expert_probe(smoke_run, tmp_path, capsys):
    summary = evaluate(  # one model and engine for both additions to the greedy pass
        "test",
        model=str(smoke_run / "final"),
        config="configs/smoke.yaml",
        limit=3,
        samples=2,
        expert_probe=True,
        out=tmp_path,
    )
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    rollout = load_config("configs/smoke.yaml").rollout  # sampled as RL samples by default
    assert summary["samples"] == 2
    assert (summary["temperature"], summary["top_p"]) == (rollout.temperature, rollout.top_p)
    assert [0 <= r["sampled_successes"] <= 2 for r in rows] == [True] * 3
    assert summary["sampled_success"] == sum(r["sampled_successes"] for r in rows) / 6
    assert summary["pass_at_k"] == sum(r["sampled_successes"] > 0 for r in rows) / 3
    assert summary["expert_probed"] == 3  # every built-in task's expert solves it
    assert summary["expert_nll"] == pytest.approx(-sum(r["expert_logprob"] for r in rows) / 3)
    assert summary["expert_greedy"] == sum(r["expert_greedy"] for r in rows) / 3
    misses = sorted(r["expert_first_miss"]["prob"] for r in rows if r["expert_first_miss"])
    assert summary["expert_first_miss_prob"] == (statistics.median(misses) if misses else None)
    assert all(0 < r["expert_min_prob"] <= 1 and r["expert_tokens"] > 0 for r in rows)
    common = ["--config", "configs/smoke.yaml", "--out", str(tmp_path / "o"), "--limit", "2"]
    assert main(["eval", "--policy", "oracle", "--samples", "2", *common]) == 2
    assert "--samples needs --policy model" in capsys.readouterr().err
    assert main(["eval", "--samples", "2", "--temperature", "0", *common]) == 2
    assert "--temperature must be > 0" in capsys.readouterr().err
    assert main(["eval", "--policy", "oracle", "--expert-probe", *common]) == 2
    assert "--expert-probe needs --policy model" in capsys.readouterr().err


def test_bad_replay_file_or_policy_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 3}\n')
    common = ["--config", "configs/smoke.yaml", "--out", str(tmp_path / "o"), "--limit", "2"]
    assert main(["eval", "--policy", f"replay:{bad}", *common]) == 2
    assert "bad.jsonl:1: expected" in capsys.readouterr().err
    assert main(["eval", "--policy", "gpt", *common]) == 2
    err = capsys.readouterr().err
    assert "--policy must be model, oracle, teacher or replay:FILE.jsonl, got 'gpt'" in err
    with pytest.raises(ReplayError, match="bad.jsonl:1"):  # the API raises it
        evaluate("test", policy=f"replay:{bad}", config="configs/smoke.yaml", limit=2)


def test_bench_verb_lists_and_runs_the_benchmark_scripts(capfd):
    assert main(["bench"]) == 0
    listed = capfd.readouterr().out.split()
    assert {"logprobs", "fused_linear", "policy_loss", "packing"} <= set(listed)
    assert main(["bench", "policy_loss", "--help"]) == 0  # arguments reach the script
    assert "--reps" in capfd.readouterr().out
    assert main(["bench", "policy_loss", "--b", "two"]) == 2  # its exit code comes back
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capfd.readouterr().err


def test_python_m_fastrl_cli_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "fastrl.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "train" in done.stdout and "report" in done.stdout


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch):
    args = ["train", "--config", "configs/smoke.yaml", "checkpoint_every=1", "rl.steps=3"]
    full = tmp_path / "full"
    assert main(args + [f"run_dir={full}"]) == 0

    crashed = tmp_path / "crashed"
    real_update = trainer.policy_update
    calls = {"n": 0}

    def crash_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real_update(*a, **kw)

    monkeypatch.setattr(trainer, "policy_update", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args + [f"run_dir={crashed}"])
    monkeypatch.setattr(trainer, "policy_update", real_update)
    assert [r["step"] for r in _rows(crashed)] == [1, 2, 3, 4]
    assert main(args + [f"run_dir={crashed}", "--resume"]) == 0

    a, b = _rows(full), _rows(crashed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ("loss", "reward/mean", "grad_norm", "entropy"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((crashed / "summary.json").read_text())
    assert sa["rl_success"] == sb["rl_success"]


def test_resumed_run_keeps_the_kl_reference(tmp_path, monkeypatch):
    args = [
        "train",
        "--config",
        "configs/smoke.yaml",
        "checkpoint_every=1",
        "rl.steps=2",
        "rl.kl_coef=0.1",
        f"run_dir={tmp_path / 'r'}",
    ]
    real_update = trainer.policy_update

    def crash(*a, **kw):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer, "policy_update", crash)
    with pytest.raises(RuntimeError):
        main(args)
    ref = tmp_path / "r" / "reference.safetensors"
    assert ref.exists()
    before = ref.read_bytes()
    monkeypatch.setattr(trainer, "policy_update", real_update)
    assert main(args + ["--resume"]) == 0
    assert ref.read_bytes() == before


def test_sigkill_once_a_checkpoint_exists_then_resume_finishes(tmp_path):
    """The outside check: `python -m fastrl train --config configs/smoke.yaml run_dir=DIR`, killed
    with SIGKILL as soon as DIR/checkpoints/ holds one, then the same command with --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from transformers import AutoModelForCausalLM

    from fastrl.models import load_tokenizer
    from fastrl.train.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fastrl",
        "train",
        "--config",
        "configs/smoke.yaml",
        f"run_dir={run}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while latest_checkpoint(run) is None:
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(run).name
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / killed_at}" in done.stderr
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5]  # 3 SFT + 2 RL steps, once each
    assert json.loads((run / "summary.json").read_text())["rl_success"] is not None
    # A checkpoint is a model directory transformers loads as it is.
    last = latest_checkpoint(run)
    model = AutoModelForCausalLM.from_pretrained(last, local_files_only=True)
    final = AutoModelForCausalLM.from_pretrained(run / "final", local_files_only=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_tokenizer(last).encode("<tool_call>", add_special_tokens=False) == [3]


def test_sigint_and_sigterm_stop_at_a_step_with_a_checkpoint_and_resume_continues(tmp_path):
    """A real process: SIGINT stops it after the step in flight with a checkpoint of that step,
    one line on stderr naming the resume command, nothing on stdout, exit 130; SIGTERM the same
    with 143; the resumed run writes every step once and prints one JSON line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastrl", "train", "--config", "configs/smoke.yaml",
           f"run_dir={run}", "sft.steps=40", "checkpoint_every=0", "checkpoint_minutes=0",
           "eval.splits=[test]"]  # fmt: skip
    metrics = run / "metrics.jsonl"

    def interrupt(args, sig, after_rows):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not metrics.exists() or len(metrics.read_text().splitlines()) < after_rows:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err

    code, out, err = interrupt(cmd, signal.SIGINT, after_rows=3)
    assert code == 130 and out == "", err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastrl: stopped by SIGINT after step ") and "Traceback" not in err
    step = int(last.split("after step ")[1].split(";")[0])
    assert f"resume with: fastrl {' '.join(cmd[3:])} --resume" in last
    assert (run / "checkpoints" / f"step_{step:06d}").is_dir()
    assert len(metrics.read_text().splitlines()) == step

    code, out, err = interrupt(cmd + ["--resume"], signal.SIGTERM, after_rows=step + 3)
    assert code == 143 and out == "", err[-2000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = done.stdout.splitlines()
    assert json.loads(line)["rl_success"] is not None
    assert [r["step"] for r in _rows(run)] == list(range(1, 40 + 2 + 1))  # every step once

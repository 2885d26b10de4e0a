"""The command line's parsing, --version and --help; the cache directory; where logs and bench
results go."""

import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fastrl.cli import BENCH_DIR, main, parse_args
from fastrl.config import cache_home, load_config
from fastrl.monitor.log import RunLogHandler, open_run_log, setup_logging

VERBS = ("train", "eval", "demo", "pretrain", "report", "bench")


def test_options_and_overrides_in_any_order():
    args = parse_args(["train", "rl.lr=1e-4", "--config", "X", "run_dir=Y", "--resume", "a.b=-1"])
    assert (args.verb, args.config, args.resume) == ("train", "X", True)
    assert args.overrides == ["rl.lr=1e-4", "run_dir=Y", "a.b=-1"]  # command-line order
    args = parse_args(["eval", "--out", "o", "seed=1", "--policy", "oracle", "run_dir=r"])
    assert (args.policy, args.out, args.overrides) == ("oracle", "o", ["seed=1", "run_dir=r"])
    assert parse_args(["demo", "rl.steps=1", "seed=2"]).overrides == ["rl.steps=1", "seed=2"]
    args = parse_args(["bench", "packing", "--reps", "3", "--out", "x.json"])
    assert (args.name, args.args) == ("packing", ["--reps", "3", "--out", "x.json"])


@pytest.mark.parametrize(
    ("argv", "unknown"),
    [
        (["train", "rl.lr=1e-4", "--bogus", "run_dir=Y"], "--bogus"),
        (["train", "--config", "X", "run_dir=Y", "stray"], "stray"),
        (["report", "runs/x", "seed=1"], "seed=1"),
    ],
)
def test_unknown_arguments_are_one_usage_error(argv, unknown, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [f"fastrl {argv[0]}: error: unrecognized arguments: {unknown}"]


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastrl {importlib.metadata.version('fastrl')}"


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        main([verb, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert text.startswith(f"usage: fastrl {verb}")
    if verb in ("train", "eval", "demo"):
        assert "KEY=VALUE" in text and "any position" in text
    if verb == "eval":
        for policy in ("model", "oracle", "teacher", "replay:FILE.jsonl"):
            assert policy in text
        assert "(default: model)" in text and "(default: test)" in text
        assert "(default: 0)" in text  # --samples
        assert "(default: None)" not in text
    if verb == "bench":
        assert "~/.cache/fastrl" in text


def test_cache_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTRL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_home() == tmp_path / "home" / ".cache" / "fastrl"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "fastrl"
    monkeypatch.setenv("FASTRL_CACHE", str(tmp_path / "mine"))
    assert cache_home() == tmp_path / "mine"
    assert load_config(None).model.cache_dir == str(tmp_path / "mine" / "models")
    cfg = load_config(None, [f"model.cache_dir={tmp_path}/other"])  # the config key wins
    assert cfg.model.cache_dir == f"{tmp_path}/other"


def test_bench_results_go_to_the_cache_unless_named(monkeypatch, tmp_path):
    import torch

    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import harness

    monkeypatch.setenv("FASTRL_CACHE", str(tmp_path / "cache"))
    device = torch.device("cpu")
    assert harness.default_out(device) == tmp_path / "cache" / "bench" / "cpu.json"
    assert BENCH_DIR / "results" not in harness.default_out(device).parents
    path = harness.write_results("demo", device, {"rows": [1]})
    assert path == tmp_path / "cache" / "bench" / "cpu.json"
    assert json.loads(path.read_text())["demo"]["rows"] == [1]
    named = harness.write_results("demo", device, {"rows": [2]}, tmp_path / "named.json")
    assert json.loads(named.read_text())["demo"]["rows"] == [2]


def test_bench_script_takes_out(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench_policy_loss.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--out" in done.stdout


@pytest.fixture
def fresh_logging(monkeypatch):
    """setup_logging's effects undone after the test."""
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    root, vllm = logging.getLogger(), logging.getLogger("vllm")
    handlers, level, vllm_level = list(root.handlers), root.level, vllm.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    vllm.setLevel(vllm_level)


def test_vllm_records_go_to_stderr_without_the_known_noise(
    fresh_logging, capsys, tmp_path, monkeypatch
):
    import os

    # vLLM's default level (importing trl, as the parity tests do, sets ERROR in the environment).
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    setup_logging("INFO")
    run_log = RunLogHandler()
    logging.getLogger().addHandler(run_log)
    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"  # vLLM adds no handler of its own
    engine = logging.getLogger("vllm.renderers.base")
    try:
        raise ValueError("Tokenizer not available when `skip_tokenizer_init=True`")
    except ValueError:
        engine.warning("Chat template warmup failed", exc_info=True)
    logging.getLogger("vllm.engine.arg_utils").warning("The global random seed is set to %d.", 0)
    logging.getLogger("vllm.config").info("an INFO line of vLLM")
    engine.warning("a real warning")
    logging.getLogger("fastrl.train").info("a fastrl line")
    open_run_log(tmp_path)  # the run directory is claimed: what was logged before goes in too
    logging.getLogger("fastrl.train").info("after the claim")
    logging.getLogger().removeHandler(run_log)
    run_log.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert "a real warning" in err and "a fastrl line" in err
    for noise in ("Traceback", "warmup", "random seed", "INFO line of vLLM"):
        assert noise not in err
    logged = Path(tmp_path / "train.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in logged] == [
        "vllm.renderers.base WARNING a real warning",
        "fastrl.train INFO a fastrl line",
        "fastrl.train INFO after the claim",
    ]


def test_eval_prints_one_json_line(tmp_path, capsys):
    argv = ["eval", "--policy", "oracle", "--limit", "2", "--out", str(tmp_path), "--env"]
    assert main([*argv, "synthetic", "--config", "configs/smoke.yaml"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    assert json.loads(out) == json.loads((tmp_path / "summary.json").read_text())

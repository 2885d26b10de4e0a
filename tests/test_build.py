"""Config meets the registries (fastrl/train/build.py `check_registries`) and `fastrl.load_config`,
which completes a configuration with its environment's defaults and checks it before any work."""

from __future__ import annotations

import pytest
import yaml

import fastrl
from fastrl.cli import main
from fastrl.config import Config, ConfigError
from fastrl.config import load_config as load_config_file
from fastrl.envs import ENVS
from fastrl.train.build import check_registries


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "env.name=nope",
            "env.name: got 'nope', expected one of ['bfcl', 'custom', 'procedural', 'synthetic']",
        ),
        ("rl.advantage=ppo", "rl.advantage: got 'ppo', expected one of ['drgrpo', 'grpo', 'rloo']"),
        ("rl.loss=nope", "rl.loss: got 'nope', expected one of ['cispo', 'gspo', 'ppo']"),
        ("eval.splits=[long_context]", "eval.splits: got ['long_context'], expected a list from"),
        ("eval.splits=[test, nope]", "eval.splits: got ['test', 'nope'], expected a list from"),
    ],
)
def test_registry_keys_are_checked_naming_the_key(override, message):
    cfg = load_config_file(None, [override])  # well-typed: the config alone cannot tell
    with pytest.raises(ConfigError) as err:
        check_registries(cfg)
    assert str(err.value).startswith(message)
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        fastrl.load_config(None, [override])


def test_split_names_are_the_environments():
    check_registries(Config())
    bfcl = fastrl.load_config(None, ["env.name=bfcl", "eval.splits=[long_context, test]"])
    assert set(bfcl.eval.splits) <= set(ENVS["bfcl"].splits)


def test_a_bfcl_config_gets_its_defaults_and_a_given_value_wins(tmp_path):
    defaults = ENVS["bfcl"].config_defaults
    cfg = fastrl.load_config(None, ["env.name=bfcl", "rollout.max_turns=5"])
    assert cfg.rollout.max_turns == 5  # given: kept
    for key in ("rollout.max_turn_tokens", "rollout.max_total_tokens", "env.eval_tasks"):
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == defaults[key]
    assert cfg.env.teacher.stop_early_rate == 0  # BFCL's demonstrations are its ground truth
    path = tmp_path / "bfcl.yaml"
    path.write_text(yaml.safe_dump({"env": {"name": "bfcl"}, "rollout": {"max_turn_tokens": 1500}}))
    from_file = fastrl.load_config(path)  # 1500 fits BFCL's 16384 total, not the default 1024
    assert (from_file.rollout.max_turn_tokens, from_file.rollout.max_total_tokens) == (1500, 16384)
    as_dict = fastrl.load_config({"env": {"name": "bfcl"}}, ["rollout.max_obs_tokens=64"])
    assert as_dict.rollout.max_obs_tokens == 64 and as_dict.rollout.max_turns == 30
    built = Config()
    built.env.name = "bfcl"
    assert fastrl.load_config(built, ["env.eval_tasks=20"]) is built
    assert built.env.eval_tasks == 20 and built.rollout.max_turns == 30
    plain = fastrl.load_config(None, [])
    assert plain.rollout.max_total_tokens == 1024 and plain.env.eval_tasks == 100


def test_cli_reports_a_registry_key_before_work(capsys, tmp_path):
    run_dir = f"run_dir={tmp_path}/r"
    code = main(["train", "--config", "configs/smoke.yaml", run_dir, "rl.loss=nope"])
    assert code == 2
    assert "rl.loss" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    code = main(["eval", "--env", "nope", "--policy", "oracle", "--out", str(tmp_path / "e")])
    assert code == 2
    assert "env.name" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_path_keys_are_checked_naming_the_key(tmp_path, tiny_policy):
    from fastrl.train.build import check_paths

    _, _, model_dir = tiny_policy
    prs = ["schedule.scheme=interleaved", "schedule.rl_phases=[1]", "supervision.prs.enabled=true"]
    good = [f"model.name={model_dir}", *prs, f"supervision.prs.reflector={model_dir}"]
    check_paths(load_config_file(None, good))
    (tmp_path / "file").write_text("")
    for overrides, message in (
        (["model.name=/no/model"], "model.name: '/no/model' is neither a preset"),
        ([f"model.name={tmp_path}"], "(it has no config.json)"),
        ([f"model.cache_dir={tmp_path}/file/models"], f"model.cache_dir: {tmp_path}/file is a"),
        ([*prs, "supervision.prs.reflector=/no/judge"], "supervision.prs.reflector: '/no/judge'"),
    ):
        with pytest.raises(ConfigError) as err:
            fastrl.load_config(None, overrides)
        assert message in str(err.value)
    fastrl.load_config(None, ["supervision.prs.reflector=/no/judge"])  # unused without PRS

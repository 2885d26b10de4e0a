import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from fastrl.cli import main
from fastrl.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    resolve,
    save_config,
)


def test_defaults_are_valid():
    cfg = Config().validate()
    assert cfg.rl.group_size >= 2
    assert cfg.model.name == "tiny"


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rl": {"lr": 3e-5, "steps": 7}, "run_dir": "x"}))
    cfg = load_config(path, ["rl.lr=1e-5", "rl.dual_clip=null", "eval.splits=[test]", "seed=3"])
    assert cfg.rl.lr == pytest.approx(1e-5)  # YAML reads "1e-5" as a string; coerced to float
    assert cfg.rl.steps == 7
    assert cfg.rl.dual_clip is None
    assert cfg.eval.splits == ["test"]
    assert cfg.seed == 3 and cfg.run_dir == "x"


@pytest.mark.parametrize(
    "override, key",
    [
        ("rl.lrr=1e-5", "rl.lrr"),
        ("optimm.grad_clip=1", "optimm"),
        ("rl.steps=abc", "rl.steps"),
        ("rl.steps=1.5", "rl.steps"),
        ("progress=maybe", "progress"),
        ("rl.group_size=1", "rl.group_size"),
        ("rl.lr=-1", "rl.lr"),
        ("rl.loss_agg=mean", "rl.loss_agg"),
        ("rl.negative_weight=1.5", "rl.negative_weight"),
        ("rl.format_reward=-1", "rl.format_reward"),
        ("monitor.alarm_alpha=0", "monitor.alarm_alpha"),
        ("optim.max_nonfinite_steps=-1", "optim.max_nonfinite_steps"),
        ("rl.tis_cap=0", "rl.tis_cap"),
        ("rollout.engine=sglang", "rollout.engine"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.max_turn_tokens=5000", "rollout.max_turn_tokens"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("rl=3", "rl"),
        ("model.device=tpu", "model.device"),
        ("distributed.zero_stage=4", "distributed.zero_stage"),
        ("schedule.scheme=mixed", "schedule.scheme"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_yaml_words_stay_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rl:\n  dynamic_sampling: off\nprogress: false\n")
    cfg = load_config(path, ["tensorboard=False"])
    assert cfg.rl.dynamic_sampling == "off" and cfg.progress is False and cfg.tensorboard is False
    assert load_config(None, ["rl.dynamic_sampling=off"]).rl.dynamic_sampling == "off"
    with pytest.raises(ConfigError, match="progress"):
        load_config(None, ["progress=yes"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rl.lr"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")


def test_malformed_yaml_names_the_file_line_and_problem(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rl:\n  lr: 1e-5\n   steps: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: malformed YAML at line 3, column \d+: "):
        load_config(path)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["rl.steps=5", "model.name=small"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert (
        config_from_dict({"rl": {"steps": 5}, "model": {"name": "small"}}).to_dict()
        == cfg.to_dict()
    )


def test_shipped_configs_load():
    for name in ("demo", "smoke"):
        load_config(f"configs/{name}.yaml")
    # `fastrl demo` runs the defaults; the file the docs' commands use is the same run
    assert load_config("configs/demo.yaml").to_dict() == load_config(None).to_dict()


def test_cli_reports_bad_key_before_work(capsys, tmp_path):
    code = main(["train", "--config", "configs/smoke.yaml", f"run_dir={tmp_path}/r", "rl.bogus=1"])
    assert code == 2
    assert "rl.bogus" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_closed_choices_name_the_key_the_value_and_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rl.kl_estimator=k4"])
    assert str(err.value) == "rl.kl_estimator: got 'k4', expected k1, k2 or k3"
    with pytest.raises(ConfigError, match=r"model.dtype: got 16, expected float32 or bfloat16"):
        load_config(None, ["model.dtype=16"])
    with pytest.raises(ConfigError, match=r"distributed.zero_stage: got True, expected 2 or 3"):
        load_config(None, ["distributed.zero_stage=true"])
    cfg = load_config(None, ["distributed.zero_stage=3.0", "rl.loss_agg=token-mean"])
    assert cfg.distributed.zero_stage == 3 and type(cfg.distributed.zero_stage) is int
    assert cfg.rl.loss_agg == "token-mean"
    built = Config()  # a Config built in Python is checked by validate() the same way
    built.guard.action = "restart"
    with pytest.raises(ConfigError, match="guard.action: got 'restart', expected sft or lower_lr"):
        built.validate()


def test_validate_changes_nothing():
    cfg = Config()
    cfg.schedule.scheme = "interleaved"
    cfg.schedule.rl_phases = [2, 3]
    cfg.supervision.ets.enabled = True
    before = dataclasses.asdict(cfg)
    with pytest.raises(ConfigError, match="rl.steps: 45 differs from sum"):
        cfg.validate()  # the derivation is resolve's
    assert dataclasses.asdict(cfg) == before
    assert resolve(cfg).rl.steps == 5
    assert Config().validate().to_dict() == Config().to_dict()


def test_environment_defaults_fill_only_the_keys_not_given(tmp_path):
    def env_defaults(name):  # as fastrl.envs.config_defaults, for a world with longer episodes
        return {"rollout.max_turns": 30, "env.eval_tasks": 300} if name == "synthetic" else {}

    path = tmp_path / "c.yaml"
    path.write_text("env:\n  eval_tasks: 7\n")
    cfg = load_config(path, ["rollout.max_total_tokens=2048"], env_defaults=env_defaults)
    assert cfg.rollout.max_turns == 30  # the environment's default
    assert cfg.env.eval_tasks == 7  # given in the file: kept
    assert load_config(path).rollout.max_turns == Config().rollout.max_turns  # no defaults given
    data = {"rollout": {"max_turns": 5}}
    assert config_from_dict(data, env_defaults=env_defaults).rollout.max_turns == 5


def test_apply_overrides_marks_keys_given():
    cfg = apply_overrides(Config(), ["rl.lr=1e-5", "rollout.max_turns=5"])
    assert cfg.rl.lr == pytest.approx(1e-5) and cfg.rollout.max_turns == 5
    assert {"rl.lr", "rollout.max_turns"} <= cfg.explicit
    resolve(cfg, lambda name: {"rollout.max_turns": 30, "rollout.max_obs_tokens": 64})
    assert (cfg.rollout.max_turns, cfg.rollout.max_obs_tokens) == (5, 64)
    with pytest.raises(ConfigError, match="rl.lrr"):
        apply_overrides(Config(), ["rl.lrr=1"])


def test_config_module_imports_nothing_from_fastrl():
    tree = ast.parse(Path("fastrl/config.py").read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [m for m in imported if m and m.split(".")[0] == "fastrl"]

import pytest
import yaml

from fastrl.cli import main
from fastrl.config import Config, ConfigError, config_from_dict, load_config, save_config


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
        ("rl.advantage=ppo", "rl.advantage"),
        ("rl.loss=nope", "rl.loss"),
        ("rl.negative_weight=1.5", "rl.negative_weight"),
        ("rl.format_reward=-1", "rl.format_reward"),
        ("monitor.alarm_alpha=0", "monitor.alarm_alpha"),
        ("optim.max_nonfinite_steps=-1", "optim.max_nonfinite_steps"),
        ("rl.tis_cap=0", "rl.tis_cap"),
        ("rollout.engine=sglang", "rollout.engine"),
        ("eval.splits=[long_context]", "eval.splits"),
        ("env.name=nope", "env.name"),
        ("eval.splits=[test, nope]", "eval.splits"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.max_turn_tokens=5000", "rollout.max_turn_tokens"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("rl=3", "rl"),
        ("model.device=tpu", "model.device"),
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

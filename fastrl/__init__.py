"""fastrl: multi-turn tool-use RL for language models.

from fastrl import Config, train, evaluate
summary = train("configs/smoke.yaml", ["rl.steps=2"])
"""

from fastrl.api import evaluate, load_config, train
from fastrl.config import Config, ConfigError

__all__ = ["PRESETS", "Config", "ConfigError", "evaluate", "load_config", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "PRESETS":  # the built-in model presets; imported on use (transformers is heavy)
        from fastrl.models import PRESETS

        return PRESETS
    raise AttributeError(f"module 'fastrl' has no attribute {name!r}")

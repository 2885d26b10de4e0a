"""Generation engines: `hf` (transformers generate on the training model) and scripted policies."""

from fastrl.rollout.engines.hf import HFEngine
from fastrl.rollout.engines.scripted import ScriptedEngine

__all__ = ["HFEngine", "ScriptedEngine"]

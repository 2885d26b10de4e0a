"""Rollout: trajectory types, the multi-turn agent loop and the generation engines."""

from fastrl.rollout.loop import Limits, run_episodes
from fastrl.rollout.types import Engine, GenOutput, Sampling, Trajectory

__all__ = ["Engine", "GenOutput", "Limits", "Sampling", "Trajectory", "run_episodes"]

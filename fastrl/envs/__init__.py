"""Tool-use environments: a registry of task worlds by name."""

from __future__ import annotations

from fastrl.envs.base import Env, Format, Parsed, Task, ToolCall, World
from fastrl.envs.bfcl import BFCLWorld
from fastrl.envs.formats import get_format
from fastrl.envs.synthetic import SyntheticWorld

ENVS: dict[str, type] = {
    "synthetic": SyntheticWorld,
    "bfcl": BFCLWorld,
}


def get_world(name: str) -> World:
    """An instance of the world registered as `name`; ValueError lists the known ones."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; known: {', '.join(sorted(ENVS))}")
    return ENVS[name]()


__all__ = [
    "ENVS",
    "Env",
    "Format",
    "Parsed",
    "Task",
    "ToolCall",
    "World",
    "get_format",
    "get_world",
]

"""Tool-use environments: a registry of task worlds by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastrl.envs.base import Env, Format, Parsed, Task, ToolCall, World
from fastrl.envs.bfcl import BFCLWorld
from fastrl.envs.formats import get_format
from fastrl.envs.synthetic import SyntheticWorld

ENVS: dict[str, type[World]] = {
    "synthetic": SyntheticWorld,
    "bfcl": BFCLWorld,
}


def get_world(name: str) -> World:
    """An instance of the world registered as `name`; ValueError lists the known ones."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; known: {', '.join(sorted(ENVS))}")
    return ENVS[name]()


def config_defaults(name: str) -> Mapping[str, Any]:
    """The config keys the world registered as `name` sets unless a configuration gives them
    (the `env_defaults` of `fastrl.config.load_config`); none for an unknown name, which
    `fastrl.train.build.check_registries` reports."""
    world = ENVS.get(name)
    return world.config_defaults if world is not None else {}


__all__ = [
    "ENVS",
    "Env",
    "Format",
    "Parsed",
    "Task",
    "ToolCall",
    "World",
    "config_defaults",
    "get_format",
    "get_world",
]

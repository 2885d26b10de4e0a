"""Tool-use environments: a registry of task worlds by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastrl.envs.base import Env, Format, Parsed, Task, ToolCall, World
from fastrl.envs.bfcl import BFCLWorld
from fastrl.envs.custom import CustomWorld, world_of
from fastrl.envs.formats import get_format
from fastrl.envs.procedural import ProceduralWorld
from fastrl.envs.synthetic import SyntheticWorld

ENVS: dict[str, type[World]] = {
    "synthetic": SyntheticWorld,
    "bfcl": BFCLWorld,
    "custom": CustomWorld,
    "procedural": ProceduralWorld,
}


def get_world(name: str, env: Any = None) -> World:
    """An instance of the world registered as `name`; ValueError lists the known ones. The
    custom world is built from the EnvConfig `env` (its tools, tasks and reward)."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; known: {', '.join(sorted(ENVS))}")
    if name == "custom":
        if env is None:
            raise ValueError("the custom world is built from a configuration's env keys")
        return world_of(env)
    return ENVS[name]()


def splits_of(env: Any) -> tuple[str, ...]:
    """The split names of the world EnvConfig `env` names: the registered class's, or for the
    custom world its task file's."""
    if env.name == "custom":
        return world_of(env).splits
    return ENVS[env.name].splits


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
    "splits_of",
]

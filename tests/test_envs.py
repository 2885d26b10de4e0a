"""The environment registry: every registered world implements the World protocol."""

from __future__ import annotations

import inspect

import pytest

from fastrl.config import Config
from fastrl.envs import ENVS, World

# The protocol's members: its attributes and its methods.
ATTRIBUTES = sorted(World.__annotations__)
METHODS = sorted(n for n, v in vars(World).items() if inspect.isfunction(v) and n[0] != "_")


def test_the_protocol_names_what_callers_use():
    assert ATTRIBUTES == ["config_defaults", "name", "splits"]
    assert METHODS == ["make_env", "tasks", "tokenizer_corpus"]


@pytest.mark.parametrize("name", sorted(ENVS))
def test_registered_worlds_implement_the_protocol(name):
    world = ENVS[name]  # the class: configs are checked against it before a world is built
    assert world.name == name
    assert isinstance(world.splits, tuple) and {"train", "test"} <= set(world.splits)
    for method in METHODS:
        wanted = inspect.signature(getattr(World, method)).parameters
        given = inspect.signature(getattr(world, method)).parameters
        assert list(given) == list(wanted), (name, method)
        for param, spec in wanted.items():
            if spec.default is not inspect.Parameter.empty and spec.default is not Ellipsis:
                assert given[param].default == spec.default, (name, method, param)


@pytest.mark.parametrize("name", sorted(ENVS))
def test_config_defaults_name_config_keys_with_values_of_their_type(name):
    cfg = Config()
    for key, value in ENVS[name].config_defaults.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)  # an AttributeError names a key the config lacks
        assert type(value) is type(node), key

"""Tool-call formats: render/parse round trips, malformed calls, and hostile input."""

from __future__ import annotations

import random
import string

import pytest

from fastrl.envs.base import Parsed, ToolCall
from fastrl.envs.formats import HermesFormat, PythonicFormat, get_format

FORMATS = [HermesFormat(), PythonicFormat()]
_ALPHABET = string.ascii_letters + string.digits + " '\"\\\n\t{}[]()<>,:=_-éß漢😀"


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kinds = ["str", "int", "float", "bool", "none"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 12)))
    if kind == "int":
        return rng.randint(-(10**12), 10**12)
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_key(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _random_key(rng: random.Random) -> str:
    return rng.choice(string.ascii_lowercase) + "".join(
        rng.choice(string.ascii_lowercase + string.digits + "_") for _ in range(rng.randint(0, 8))
    )


def _random_calls(rng: random.Random) -> list[ToolCall]:
    return [
        ToolCall(
            _random_key(rng),
            {_random_key(rng): _random_value(rng) for _ in range(rng.randint(0, 4))},
        )
        for _ in range(rng.randint(1, 3))
    ]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_round_trip_random_calls(fmt):
    rng = random.Random(0)
    for _ in range(500):
        calls = _random_calls(rng)
        parsed = fmt.parse(fmt.render_calls(calls))
        assert parsed.error is None
        assert parsed.calls == calls


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_round_trip_with_surrounding_whitespace(fmt):
    calls = [ToolCall("get_weather", {"city": "São Paulo"}), ToolCall("f", {"x": [1, {"y": "'"}]})]
    assert fmt.parse("\n  " + fmt.render_calls(calls) + "\n").calls == calls


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_plain_text_is_an_answer(fmt):
    for text in ["The temperature in Paris is 21.", "", "  ", "f(x=1) is not a list", "[1, 2]"]:
        assert fmt.parse(text) == Parsed([])


def test_expected_syntax():
    calls = [ToolCall("f", {"a": 1, "b": "x"}), ToolCall("g", {"c": [1, 2]})]
    assert PythonicFormat().render_calls(calls) == "[f(a=1, b='x'), g(c=[1, 2])]"
    assert HermesFormat().render_calls(calls[:1]) == (
        '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": "x"}}\n</tool_call>'
    )


def test_render_tools_lists_each_tool_on_a_line():
    tools = [
        {"name": "f", "description": "F.", "parameters": {"type": "object", "properties": {}}},
        {"name": "g", "description": "G.", "parameters": {"type": "object", "properties": {}}},
    ]
    for fmt in FORMATS:
        text = fmt.render_tools(tools)
        block = text[text.index("<tools>\n") + len("<tools>\n") : text.index("\n</tools>")]
        assert [line[:13] for line in block.split("\n")] == ['{"name": "f",', '{"name": "g",']


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "f", "arguments": {}}',  # missing closing tag
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g"',
        "<tool_call>\n{name: f}\n</tool_call>",  # bad JSON
        "<tool_call>\n</tool_call>",
        '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',  # arguments not a dict
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        '<tool_call>\n{"name": "f"}\n</tool_call>',
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',  # non-string name
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
        '<tool_call>\n["f", {}]\n</tool_call>',
        "<tool_call>\n" + "[" * 100_000 + "\n</tool_call>",  # deep nesting
        "<tool_call>\n" + "9" * 10_000 + "\n</tool_call>",  # over the int digit limit
    ],
)
def test_hermes_malformed_is_an_error(text):
    parsed = HermesFormat().parse(text)
    assert parsed.calls == []
    assert parsed.error


@pytest.mark.parametrize(
    "text",
    [
        "[__import__('os').system('touch /tmp/fastrl_pwned')]",
        "[f(x=__import__('os').system('touch /tmp/fastrl_pwned'))]",
        "[f(x=open('/etc/passwd').read())]",
        "[f(x=lambda: 1)]",
        "[(lambda: 1)()]",
        "[os.system(cmd='ls')]",
        "[f(x=y)]",  # a name is not a literal
        "[f(1)]",  # positional argument
        "[f(**{'a': 1})]",
        "[f(x={1, 2})]",  # set is not JSON-like
        "[f(x=b'bytes')]",
        "[f(x=1j)]",
        "[f(x={1: 2})]",  # non-string dict key
        "[f(x=[i for i in range(9)])]",
        "[f(a=1, a=2)]",
        "[f(x=1)] + [g(y=2)]",
        "[f(x=1), 3]",
        "[f(x=1)",  # unbalanced
        "[f(x=1))]",
        "[f(x='unterminated)]",
        "[" + "(" * 100_000 + "]",
        "[f(x=" + "[" * 100_000 + "]",
        "[f(x=" + "-" * 100_000 + "1)]",
        "[f(x=" + "9" * 10_000 + ")]",
        "[f(x=1e999)]",  # not finite
        "[f(x='\0')]\0",
        "[()]",
    ],
)
def test_pythonic_hostile_is_an_error(text):
    parsed = PythonicFormat().parse(text)
    assert parsed.calls == []
    assert parsed.error


def test_pythonic_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    PythonicFormat().parse(f"[__import__('os').system('touch {marker}')]")
    PythonicFormat().parse(f"[f(x=__import__('pathlib').Path('{marker}').touch())]")
    assert not marker.exists()


def test_pythonic_tuples_become_lists():
    assert PythonicFormat().parse("[f(x=(1, (2, 3)))]").calls == [ToolCall("f", {"x": [1, [2, 3]]})]


def test_hermes_allows_text_around_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert HermesFormat().parse(text).calls == [ToolCall("f", {"a": 1})]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fuzz_never_raises(fmt):
    rng = random.Random(1)
    pieces = [
        "<tool_call>", "</tool_call>", "[", "]", "(", ")", "{", "}", '"', "'", ":", ",", "=",
        "name", "arguments", "f", "1", "None", "null", "lambda", "__import__", ".", "\\", "\n",
        "é", "\0", "**", "*", "x", "if", "for", "yield", "await", "@", "#",
    ]  # fmt: skip
    good = fmt.render_calls([ToolCall("f", {"a": [1, {"b": "c"}]})])
    for _ in range(3000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        else:
            chars = list(good)
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(chars))
                if rng.random() < 0.5:
                    del chars[i]
                else:
                    chars.insert(i, rng.choice(pieces))
            text = "".join(chars)
        if fmt.name == "pythonic" and rng.random() < 0.5:
            text = "[" + text + "(" if not text.startswith("[") else text
        parsed = fmt.parse(text)
        assert isinstance(parsed, Parsed)
        assert not (parsed.calls and parsed.error)
        for call in parsed.calls:
            assert isinstance(call.name, str) and isinstance(call.arguments, dict)


def test_get_format():
    assert get_format("hermes").name == "hermes"
    assert get_format("pythonic").name == "pythonic"
    with pytest.raises(ValueError, match="hermes"):
        get_format("xml")

"""BFCL v4 multi-turn on the installed bfcl-eval data: splits, safe execution, checker reward."""

import json
import os

import pytest

pytest.importorskip("bfcl_eval")

from fastrl.api import evaluate  # noqa: E402
from fastrl.envs import get_format, get_world  # noqa: E402
from fastrl.envs.base import Parsed, ToolCall  # noqa: E402
from fastrl.envs.bfcl import (  # noqa: E402
    CONTENT_OOD_CLASSES,
    Executor,
    _entry,
    load_category,
    parse_ground_truth,
    split_ids,
)

# Large enough for any BFCL task played by the scripted policies (the token counts come from the
# tiny preset's tool-world tokenizer, which spells BFCL text with many tokens).
BIG = [
    "rollout.max_turns=60",
    "rollout.max_turn_tokens=8192",
    "rollout.max_obs_tokens=100000",
    "rollout.max_total_tokens=1000000",
]


@pytest.fixture(scope="module")
def bfcl():
    return get_world("bfcl")


def test_splits_are_the_paper_split(bfcl):
    train, test = set(split_ids("train")), set(split_ids("test"))
    assert len(train) == len(test) == 300 and not train & test
    assert len(split_ids("long_context")) == 200
    # The variants of one task (same index in base, miss_param, miss_func) stay on one side.
    index = {
        e["id"]: i
        for c in ("base", "miss_param", "miss_func")
        for i, e in enumerate(load_category(c))
    }
    train_idx = {index[i] for i in train}
    assert not train_idx & {index[i] for i in test}
    assert len(train_idx) == 100
    # Content-OOD: test tasks on held-out API classes only; its training split never touches them.
    for i in split_ids("content_ood"):
        assert i in test and set(_entry(i)["involved_classes"]) <= CONTENT_OOD_CLASSES
    for i in split_ids("train_in_domain"):
        assert i in train and not set(_entry(i)["involved_classes"]) & CONTENT_OOD_CLASSES
    fmt = bfcl.tasks("format_ood", 3)
    assert [t.meta["entry_id"] for t in fmt] == list(split_ids("test")[:3])
    assert all(t.fmt == "pythonic" and "[tool_name(" in t.messages[0]["content"] for t in fmt)


def test_oracle_solves_test_tasks(tmp_path):
    # The environment's defaults: the paper's limits.
    summary = evaluate("test", policy="oracle", env="bfcl", limit=40, out=tmp_path)
    assert summary["success"] == 1.0 and summary["n"] == 40
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    for r in rows:  # one structural state per assistant message; the oracle's are all healthy
        assert len(r["states"]) == sum(m["role"] == "assistant" for m in r["messages"])
        assert set(r["states"]) <= {"healthy_call", "healthy_text"}
    assert {r["task_id"].split("/")[-1].rsplit("_", 1)[0] for r in rows} >= {"multi_turn_base"}


def test_oracle_solves_format_ood_and_miss_func_tasks(bfcl):
    summary = evaluate("format_ood", policy="oracle", env="bfcl", limit=12, overrides=BIG)
    assert summary["success"] == 1.0
    ids = [i for i in split_ids("test") if "miss_func" in i][:6]
    env = bfcl.make_env()
    for entry_id in ids:
        task = next(t for t in bfcl.tasks("test", 300) if t.meta["entry_id"] == entry_id)
        assert _play(env, task, [m for turn in task.expert for m in turn]) == 1.0, entry_id


def _play(env, task, messages):
    fmt = get_format(task.fmt)
    env.reset(task)
    for text in messages:
        _, done = env.step(text, fmt.parse(text))
        if done:
            break
    return env.score()[0]


def test_miss_func_reveals_the_held_out_function_at_its_turn(bfcl):
    task = next(
        t for t in bfcl.tasks("test", 300) if _entry(t.meta["entry_id"]).get("missed_function")
    )
    entry = _entry(task.meta["entry_id"])
    (turn, names), *_ = ((int(k), v) for k, v in entry["missed_function"].items())
    offered = {t["name"] for t in task.tools}
    assert not offered & set(names)
    env = bfcl.make_env()
    env.reset(task)
    call = ToolCall(names[0], {})
    obs, _ = env.step("call", Parsed([call]))
    assert obs[0]["content"].startswith("Error: unknown function")  # not offered yet
    for _ in range(turn):  # plain text ends each turn up to the reveal
        obs, _ = env.step("ok", Parsed([]))
    assert names[0] in obs[-1]["content"] and "More tools are available now" in obs[-1]["content"]
    obs, _ = env.step("call", Parsed([call]))
    assert not obs[0]["content"].startswith("Error: unknown function")


def test_calls_in_a_turn_that_needs_none_fail(bfcl):
    task = next(t for t in bfcl.tasks("test", 300) if "miss_param" in t.meta["entry_id"])
    entry = _entry(task.meta["entry_id"])
    empty = next(i for i, gt in enumerate(entry["ground_truth"]) if not gt)
    messages = []
    for i, turn in enumerate(task.expert):
        if i == empty:  # instead of asking for the missing value, call something
            messages += [get_format("hermes").render_calls([ToolCall(task.tools[0]["name"], {})])]
        messages += turn
    env = bfcl.make_env()
    assert _play(env, task, messages) == 0.0
    assert env.score()[1]["first_failing_turn"] == empty


def test_ground_truth_parser_reads_literals_only():
    assert parse_ground_truth("sort('a.txt')") == ("sort", ("a.txt",), {})
    assert parse_ground_truth("mv(source='a', destination='b')") == (
        "mv",
        (),
        {"source": "a", "destination": "b"},
    )
    with pytest.raises(ValueError):
        parse_ground_truth("__import__('os').system('true')")
    with pytest.raises(ValueError):
        parse_ground_truth("ls(a=open('x'))")


HOSTILE = [
    '<tool_call>\n{"name": "__import__", "arguments": {"name": "os"}}\n</tool_call>',
    '<tool_call>\n{"name": "eval", "arguments": '
    "{\"source\": \"__import__('os').system('touch {p}')\"}}\n</tool_call>",
    '<tool_call>\n{"name": "_load_scenario", "arguments": {"scenario": {}}}\n</tool_call>',
    '<tool_call>\n{"name": "__init__", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "touch", "arguments": {"file_name": "x", "__class__": 1}}\n</tool_call>',
    '<tool_call>\n{"name": "echo", "arguments": '
    "{\"content\": \"__import__('os').system('touch {p}')\"}}\n</tool_call>",
    '<tool_call>\n{"name": "cd", "arguments": "os.system(\'touch {p}\')"}\n</tool_call>',
    '<tool_call>\n{"name": ["cd"], "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "cd", "arguments": {"folder": '
    + "[" * 500
    + "]" * 500
    + "}}\n</tool_call>",
    "[__import__('os').system('touch {p}')]",
    "[ls(a=open('{p}', 'w'))]",
    "[cd(folder=exec('import os; os.system(\"touch {p}\")'))]",
    "<tool_call>\nnot json at all {p}\n</tool_call>",
    "x" * 100_000,
]


def test_hostile_replay_executes_nothing_and_scores_nothing(tmp_path, bfcl):
    marker = tmp_path / "pwned"
    tasks = bfcl.tasks("test", 4)
    replay = tmp_path / "hostile.jsonl"
    with open(replay, "w") as f:
        for task in tasks:
            msgs = [m.replace("{p}", str(marker)) for m in HOSTILE] + ["bye"] * 8
            f.write(json.dumps({"task_id": task.id, "messages": msgs}) + "\n")
    out = tmp_path / "out"
    summary = evaluate(
        "test", policy=f"replay:{replay}", env="bfcl", limit=4, overrides=BIG, out=out
    )
    assert summary["success"] == 0.0 and summary["n"] == 4
    assert not marker.exists()
    assert not os.path.exists("pwned")


def test_executor_guards(bfcl):
    entry = _entry(split_ids("test")[0])
    ex = Executor(entry, max_output_chars=50)
    allowed = set(ex.methods)
    assert ex.call("__init__", {}, allowed | {"__init__"})[1] is None
    assert ex.call("nope", {}, allowed)[1] is None
    assert ex.call("cd", {"folder": float("nan")}, allowed)[1] is None  # not a JSON literal
    assert ex.call("cd", {"wrong_arg": "x"}, allowed)[0].startswith("Error: cd:")
    assert ex.call("cd", "folder", allowed)[1] is None
    text, _ = ex.call("cd", {"folder": "no-such-folder"}, allowed)
    assert isinstance(text, str)  # an API-level error comes back as text either way
    if "ls" in allowed:  # an output longer than the observation limit is an error observation
        ex.methods["ls"] = lambda a=False: "y" * 100
        # It ran (the checker sees its result), but the model is shown the error.
        assert ex.call("ls", {}, allowed) == (
            "Error: ls: output of 100 characters exceeds the limit",
            "y" * 100,
        )


def test_hint_and_summary_by_category(bfcl, tmp_path):
    task = next(t for t in bfcl.tasks("test", 300) if "miss_param" in t.meta["entry_id"])
    entry = _entry(task.meta["entry_id"])
    first = parse_ground_truth(entry["ground_truth"][0][0])[0]
    assert task.hint.startswith("Hint: turn 1: call " + first) and "ask the user" in task.hint
    summary = evaluate("test", policy="oracle", env="bfcl", limit=8, overrides=BIG)
    assert set(summary["success_by_category"]) <= {"base", "miss_param", "miss_func"}
    assert all(v == 1.0 for v in summary["success_by_category"].values())


@pytest.mark.parametrize(
    "config", ["configs/bfcl_qwen2.5_1.5b_grpo.yaml", "configs/bfcl_qwen2.5_1.5b_sft_grpo.yaml"]
)
def test_paper_configs_run_a_step_on_a_tiny_model(config, tmp_path):
    """The paper's BFCL configs, pointed at the tiny preset (its tokenizer built from BFCL text,
    with the chat and tool-call special tokens), for one step of each phase."""
    from fastrl.cli import main

    code = main(
        [
            "train", "--config", config, f"run_dir={tmp_path}/run", "model.name=tiny",
            "model.dtype=float32", "model.gradient_checkpointing=false", "model.vocab_size=4096",
            f"model.cache_dir={tmp_path}/models", "rollout.engine=hf", "rl.steps=1",
            "rl.prompts_per_step=1", "rl.group_size=2", "rl.warmup_steps=0", "env.train_tasks=2",
            "env.eval_tasks=1", "rollout.max_turns=2", "rollout.max_turn_tokens=16",
            "eval.every=0", "eval.splits=[test]",
            *(["sft.steps=1", "sft.batch_size=2"] if "sft" in config else []),
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rl_success"] is not None
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == (["sft"] if "sft" in config else []) + ["rl"]


def test_environment_defaults_fill_only_keys_not_given():
    from fastrl import load_config

    cfg = load_config(None, ["env.name=bfcl", "rollout.max_turns=5"])
    assert cfg.rollout.max_turns == 5  # given: kept
    assert (cfg.rollout.max_turn_tokens, cfg.rollout.max_total_tokens) == (2048, 16384)
    assert cfg.env.eval_tasks == 300
    plain = load_config(None, [])
    assert plain.rollout.max_total_tokens == 1024 and plain.env.eval_tasks == 100
    # The paper's config names a local model directory, checked at load: a preset stands in.
    paper = load_config("configs/bfcl_qwen2.5_1.5b_grpo.yaml", ["model.name=tiny"])
    assert paper.rollout.max_turns == 30 and paper.rollout.max_obs_tokens == 1024

"""The procedural tool world (fastrl/envs/procedural.py) and the pretraining stage on it
(fastrl/pretrain.py): determinism, both syntaxes, dependent calls, disjointness from the
synthetic world, the CLI verb's errors, and a short run that learns."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from fastrl.cli import main
from fastrl.envs import get_world
from fastrl.envs.base import ToolCall
from fastrl.envs.formats import get_format
from fastrl.envs.procedural import SPLITS, ProceduralWorld, draw
from fastrl.envs.synthetic import dumps
from fastrl.envs.synthetic import tools as world_tools
from fastrl.envs.synthetic.tasks import OOD_TEMPLATES, TEMPLATES


@pytest.fixture(scope="module")
def procedural():
    return ProceduralWorld()


def play(env, task, messages):
    """Send assistant `messages` in order; return the score and every observation."""
    env.reset(task)
    form = get_format(task.fmt)
    observations = []
    for text in messages:
        obs, done = env.step(text, form.parse(text))
        observations += obs
        if done:
            break
    return env.score()[0], observations


# --- the generator ------------------------------------------------------------------------------


def test_tasks_are_deterministic_and_prefixes(procedural):
    assert draw("train", 3, 7) == draw("train", 3, 7)
    assert draw("train", 3, 7) != draw("train", 4, 7)
    five = procedural.tasks("train", 5, seed=1)
    assert [t.messages for t in procedural.tasks("train", 3, seed=1)] == [
        t.messages for t in five[:3]
    ]
    assert procedural.tokenizer_corpus(20) == procedural.tokenizer_corpus(20)


def test_held_out_tasks_are_the_same_in_both_syntaxes_and_not_in_train(procedural):
    hermes = procedural.tasks("test_hermes", 40)
    pythonic = procedural.tasks("test_pythonic", 40)
    assert {t.fmt for t in hermes} == {"hermes"} and {t.fmt for t in pythonic} == {"pythonic"}
    for h, p in zip(hermes, pythonic, strict=True):
        assert h.messages[1] == p.messages[1] and h.meta == p.meta
        assert "hermes JSON syntax" in h.messages[0]["content"]
        assert "pythonic list syntax" in p.messages[0]["content"]
    train = {t.messages[1]["content"] + json.dumps(t.meta) for t in procedural.tasks("train", 400)}
    assert not train & {t.messages[1]["content"] + json.dumps(t.meta) for t in hermes}
    assert {t.fmt for t in procedural.tasks("train", 40)} == {"hermes", "pythonic"}


@pytest.mark.parametrize("split", SPLITS)
def test_expert_calls_parse_back_and_solve_the_task(procedural, split):
    env = procedural.make_env()
    tasks = procedural.tasks(split, 60)
    assert {len(t.meta["turns"]) for t in tasks} == {1, 2, 3}
    assert max(sum(map(len, t.expert)) for t in tasks) <= 7  # within rollout.max_turns
    for task in tasks:
        form = get_format(task.fmt)
        for turn, messages in zip(task.meta["turns"], task.expert, strict=True):
            *calls, answer = messages
            for text, call in zip(calls, turn["calls"], strict=True):
                assert form.parse(text).calls == [ToolCall(call["name"], call["arguments"])]
            assert form.parse(answer).calls == []
        reward, observations = play(env, task, [m for turn in task.expert for m in turn])
        assert reward == 1.0
        # Each call's result, and after each answer but the last the next user question.
        wanted = []
        for i, turn in enumerate(task.meta["turns"]):
            wanted += [turn["question"]] if i else []
            wanted += [dumps(c["result"]) for c in turn["calls"]]
        assert [o["content"] for o in observations] == wanted


def test_dependent_calls_take_the_earlier_result(procedural):
    env = procedural.make_env()
    chains = 0
    for task in procedural.tasks("train", 200):
        turn = task.meta["turns"][0]
        calls = turn["calls"]
        if len({c["name"] for c in calls}) < 2:
            continue  # one call, or one tool for two entities
        chains += 1
        for before, after in zip(calls, calls[1:]):
            (value,) = after["arguments"].values()
            assert value in before["result"].values()
        assert any(v in map(str, calls[-1]["result"].values()) for v in turn["expected"])
        # The later call with the entity of the question instead of the result fails.
        form = get_format(task.fmt)
        (first_value,) = calls[0]["arguments"].values()
        (arg,) = calls[1]["arguments"]
        wrong = form.render_calls([ToolCall(calls[1]["name"], {arg: first_value})])
        messages = [task.expert[0][0], wrong, task.expert[0][-1]]
        reward, observations = play(env, task, messages)
        assert "error" in json.loads(observations[1]["content"])
    assert chains >= 50


def test_answers_need_the_results(procedural):
    env = procedural.make_env()
    for task in procedural.tasks("test_hermes", 30):
        reward, _ = play(env, task, ["I do not know."])
        assert reward == 0.0


# --- disjointness from the synthetic tool world -------------------------------------------------


def _synthetic_questions() -> set[str]:
    world = get_world("synthetic")
    return {
        turn["question"]
        for split in world.splits
        for task in world.tasks(split, 300)
        for turn in task.meta["turns"]
    }


def _skeleton(text: str) -> str:
    """A question with its values masked: capitalised words, numbers, ids, quoted text."""
    text = re.sub(r"'[^']*'", "<V>", text)
    return re.sub(r"\b(?:[A-Z][a-z]+|[A-Za-z]?\d+)\b", "<V>", text)


def test_pretraining_data_is_disjoint_from_the_tool_world(procedural):
    texts = procedural.tokenizer_corpus(1500)
    words = {w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)}
    world_schemas = world_tools.TOOLS.values()  # content_ood's tools included
    for name in (s["name"] for s in world_schemas):
        assert not any(re.search(rf"\b{name}\b", text) for text in texts), name
    # Argument and result names: "name" is also a key of the hermes syntax itself, so these are
    # compared as names, not searched in the text.
    world_args = {a for s in world_schemas for a in s["parameters"]}
    keys = set()
    for task in procedural.tasks("train", 1500):
        keys |= {a for s in task.tools for a in s["parameters"]}
        keys |= {f for t in task.meta["turns"] for c in t["calls"] for f in c["result"]}
    assert not keys & world_args
    pools = (
        world_tools.PEOPLE,
        world_tools.CITIES,
        world_tools.CURRENCIES,
        world_tools.SKIES,
        world_tools.TODO_ITEMS,
        world_tools.OOD_PEOPLE,
        world_tools.OOD_CITIES,
        world_tools.OOD_ITEMS,
    )
    entries = {entry.lower() for pool in pools for entry in pool}
    assert not words & entries  # names, cities, currencies, skies, items
    phrases = [e for e in entries if " " in e]  # todo texts ("call" alone is the format's word)
    assert phrases and not any(p in text.lower() for p in phrases for text in texts)
    # Question templates: no question of the tool world, masked to its wording, is a
    # procedural one; train, test and content_ood templates are all drawn above.
    assert sum(len(t) for t in (*TEMPLATES.values(), *OOD_TEMPLATES.values())) > 20
    synthetic = {_skeleton(q) for q in _synthetic_questions()}
    questions = {t.messages[1]["content"] for t in procedural.tasks("train", 1500)}
    assert not synthetic & {_skeleton(q) for q in questions}
    assert not _synthetic_questions() & questions


# --- the stage and its CLI verb -----------------------------------------------------------------

TINY_RUN = [
    "pretrain.steps=4",
    "pretrain.batch_size=4",
    "pretrain.tasks=8",
    "pretrain.lr=3e-3",
    "pretrain.warmup_ratio=0",
    "pretrain.schedule=constant",
    "pretrain.eval_tasks=0",
    "model.vocab_size=400",
    "checkpoint_every=2",
    "progress=false",
    "threads=2",
]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["pretrain.steps=0"], "pretrain.steps"),
        (["pretrain.bogus=1"], "pretrain.bogus"),
        (["model.name=/no/such/dir"], "model.name"),
        (["pretrain.batch_size=99", "pretrain.tasks=3"], "pretrain.tasks"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(overrides, key, tmp_path, capsys):
    rc = main(["pretrain", f"run_dir={tmp_path / 'run'}", *TINY_RUN, *overrides])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith("fastrl: error:")]
    assert len(lines) == 1 and key in lines[0]


def test_a_short_run_writes_checkpoints_and_its_loss_falls(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["pretrain", f"run_dir={run_dir}", *TINY_RUN]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    summary = json.loads(out[0])
    assert summary["loss_last"] < summary["loss_first"]
    assert (run_dir / "checkpoints" / "step_000004" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000004"
    recipe = json.loads((run_dir / "final" / "recipe.json").read_text())
    assert recipe["recipe_hash"] == summary["recipe_hash"]
    assert recipe["recipe"]["pretrain"]["steps"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 5))
    # Killed after step 2: the same recipe in the same directory resumes from that checkpoint
    # and ends with the same weights and one metric row per step.
    weights = (run_dir / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    (run_dir / "checkpoints" / "latest").write_text("step_000002")
    assert main(["pretrain", f"run_dir={run_dir}", *TINY_RUN]) == 0
    again = json.loads(capsys.readouterr().out.strip())
    assert again["loss_last"] == summary["loss_last"]
    assert (run_dir / "final" / "model.safetensors").read_bytes() == weights
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 5))
    # Another recipe there is refused.
    assert main(["pretrain", f"run_dir={run_dir}", *TINY_RUN, "pretrain.lr=1e-3"]) == 2
    assert "another recipe" in capsys.readouterr().err


def _base_config(cache_dir, *overrides):
    from fastrl import load_config

    given = ["model.name=tiny-base", f"model.cache_dir={cache_dir}", *TINY_RUN, "pretrain.steps=2"]
    return load_config(None, [*given, *overrides])


def test_the_base_is_deterministic_built_once_and_shipped_by_recipe(tmp_path, monkeypatch):
    import fastrl.pretrain as stage

    first = stage.materialize_base(_base_config(tmp_path / "a"))
    second = stage.materialize_base(_base_config(tmp_path / "b"))
    assert first.name == second.name and first.name.startswith("tiny-base-")
    weights = [(d / "model.safetensors").read_bytes() for d in (first, second)]
    assert weights[0] == weights[1]  # deterministic on CPU
    assert stage.recipe_hash_of(first) == stage.recipe_hash(stage.recipe(_base_config(tmp_path)))

    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again")

    monkeypatch.setattr(stage, "pretrain", no_training)
    assert stage.materialize_base(_base_config(tmp_path / "a")) == first  # cached

    # A shipped base of the asked recipe is copied into an empty cache; another recipe trains.
    monkeypatch.setattr(stage, "SHIPPED_DIR", tmp_path / "shipped")
    shutil.copytree(first, tmp_path / "shipped" / "tiny-base")
    copied = stage.materialize_base(_base_config(tmp_path / "c"))
    assert (copied / "model.safetensors").read_bytes() == weights[0]
    with pytest.raises(AssertionError, match="pretrained again"):
        stage.materialize_base(_base_config(tmp_path / "c", "pretrain.lr=1e-3"))

    # The policy a training run builds from `model.name: tiny-base` is that base, and its
    # tokenizer reads the tool world's text.
    from fastrl.train.build import build_policy

    model, tokenizer, model_dir = build_policy(_base_config(tmp_path / "a"))
    assert model_dir == first
    prompt = get_world("synthetic").tasks("test", 1)[0].messages[0]["content"]
    assert tokenizer.decode(tokenizer.encode(prompt, add_special_tokens=False)) == prompt


def test_shipped_bases_match_the_current_recipe():
    """A base committed under fastrl/bases/ must be what `fastrl pretrain` builds from the
    default recipe of its name today (else the cache would never use it)."""
    from fastrl import load_config
    from fastrl.pretrain import SHIPPED_DIR, recipe, recipe_hash, recipe_hash_of

    shipped = sorted(SHIPPED_DIR.glob("*-base")) if SHIPPED_DIR.is_dir() else []
    if not shipped:
        pytest.skip("no base is shipped")
    for path in shipped:
        cfg = load_config(None, [f"model.name={path.name}"])
        assert recipe_hash_of(path) == recipe_hash(recipe(cfg)), path.name
    # A shipped config naming a base asks for the shipped one (else its first use trains).
    for config in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        name = (yaml.safe_load(config.read_text()).get("model") or {}).get("name")
        if name and (SHIPPED_DIR / name).is_dir():
            cfg = load_config(str(config))
            assert recipe_hash(recipe(cfg)) == recipe_hash_of(SHIPPED_DIR / name), config.name


def test_fastrl_eval_runs_the_procedural_world(tmp_path, capsys):
    argv = ["eval", "--env", "procedural", "--split", "test_pythonic", "--policy", "oracle"]
    argv += ["--limit", "5", "--out", str(tmp_path / "eval"), "model.vocab_size=400"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert (summary["env"], summary["success"], summary["n"]) == ("procedural", 1.0, 5)


def test_sft_replay_adds_pretraining_transcripts_to_every_batch(tmp_path, monkeypatch):
    """`sft.replay`: each SFT step trains on its `sft.batch_size` world demonstrations plus that
    many procedural pretraining transcripts (both syntaxes over the steps), drawn per step."""
    import fastrl
    from fastrl.config import load_config
    from fastrl.train import trainer

    batches = []
    real = trainer.sft_step

    def sft_step(model, optimizer, trajs, *args, **kwargs):
        batches.append(list(trajs))
        return real(model, optimizer, trajs, *args, **kwargs)

    monkeypatch.setattr(trainer, "sft_step", sft_step)
    overrides = [f"run_dir={tmp_path / 'run'}", "sft.steps=3", "sft.replay=4", "rl.steps=0"]
    overrides += ["env.eval_tasks=2", "eval.splits=[test]", "rollout.max_total_tokens=1024"]
    fastrl.train(load_config("configs/smoke.yaml", overrides))
    assert len(batches) == 3
    replayed = [[t for t in b if t.task_id.startswith("procedural/")] for b in batches]
    assert all(len(b) - len(r) == 8 for b, r in zip(batches, replayed))  # sft.batch_size
    assert all(1 <= len(r) <= 4 for r in replayed)  # those that fit rollout.max_total_tokens
    assert len({t.task_id for r in replayed for t in r}) == sum(map(len, replayed))
    syntaxes = {
        "hermes" if "hermes JSON" in t.messages[0]["content"] else "pythonic"
        for r in replayed
        for t in r
    }
    assert syntaxes == {"hermes", "pythonic"}

"""ETS and PRS: the failure log, the corrective data and the reflectors."""

import json

import pytest

from fastrl.algo import corrective as C
from fastrl.algo import supervision as S
from fastrl.envs.base import Task
from fastrl.rollout.engines import ScriptedEngine
from fastrl.rollout.loop import Limits

LIMITS = Limits(max_total_tokens=4096)


class Recording(ScriptedEngine):
    """Answers every turn with "I do not know." and records the prompt of each request's first
    turn."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, {})
        self.first_prompts: dict[str, list[int]] = {}

    def generate(self, prompts, sampling, request_ids=None):
        for rid, prompt in zip(request_ids, prompts):
            self.first_prompts.setdefault(rid, list(prompt))
            self.scripts.setdefault(rid, ["I do not know."])
        return super().generate(prompts, sampling, request_ids)


def _failed(trajs):
    for t in trajs:
        t.success, t.source = False, "policy"
    return trajs


def test_failure_log_windows_and_state(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("train", 4)
    trajs = S.play_experts(tok, world, tasks, LIMITS, solved_only=True)
    log = C.FailureLog()
    log.record(1, _failed(trajs[:2]))
    log.record(3, _failed(trajs[2:3]))
    trajs[3].source = "expert"
    trajs[3].success = False
    log.record(3, [trajs[3]])  # expert members never count as failures
    assert log.tasks_since(1) == [tasks[0].id, tasks[1].id, tasks[2].id]
    assert log.tasks_since(2) == [tasks[2].id]
    again = C.FailureLog()
    again.load_state_dict(json.loads(json.dumps(log.state_dict())))
    assert again.tasks_since(1) == log.tasks_since(1)
    again.forget_before(2)
    assert list(again.examples) == [tasks[2].id]


def test_corrective_data_is_experts_of_failed_tasks_plus_reflections(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("train", 6)
    engine = Recording(tok)  # fails every task
    from fastrl.rollout.loop import run_episodes

    failed = run_episodes(engine, tok, tasks[:3], world.make_env, limits=LIMITS)
    log = C.FailureLog()
    log.record(5, failed)
    by_id = {t.id: t for t in tasks}
    data, n = C.corrective_data(tok, world, by_id, log, since_step=5, limits=LIMITS)
    assert n == 3 and sorted(t.task_id for t in data) == sorted(t.id for t in tasks[:3])
    assert all(t.source == "expert" and t.success for t in data)
    data, n = C.corrective_data(
        tok, world, by_id, log, since_step=5, limits=LIMITS, reflector=C.RuleReflector()
    )
    reflections = [t for t in data if t.source == "reflection"]
    assert n == 3 and len(reflections) == 3
    for r in reflections:
        task = by_id[r.task_id]
        prompt = tok.decode(r.prompt_ids)
        assert "I do not know." in prompt and task.expert[0][0] in prompt
        critique = tok.decode([i for i, m in zip(r.response_ids, r.loss_mask) if m])
        assert critique.startswith("Step 1: error: answered before calling")
        assert "First error: step 1" in critique and critique.endswith("<|im_end|>")
        assert all(r.loss_mask) and r.response_ids[-1] == tok.eos_token_id
    assert C.corrective_data(tok, world, by_id, log, since_step=6, limits=LIMITS)[1] == 0


def _task(world, n_calls: int) -> Task:
    return next(
        t for t in world.tasks("train", 200) if S.expert_calls(t) == n_calls and len(t.expert) == 1
    )


def test_rule_reflector_names_the_first_error_and_where_the_value_was(world):
    task = _task(world, 2)
    first, second, answer = task.expert[0]
    env = world.make_env()
    messages = env.reset(task)
    messages.append({"role": "assistant", "content": first})
    from fastrl.envs.formats import get_format

    obs, _ = env.step(first, get_format(task.fmt).parse(first))
    messages += obs
    call = get_format(task.fmt).parse(second).calls[0]
    key, value = next(iter(call.arguments.items()))
    wrong = second.replace(json.dumps(value), json.dumps("X" + str(value)))
    messages.append({"role": "assistant", "content": wrong})
    text = C.RuleReflector().reflect(task, messages, {"first_failing_turn": 0})
    lines = text.splitlines()
    assert lines[0].startswith("Step 1: correct")
    assert lines[1].startswith(f"Step 2: error: {call.name} argument {key} is")
    assert json.dumps(value) in lines[1]
    assert lines[2].startswith("First error: step 2")
    assert lines[-1].startswith("Lesson: When a call needs a value")
    if str(value) in obs[0]["content"]:
        assert "in an earlier tool result" in lines[1]
    malformed = [
        *messages[:2],
        {"role": "assistant", "content": "<tool_call>\n{oops\n</tool_call>"},
    ]
    assert "malformed" in C.RuleReflector().reflect(task, malformed, {}).splitlines()[0]


def test_model_reflector_runs_a_local_judge(tiny_policy, world):
    _, _, path = tiny_policy
    task = _task(world, 1)
    messages = world.make_env().reset(task) + [{"role": "assistant", "content": "No idea."}]
    text = C.get_reflector(str(path), max_new_tokens=8).reflect(task, messages, {})
    assert isinstance(text, str)
    with pytest.raises(OSError):
        C.get_reflector("/nonexistent/judge")

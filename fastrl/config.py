"""Run configuration: a few dataclasses, YAML presets, dotted command-line overrides.

The defaults are the built-in demo (`fastrl demo`): a tiny model on the synthetic tool world on CPU.
`load_config("configs/x.yaml", ["rl.lr=1e-5"])` merges a YAML file and overrides; unknown keys,
wrong types, values outside a closed choice (a `Literal` field) and impossible values raise
`ConfigError` naming the key, before any work starts.

This module imports nothing from fastrl. What needs the registries is done by the callers:
`fastrl.envs.config_defaults` gives an environment's defaults (passed in as `env_defaults`), and
`fastrl.train.build.check_registries` checks the keys that name registry entries (`env.name`,
`rl.loss`, `rl.advantage`, the environment's split names) or depend on the environment (the
teacher's habits), and `check_paths` the path-valued keys (`model.name`, `model.cache_dir`,
`supervision.prs.reflector`); `fastrl.load_config`, which the CLI and `train`/`evaluate` use,
does all of it. A malformed YAML file is a `ConfigError` naming the file and line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The closed choices shared by several keys.
Schedule = Literal["constant", "cosine", "linear"]
LossAgg = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
# An environment's defaults by its name: dotted config keys and the values it sets on the keys a
# configuration does not give (`fastrl.envs.config_defaults`).
EnvDefaults = Callable[[str], Mapping[str, Any]]


def cache_home() -> Path:
    """fastrl's cache directory: `$FASTRL_CACHE`, else `$XDG_CACHE_HOME/fastrl`, else
    `~/.cache/fastrl`. Built presets go to `models/` (`model.cache_dir`), bench results to `bench/`.
    """
    if os.environ.get("FASTRL_CACHE"):
        return Path(os.environ["FASTRL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fastrl"


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an impossible value."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false are, so `dynamic_sampling: off` stays a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class ModelConfig:
    # A built-in preset (tiny | small | base), a preset's tool-use pretrained base (tiny-base |
    # small-base | base-base: built by `fastrl pretrain` with the `pretrain.*` keys on first use
    # and cached in `cache_dir`) or a local Hugging Face causal-LM directory.
    name: str = "tiny"
    # Parameter dtype for training: float32 | bfloat16.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Where the policy trains: auto (this process's CUDA device when CUDA is available, else the
    # CPU) | cuda | cpu.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # BPE vocabulary size of a preset's tokenizer (presets only).
    vocab_size: int = 2048
    # Seed of a preset's random initialisation (presets only).
    init_seed: int = 0
    # Recompute activations in the backward pass to save memory.
    gradient_checkpointing: bool = False
    # Attention implementation: auto (fastrl_packed when optim.packing, else sdpa) | fastrl_packed
    # (varlen attention over packed micro-batches: flash-attn, torch varlen or per-sequence SDPA,
    # chosen at start and logged) | sdpa | eager (transformers' own; packed micro-batches then use
    # a block-diagonal mask).
    attention: Literal["auto", "fastrl_packed", "sdpa", "eager"] = "auto"
    # Apply liger-kernel's Triton kernels (RMSNorm, SwiGLU, RoPE) to the model's layers; CUDA only
    # (a CPU run refuses it at start). The LM head stays fastrl's fused logprob op.
    liger: bool = False
    # Where built presets (tokenizer + random-init weights) are cached (default: `models/` of the
    # user's cache directory, `cache_home()`).
    cache_dir: str = field(default_factory=lambda: str(cache_home() / "models"))


@dataclass
class TeacherConfig:
    # The SFT warm-up imitates a teacher: each task's expert solution written with habits a
    # teacher model might have (fastrl/envs/teacher.py; synthetic world only). Each rate is the
    # chance, per turn the habit applies to, that the teacher falls into it; decisions are drawn
    # per task, turn and run seed. All 0: the expert's own (perfect) demonstrations. The expert
    # (Task.expert) stays the truth for the oracle, OPS, ETS/PRS, mixed SFT, hints and probes.
    # Habits touch only a task's last turn or turns that only read the world.
    # stop_early: in a turn of 2+ calls, answer with the value in hand ("The answer is Paris.")
    # instead of making the turn's last call.
    stop_early_rate: float = 0.75
    # guess: answer a turn without any call, with a made-up value in the expert's sentence.
    guess_rate: float = 0.0
    # skip_lookup: in a turn that starts with lookup_user, pass the person's name where the
    # looked-up value belongs (get_weather(city="Ana")), then give up on the error.
    skip_lookup_rate: float = 0.0


@dataclass
class EnvConfig:
    # Environment name (see fastrl.envs.ENVS; checked by fastrl.train.build.check_registries).
    name: str = "synthetic"
    # Number of training tasks (the pool SFT and RL draw from).
    train_tasks: int = 3000
    # Number of held-out tasks per evaluated split.
    eval_tasks: int = 100
    # Seed of the task generator.
    seed: int = 0
    # Seconds one tool call may run before it is cut off with an error observation (0: no limit).
    tool_timeout_s: float = 10.0
    # custom world only (fastrl/envs/custom.py): the class whose public methods are the tools,
    # FILE.py:ClassName or package.module:ClassName. Relative paths in a config file resolve
    # against the file's folder.
    tools: str = ""
    # custom world only: the tasks, a JSONL file (one task object per line).
    tasks: str = ""
    # custom world only, optional: FILE.py:function (or package.module:function) replacing the
    # default reward, called as fn(task: dict, tools: object, answers: list[str]) -> float or
    # (float, dict).
    reward: str = ""
    # The teacher whose demonstrations the SFT warm-up trains on (see TeacherConfig).
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class RolloutConfig:
    # Generation engine: auto (vllm when it can be imported, else hf) | vllm (an in-process vLLM
    # engine synced in place from the trainer after every step) | hf (KV-cached decoding on the
    # training model itself).
    engine: Literal["auto", "vllm", "hf"] = "auto"
    # vLLM only: fraction of the GPU's memory vLLM may take (weights + KV cache); ignored on CPU.
    gpu_memory_utilization: float = 0.3
    # vLLM only: longest context the engine holds; 0 means max_total_tokens + max_turn_tokens.
    max_model_len: int = 0
    # Maximum assistant turns per episode.
    max_turns: int = 8
    # Maximum tokens the policy may generate in one assistant turn.
    max_turn_tokens: int = 96
    # Maximum tokens of one observation (longer tool outputs are cut).
    max_obs_tokens: int = 128
    # Maximum prompt + response tokens of an episode.
    max_total_tokens: int = 1024
    # Sampling temperature for RL rollouts (evaluation is greedy).
    temperature: float = 1.0
    # Nucleus sampling threshold for RL rollouts.
    top_p: float = 1.0
    # Trajectories generated together in one engine call.
    batch_size: int = 128


@dataclass
class SFTConfig:
    # Optimizer steps of the SFT phase on the teacher's demonstrations (0 skips it).
    steps: int = 800
    # Demonstrations per optimizer step.
    batch_size: int = 8
    # Peak learning rate.
    lr: float = 5e-4
    # Fraction of the steps spent in linear warm-up.
    warmup_ratio: float = 0.05
    # Learning-rate schedule after warm-up: constant | cosine | linear.
    schedule: Schedule = "constant"
    # Aggregation of the SFT token loss: token-mean | seq-mean-token-mean.
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    # Demonstrate only train tasks whose expert makes at most this many tool calls (RL still
    # trains on every task); 0 uses them all.
    max_expert_calls: int = 0
    # Pretraining replay: this many transcripts of the tool-use pretraining data (procedural
    # tools in both call syntaxes, the `pretrain.tasks` of `pretrain.seed`) added to every SFT
    # batch, so a `<preset>-base` keeps what the world's one-syntax demonstrations do not show
    # while it learns them; 0 is off.
    replay: int = 0


@dataclass
class RLConfig:
    # RL steps (each: sample groups, score, advantages, policy update); 0 skips RL.
    steps: int = 45
    # Distinct tasks per RL step.
    prompts_per_step: int = 8
    # Rollouts per task (the GRPO group).
    group_size: int = 8
    # Peak learning rate.
    lr: float = 1e-4
    # Linear warm-up steps.
    warmup_steps: int = 2
    # Learning-rate schedule after warm-up: constant | cosine | linear.
    schedule: Schedule = "constant"
    # Optimizer steps per RL step (the batch is split into this many mini-batches).
    updates_per_step: int = 1
    # Advantage estimator from fastrl.algo.advantages.ESTIMATORS: grpo | drgrpo | rloo.
    advantage: str = "grpo"
    # Policy loss from fastrl.algo.losses.POLICY_LOSSES: ppo | gspo | cispo.
    loss: str = "ppo"
    # Loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum |
    # seq-mean-token-sum-norm.
    loss_agg: LossAgg = "seq-mean-token-mean"
    # Lower clip range of the ratio (1 - clip_low).
    clip_low: float = 0.2
    # Upper clip range of the ratio (1 + clip_high); > clip_low is DAPO's clip-higher.
    clip_high: float = 0.2
    # Dual-clip constant c > 1 for negative advantages; null disables it.
    dual_clip: float | None = 3.0
    # KL coefficient against the frozen reference (the model at the start of RL); 0 disables it.
    kl_coef: float = 0.0
    # KL estimator: k1 | k2 | k3.
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Entropy bonus coefficient.
    entropy_coef: float = 0.0
    # Groups whose rewards all agree carry no signal: off (keep them) | drop | refill (sample
    # more tasks).
    dynamic_sampling: Literal["off", "drop", "refill"] = "off"
    # Extra sampling rounds allowed by dynamic_sampling=refill.
    max_refill_rounds: int = 2
    # Exclude trajectories cut by a length or turn limit from the loss (DAPO overlong filtering).
    # Off by default (as TRL): a multi-turn episode is mostly cut by an error loop reaching the
    # turn limit, and masking it leaves loops unpunished (their share grew under RL when masked).
    mask_truncated: bool = False
    # Scale of negative advantages (1 is plain GRPO; 0 trains on better-than-average samples only).
    # Failed multi-turn samples are long and full of low-probability tokens, so at full weight
    # their push-down can dominate the update and drag down the tokens successes share with them.
    negative_weight: float = 1.0
    # Format reward weight: adds this times the fraction of the episode's assistant messages in a
    # healthy structural state (a well-formed call or a clean text reply) to the task reward;
    # success is unchanged. 0 is off (the paper uses none).
    format_reward: float = 0.0
    # Truncated importance sampling: weight each sampled token's loss by
    # min(p_trainer / p_engine, tis_cap), correcting for engine-vs-trainer numerics; null is off.
    tis_cap: float | None = None


@dataclass
class OptimConfig:
    # AdamW weight decay.
    weight_decay: float = 0.01
    # AdamW betas.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # Gradient-norm clip; 0 disables it.
    grad_clip: float = 1.0
    # Stop after this many steps in a row whose update was skipped for a non-finite loss or
    # gradient (each such update is skipped, logged and counted); 0 never stops.
    max_nonfinite_steps: int = 3
    # Run each training micro-batch padding-free, its sequences packed into one.
    packing: bool = True
    # Token budget of one micro-batch (real tokens when packing, rows x longest otherwise); bounds
    # activation memory. Packed micro-batches are filled first-fit decreasing.
    max_tokens_per_microbatch: int = 4096


@dataclass
class EvalConfig:
    # Splits evaluated after RL (the test split is also evaluated after SFT).
    splits: list[str] = field(default_factory=lambda: ["test", "format_ood", "content_ood"])
    # Evaluate the test split every N RL steps (0: only after SFT and at the end).
    every: int = 0
    # Evaluate every split on the weights RL starts from (the summary's sft_* keys); false skips
    # it, for RL from a checkpoint whose own run already evaluated it (configs/experiments/).
    before_rl: bool = True


@dataclass
class MonitorConfig:
    # ctrl/alarm fires when a control-token probability moves more than this many EMA standard
    # deviations the dangerous way (up for <|im_end|> and <tool_call>, down for the JSON opener).
    alarm_threshold: float = 4.0
    # Steps of history a series needs before it can raise the alarm.
    alarm_min_history: int = 5
    # EMA weight of the newest value in the running mean and variance.
    alarm_alpha: float = 0.1
    # The EMA z-score rule above on the sampled control-token series (ctrl/p_*, ctrl/turn_p_*,
    # ctrl/after_call_p_im_end; ctrl/z_* are logged either way). Off: it fired only after
    # sampled success had fallen, and the health rule below fires before (docs/EXPERIMENTS.md).
    spike_alarm: bool = False
    # ctrl/alarm also fires when the look-ahead health probe rises more than this many nats above
    # its value on the weights RL started from (ctrl/health_drift, ctrl/health_drift_all): the
    # mean NLL of the expert's own tokens, at control positions and over every assistant token,
    # on the decision probe's held-out trajectories, scored on the weights each update produced
    # before they sample. 0 turns the rule off (as does decision_probe_tasks=0: no probe set).
    health_threshold: float = 0.15
    # ctrl/alarm also fires when the share of structurally polluted sampled turns
    # (state/pollution) rises more than this above its value on the first RL step's samples
    # (ctrl/pollution_drift): it catches collapses the health probe misses when supervision
    # trains on expert trajectories like the probe's (OPS, mixed SFT). 0 turns the rule off.
    pollution_threshold: float = 0.25
    # Held-out test tasks whose expert trajectories the decision probe scores every RL step:
    # p(<tool_call>) after each question and tool result, where the expert makes a turn's last
    # call (ctrl/habit_p_tool_call; a teacher that stops early answers there), its first call
    # (ctrl/first_p_tool_call), another call (ctrl/continue_p_tool_call) or answers
    # (ctrl/answer_p_tool_call); 0 turns it off.
    decision_probe_tasks: int = 32
    # On an RL step without an update (every group agreed), the token metrics (entropy,
    # control-token probabilities) come from a no-grad forward over rows spread across the
    # groups, up to this many tokens; 0 skips them (those steps then log no token metrics).
    idle_metric_tokens: int = 2048


@dataclass
class OPSConfig:
    # Off-policy supervision: this many of each group's `rl.group_size` members are the task's
    # expert trajectory (played through the environment, scored, normalised with the group)
    # instead of samples; 0 is off.
    k: int = 0
    # Loss on expert tokens: clip (the policy loss, whose ratio against the trainer's own
    # pre-update logprobs is 1 on the first update) | luffy (the ratio replaced by p / (p + gamma),
    # no clipping; LUFFY's policy shaping).
    shaping: Literal["clip", "luffy"] = "clip"
    # LUFFY's gamma.
    gamma: float = 0.1


@dataclass
class HBGConfig:
    # Hint-based guidance: this many of each group's members see the task's hint in the system
    # prompt while sampling; the trained sequence has the plain prompt. 0 is off.
    k: int = 0


@dataclass
class ETSConfig:
    # Erroneous trajectory supervision: after each RL phase (schedule.scheme=interleaved), an SFT
    # phase on the expert trajectories of every task with a failed rollout in its last `window`
    # RL steps.
    enabled: bool = False
    # RL steps looked back for failed tasks.
    window: int = 10
    # Passes over the collected tasks.
    epochs: int = 2
    # Peak learning rate of the SFT phase.
    lr: float = 1e-5
    # Fraction of the phase spent in linear warm-up.
    warmup_ratio: float = 0.3
    # Trajectories per optimizer step.
    batch_size: int = 8


@dataclass
class PRSConfig:
    # Process reflection supervision: as ETS, plus SFT on reflections (an analysis prompt holding
    # a failed trajectory and the reference solution -> a turn-by-turn critique). Uses the
    # `supervision.ets` window, epochs, lr, warm-up and batch size.
    enabled: bool = False
    # Who writes the critiques: builtin (a deterministic critic comparing the trajectory with the
    # expert's) | a local Hugging Face model directory used as judge (greedy).
    reflector: str = "builtin"
    # Most new tokens a judge model writes per critique.
    max_reflection_tokens: int = 256


@dataclass
class MixedSFTConfig:
    # Weight mu of an SFT loss on expert trajectories added to every RL update (0 is off).
    weight: float = 0.0
    # mu at the last RL step for the linear and cosine schedules.
    final_weight: float = 0.0
    # How mu moves over the RL steps: constant | linear | cosine.
    schedule: Schedule = "constant"
    # CHORD's per-token weight phi = p (1 - p) (no gradient through it) on the SFT tokens.
    chord_phi: bool = False
    # Expert trajectories drawn per RL update.
    batch_size: int = 4


@dataclass
class SupervisionConfig:
    # The SFT warm-up before RL is the `sft` block; these are the other supervision modes, each
    # off by default and combinable.
    ops: OPSConfig = field(default_factory=OPSConfig)
    hbg: HBGConfig = field(default_factory=HBGConfig)
    ets: ETSConfig = field(default_factory=ETSConfig)
    prs: PRSConfig = field(default_factory=PRSConfig)
    mixed_sft: MixedSFTConfig = field(default_factory=MixedSFTConfig)


@dataclass
class ScheduleConfig:
    # synchronous: SFT warm-up (sft.steps), then one RL phase of rl.steps (OPS, HBG and mixed SFT
    # act inside its steps) | interleaved: SFT warm-up, then RL phases of `rl_phases` steps with a
    # corrective SFT phase (ETS / PRS) between consecutive ones.
    scheme: Literal["synchronous", "interleaved"] = "synchronous"
    # interleaved only: the RL phase lengths, e.g. [50, 100, 150]; rl.steps is then their sum.
    rl_phases: list[int] = field(default_factory=list)


@dataclass
class GuardConfig:
    # Collapse guard: on a control-token alarm (ctrl/alarm) or when state/collapse passes
    # `collapse_threshold`, roll back to the last healthy snapshot and act.
    enabled: bool = False
    # Act on ctrl/alarm.
    on_alarm: bool = True
    # Act when the fraction of collapsed assistant messages in a step exceeds this; 0 disables.
    collapse_threshold: float = 0.3
    # Act when the fraction of polluted assistant messages (tags mixed with stray text) in a step
    # exceeds this; 0 disables. Fast collapses at high learning rates often take this form.
    pollution_threshold: float = 0.0
    # What to do after the rollback: sft (a corrective SFT phase, ETS-style, with the
    # supervision.ets settings) | lower_lr (only the learning-rate cut below).
    action: Literal["sft", "lower_lr"] = "sft"
    # Every action multiplies the RL learning rate by this for the rest of the run (a lasting
    # cut, so the run does not climb straight back into the update that broke it); 1 keeps the
    # rate (action sft only).
    lr_factor: float = 0.5
    # A healthy RL step (no alarm, collapse under the threshold) refreshes the snapshot every this
    # many steps.
    snapshot_every: int = 5
    # Most guard actions in a run; after that the guard only logs.
    max_actions: int = 3


@dataclass
class DistributedConfig:
    # Under torchrun with several processes: DeepSpeed ZeRO stage (2: optimizer states and
    # gradients partitioned; 3: parameters too).
    zero_stage: Literal[2, 3] = 2
    # Collective backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo.
    backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class PretrainConfig:
    # The tool-use pretraining stage (`fastrl pretrain`, fastrl/pretrain.py): SFT of a preset on
    # procedurally generated tools and tasks (fastrl/envs/procedural.py) in both call syntaxes.
    # The same keys are the recipe of `model.name: <preset>-base`, built and cached on first use.
    # Optimizer steps (3000: the loss still fell at 1000, where held-out success was 0.02).
    steps: int = 3000
    # Transcripts per optimizer step.
    batch_size: int = 16
    # Peak learning rate.
    lr: float = 1e-3
    # Fraction of the steps spent in linear warm-up.
    warmup_ratio: float = 0.05
    # Learning-rate schedule after warm-up: constant | cosine | linear.
    schedule: Schedule = "cosine"
    # Procedural training tasks (the pool batches are drawn from); each is also fitted into the
    # tokenizer, together with the tool world's corpus.
    tasks: int = 6000
    # Seed of the procedural tasks and of the batch order.
    seed: int = 0
    # Held-out procedural tasks per syntax scored greedily after training (0: none).
    eval_tasks: int = 100


@dataclass
class Config:
    # Run directory: metrics.jsonl, config.yaml, checkpoints/, events, summary.json.
    run_dir: str = "runs/demo"
    # Global seed (sampling, data order).
    seed: int = 0
    # Checkpoints bound the work a kill loses: one at each phase end, one every N optimizer steps
    # of a phase, and one when `checkpoint_minutes` have passed since the last (whichever comes
    # first; 0 turns either off). A tiny model's checkpoint takes well under a second.
    checkpoint_every: int = 200
    checkpoint_minutes: float = 1.5
    # Keep this many most recent checkpoints.
    keep_checkpoints: int = 2
    # Show a progress bar on stderr.
    progress: bool = True
    # Write TensorBoard event files beside metrics.jsonl.
    tensorboard: bool = True
    # torch intra-op threads; 0 keeps torch's default.
    threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        # Dotted keys given explicitly (YAML file, overrides); the environment's own defaults
        # (`config_defaults` of its World class) fill in only the others. Not saved.
        self.explicit: set[str] = set()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check every value; raise ConfigError naming the key. Changes nothing.

        Types and closed choices are the fields' annotations (the loader's own check, run again
        for a Config built in Python); below, ranges and rules across keys. The registry-backed
        keys are checked by `fastrl.train.build.check_registries`.
        """
        _check_fields(self)
        checks: list[tuple[str, bool, str]] = [
            ("model.vocab_size", self.model.vocab_size >= 300, ">= 300"),
            ("env.train_tasks", self.env.train_tasks >= 1, ">= 1"),
            ("env.eval_tasks", self.env.eval_tasks >= 1, ">= 1"),
            ("env.tool_timeout_s", self.env.tool_timeout_s >= 0, ">= 0"),
            (
                "env.teacher.stop_early_rate",
                0 <= self.env.teacher.stop_early_rate <= 1,
                "in [0, 1]",
            ),
            ("env.teacher.guess_rate", 0 <= self.env.teacher.guess_rate <= 1, "in [0, 1]"),
            (
                "env.teacher.skip_lookup_rate",
                0 <= self.env.teacher.skip_lookup_rate <= 1,
                "in [0, 1]",
            ),
            (
                "rollout.gpu_memory_utilization",
                0 < self.rollout.gpu_memory_utilization <= 1,
                "in (0, 1]",
            ),
            ("rollout.max_model_len", self.rollout.max_model_len >= 0, ">= 0"),
            ("rollout.max_turns", self.rollout.max_turns >= 1, ">= 1"),
            ("rollout.max_turn_tokens", self.rollout.max_turn_tokens >= 1, ">= 1"),
            ("rollout.max_obs_tokens", self.rollout.max_obs_tokens >= 1, ">= 1"),
            ("rollout.max_total_tokens", self.rollout.max_total_tokens >= 16, ">= 16"),
            ("rollout.temperature", self.rollout.temperature > 0, "> 0"),
            ("rollout.top_p", 0 < self.rollout.top_p <= 1, "in (0, 1]"),
            ("rollout.batch_size", self.rollout.batch_size >= 1, ">= 1"),
            ("sft.steps", self.sft.steps >= 0, ">= 0"),
            ("sft.batch_size", self.sft.batch_size >= 1, ">= 1"),
            ("sft.lr", self.sft.lr > 0, "> 0"),
            ("sft.warmup_ratio", 0 <= self.sft.warmup_ratio < 1, "in [0, 1)"),
            ("rl.steps", self.rl.steps >= 0, ">= 0"),
            ("rl.prompts_per_step", self.rl.prompts_per_step >= 1, ">= 1"),
            ("rl.group_size", self.rl.group_size >= 2, ">= 2 (a group needs a baseline)"),
            ("rl.lr", self.rl.lr > 0, "> 0"),
            ("rl.warmup_steps", self.rl.warmup_steps >= 0, ">= 0"),
            ("rl.negative_weight", 0 <= self.rl.negative_weight <= 1, "in [0, 1]"),
            ("rl.format_reward", self.rl.format_reward >= 0, ">= 0"),
            ("sft.max_expert_calls", self.sft.max_expert_calls >= 0, ">= 0"),
            ("sft.replay", 0 <= self.sft.replay <= self.pretrain.tasks, "in [0, pretrain.tasks]"),
            ("optim.max_nonfinite_steps", self.optim.max_nonfinite_steps >= 0, ">= 0"),
            ("monitor.alarm_threshold", self.monitor.alarm_threshold > 0, "> 0"),
            ("monitor.alarm_min_history", self.monitor.alarm_min_history >= 1, ">= 1"),
            ("monitor.alarm_alpha", 0 < self.monitor.alarm_alpha <= 1, "in (0, 1]"),
            ("monitor.health_threshold", self.monitor.health_threshold >= 0, ">= 0"),
            ("monitor.pollution_threshold", 0 <= self.monitor.pollution_threshold <= 1, "[0, 1]"),
            ("monitor.decision_probe_tasks", self.monitor.decision_probe_tasks >= 0, ">= 0"),
            ("monitor.idle_metric_tokens", self.monitor.idle_metric_tokens >= 0, ">= 0"),
            ("rl.tis_cap", self.rl.tis_cap is None or self.rl.tis_cap > 0, "> 0 or null"),
            ("rl.updates_per_step", self.rl.updates_per_step >= 1, ">= 1"),
            ("rl.clip_low", 0 <= self.rl.clip_low < 1, "in [0, 1)"),
            ("rl.clip_high", self.rl.clip_high >= 0, ">= 0"),
            ("rl.dual_clip", self.rl.dual_clip is None or self.rl.dual_clip > 1, "> 1 or null"),
            ("rl.kl_coef", self.rl.kl_coef >= 0, ">= 0"),
            ("rl.entropy_coef", self.rl.entropy_coef >= 0, ">= 0"),
            ("rl.max_refill_rounds", self.rl.max_refill_rounds >= 0, ">= 0"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, ">= 0"),
            (
                "optim.betas",
                len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
                "two values in [0, 1)",
            ),
            ("optim.grad_clip", self.optim.grad_clip >= 0, ">= 0"),
            (
                "optim.max_tokens_per_microbatch",
                self.optim.max_tokens_per_microbatch >= 16,
                ">= 16",
            ),
            ("eval.every", self.eval.every >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("checkpoint_minutes", self.checkpoint_minutes >= 0, ">= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("threads", self.threads >= 0, ">= 0"),
            ("pretrain.steps", self.pretrain.steps >= 1, ">= 1"),
            ("pretrain.batch_size", self.pretrain.batch_size >= 1, ">= 1"),
            ("pretrain.lr", self.pretrain.lr > 0, "> 0"),
            ("pretrain.warmup_ratio", 0 <= self.pretrain.warmup_ratio < 1, "in [0, 1)"),
            ("pretrain.tasks", self.pretrain.tasks >= 1, ">= 1"),
            ("pretrain.eval_tasks", self.pretrain.eval_tasks >= 0, ">= 0"),
        ]
        sup, sched, guard = self.supervision, self.schedule, self.guard
        G = self.rl.group_size
        checks += [
            ("supervision.ops.k", 0 <= sup.ops.k < G, f"in [0, rl.group_size={G})"),
            ("supervision.ops.gamma", sup.ops.gamma > 0, "> 0"),
            (
                "supervision.hbg.k",
                0 <= sup.hbg.k and sup.hbg.k + sup.ops.k < G,
                f">= 0, with supervision.ops.k below rl.group_size={G} (a group needs samples)",
            ),
            ("supervision.ets.window", sup.ets.window >= 1, ">= 1"),
            ("supervision.ets.epochs", sup.ets.epochs >= 1, ">= 1"),
            ("supervision.ets.lr", sup.ets.lr > 0, "> 0"),
            ("supervision.ets.warmup_ratio", 0 <= sup.ets.warmup_ratio < 1, "in [0, 1)"),
            ("supervision.ets.batch_size", sup.ets.batch_size >= 1, ">= 1"),
            ("supervision.prs.reflector", bool(sup.prs.reflector), "builtin or a model directory"),
            ("supervision.prs.max_reflection_tokens", sup.prs.max_reflection_tokens >= 1, ">= 1"),
            ("supervision.mixed_sft.weight", sup.mixed_sft.weight >= 0, ">= 0"),
            ("supervision.mixed_sft.final_weight", sup.mixed_sft.final_weight >= 0, ">= 0"),
            ("supervision.mixed_sft.batch_size", sup.mixed_sft.batch_size >= 1, ">= 1"),
            ("schedule.rl_phases", all(n >= 1 for n in sched.rl_phases), "positive step counts"),
            ("guard.collapse_threshold", 0 <= guard.collapse_threshold <= 1, "in [0, 1]"),
            ("guard.pollution_threshold", 0 <= guard.pollution_threshold <= 1, "in [0, 1]"),
            ("guard.lr_factor", 0 < guard.lr_factor <= 1, "in (0, 1]"),
            (
                "guard.lr_factor",
                guard.action != "lower_lr" or guard.lr_factor < 1,
                "< 1 with guard.action=lower_lr",
            ),
            ("guard.snapshot_every", guard.snapshot_every >= 1, ">= 1"),
            ("guard.max_actions", guard.max_actions >= 0, ">= 0"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{key}: got {_get(self, key)!r}, expected {expected}")
        corrective = sup.ets.enabled or sup.prs.enabled
        if sched.scheme == "interleaved":
            if not sched.rl_phases:
                raise ConfigError(
                    "schedule.rl_phases: the interleaved scheme needs the RL phase lengths, "
                    "e.g. [50, 100, 150]"
                )
            if not corrective:
                raise ConfigError(
                    "schedule.scheme: interleaved runs ETS or PRS phases between RL phases; "
                    "set supervision.ets.enabled=true or supervision.prs.enabled=true"
                )
            if self.rl.steps != sum(sched.rl_phases):  # `resolve` derives it when not given
                raise ConfigError(
                    f"rl.steps: {self.rl.steps} differs from sum(schedule.rl_phases) = "
                    f"{sum(sched.rl_phases)}; leave rl.steps out under the interleaved scheme"
                )
        else:
            if sched.rl_phases:
                raise ConfigError(
                    "schedule.rl_phases: only the interleaved scheme has RL phases; "
                    "set schedule.scheme=interleaved or drop the key"
                )
            if corrective:
                key = "supervision.ets.enabled" if sup.ets.enabled else "supervision.prs.enabled"
                raise ConfigError(
                    f"{key}: ETS and PRS run between RL phases; set schedule.scheme=interleaved "
                    "and schedule.rl_phases"
                )
        if self.rollout.max_turn_tokens >= self.rollout.max_total_tokens:
            raise ConfigError(
                f"rollout.max_turn_tokens: {self.rollout.max_turn_tokens} must be smaller than "
                f"rollout.max_total_tokens ({self.rollout.max_total_tokens})"
            )
        return self


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _either(options: tuple[Any, ...]) -> str:
    """`("a", "b", "c")` -> `"a, b or c"`."""
    words = [str(o) for o in options]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        options = typing.get_args(annotation)
        for option in options:
            try:
                if _coerce(key, value, type(option)) == option:
                    return option
            except ConfigError:
                pass
        raise ConfigError(f"{key}: got {value!r}, expected {_either(options)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first field of dataclass `obj` whose value its type refuses."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{prefix}{f.name}.")
        else:
            _coerce(prefix + f.name, value, hints[f.name])


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Assign `data` onto dataclass `obj` in place, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{dotted}' (valid here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(dotted, value, hints[key]))


def parse_override(text: str) -> tuple[str, Any]:
    """`"rl.lr=1e-5"` -> `("rl.lr", 1e-05)`; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Merge `key=value` overrides (values read as YAML) into `cfg` in place and return it.

    The keys count as given, so an environment's defaults leave them alone. Not validated:
    `resolve` (or a loader) does that once everything is in.
    """
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
        cfg.explicit.add(key)
    return cfg


def resolve(cfg: Config, env_defaults: EnvDefaults | None = None) -> Config:
    """Fill in what the given keys leave open, then validate; returns `cfg`.

    The environment's defaults (`env_defaults(cfg.env.name)`: e.g. BFCL's episode limits) go on
    the keys the configuration does not give, and under the interleaved scheme `rl.steps`, when
    not given, becomes the sum of `schedule.rl_phases`.
    """
    for key, value in (env_defaults(cfg.env.name) if env_defaults else {}).items():
        if key not in cfg.explicit:
            *path, name = key.split(".")
            setattr(_get(cfg, ".".join(path)), name, value)
    sched = cfg.schedule
    if sched.scheme == "interleaved" and "rl.steps" not in cfg.explicit:
        cfg.rl.steps = sum(sched.rl_phases)
    return cfg.validate()


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    env_defaults: EnvDefaults | None = None,
) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; resolved (see
    `resolve`) and validated. `fastrl.load_config` passes the environments' defaults and checks
    the registry-backed keys too."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: malformed YAML{_where(e)}") from None
        _merge(cfg, data)
        cfg.explicit |= _dotted_keys(data)
        _relative_to(cfg, path.resolve().parent, _dotted_keys(data))
    apply_overrides(cfg, overrides or [])
    return resolve(cfg, env_defaults)


# Path-valued keys that a config file gives relative to its own folder (`FILE.py:Name` counts the
# part before the colon; a `package.module:Name` is left as it is).
FILE_RELATIVE_KEYS = ("env.tools", "env.tasks", "env.reward")


def _relative_to(cfg: Config, folder: Path, given: set[str]) -> None:
    """Make the relative paths of `FILE_RELATIVE_KEYS` among `given` relative to `folder`."""
    for key in FILE_RELATIVE_KEYS:
        *parent, name = key.split(".")
        node = _get(cfg, ".".join(parent))
        value = getattr(node, name)
        if key not in given or not value:
            continue
        where, sep, attr = value.rpartition(":") if key != "env.tasks" else ("", "", value)
        target = where if sep else value
        if key != "env.tasks" and not target.endswith(".py"):
            continue
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = folder / path
        setattr(node, name, f"{path}{sep}{attr}" if sep else str(path))


def _where(error: yaml.YAMLError) -> str:
    """` at line L, column C: PROBLEM` of a YAML parse error (lines and columns from 1)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return f": {problem}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _dotted_keys(data: Any, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return {prefix.rstrip(".")} if prefix else set()
    keys: set[str] = set()
    for key, value in data.items():
        keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def config_from_dict(data: dict[str, Any], *, env_defaults: EnvDefaults | None = None) -> Config:
    """A resolved, validated Config from a (possibly partial) nested mapping."""
    cfg = Config()
    _merge(cfg, data)
    cfg.explicit |= _dotted_keys(data)
    return resolve(cfg, env_defaults)


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

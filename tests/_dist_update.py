"""Run by tests/test_distributed.py under torchrun: one RL update of a fixed global batch under
DeepSpeed ZeRO-2, each rank on its share; rank 0 saves the updated parameters.

kind `sgd-rollback`: update, load the starting weights back into the model in place (as a guard's
rollback does), then update again: the result must be the single update's. `stage`: the ZeRO
stage (2 or 3)."""

import sys

import torch

from fastrl.algo import supervision as S
from fastrl.config import load_config
from fastrl.envs import get_world
from fastrl.models import load_model
from fastrl.rollout.loop import Limits
from fastrl.train import optim as O
from fastrl.train import update as U
from fastrl.train.distributed import DeepSpeedOptimizer, setup


def batch(tok, world, cache):
    """The global batch: expert trajectories standing in for samples, advantages of both signs."""
    trajs = S.play_experts(
        tok, world, world.tasks("train", 6), Limits(max_total_tokens=4096), solved_only=True
    )
    for i, t in enumerate(trajs):
        t.source, t.group_id, t.info["advantage"] = "policy", i // 3, (1.0, -0.5, 0.25)[i % 3]
    return trajs


def config(agg: str, stage: int = 2):
    return load_config(
        None,
        [
            f"distributed.zero_stage={stage}",
            "rl.lr=1e-3",
            "rl.warmup_steps=0",
            f"rl.loss_agg={agg}",
            "optim.max_tokens_per_microbatch=300",
            "optim.grad_clip=0",
        ],
    )


def optimizer(model, cfg, kind: str) -> torch.optim.Optimizer:
    """AdamW as the trainer builds it, or SGD, whose step shows a wrong gradient scale too."""
    if kind.startswith("sgd"):
        return torch.optim.SGD(model.parameters(), lr=cfg.rl.lr)
    return O.make_optimizer(model, cfg, cfg.rl.lr)


def main(out: str, cache: str, agg: str, kind: str, stage: str = "2") -> None:
    dist = setup("gloo")
    world = get_world("synthetic")
    if not dist.is_main:
        dist.barrier()  # rank 0 builds the preset into the empty cache first
    model, tok, _ = load_model(
        "tiny", corpus=lambda: world.tokenizer_corpus(n_tasks=300), cache_dir=cache, vocab_size=512
    )
    if dist.is_main:
        dist.barrier()
    model.train()
    cfg = config(agg, int(stage))
    opt = DeepSpeedOptimizer(model, optimizer(model, cfg, kind), cfg, dist)
    trajs = batch(tok, world, cache)[dist.rank :: dist.world_size]
    with opt.full_weights():
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(2 if kind == "sgd-rollback" else 1):
        with opt.writable_weights():
            model.load_state_dict(start)
        U.policy_update(model, opt, trajs, trajs, cfg.rl.lr, U.step_spec(cfg, tok), dist=dist)
    with opt.full_weights():
        if dist.is_main:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])

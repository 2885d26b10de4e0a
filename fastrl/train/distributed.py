"""Data parallelism under torchrun with DeepSpeed ZeRO-2 or ZeRO-3 (config block `distributed`).

    torchrun --nproc_per_node=2 -m fastrl train --config configs/smoke_deepspeed.yaml

Every rank builds the same model and its own rollout engine, plays its share of each step's tasks
(whole GRPO groups, so advantages need no communication) and trains on its own trajectories; the
loss is normalised by global token or row counts, so DeepSpeed's gradient averaging yields the
gradient of the single-process loss on the whole batch. Ranks run the same number of backward
passes per update (ZeRO reduces gradients during each one): a rank with fewer micro-batches runs
zero-weighted passes on a one-token sequence. Metrics are averaged over ranks (maxima for `*_max`)
and written by rank 0, which also evaluates and writes checkpoints (with every rank's RNG state).
On CPU the backend is gloo and DeepSpeed's CPU accelerator is selected (`DS_ACCELERATOR=cpu`).

One DeepSpeed engine serves every phase (its hooks sit on the parameters): where a single process
starts a fresh optimizer (a new SFT or RL phase) the engine's AdamW moments are cleared, so after a
corrective SFT phase inside RL the RL moments restart too (a single process keeps them).
DeepSpeed partitions the optimizer states across ranks: each rank writes its partition (fp32
master weights and AdamW moments, plain tensors) as `optim_rank<r>.pt` into the checkpoint, so a
run resumed with the same number of ranks continues exactly; with another number the moments
restart (logged). Weights loaded into the model in place (a guard's rollback) are copied into the
fp32 masters too, or the next step would bring the old weights back.

Under ZeRO-3 the parameters are partitioned as well. The training passes run the modules (whose
DeepSpeed hooks gather each one's weights as it runs, and again for backward); the fused LM head
runs as the head module's forward for the same reason. Everything else that reads weights
(generation on the HF engine, no-grad logprobs, evaluation, saving, the KL reference) runs inside
`full_weights`: all parameters gathered once and the hooks removed, so ranks may run different
numbers of forwards. The vLLM sync gathers one tensor at a time (`gather`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """Processes torchrun started (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        """Where collective tensors live: NCCL reduces CUDA tensors only."""
        return "cuda" if self.backend == "nccl" else "cpu"

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.tolist()

    def all_max(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def reduce_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Average the numeric metrics of a step over ranks (`*_max`: maximum); the same keys on
        every rank are required for the numeric ones present anywhere."""
        if not self.enabled:
            return row
        rows = self.gather_objects(row)
        out = dict(rows[0])
        keys = sorted({k for r in rows for k, v in r.items() if _numeric(v)} - {"step"})
        for key in keys:
            values = [r[key] for r in rows if _numeric(r.get(key))]
            out[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
        return out


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def setup(backend: str = "auto") -> Dist:
    """Join the torchrun job (no-op in a single process)."""
    world = launched_world_size()
    if world <= 1:
        return Dist()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(
            f"{world} processes train under DeepSpeed, which cannot be imported ({e}): "
            "`pip install -e .[deepspeed]` (`make test` sets it up), or run one process"
        ) from e

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():  # before NCCL starts, so each rank's communicator uses its card
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    dist = Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), backend)
    log.info("rank %d of %d (%s)", dist.rank, dist.world_size, backend)
    return dist


class DeepSpeedOptimizer:
    """One DeepSpeed engine around the model, behind the small optimizer interface the trainer
    uses (`param_groups`, `state_dict`, `load_state_dict`, `zero_grad`). Every phase shares it;
    `reset` clears the AdamW moments where a single process would start a fresh optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg, dist: Dist):
        import deepspeed

        stage = cfg.distributed.zero_stage
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # step() is the boundary; we count passes
            "gradient_clipping": 0.0,  # clipped here, on the reduced gradients
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if cfg.optim.grad_clip > 0:
            config["gradient_clipping"] = cfg.optim.grad_clip
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
        self.world_size = dist.world_size
        self.stage = stage

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        # What the engine's own forward does first (the trainer calls the module itself): under
        # ZeRO-3 this advances the micro-step, without which each pass would overwrite the
        # gradients of the previous ones instead of adding to them.
        self.optimizer.clear_backward_seen_flag()
        # DeepSpeed averages gradients over ranks; the loss is normalised globally, so scale it
        # back up to make the average the sum.
        self.engine.backward(loss * self.world_size)

    def step(self) -> float:
        """Reduce, clip and apply; returns the global gradient norm (non-finite: skipped)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    def _partitions(self) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        """The torch optimizer DeepSpeed wraps and the flat fp32 partitions it steps on."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return inner, [p for group in inner.param_groups for p in group["params"]]

    def reset(self) -> None:
        """Forget the AdamW moments (a new phase's optimizer)."""
        self._partitions()[0].state.clear()

    def partition_state(self) -> dict[str, Any]:
        """This rank's share of the optimizer: per flat partition, the fp32 master weights and
        the AdamW state, as tensors and numbers (`torch.load(weights_only=True)` reads it)."""
        inner, params = self._partitions()
        return {
            "world_size": self.world_size,
            "zero_stage": self.stage,
            "partitions": [
                {
                    "master": p.detach().clone(),
                    "state": {
                        k: v.detach().clone() if torch.is_tensor(v) else v
                        for k, v in inner.state.get(p, {}).items()
                    },
                }
                for p in params
            ],
        }

    def load_partition_state(self, saved: dict[str, Any]) -> bool:
        """Restore `partition_state()` of the same rank; False (nothing changed) when it was
        written by another number of ranks, ZeRO stage or model."""
        inner, params = self._partitions()
        parts = saved.get("partitions", [])
        if (
            saved.get("world_size") != self.world_size
            or saved.get("zero_stage") != self.stage
            or len(parts) != len(params)
            or any(s["master"].shape != p.shape for s, p in zip(parts, params))
        ):
            log.warning(
                "optimizer partitions were saved by %s ranks under ZeRO-%s, this run has %d ranks "
                "under ZeRO-%d: the AdamW moments restart",
                saved.get("world_size"),
                saved.get("zero_stage"),
                self.world_size,
                self.stage,
            )
            return False
        with torch.no_grad():
            for p, part in zip(params, parts):
                p.copy_(part["master"])
                inner.state[p] = {
                    k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v
                    for k, v in part["state"].items()
                }
        return True

    def weights_loaded(self) -> None:
        """The model's weights were replaced in place: make the fp32 masters follow."""
        self.optimizer.refresh_fp32_params()

    # -- ZeRO-3: parameters live partitioned; these give whole ones where they are needed -------

    def gather(
        self, params: list[torch.nn.Parameter], modifier_rank: int | None = None
    ) -> contextlib.AbstractContextManager:
        """`params` whole on every rank for the duration (collective). Read-only, or with
        `modifier_rank` that rank's values are partitioned back on exit."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Every parameter whole on this rank and DeepSpeed's module hooks off, so forwards run
        without collectives and ranks may run different numbers of them (generation, no-grad
        logprobs, evaluation, saving). Collective to enter and leave; read-only (use
        `writable_weights` to change weights). Nothing to do below ZeRO-3."""
        if self.stage != 3:
            yield
            return
        offload = self.optimizer.parameter_offload
        params = list(self.engine.module.parameters())
        root = offload.module
        # The root's start-of-forward hook syncs a step counter across ranks: it goes too.
        start_hook = root._forward_pre_hooks[offload.fwd_pre_hook.id]
        with self.gather(params):
            for p in params:
                p.ds_active_sub_modules.clear()
            for hook in [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                offload.fwd_pre_hook = root.register_forward_pre_hook(start_hook)
                offload._register_deepspeed_module(root)

    @contextlib.contextmanager
    def writable_weights(self) -> Iterator[None]:
        """Weights to overwrite in place on every rank (a rollback); under ZeRO-3 they are whole
        inside and rank 0's values are partitioned back on exit. The fp32 masters follow."""
        with self.gather(list(self.engine.module.parameters()), modifier_rank=0):
            yield
        self.weights_loaded()

    def state_dict(self) -> dict:
        return {}  # per-rank partitions: see `partition_state`

    def load_state_dict(self, state: dict) -> None:
        if state:
            log.warning("optimizer state in a checkpoint is ignored under DeepSpeed")

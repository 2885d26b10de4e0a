"""One optimizer step from trajectories: `sft_step` (the SFT loss) and `policy_update` (the RL
loss, with mixed SFT added when configured).

Both turn their trajectories into micro-batches (`micro_batches`), each a `Pass`: a closure that
runs the forward, returns its weighted loss, and records metrics. `fastrl.train.optim.run_passes`
backpropagates them (the same count on every rank) and `clip_and_step` applies the step. Every
hyperparameter is bound once per run in a `StepSpec` (`step_spec`), the RL loss in an `RLLoss`
(`fastrl.algo.losses.rl_loss`); the functions here take tensors, trajectories and that spec.

Shape letters: B rows of a micro-batch, T positions, M trained positions, C control tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastrl.algo.advantages import group_advantages
from fastrl.algo.losses import (
    RLLoss,
    microbatch_weight,
    mixed_sft_loss,
    rl_loss,
    sft_loss,
    tis_weights,
)
from fastrl.config import Config
from fastrl.monitor.control_tokens import gradient_split
from fastrl.monitor.log import nvtx_range
from fastrl.monitor.metrics import CONTROL_KEYS, ProbeIds, probe_ids, token_metrics
from fastrl.rollout.types import Trajectory
from fastrl.train.batch import collate, micro_batches, model_device, token_stats
from fastrl.train.distributed import Dist
from fastrl.train.optim import Pass, clip_and_step, full_weights, run_passes


@dataclass(frozen=True)
class StepSpec:
    """What turns trajectories into an optimizer step, bound once from the config (`step_spec`)."""

    pad_id: int
    max_tokens: int  # per micro-batch (optim.max_tokens_per_microbatch)
    packing: bool
    grad_clip: float
    sft_loss_agg: str = "token-mean"
    temperature: float = 1.0  # the sampling temperature RL logprobs are taken at
    updates_per_step: int = 1
    loss: RLLoss | None = None  # the bound RL loss
    chord_phi: bool = False  # mixed SFT weights each token by p (1 - p)
    ids: ProbeIds | None = None  # the tokens `ctrl/*` metrics probe; None: no probes
    # Token budget of the metric forward on a step without an update (None: every row; 0: none).
    idle_metric_tokens: int | None = None


def spread_sample(trajs: list[Trajectory], max_tokens: int) -> list[Trajectory]:
    """Rows of `trajs` evenly spaced through the list (a step's trajectories come group by group,
    so every group is represented while rows are at least as many as groups), as many as fit in
    `max_tokens` at the mean row length; at least one."""
    if not trajs:
        return []
    mean = sum(t.num_tokens for t in trajs) / len(trajs)
    m = min(len(trajs), max(1, int(max_tokens // mean)))
    return [trajs[j * len(trajs) // m] for j in range(m)]


def step_spec(cfg: Config, tokenizer: Any) -> StepSpec:
    """The `StepSpec` of `cfg` for the policy's `tokenizer` (pad id, control-token probes)."""
    rl, ops = cfg.rl, cfg.supervision.ops
    loss = rl_loss(
        rl.loss,
        clip_low=rl.clip_low,
        clip_high=rl.clip_high,
        dual_clip=rl.dual_clip,
        kl_coef=rl.kl_coef,
        kl_estimator=rl.kl_estimator,
        entropy_coef=rl.entropy_coef,
        loss_agg=rl.loss_agg,
        norm_len=cfg.rollout.max_total_tokens,
        luffy_gamma=ops.gamma if ops.k > 0 and ops.shaping == "luffy" else None,
        tis_cap=rl.tis_cap,
    )
    try:
        ids = probe_ids(tokenizer)
    except ValueError:  # a tokenizer without the control tokens: no probes (RL needs them)
        ids = None
    return StepSpec(
        pad_id=tokenizer.pad_token_id,
        max_tokens=cfg.optim.max_tokens_per_microbatch,
        packing=cfg.optim.packing,
        grad_clip=cfg.optim.grad_clip,
        sft_loss_agg=cfg.sft.loss_agg,
        temperature=cfg.rollout.temperature,
        updates_per_step=rl.updates_per_step,
        loss=loss,
        chord_phi=cfg.supervision.mixed_sft.chord_phi,
        idle_metric_tokens=cfg.monitor.idle_metric_tokens,
        ids=ids,
    )


# --------------------------------------------------------------------------- SFT
def sft_step(
    model, optimizer, trajs: list[Trajectory], lr: float, spec: StepSpec, dist: Dist | None = None
) -> dict[str, Any]:
    """One optimizer step of the SFT loss on `trajs` (this rank's share of the batch, normalised
    by the whole batch's tokens or rows); returns its metrics."""
    dist = dist or Dist()
    t0 = time.time()
    for group in optimizer.param_groups:
        group["lr"] = lr
    local_tokens = sum(sum(t.loss_mask) for t in trajs)
    n_tokens, n_rows = dist.all_sum([local_tokens, len(trajs)])
    losses = []

    def run(group: list[Trajectory]) -> torch.Tensor:
        batch = collate(group, spec.pad_id, model_device(model))
        with nvtx_range("forward"):
            logp, _, _ = token_stats(model, batch, packed=spec.packing)
        tokens = batch.target_mask.sum().item()
        weight = microbatch_weight(spec.sft_loss_agg, tokens, len(group), n_tokens, n_rows)
        loss = sft_loss(logp, batch.target_mask.float(), loss_agg=spec.sft_loss_agg) * weight
        losses.append(loss.item())
        return loss

    groups = micro_batches(trajs, spec.max_tokens, spec.packing)
    bad = run_passes(dist, model, optimizer, [Pass(g, run) for g in groups])
    with nvtx_range("optimizer"):
        grad_norm = clip_and_step(model, optimizer, spec.grad_clip, skip=bad)
    (total_loss,) = dist.all_sum([sum(losses)])
    dt = time.time() - t0
    return {
        "loss": total_loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "time/train": dt,
        "throughput/tokens_per_s": n_tokens / dt,
    }


# --------------------------------------------------------------------------- RL
def loss_members(trajs: list[Trajectory], mask_truncated: bool) -> list[Trajectory]:
    """The trajectories the policy loss trains on: all, or (overlong filtering) the uncut ones.
    Masked ones still count in the advantages of their group and in the loss denominators."""
    return [t for t in trajs if not (mask_truncated and t.truncated)]


def assign_advantages(trajs: list[Trajectory], estimator: str, negative_weight: float) -> None:
    """Group-relative advantages into `t.info["advantage"]`, negative ones scaled by
    `negative_weight` (a zero advantage leaves the trajectory out of the update)."""
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)  # [N]
    gids = torch.tensor([t.group_id for t in trajs])  # [N]
    adv = group_advantages(rewards, gids, estimator=estimator)  # [N]
    adv = torch.where(adv < 0, adv * negative_weight, adv)  # [N]
    for t, a in zip(trajs, adv.tolist()):
        t.info["advantage"] = a


class Meter:
    """Weighted means of a step's metrics over its micro-batches (`*_max` keys: maxima)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, key: str, value: float, weight: float) -> None:
        if key.endswith("_max"):
            self.sums[key] = max(self.sums.get(key, value), value)
            self.counts[key] = 1.0
            return
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.counts[key] = self.counts.get(key, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}


def policy_update(
    model,
    optimizer,
    trajs: list[Trajectory],
    sampled: list[Trajectory],
    lr: float,
    spec: StepSpec,
    *,
    ref_model=None,
    experts: list[Trajectory] | None = None,
    mixed_weight: float = 0.0,
    dist: Dist | None = None,
) -> dict[str, float]:
    """`spec.updates_per_step` optimizer steps at `lr` over mini-batches of `trajs`; returns the
    step's metrics.

    `sampled` (a superset of `trajs`) is measured instead when no trajectory carries a signal.
    With `experts` and `mixed_weight` (mu), each optimizer step adds mu times the SFT loss of a
    share of `experts` (mixed SFT). `ref_model`: the KL penalty's reference policy.
    """
    dist = dist or Dist()
    loss_fn = spec.loss
    experts = experts if mixed_weight > 0 else []
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_minis = spec.updates_per_step
    minis = [trajs[i::n_minis] for i in range(n_minis)]
    # The ratio's old policy: the trainer before this step's updates.
    old: dict[int, torch.Tensor] = {}
    if n_minis > 1:
        with torch.no_grad(), full_weights(optimizer):
            for group in micro_batches(trajs, spec.max_tokens, spec.packing):
                batch = collate(group, spec.pad_id, model_device(model))
                logp, _, _ = token_stats(model, batch, spec.temperature, packed=spec.packing)
                for t, lp in zip(group, logp):
                    old[id(t)] = lp[: t.num_tokens]  # [T_t] without this batch's padding
    meter = Meter()
    grad_norms = []
    trained_tokens = 0  # tokens through a forward and backward pass (zero-advantage rows skipped)
    expert_minis = [experts[i::n_minis] for i in range(n_minis)]
    for mini, expert_mini in zip(minis, expert_minis):
        # Normalisers over the whole batch (every rank's share of it).
        n_tokens, n_rows = dist.all_sum(
            [sum(sum(t.loss_mask) for t in mini), sum(1 for t in mini if any(t.loss_mask))]
        )
        active = [
            t for t in mini if any(t.loss_mask) and (loss_fn.uses_all_tokens or t.info["advantage"])
        ]
        passes = mixed_passes(model, expert_mini, mixed_weight, spec, dist, meter)
        trained_tokens += sum(t.num_tokens for p in passes for t in p.group)  # mixed SFT
        if n_tokens:
            trained_tokens += sum(t.num_tokens for t in active)
            for group in micro_batches(active, spec.max_tokens, spec.packing):
                run = rl_pass(model, ref_model, old, spec, meter, n_tokens, n_rows)
                passes.append(Pass(group, run))
        if not dist.all_max(len(passes)):
            continue
        bad = run_passes(dist, model, optimizer, passes)
        with nvtx_range("optimizer"):
            grad_norms.append(clip_and_step(model, optimizer, spec.grad_clip, skip=bad))
    if not grad_norms and spec.idle_metric_tokens != 0:
        # No trajectory carried a learning signal (every group agreed): no update, but the
        # policy's token metrics are still measured, on rows spread over the groups.
        with torch.no_grad(), full_weights(optimizer):
            signal = [t for t in sampled if any(t.loss_mask)]
            if spec.idle_metric_tokens is not None:
                signal = spread_sample(signal, spec.idle_metric_tokens)
            for group in micro_batches(signal, spec.max_tokens, spec.packing):
                batch = collate(group, spec.pad_id, model_device(model))
                control = spec.ids.control if spec.ids is not None else None
                logp, entropy, ctrl_probs = token_stats(
                    model, batch, spec.temperature, control, spec.packing
                )
                token_metrics(meter.add, batch, logp, entropy, ctrl_probs, spec.ids)
    if not grad_norms:
        meter.sums.update(loss=0.0, clip_frac=0.0, kl=0.0, ratio_mean=1.0)
        meter.counts.update(loss=1.0, clip_frac=1.0, kl=1.0, ratio_mean=1.0)
    out = meter.means()
    out["loss"] = meter.sums.get("loss", 0.0) / max(1, len(grad_norms))  # 0: only mixed SFT ran
    finite = [g for g in grad_norms if math.isfinite(g)]
    out["grad_norm"] = float(np.mean(finite)) if finite else (grad_norms[0] if grad_norms else 0.0)
    out["skipped_updates"] = len(grad_norms) - len(finite)
    out["train/updates"] = len(finite)  # optimizer steps applied: 0 leaves the weights as they were
    out["lr"] = lr
    out["train/tokens"] = float(trained_tokens)
    return out


def rl_pass(
    model, ref_model, old: dict[int, torch.Tensor], spec: StepSpec, meter: Meter,
    n_tokens: float, n_rows: float,
) -> Callable[[list[Trajectory]], torch.Tensor]:  # fmt: skip
    """The RL loss of one micro-batch, weighted by its share of the mini-batch (`n_tokens` loss
    tokens, `n_rows` rows with one); records the loss, clip and KL statistics, the token metrics
    and the control tokens' gradient push in `meter`."""
    loss_fn, ids = spec.loss, spec.ids
    control = ids.control if ids is not None else None

    def run(group: list[Trajectory]) -> torch.Tensor:
        batch = collate(group, spec.pad_id, model_device(model))
        mask = batch.target_mask.float()  # [B, T]
        with nvtx_range("forward"):
            logp, entropy, ctrl_probs = token_stats(
                model, batch, spec.temperature, control, spec.packing
            )
        old_lp = (
            torch.nn.utils.rnn.pad_sequence([old[id(t)] for t in group], batch_first=True)
            if old
            else logp.detach()
        )  # [B, T]
        ref_lp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_lp, _, _ = token_stats(ref_model, batch, spec.temperature, packed=spec.packing)
        adv = torch.tensor(
            [t.info["advantage"] for t in group], dtype=torch.float32, device=mask.device
        )  # [B]
        g_tokens = mask.sum().item()
        if loss_fn.tis_cap is not None:
            tis = tis_weights(old_lp, batch.engine_logprobs, batch.sampled, loss_fn.tis_cap)
            adv = adv[:, None] * tis * mask  # [B, T]
            meter.add("rollout/tis_weight_mean", (tis * mask).sum().item() / max(1.0, g_tokens),
                      g_tokens)  # fmt: skip
        shaped = torch.tensor(
            [t.source == "expert" for t in group], dtype=torch.bool, device=mask.device
        )  # [B] rows under LUFFY's shaping, when it is on
        with nvtx_range("loss"):
            loss, stats = loss_fn(
                logp, old_lp, adv, mask, shaped, ref_logprobs=ref_lp, entropy=entropy
            )
        rows = sum(1 for t in group if any(t.loss_mask))
        weight = microbatch_weight(loss_fn.loss_agg, g_tokens, rows, n_tokens, n_rows)
        meter.add("loss", loss.item(), weight)
        for key in ("clip_frac", "kl", "ratio_mean"):
            if key in stats:
                meter.add(key, float(stats[key]), g_tokens)
        token_metrics(meter.add, batch, logp, entropy, ctrl_probs, ids)
        if ctrl_probs is not None:
            trained = batch.target_mask  # [B, T]
            adv_tok = adv[trained] if adv.dim() == 2 else adv[trained.nonzero()[:, 0]]  # [M]
            g_self, g_other = gradient_split(
                ctrl_probs.detach(), batch.labels[trained], adv_tok, list(control)
            )
            m = max(1.0, g_tokens)
            pushes = torch.stack([g_self, g_other]).tolist()  # one transfer  # [2, C]
            for k, key in enumerate(CONTROL_KEYS):  # per trained token
                meter.add(f"ctrl/grad_self_{key}", pushes[0][k] / m, m)
                meter.add(f"ctrl/grad_other_{key}", pushes[1][k] / m, m)
        return loss * weight

    return run


def mixed_passes(
    model, experts: list[Trajectory], weight: float, spec: StepSpec, dist: Dist, meter: Meter
) -> list[Pass]:
    """The backward passes of mixed SFT: `weight` x the SFT loss of `experts` (this rank's share),
    token-mean over every rank's expert tokens, with CHORD's p(1 - p) weights when configured;
    the unweighted loss is recorded as `sft/mixed_loss`."""
    if not experts:
        return []
    (n_tokens,) = dist.all_sum([sum(sum(t.loss_mask) for t in experts)])

    def run(group: list[Trajectory]) -> torch.Tensor:
        batch = collate(group, spec.pad_id, model_device(model))
        logp, _, _ = token_stats(model, batch, packed=spec.packing)
        share = microbatch_weight("token-mean", batch.target_mask.sum().item(), 0, n_tokens, 0)
        loss = mixed_sft_loss(logp, batch.target_mask, chord_phi=spec.chord_phi) * share
        meter.add("sft/mixed_loss", loss.item(), 1.0)
        return loss * weight

    return [Pass(g, run) for g in micro_batches(experts, spec.max_tokens, spec.packing)]

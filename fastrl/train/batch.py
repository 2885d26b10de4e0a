"""Batches of trajectories for the trainer's forward passes.

`collate` right-pads trajectories into a `Batch` built on the host (its real-token count and
longest row known there, so packing never reads a size back from the device); `micro_batches`
groups trajectories under a token budget; `token_stats` runs the policy on a batch, packed or
padded, and sends only the trained positions through the fused LM-head op, so the full
`[B, T, V]` logits are never formed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastrl.ops import fused_linear_token_logprobs, pack, position_ids
from fastrl.rollout.types import Trajectory
from fastrl.train.packing import ATTN_IMPLEMENTATION, first_fit_decreasing, no_mask


@dataclass
class Batch:
    """Right-padded token batch of trajectories; position t predicts token t + 1."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T] bool: position predicts a trained token
    labels: torch.Tensor  # [B, T] next token (0 where not a target)
    engine_logprobs: torch.Tensor  # [B, T] engine logprob of the label token
    sampled: torch.Tensor  # [B] bool: the row's tokens were sampled from the plain prompt
    # Known on the host, so packing never reads a count back from the device.
    n_real: int  # real (non-pad) tokens
    longest: int  # longest row


def model_device(model: torch.nn.Module) -> torch.device:
    """The device the model's parameters live on (ZeRO-3 placeholders report theirs too)."""
    return next(model.parameters()).device


def collate(
    trajs: list[Trajectory], pad_id: int, device: torch.device | str | None = None
) -> Batch:
    """Right-pad `trajs` into a Batch, built on the host and copied to `device` when given."""
    width = max(t.num_tokens for t in trajs)
    B = len(trajs)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    target_mask = torch.zeros((B, width), dtype=torch.bool)
    labels = torch.zeros((B, width), dtype=torch.long)
    engine_lp = torch.zeros((B, width), dtype=torch.float32)
    for row, t in enumerate(trajs):
        ids = t.prompt_ids + t.response_ids
        n, p = len(ids), len(t.prompt_ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention_mask[row, :n] = 1
        labels[row, : n - 1] = input_ids[row, 1:n]
        if t.response_ids:
            target_mask[row, p - 1 : n - 1] = torch.tensor(t.loss_mask, dtype=torch.bool)
            engine_lp[row, p - 1 : n - 1] = torch.tensor(t.engine_logprobs, dtype=torch.float32)
    # Expert members have no engine logprobs; hinted members' were taken in another context.
    sampled = torch.tensor([t.source == "policy" for t in trajs], dtype=torch.bool)
    tensors = [input_ids, attention_mask, target_mask, labels, engine_lp, sampled]
    if device is not None and torch.device(device) != input_ids.device:
        tensors = [x.to(device, non_blocking=True) for x in tensors]
    n_real = sum(t.num_tokens for t in trajs)
    return Batch(*tensors, n_real=n_real, longest=width)


def micro_batches(
    trajs: list[Trajectory], token_budget: int, packed: bool = False
) -> list[list[Trajectory]]:
    """Group trajectories into micro-batches that fit the token budget.

    Packed: first-fit decreasing on real token counts (`packing.first_fit_decreasing`). Padded:
    sorted by length, so each micro-batch's rows x longest fits.
    """
    if packed:
        bins = first_fit_decreasing([t.num_tokens for t in trajs], token_budget)
        return [[trajs[i] for i in b] for b in bins]
    ordered = sorted(trajs, key=lambda t: t.num_tokens)
    groups: list[list[Trajectory]] = []
    current: list[Trajectory] = []
    for t in ordered:
        if current and (len(current) + 1) * t.num_tokens > token_budget:
            groups.append(current)
            current = []
        current.append(t)
    if current:
        groups.append(current)
    return groups


def token_stats(
    model: torch.nn.Module,
    batch: Batch,
    temperature: float = 1.0,
    control_ids: list[int] | None = None,
    packed: bool = False,
):
    """Per-target-token logprob/entropy (and control-token probs) as [B, T] tensors.

    With `packed`, the micro-batch runs padding-free: its real tokens are packed into one sequence
    with per-sequence position ids, and attention stays inside each sequence. Under the
    `fastrl_packed` attention the segment boundaries go to a varlen kernel and no mask is built;
    under another implementation (sdpa, eager) transformers builds a block-diagonal mask from the
    position ids (no attention mask and no cache given), which costs N^2 over the packed length.
    Only the trained positions go through the LM head, via the fused op, so the full [B, T, V]
    logits are never formed.
    """
    base = getattr(model, model.base_model_prefix)
    mask = batch.target_mask  # [B, T]
    if packed:
        # Sizes from the host-side counts: no device-to-host sync.
        ids, cu_seqlens = pack(batch.input_ids, batch.attention_mask, total=batch.n_real)
        positions = position_ids(cu_seqlens, batch.n_real)  # [N]
        kwargs = {}
        if model.config._attn_implementation == ATTN_IMPLEMENTATION:
            longest = batch.longest
            kwargs = dict(
                attention_mask=no_mask(model),
                cu_seq_lens_q=cu_seqlens,
                cu_seq_lens_k=cu_seqlens,
                max_length_q=longest,
                max_length_k=longest,
            )
        hidden = base(
            input_ids=ids[None], position_ids=positions[None], use_cache=False, **kwargs
        ).last_hidden_state[0]  # [N, H]
        # [N] bool, row-major target positions
        targets, _ = pack(mask, batch.attention_mask, total=batch.n_real)
        hidden = hidden[targets]  # [M, H]
    else:
        hidden = base(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state[mask]  # [M, H]
    head = model.get_output_embeddings()
    labels = batch.labels[mask]  # [M]

    def fused_head(h: torch.Tensor) -> tuple:
        stats = fused_linear_token_logprobs(
            h,  # [M, H]
            head.weight,  # [V, H]
            labels,
            temperature=temperature,
            with_entropy=True,
            control_ids=control_ids,
        )
        return stats.logprobs, stats.entropy, stats.control_probs

    if hasattr(head.weight, "ds_id"):  # ZeRO-3: the head's weight is whole only inside its call
        token_logp, token_entropy, control_probs = call_as_forward(head, fused_head, hidden)
    else:
        token_logp, token_entropy, control_probs = fused_head(hidden)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    logp = logp.masked_scatter(mask, token_logp)  # [B, T]
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
        mask, token_entropy
    )  # [B, T]
    return logp, entropy, control_probs


def call_as_forward(module: torch.nn.Module, fn: Callable, *args: Any) -> Any:
    """`fn(*args)` run as `module`'s forward, so the hooks on the module run around it (ZeRO-3
    gathers the module's weights before and releases them after, and again for backward)."""
    module.forward = fn
    try:
        return module(*args)
    finally:
        del module.forward

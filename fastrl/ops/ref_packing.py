"""Torch references of the packing ops `fastrl.ops.pack/unpack/position_ids/segment_sum`.

The CPU path when the extension `fastrl._C` (csrc/) is not built, and its test oracle. The
inputs arrive checked by `fastrl.ops`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Row index of each of the `total` packed positions `(total,)` int64."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def pack(x: Tensor, mask: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Keep the positions where `mask (B, T)` is nonzero, in row-major order.

    Args:
        x: `(B, T, ...)` padded values (`x.shape[:2] == mask.shape`).
        mask: `(B, T)` bool or 0/1.
        total: number of set positions. Without it the count is read from the device (one host
            synchronisation); with it nothing synchronises (`torch.nonzero_static`).

    Returns:
        packed `(total, ...)` and int32 `cu_seqlens (B+1,)`.
    """
    flat_mask = mask.reshape(-1).bool()  # [B*T]
    if total is None:
        total = int(flat_mask.sum())
    index = torch.nonzero_static(flat_mask, size=total).squeeze(1)  # [total]
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, index)  # [total, ...]
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)  # [B+1]
    cu_seqlens[1:] = mask.bool().sum(dim=1).cumsum(0)
    return packed, cu_seqlens


def unpack(packed: Tensor, cu_seqlens: Tensor, mask: Tensor) -> Tensor:
    """Inverse of `pack`: `(total, ...)` back to `(B, T, ...)` with zeros where `mask` is unset."""
    bool_mask = mask.bool()  # [B, T]
    out_shape = (*mask.shape, *packed.shape[1:])
    if packed.shape[0] == 0:
        return packed.new_zeros(out_shape)
    # packed index of (b, t) = cu_seqlens[b] + (number of set positions before t in row b)
    rank = bool_mask.cumsum(dim=1) - 1  # [B, T]
    index = (cu_seqlens[:-1, None].long() + rank).clamp(0, packed.shape[0] - 1)  # [B, T]
    gathered = packed.index_select(0, index.reshape(-1)).reshape(out_shape)  # [B, T, ...]
    keep = bool_mask.reshape(*mask.shape, *([1] * (packed.dim() - 1)))  # [B, T, 1...]
    return torch.where(keep, gathered, 0)


def position_ids(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """Position of each packed token within its sequence, `(total,)` int64, restarting at 0.

    `total` defaults to `cu_seqlens[-1]`, read from the device (one synchronisation).
    """
    if total is None:
        total = int(cu_seqlens[-1])
    segments = _segment_ids(cu_seqlens, total)  # [total]
    positions = torch.arange(total, device=cu_seqlens.device)  # [total]
    return positions - cu_seqlens.long()[segments]


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Sum of packed `values (total, ...)` per sequence: `(B, ...)`, 0 for empty sequences."""
    segments = _segment_ids(cu_seqlens, values.shape[0])  # [total]
    out = values.new_zeros(cu_seqlens.shape[0] - 1, *values.shape[1:])  # [B, ...]
    return out.index_add(0, segments, values)

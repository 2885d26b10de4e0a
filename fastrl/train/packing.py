"""Token-budget micro-batches and attention over packed sequences.

Micro-batches: a rank's share of a training batch is bin-packed, first-fit decreasing, into
micro-batches of at most `max_tokens` real tokens (a sequence longer than the budget gets a
micro-batch of its own). The loss normaliser is computed over the whole batch, never per
micro-batch, so how sequences are grouped does not change the loss or its gradient.

Attention: a packed micro-batch is one sequence of concatenated trajectories with per-sequence
position ids; attention must stay inside each trajectory. `PackedAttention` is registered with
transformers as the attention implementation "fastrl_packed" and takes the segment boundaries
(`cu_seq_lens_q`) from the forward's keyword arguments. Its kernel is chosen once:

- `flash_attn`: flash-attn's varlen kernel, when the package is installed and tensors are on CUDA;
- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn` (CUDA only) where the installed torch
  has it;
- `sdpa_segments`: causal SDPA run on each segment in turn (CPU, or CUDA without either of the
  above). It never forms a block-diagonal mask and never attends across segments, so its cost is
  the sum of the segments' causal attention, not that of the packed length squared.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "fastrl_packed"
KERNELS = ("flash_attn", "torch_varlen", "sdpa_segments")


# --------------------------------------------------------------------------- micro-batches
def first_fit_decreasing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose total length is at most `max_tokens`.

    Sequences are placed longest first into the first bin with room (a sequence longer than the
    budget gets a bin of its own). Within a bin, indices keep their decreasing-length order.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return bins


# --------------------------------------------------------------------------- attention
def available_kernels(device: torch.device | str) -> list[str]:
    """Packed-attention kernels usable for tensors on `device`, best first."""
    device = torch.device(device)
    kernels = []
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None:
            kernels.append("flash_attn")
        if _torch_varlen() is not None:
            kernels.append("torch_varlen")
    kernels.append("sdpa_segments")
    return kernels


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def choose_kernel(device_type: str, requested: str = "auto") -> str:
    """The packed-attention kernel for `device_type`; logged once per choice."""
    kernels = available_kernels(device_type)
    if requested == "auto":
        kernel = kernels[0]
    elif requested in kernels:
        kernel = requested
    else:
        raise ValueError(
            f"packed attention kernel {requested!r} is not available on {device_type}; "
            f"available: {', '.join(kernels)}"
        )
    log.info("packed attention on %s: %s (available: %s)", device_type, kernel, ", ".join(kernels))
    return kernel


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed segment (transformers attention-function signature).

    query: [1, Hq, N, D]; key, value: [1, Hkv, N, D]; `cu_seq_lens_q`: [S + 1] int32 segment
    boundaries, passed by the packed training forward. Returns the output as [1, N, Hq, D].
    Calls without `cu_seq_lens_q` (generation, padded batches) are ordinary SDPA attention with
    the padding mask transformers built for them.
    """
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    kernel = choose_kernel(query.device.type)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, H, D]
    if kernel == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        if max_length_q is None:
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        out = flash_attn_varlen_func(
            q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
            dropout_p=dropout, softmax_scale=scaling, causal=True,
        )  # fmt: skip
    elif kernel == "torch_varlen":
        if max_length_q is None:
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        out = _torch_varlen()(
            q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
            scale=scaling, window_size=(-1, 0), enable_gqa=k.shape[1] != q.shape[1],
        )  # fmt: skip
    else:
        out = _sdpa_segments(query, key, value, cu_seq_lens_q, scaling, dropout)
        return out, None
    return out[None], None


def _sdpa_segments(query, key, value, cu_seqlens, scaling, dropout=0.0) -> torch.Tensor:
    """Causal SDPA over each segment of the packed row; [1, N, Hq, D]."""
    gqa = key.shape[1] != query.shape[1]
    bounds = cu_seqlens.tolist()  # one host read per layer: segment slicing needs the numbers
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
            dropout_p=dropout,
        )
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs, dim=2).transpose(1, 2)  # [1, N, Hq, D]


@functools.cache
def register() -> str:
    """Register "fastrl_packed" with transformers (attention and, for padded calls, SDPA's mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def no_mask(model: torch.nn.Module) -> dict[str, None]:
    """The `attention_mask` argument that makes transformers skip building a mask for a forward.

    A packed forward passes the segment boundaries instead; a dict per attention type is taken
    as already prepared masks.
    """
    types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    return {t: None for t in types | {"full_attention"}}

"""Public kernel API of fastrl: token statistics, the fused LM head, the policy loss and packing.

Every function here dispatches to one backend, in this order of preference:
    cuda    the C++/CUDA extension `fastrl._C` through `fastrl._ext` (its CPU kernels serve CPU
            tensors too)
    triton  the Triton kernels `fastrl.triton_kernels` (CUDA tensors, or `TRITON_INTERPRET=1`)
    torch   the torch references `fastrl.ops.ref_*` gathered in `fastrl.ops.reference` (always
            available)
A backend module provides an op by exposing a callable with the op's public name and signature;
ops a backend does not provide fall back to the torch reference. `FASTRL_BACKEND=torch|triton|cuda`
forces one backend (`auto`, the default, takes the first that provides the op and can run: Triton
only for CUDA tensors, so CPU tensors run Triton only with `FASTRL_BACKEND=triton` and
`TRITON_INTERPRET=1`); forcing one that cannot run raises a RuntimeError. The choice for each op
is logged once on the `fastrl.ops` logger.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

from fastrl.ops import reference
from fastrl.ops.reference import TokenStats

__all__ = [
    "BACKENDS",
    "TokenStats",
    "fused_linear_token_logprobs",
    "pack",
    "policy_loss",
    "position_ids",
    "segment_sum",
    "select_backend",
    "token_logprobs",
    "unpack",
]

logger = logging.getLogger("fastrl.ops")

BACKENDS = ("cuda", "triton", "torch")
_BACKEND_MODULES = {"cuda": "fastrl._ext", "triton": "fastrl.triton_kernels"}


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _requested_backend() -> str:
    value = os.environ.get("FASTRL_BACKEND", "auto").strip().lower() or "auto"
    if value not in (*BACKENDS, "auto"):
        raise ValueError(f"FASTRL_BACKEND={value!r}; valid values: auto, {', '.join(BACKENDS)}")
    return value


@functools.cache
def _backend_module(name: str) -> tuple[ModuleType | None, str]:
    """The backend's module, or None with the reason it cannot be loaded."""
    if name == "torch":
        return reference, ""
    if name == "triton" and importlib.util.find_spec("triton") is None:
        return None, "the triton package is not installed"
    try:
        return importlib.import_module(_BACKEND_MODULES[name]), ""
    except ImportError as error:
        if name == "cuda":
            logger.warning(
                "fastrl._C (the packed-sequence C++/CUDA extension) is not built: pack, unpack, "
                "position_ids and segment_sum use the torch reference (same results, slower). "
                "Build it with `pip install --no-build-isolation -e .` (%s)",
                error,
            )
        return None, f"{_BACKEND_MODULES[name]} cannot be imported ({error})"


def _unusable_reason(name: str, device_type: str) -> str:
    """Why backend `name` cannot run on `device_type` ('' when it can)."""
    module, reason = _backend_module(name)
    if module is None:
        return reason
    if name == "cuda" and device_type == "cuda" and not module.has_cuda_kernels():
        return "fastrl._C was built without CUDA kernels (CPU torch or no nvcc at build time)"
    if name == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need CUDA tensors or TRITON_INTERPRET=1, got {device_type}"
    return ""


def _provides(name: str, op: str) -> bool:
    module, _ = _backend_module(name)
    return module is not None and callable(getattr(module, op, None))


@functools.cache
def _choose(op: str, requested: str, device_type: str) -> str:
    if requested == "auto":
        chosen = next(
            name
            for name in BACKENDS
            if name == "torch"
            or (
                # The interpreter is for tests: CPU tensors use Triton only when it is forced
                # (checked first, so that Triton is not even imported for them).
                not (name == "triton" and device_type != "cuda")
                and _provides(name, op)
                and not _unusable_reason(name, device_type)
            )
        )
    else:
        reason = _unusable_reason(requested, device_type)
        if reason:
            raise RuntimeError(f"FASTRL_BACKEND={requested} is unavailable: {reason}")
        chosen = requested if _provides(requested, op) else "torch"
    logger.info(
        "fastrl.ops.%s on %s: %s backend%s (FASTRL_BACKEND=%s)",
        op,
        device_type,
        chosen,
        # "cuda" names the compiled extension, which also holds the CPU kernels.
        " (compiled fastrl._C, CPU kernels)" if chosen == "cuda" and device_type == "cpu" else "",
        requested,
    )
    return chosen


def select_backend(op: str, device: torch.device | str = "cpu") -> str:
    """Name of the backend that runs `op` for tensors on `device` (logged once per choice)."""
    return _choose(op, _requested_backend(), torch.device(device).type)


def _impl(op: str, device: torch.device) -> Callable:
    module, _ = _backend_module(select_backend(op, device))
    return getattr(module, op)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    control_ids: Tensor | Sequence[int] | None = None,
    ignore_index: int = -100,
) -> TokenStats:
    """Log-probability of each label, entropy and control-token probabilities.

    Args:
        logits: `(N, V)` logits of any float dtype, divided by `temperature`.
        labels: `(N,)` int64; rows equal to `ignore_index` give 0 and no gradient.
        with_entropy: also return the entropy, which carries gradient like the logprobs.
        control_ids: `(K,)` token ids whose softmax probabilities are returned, detached.

    Returns:
        TokenStats: `logprobs (N,)`, `entropy (N,)` or None, `control_probs (N, K)` or None,
        all float32.
    """
    return _impl("token_logprobs", logits.device)(
        logits,
        labels,
        temperature=temperature,
        with_entropy=with_entropy,
        control_ids=control_ids,
        ignore_index=ignore_index,
    )


def fused_linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    control_ids: Tensor | Sequence[int] | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> TokenStats:
    """`token_logprobs(hidden @ weight.T, labels, ...)` holding one row chunk of logits at a time.

    Args:
        hidden: `(N, H)` final hidden states.
        weight: `(V, H)` LM-head weight; gradients flow to both `hidden` and `weight`.
        labels: `(N,)` int64.
        chunk_size: rows per chunk (None: the backend's default).

    Returns:
        TokenStats as in `token_logprobs`.
    """
    return _impl("fused_linear_token_logprobs", hidden.device)(
        hidden,
        weight,
        labels,
        temperature=temperature,
        with_entropy=with_entropy,
        control_ids=control_ids,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level clipped policy loss with KL penalty and entropy bonus.

    Per token, r = exp(logp − old), pg = max(−A·r, −A·clip(r, 1−clip_low, 1+clip_high)) (and
    pg = min(pg, −A·dual_clip) where A < 0), ℓ = pg + kl_coef·KL − entropy_coef·entropy, reduced
    by `loss_agg` (see `fastrl.ops.ref_policy_loss.aggregate_loss`). Rows without a loss token are left
    out of every row count, `seq-mean-token-sum-norm`'s B included: Σℓm / (B · norm_len) with B
    the rows that have a loss token, as verl does (TRL's `dr_grpo` divides by every row).

    Args:
        logprobs, old_logprobs, mask: `(B, T)`; ref_logprobs, entropy: `(B, T)` or None.
        advantages: `(B,)` or `(B, T)`.

    Returns:
        The scalar loss and a dict of detached 0-dim float tensors (kept on the device so that
        nothing synchronises): `loss`, `pg_loss`, `clip_frac`, `clip_frac_low`, `clip_frac_high`,
        `kl`, `ratio_mean`, plus `dual_clip_frac` and `entropy` when those apply.
    """
    return _impl("policy_loss", logprobs.device)(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        loss_agg=loss_agg,
        norm_len=norm_len,
    )


def pack(x: Tensor, mask: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Keep the positions of `x (B, T, ...)` where `mask (B, T)` is set, in row-major order.

    Returns packed `(total, ...)` and int32 `cu_seqlens (B+1,)`. Pass `total` (the number of set
    positions, usually known on the host) to avoid reading it back from the device.
    """
    return _impl("pack", x.device)(x, mask, total)


def unpack(packed: Tensor, cu_seqlens: Tensor, mask: Tensor) -> Tensor:
    """Inverse of `pack`: `(total, ...)` to `(B, T, ...)`, zeros where `mask` is unset."""
    return _impl("unpack", packed.device)(packed, cu_seqlens, mask)


def position_ids(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """Int64 position of each packed token within its sequence `(total,)`, restarting at 0."""
    return _impl("position_ids", cu_seqlens.device)(cu_seqlens, total)


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence sum of packed `values (total, ...)`: `(B, ...)`."""
    return _impl("segment_sum", values.device)(values, cu_seqlens)

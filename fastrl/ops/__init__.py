"""Public kernel API of fastrl: token statistics, the fused LM head, the policy loss and packing.

Every function here checks its inputs (the errors name the op's arguments and their shapes), then
calls one backend, in this order of preference:
    cuda    the C++/CUDA extension `fastrl._C` through `fastrl.ops._ext` (its CPU kernels serve
            CPU tensors too)
    triton  the Triton kernels `fastrl.triton_kernels` (CUDA tensors, or `TRITON_INTERPRET=1`)
    torch   the torch references `fastrl.ops.ref_*` gathered in `fastrl.ops.reference` (always
            available)
A backend module provides an op by exposing a callable with the op's public name. It is called
with checked inputs, positionally in the order of the public signature (control ids already a
`(K,)` int64 tensor on the device), and returns plain tensors or tuples, which the functions here
wrap (`TokenStats`); the kernels do not check again. Ops a backend does not provide fall back to
the torch reference, and so does `policy_loss` when a gradient is needed that the fused kernel
does not compute (with respect to `old_logprobs`, `advantages` or `ref_logprobs`).

`FASTRL_BACKEND=torch|triton|cuda` forces one backend (`auto`, the default, takes the first that
provides the op and can run: Triton only for CUDA tensors, so CPU tensors run Triton only with
`FASTRL_BACKEND=triton` and `TRITON_INTERPRET=1`); forcing one that cannot run raises a
RuntimeError. The choice for each op is logged once on the `fastrl.ops` logger.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from fastrl.ops import reference
from fastrl.ops.ref_policy_loss import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    check_choice,
    check_dual_clip,
    check_kl_reference,
    check_loss_shapes,
)

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
_BACKEND_MODULES = {"cuda": "fastrl.ops._ext", "triton": "fastrl.triton_kernels"}


@dataclass
class TokenStats:
    """Per-token statistics of a softmax over the vocabulary.

    Attributes:
        logprobs: `(N,)` float32 log-probability of each label (0 on ignored rows).
        entropy: `(N,)` float32 entropy of each row (0 on ignored rows), or None.
        control_probs: `(N, K)` float32 probabilities of the control token ids, without gradient,
            on every row (ignored rows included, since probe positions need not carry a label),
            or None.
    """

    logprobs: Tensor
    entropy: Tensor | None
    control_probs: Tensor | None


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


def _impl(op: str, device: torch.device, backend: str | None = None) -> Callable:
    module, _ = _backend_module(backend or select_backend(op, device))
    return getattr(module, op)


# --------------------------------------------------------------------------------------------
# Input checks (once, here; the backends trust their inputs)
# --------------------------------------------------------------------------------------------


def _check_token_inputs(rows: int, labels: Tensor, temperature: float) -> None:
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _control_index(
    control_ids: Tensor | Sequence[int] | None, vocab: int, device: torch.device
) -> Tensor | None:
    """`(K,)` contiguous int64 ids on `device`, range-checked while they are on the host (ids
    already on an accelerator are not read back: no synchronisation)."""
    if control_ids is None:
        return None
    if not (isinstance(control_ids, Tensor) and control_ids.device.type != "cpu"):
        ids = torch.as_tensor(control_ids, dtype=torch.long).reshape(-1)  # [K]
        if ids.numel() > 0:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise IndexError(f"control_ids must lie in [0, {vocab}), got [{low}, {high}]")
    return torch.as_tensor(control_ids, dtype=torch.long, device=device).reshape(-1).contiguous()


def _check_policy_loss_inputs(
    tensors: tuple[Tensor | None, ...],
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    loss_agg: str,
) -> None:
    """The torch reference's checks, in its order and with its messages; then one device."""
    logprobs, _, advantages, mask, ref_logprobs, _ = tensors
    check_loss_shapes(logprobs, advantages, mask)
    check_dual_clip(dual_clip)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_kl_reference(kl_coef, ref_logprobs)
    check_choice("loss_agg", loss_agg, LOSS_AGGREGATIONS)
    if any(t is not None and t.device != logprobs.device for t in tensors):
        raise RuntimeError("policy_loss: all tensors must be on the same device")


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
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, V), got {tuple(logits.shape)}")
    _check_token_inputs(logits.shape[0], labels, temperature)
    ids = _control_index(control_ids, logits.shape[1], logits.device)
    logprobs, entropy, control = _impl("token_logprobs", logits.device)(
        logits, labels, float(temperature), with_entropy, ids, ignore_index
    )
    return TokenStats(logprobs, entropy, control)


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
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) do not match: {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}"
        )
    _check_token_inputs(hidden.shape[0], labels, temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = _control_index(control_ids, weight.shape[0], hidden.device)
    logprobs, entropy, control = _impl("fused_linear_token_logprobs", hidden.device)(
        hidden, weight, labels, float(temperature), with_entropy, ids, ignore_index, chunk_size
    )
    return TokenStats(logprobs, entropy, control)


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
    by `loss_agg` (see `fastrl.ops.ref_policy_loss.aggregate_loss`). Rows without a loss token are
    left out of every row count, `seq-mean-token-sum-norm`'s B included: Σℓm / (B · norm_len) with
    B the rows that have a loss token, as verl does (TRL's `dr_grpo` divides by every row).

    Args:
        logprobs, old_logprobs, mask: `(B, T)`; ref_logprobs, entropy: `(B, T)` or None.
        advantages: `(B,)` or `(B, T)`.

    Returns:
        The scalar loss and a dict of detached 0-dim float tensors (kept on the device so that
        nothing synchronises): `loss`, `pg_loss`, `clip_frac`, `clip_frac_low`, `clip_frac_high`,
        `kl`, `ratio_mean`, plus `dual_clip_frac` and `entropy` when those apply.
    """
    tensors = (logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy)
    _check_policy_loss_inputs(tensors, dual_clip, kl_coef, kl_estimator, loss_agg)
    backend = select_backend("policy_loss", logprobs.device)
    if (
        backend != "torch"
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (old_logprobs, advantages, ref_logprobs))
    ):
        # The fused kernel differentiates `logprobs` and `entropy` only; the reference gives the
        # gradients with respect to the other inputs exactly.
        backend = "torch"
    return _impl("policy_loss", logprobs.device, backend)(
        *tensors,
        clip_low,
        clip_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        entropy_coef,
        loss_agg,
        norm_len,
    )


def pack(x: Tensor, mask: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Keep the positions of `x (B, T, ...)` where `mask (B, T)` is set, in row-major order.

    Returns packed `(total, ...)` and int32 `cu_seqlens (B+1,)`. Pass `total` (the number of set
    positions, usually known on the host) to avoid reading it back from the device.
    """
    if x.shape[:2] != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} does not start with mask's shape {tuple(mask.shape)}")
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

"""Fused Triton forward + backward of the clipped PPO/GRPO policy loss (`fastrl.ops.policy_loss`).

The Triton backend of `fastrl.ops.policy_loss`, which checks the inputs first: same arguments,
outputs, statistics and autograd behaviour as the torch reference `fastrl/ops/ref_policy_loss.py`.

Design:
    `_policy_loss_rows_kernel`, grid `(B,)`: one program per row loops over T in blocks of
        `BLOCK_T`. Per token it computes the ratio, the clipped (and dual-clipped) surrogate, the
        KL estimate, the token loss and d loss_t / d logp_t; per row it reduces the token count and
        the masked sums of the loss, pg, KL, ratio, clip flags and entropy into a `(B, 9)` partials
        buffer. In the same pass it writes the gradient of the loss w.r.t. `logprobs` (and
        `entropy` when that is differentiated), already divided by the row normaliser (the row
        token count for `seq-mean-token-mean`, `norm_len` for `seq-mean-token-sum-norm`); a
        `seq-mean-token-mean` row first counts its mask in a cheap pre-loop.
    `_policy_loss_finalize_kernel`, grid `(1,)`: reduces the partials over the rows into the loss,
        the statistics and `inv_norm`, the global normaliser (1 / tokens or 1 / non-empty rows).
    Backward: grad_logprobs = saved_grad · (grad_output · inv_norm); nothing is recomputed.

Every reduction runs in a fixed order inside one program (no atomics), so results are
deterministic. Arithmetic is fp32, or fp64 when an input is fp64; inputs may be any float dtype
with any strides (advantages `(B,)` use a zero stride), masks bool / int / float.

Differences from the reference, by design: bf16/fp16 inputs are computed in fp32 rather than in
their own dtype (more accurate), `k3` uses a series for small |d| (no cancellation), and the
result is not differentiable twice. The kernel differentiates `logprobs` and `entropy` only: when
`old_logprobs`, `advantages` or `ref_logprobs` require a gradient, `fastrl.ops.policy_loss` calls
the torch reference instead.
"""

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["policy_loss"]

# The `KL_EST` code the rows kernel is compiled with, per `kl_estimator`.
KL_ESTIMATOR_CODES = {"k1": 1, "k2": 2, "k3": 3}

# Columns of the per-row partials `(B, N_PARTIALS)`: valid tokens, row value of the loss and of
# pg (row sums divided by the row normaliser), and the masked row sums of KL, ratio, clip-low,
# clip-high and dual-clip flags, entropy.
N_PARTIALS = 9
# Entries of the statistics buffer written by the finalize kernel.
_S_PG, _S_KL, _S_RATIO, _S_CLIP_LOW, _S_CLIP_HIGH, _S_CLIP, _S_DUAL, _S_ENTROPY = range(8)
N_STATS = 8

# Tokens per loop step of a row program, and per thread (about 100 registers on sm_90 with every
# feature on, no spills).
MAX_BLOCK_T = {torch.float32: 1024, torch.float64: 512}
TOKENS_PER_THREAD = {torch.float32: 4, torch.float64: 2}
MAX_BLOCK_B = 1024


@triton.jit
def _k3_expm1(d, N_TERMS: tl.constexpr):
    """k3 = exp(d) − 1 − d and expm1(d) = k3 + d, accurate for small |d| too.

    For |d| ≤ 1/2: k3 = d²/2 · (1 + d/3 (1 + d/4 (1 + …))), `N_TERMS` nested factors (7 give
    fp32 accuracy, 13 fp64); otherwise exp(d) − 1 − d, whose cancellation is at most ~5×.
    """
    p = 1.0 + d / (N_TERMS + 2)
    for i in tl.static_range(N_TERMS - 1):
        p = 1.0 + d * p / (N_TERMS + 1 - i)
    k3_small = 0.5 * d * d * p
    em1_big = tl.exp(d) - 1.0
    small = tl.abs(d) <= 0.5
    k3 = tl.where(small, k3_small, em1_big - d)
    em1 = tl.where(small, d + k3_small, em1_big)
    return k3, em1


@triton.jit
def _policy_loss_rows_kernel(
    lp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    ref_ptr,
    ent_ptr,
    grad_lp_ptr,
    grad_ent_ptr,
    partial_ptr,
    T,
    s_lp_b,
    s_lp_t,
    s_old_b,
    s_old_t,
    s_adv_b,
    s_adv_t,
    s_m_b,
    s_m_t,
    s_ref_b,
    s_ref_t,
    s_ent_b,
    s_ent_t,
    clip_lo: tl.float64,
    clip_hi: tl.float64,
    dual_clip: tl.float64,
    kl_coef: tl.float64,
    ent_coef: tl.float64,
    norm_len: tl.float64,
    ACC: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_REF: tl.constexpr,
    USE_KL: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_ENT: tl.constexpr,
    USE_ENT: tl.constexpr,
    ROW_MEAN: tl.constexpr,
    ROW_NORM: tl.constexpr,
    WRITE_GRAD_LP: tl.constexpr,
    WRITE_GRAD_ENT: tl.constexpr,
    N_TERMS: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One row: token losses, masked row sums into `partial_ptr[row]`, row-scaled gradients."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T).to(tl.int64)
    # Scalars in the accumulation dtype (tl.full keeps fp64 exact, also under the interpreter).
    lo = tl.full([], clip_lo, ACC)
    hi = tl.full([], clip_hi, ACC)
    dual = tl.full([], dual_clip, ACC)
    c_kl = tl.full([], kl_coef, ACC)
    c_ent = tl.full([], ent_coef, ACC)

    # Row normaliser of the aggregation: the valid-token count or norm_len (1 otherwise).
    if ROW_MEAN:
        seen = tl.zeros([BLOCK_T], dtype=tl.int32)
        for start in range(0, T, BLOCK_T):
            t = start + offs
            inb = t < T
            m = tl.load(mask_ptr + row * s_m_b + t * s_m_t, mask=inb, other=0) != 0
            seen += (m & inb).to(tl.int32)
        row_den = tl.maximum(tl.sum(seen, axis=0), 1).to(ACC)
    elif ROW_NORM:
        row_den = tl.full([], norm_len, ACC)
    else:
        row_den = tl.full([], 1.0, ACC)

    n_acc = tl.zeros([BLOCK_T], dtype=tl.int32)
    loss_acc = tl.zeros([BLOCK_T], dtype=ACC)
    pg_acc = tl.zeros([BLOCK_T], dtype=ACC)
    kl_acc = tl.zeros([BLOCK_T], dtype=ACC)
    ratio_acc = tl.zeros([BLOCK_T], dtype=ACC)
    low_acc = tl.zeros([BLOCK_T], dtype=ACC)
    high_acc = tl.zeros([BLOCK_T], dtype=ACC)
    dual_acc = tl.zeros([BLOCK_T], dtype=ACC)
    ent_acc = tl.zeros([BLOCK_T], dtype=ACC)
    for start in range(0, T, BLOCK_T):
        t = start + offs
        inb = t < T
        m = (tl.load(mask_ptr + row * s_m_b + t * s_m_t, mask=inb, other=0) != 0) & inb
        lp = tl.load(lp_ptr + row * s_lp_b + t * s_lp_t, mask=inb, other=0.0).to(ACC)
        old = tl.load(old_ptr + row * s_old_b + t * s_old_t, mask=inb, other=0.0).to(ACC)
        # The reference casts the advantages to the dtype of logprobs first.
        adv = tl.load(adv_ptr + row * s_adv_b + t * s_adv_t, mask=inb, other=0.0)
        a = adv.to(lp_ptr.dtype.element_ty).to(ACC)

        # Clipped surrogate pg = max(u, c) and d pg / d r, with torch's rule that max/min split
        # the gradient evenly between equal arguments (u == c inside the clip range).
        ratio = tl.exp(tl.where(m, lp - old, 0.0))
        neg_a = -a
        u = neg_a * ratio
        clamped = tl.minimum(
            tl.maximum(ratio, lo, propagate_nan=tl.PropagateNan.ALL),
            hi,
            propagate_nan=tl.PropagateNan.ALL,
        )
        c = neg_a * clamped
        pg = tl.maximum(u, c, propagate_nan=tl.PropagateNan.ALL)
        in_range = (ratio >= lo) & (ratio <= hi)
        dpg = tl.where(u > c, neg_a, tl.where(u == c, tl.where(in_range, neg_a, 0.5 * neg_a), 0.0))
        low_acc += (m & (a < 0) & (ratio < lo)).to(ACC)
        high_acc += (m & (a > 0) & (ratio > hi)).to(ACC)
        if HAS_DUAL:
            bound = neg_a * dual
            neg = a < 0
            dual_acc += (m & neg & (pg > bound)).to(ACC)
            dpg = tl.where(
                neg, tl.where(pg < bound, dpg, tl.where(pg == bound, 0.5 * dpg, 0.0)), dpg
            )
            pg = tl.where(neg, tl.minimum(pg, bound, propagate_nan=tl.PropagateNan.ALL), pg)
        token_loss = pg
        grad = dpg * ratio  # d loss_t / d logp_t; d r / d logp = r

        if HAS_REF:
            ref = tl.load(ref_ptr + row * s_ref_b + t * s_ref_t, mask=inb, other=0.0).to(ACC)
            d = tl.where(m, ref - lp, 0.0)
            if KL_EST == 1:
                kl = -d
                dkl = tl.full([BLOCK_T], 1.0, ACC)
            elif KL_EST == 2:
                kl = 0.5 * d * d
                dkl = -d
            else:
                kl, em1 = _k3_expm1(d, N_TERMS)
                dkl = -em1
            kl_acc += tl.where(m, kl, 0.0)
            if USE_KL:
                token_loss = token_loss + c_kl * kl
                grad = grad + c_kl * dkl
        if HAS_ENT:
            ent = tl.load(ent_ptr + row * s_ent_b + t * s_ent_t, mask=inb, other=0.0).to(ACC)
            ent_acc += tl.where(m, ent, 0.0)
            if USE_ENT:
                token_loss = token_loss - c_ent * ent

        n_acc += m.to(tl.int32)
        loss_acc += tl.where(m, token_loss, 0.0)
        pg_acc += tl.where(m, pg, 0.0)
        ratio_acc += tl.where(m, ratio, 0.0)
        if WRITE_GRAD_LP:
            tl.store(grad_lp_ptr + row * T + t, tl.where(m, grad / row_den, 0.0), mask=inb)
        if WRITE_GRAD_ENT:
            tl.store(grad_ent_ptr + row * T + t, tl.where(m, -c_ent / row_den, 0.0), mask=inb)

    out = partial_ptr + row * NP
    tl.store(out + 0, tl.sum(n_acc, axis=0).to(ACC))
    tl.store(out + 1, tl.sum(loss_acc, axis=0) / row_den)
    tl.store(out + 2, tl.sum(pg_acc, axis=0) / row_den)
    tl.store(out + 3, tl.sum(kl_acc, axis=0))
    tl.store(out + 4, tl.sum(ratio_acc, axis=0))
    tl.store(out + 5, tl.sum(low_acc, axis=0))
    tl.store(out + 6, tl.sum(high_acc, axis=0))
    tl.store(out + 7, tl.sum(dual_acc, axis=0))
    tl.store(out + 8, tl.sum(ent_acc, axis=0))


@triton.jit
def _policy_loss_finalize_kernel(
    partial_ptr,
    loss_ptr,
    stats_ptr,
    inv_norm_ptr,
    B,
    ACC: tl.constexpr,
    TOKEN_MEAN: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Reduce the `(B, NP)` row partials to the loss, the statistics and 1 / normaliser."""
    offs = tl.arange(0, BLOCK_B)
    tokens = tl.zeros([BLOCK_B], dtype=tl.int64)
    rows = tl.zeros([BLOCK_B], dtype=tl.int64)
    loss = tl.zeros([BLOCK_B], dtype=ACC)
    pg = tl.zeros([BLOCK_B], dtype=ACC)
    kl = tl.zeros([BLOCK_B], dtype=ACC)
    ratio = tl.zeros([BLOCK_B], dtype=ACC)
    low = tl.zeros([BLOCK_B], dtype=ACC)
    high = tl.zeros([BLOCK_B], dtype=ACC)
    dual = tl.zeros([BLOCK_B], dtype=ACC)
    ent = tl.zeros([BLOCK_B], dtype=ACC)
    for start in range(0, B, BLOCK_B):
        b = start + offs
        inb = b < B
        base = partial_ptr + b.to(tl.int64) * NP
        count = tl.load(base + 0, mask=inb, other=0.0).to(tl.int64)
        tokens += count
        rows += (count > 0).to(tl.int64)
        loss += tl.load(base + 1, mask=inb, other=0.0)
        pg += tl.load(base + 2, mask=inb, other=0.0)
        kl += tl.load(base + 3, mask=inb, other=0.0)
        ratio += tl.load(base + 4, mask=inb, other=0.0)
        low += tl.load(base + 5, mask=inb, other=0.0)
        high += tl.load(base + 6, mask=inb, other=0.0)
        dual += tl.load(base + 7, mask=inb, other=0.0)
        ent += tl.load(base + 8, mask=inb, other=0.0)
    token_den = tl.maximum(tl.sum(tokens, axis=0), 1).to(ACC)
    if TOKEN_MEAN:
        den = token_den
    else:
        den = tl.maximum(tl.sum(rows, axis=0), 1).to(ACC)
    tl.store(loss_ptr, tl.sum(loss, axis=0) / den)
    tl.store(inv_norm_ptr, 1.0 / den)
    low_frac = tl.sum(low, axis=0) / token_den
    high_frac = tl.sum(high, axis=0) / token_den
    tl.store(stats_ptr + 0, tl.sum(pg, axis=0) / den)
    tl.store(stats_ptr + 1, tl.sum(kl, axis=0) / token_den)
    tl.store(stats_ptr + 2, tl.sum(ratio, axis=0) / token_den)
    tl.store(stats_ptr + 3, low_frac)
    tl.store(stats_ptr + 4, high_frac)
    tl.store(stats_ptr + 5, low_frac + high_frac)
    tl.store(stats_ptr + 6, tl.sum(dual, axis=0) / token_den)
    tl.store(stats_ptr + 7, tl.sum(ent, axis=0) / token_den)


class _Config(NamedTuple):
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    loss_agg: str
    norm_len: int | None
    loss_dtype: torch.dtype
    acc_dtype: torch.dtype
    grad_logprobs: bool
    grad_entropy: bool


class LaunchConfig(NamedTuple):
    block_t: int  # tokens per loop step of a row program
    rows_warps: int
    block_b: int  # rows per loop step of the finalize program
    finalize_warps: int


def launch_config(n_rows: int, n_cols: int, acc_dtype: torch.dtype) -> LaunchConfig:
    """Block sizes and warps of both kernels for `(n_rows, n_cols)` inputs accumulated in
    `acc_dtype` (also read by `bench/cuda_check.py`, which compiles what this picks)."""
    block_t = max(16, min(MAX_BLOCK_T[acc_dtype], triton.next_power_of_2(max(n_cols, 1))))
    warps = max(1, min(8, block_t // (32 * TOKENS_PER_THREAD[acc_dtype])))
    block_b = max(16, min(MAX_BLOCK_B, triton.next_power_of_2(max(n_rows, 1))))
    return LaunchConfig(block_t, warps, block_b, 4)


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(
    logprobs: Tensor,
    entropy: Tensor | None,
    old: Tensor,
    adv: Tensor,
    mask: Tensor,
    ref: Tensor | None,
    cfg: _Config,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Run both kernels: loss, stats `(N_STATS,)`, 0-dim inv_norm, row-scaled gradients or None."""
    n_rows, n_cols = logprobs.shape
    device = logprobs.device
    acc = cfg.acc_dtype
    tl_acc = tl.float64 if acc == torch.float64 else tl.float32
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    partials = torch.empty(n_rows, N_PARTIALS, dtype=acc, device=device)
    grad_lp = torch.empty(n_rows, n_cols, dtype=acc, device=device) if cfg.grad_logprobs else None
    grad_ent = torch.empty(n_rows, n_cols, dtype=acc, device=device) if cfg.grad_entropy else None
    loss = torch.empty((), dtype=cfg.loss_dtype, device=device)
    stats = torch.empty(N_STATS, dtype=acc, device=device)
    inv_norm = torch.empty((), dtype=acc, device=device)
    launch = launch_config(n_rows, n_cols, acc)
    has_ref, has_ent = ref is not None, entropy is not None
    agg = cfg.loss_agg
    with _device_guard(device):
        if n_rows > 0:
            _policy_loss_rows_kernel[(n_rows,)](
                logprobs,
                old,
                adv,
                mask,
                ref if has_ref else logprobs,
                entropy if has_ent else logprobs,
                grad_lp if grad_lp is not None else partials,
                grad_ent if grad_ent is not None else partials,
                partials,
                n_cols,
                *logprobs.stride(),
                *old.stride(),
                *adv.stride(),
                *mask.stride(),
                *(ref.stride() if has_ref else (0, 0)),
                *(entropy.stride() if has_ent else (0, 0)),
                1.0 - cfg.clip_low,
                1.0 + cfg.clip_high,
                float(cfg.dual_clip) if cfg.dual_clip is not None else 0.0,
                float(cfg.kl_coef),
                float(cfg.entropy_coef),
                float(cfg.norm_len if cfg.norm_len is not None else n_cols),
                ACC=tl_acc,
                HAS_DUAL=cfg.dual_clip is not None,
                HAS_REF=has_ref,
                USE_KL=has_ref and cfg.kl_coef != 0.0,
                KL_EST=KL_ESTIMATOR_CODES[cfg.kl_estimator],
                HAS_ENT=has_ent,
                USE_ENT=has_ent and cfg.entropy_coef != 0.0,
                ROW_MEAN=agg == "seq-mean-token-mean",
                ROW_NORM=agg == "seq-mean-token-sum-norm",
                WRITE_GRAD_LP=grad_lp is not None,
                WRITE_GRAD_ENT=grad_ent is not None,
                N_TERMS=13 if acc == torch.float64 else 7,
                NP=N_PARTIALS,
                BLOCK_T=launch.block_t,
                num_warps=launch.rows_warps,
            )
        _policy_loss_finalize_kernel[(1,)](
            partials,
            loss,
            stats,
            inv_norm,
            n_rows,
            ACC=tl_acc,
            TOKEN_MEAN=agg == "token-mean",
            NP=N_PARTIALS,
            BLOCK_B=launch.block_b,
            num_warps=launch.finalize_warps,
        )
    return loss, stats, inv_norm, grad_lp, grad_ent


class _PolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logprobs: Tensor,
        entropy: Tensor | None,
        old: Tensor,
        adv: Tensor,
        mask: Tensor,
        ref: Tensor | None,
        cfg: _Config,
    ) -> tuple[Tensor, Tensor]:
        shape = logprobs.shape
        ent = torch.broadcast_to(entropy, shape) if entropy is not None else None
        loss, stats, inv_norm, grad_lp, grad_ent = _launch(logprobs, ent, old, adv, mask, ref, cfg)
        ctx.save_for_backward(grad_lp, grad_ent, inv_norm)
        ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor | None):
        grad_lp, grad_ent, inv_norm = ctx.saved_tensors
        scale = grad_loss.to(inv_norm.dtype) * inv_norm  # 0-dim
        lp_dtype, ent_dtype = ctx.dtypes
        g_lp = (grad_lp * scale).to(lp_dtype) if grad_lp is not None else None
        g_ent = (grad_ent * scale).to(ent_dtype) if grad_ent is not None else None
        return g_lp, g_ent, None, None, None, None, None


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
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
    """Fused Triton version of the torch reference `policy_loss` (same arguments and returns).

    Args:
        logprobs, old_logprobs, mask: `(B, T)`; ref_logprobs, entropy: `(B, T)` or None, all on
            one device (CUDA, or CPU under `TRITON_INTERPRET=1`).
        advantages: `(B,)` or `(B, T)`.
        dual_clip: None or > 1; kl_estimator: a key of `KL_ESTIMATOR_CODES`; loss_agg: one of
            the reference's `LOSS_AGGREGATIONS`; kl_coef != 0 only with `ref_logprobs`.

    Returns:
        The scalar loss (differentiable w.r.t. `logprobs` and, with `entropy_coef != 0`,
        `entropy`) and the reference's statistics as detached 0-dim tensors of its dtypes.
    """
    grad_mode = torch.is_grad_enabled()
    shape = logprobs.shape
    old = torch.broadcast_to(old_logprobs, shape)
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).expand(shape)
    ref = torch.broadcast_to(ref_logprobs, shape) if ref_logprobs is not None else None
    use_kl = ref is not None and kl_coef != 0.0
    use_ent = entropy is not None and entropy_coef != 0.0

    # The reference's dtypes: ratio/pg/clip fractions, KL, token loss.
    ratio_dtype = torch.promote_types(logprobs.dtype, old.dtype)
    kl_dtype = torch.promote_types(ref.dtype, logprobs.dtype) if ref is not None else logprobs.dtype
    loss_dtype = ratio_dtype
    if use_kl:
        loss_dtype = torch.promote_types(loss_dtype, kl_dtype)
    if use_ent:
        loss_dtype = torch.promote_types(loss_dtype, entropy.dtype)
    dtypes = {logprobs.dtype, ratio_dtype, kl_dtype}
    if entropy is not None:
        dtypes.add(entropy.dtype)
    acc_dtype = torch.float64 if torch.float64 in dtypes else torch.float32

    cfg = _Config(
        clip_low=float(clip_low),
        clip_high=float(clip_high),
        dual_clip=None if dual_clip is None else float(dual_clip),
        kl_coef=float(kl_coef),
        kl_estimator=kl_estimator,
        entropy_coef=float(entropy_coef),
        loss_agg=loss_agg,
        norm_len=norm_len,
        loss_dtype=loss_dtype,
        acc_dtype=acc_dtype,
        grad_logprobs=grad_mode and logprobs.requires_grad,
        grad_entropy=grad_mode and use_ent and entropy.requires_grad,
    )
    # Entropy enters the graph only when it is part of the loss, as in the reference.
    ent_input = entropy if use_ent else (entropy.detach() if entropy is not None else None)
    loss, stats = _PolicyLossFunction.apply(logprobs, ent_input, old, adv, mask, ref, cfg)

    by_dtype: dict[torch.dtype, Tensor] = {}

    def stat(index: int, dtype: torch.dtype) -> Tensor:
        if dtype not in by_dtype:
            by_dtype[dtype] = stats.to(dtype)
        return by_dtype[dtype][index]

    out = {
        "loss": loss.detach(),
        "pg_loss": stat(_S_PG, ratio_dtype),
        "kl": stat(_S_KL, kl_dtype),
        "ratio_mean": stat(_S_RATIO, ratio_dtype),
        "clip_frac_low": stat(_S_CLIP_LOW, ratio_dtype),
        "clip_frac_high": stat(_S_CLIP_HIGH, ratio_dtype),
        "clip_frac": stat(_S_CLIP, ratio_dtype),
    }
    if dual_clip is not None:
        out["dual_clip_frac"] = stat(_S_DUAL, ratio_dtype)
    if entropy is not None:
        out["entropy"] = stat(_S_ENTROPY, entropy.dtype)
    return loss, out

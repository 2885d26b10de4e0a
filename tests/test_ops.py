"""fastrl.ops against float64 references: token statistics, fused LM head, policy loss, packing."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastrl import ops
from fastrl.ops import reference

IGNORE = -100


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTRL_BACKEND", "torch")


# --------------------------------------------------------------------------------------------
# Token statistics
# --------------------------------------------------------------------------------------------


def naive_token_stats(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Float64 log_softmax reference: logprobs (N,), entropy (N,), probs (N, V)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)  # [N, V]
    valid = labels != IGNORE  # [N]
    label_logp = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)  # [N]
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [N]
    return (
        torch.where(valid, label_logp, 0.0),
        torch.where(valid, entropy, 0.0),
        logp.exp(),
    )


def make_labels(n: int, vocab: int, generator: torch.Generator, ignore_every: int = 4):
    labels = torch.randint(0, vocab, (n,), generator=generator)  # [N]
    labels[1::ignore_every] = IGNORE
    return labels


# (dtype, atol, rtol) of forward statistics and of the logits gradient. Outputs are fp32 whatever
# the input dtype, and the reference is computed from the same (upcast) input values, so only
# the bf16 gradient, which is rounded to bf16, needs a looser tolerance.
DTYPES = [
    (torch.float32, 2e-5, 1e-5, 1e-6, 1e-4),
    (torch.bfloat16, 2e-5, 1e-5, 1e-3, 1e-2),
]


@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (17, 1000), (64, 257)])
@pytest.mark.parametrize(("dtype", "atol", "rtol", "grad_atol", "grad_rtol"), DTYPES)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_token_logprobs_matches_float64(
    monkeypatch, shape, dtype, atol, rtol, grad_atol, grad_rtol, temperature
):
    n, vocab = shape
    # about three rows per chunk, so chunk boundaries are crossed whenever N > 3
    monkeypatch.setattr(reference, "CHUNK_BYTES", 3 * vocab * 4)
    gen = torch.Generator().manual_seed(n * vocab)
    logits = (torch.randn(n, vocab, generator=gen) * 4).to(dtype).requires_grad_()  # [N, V]
    labels = make_labels(n, vocab, gen)  # [N]
    control_ids = [0, vocab // 2, vocab - 1]

    stats = ops.token_logprobs(
        logits, labels, temperature=temperature, control_ids=control_ids, ignore_index=IGNORE
    )

    exact = logits.detach().double().requires_grad_()  # [N, V]
    ref_logp, ref_ent, ref_probs = naive_token_stats(exact, labels, temperature)
    assert stats.logprobs.dtype == stats.entropy.dtype == torch.float32
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(stats.entropy.double(), ref_ent, atol=atol, rtol=rtol)
    torch.testing.assert_close(
        stats.control_probs.double(), ref_probs[:, control_ids], atol=1e-6, rtol=1e-5
    )
    assert not stats.control_probs.requires_grad

    w_logp = torch.randn(n, generator=gen, dtype=torch.float64)  # [N]
    w_ent = torch.randn(n, generator=gen, dtype=torch.float64)  # [N]
    ((stats.logprobs * w_logp.float()).sum() + (stats.entropy * w_ent.float()).sum()).backward()
    ((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum()).backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=grad_atol, rtol=grad_rtol)
    ignored = labels == IGNORE  # [N]
    assert torch.all(logits.grad[ignored] == 0)


def test_token_logprobs_all_rows_ignored():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 11, generator=gen).requires_grad_()  # [N, V]
    labels = torch.full((6,), IGNORE)  # [N]
    stats = ops.token_logprobs(logits, labels)
    assert torch.all(stats.logprobs == 0) and torch.all(stats.entropy == 0)
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    assert torch.all(logits.grad == 0)


def test_token_logprobs_without_entropy():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 31, generator=gen).requires_grad_()  # [N, V]
    labels = make_labels(9, 31, gen)  # [N]
    stats = ops.token_logprobs(logits, labels, with_entropy=False, temperature=1.3)
    assert stats.entropy is None and stats.control_probs is None
    exact = logits.detach().double().requires_grad_()
    ref_logp, _, _ = naive_token_stats(exact, labels, 1.3)
    stats.logprobs.sum().backward()
    ref_logp.sum().backward()
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("scale", [50.0, 1e3, 1e4])
def test_token_logprobs_large_logits(scale):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(12, 129, generator=gen) * scale).requires_grad_()  # [N, V]
    labels = make_labels(12, 129, gen)  # [N]
    stats = ops.token_logprobs(logits, labels, temperature=0.7)
    exact = logits.detach().double().requires_grad_()
    ref_logp, ref_ent, _ = naive_token_stats(exact, labels, 0.7)
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    (ref_logp.sum() + ref_ent.sum()).backward()
    # fp32 logits of magnitude `scale` carry an absolute rounding error of about scale * 6e-8
    tol = scale * 1e-6
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=tol, rtol=1e-6)
    torch.testing.assert_close(stats.entropy.double(), ref_ent, atol=tol, rtol=1e-5)
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=tol, rtol=1e-4)


def test_token_logprobs_masked_vocabulary_is_finite():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 17, generator=gen)  # [N, V]
    logits[:, 3:9] = float("-inf")
    logits.requires_grad_()
    labels = torch.tensor([0, 1, 2, 9, 16])  # [N]
    stats = ops.token_logprobs(logits, labels)
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    kept = torch.cat([logits.detach()[:, :3], logits.detach()[:, 9:]], dim=1)  # [N, V - 6]
    ref_logp, ref_ent, _ = naive_token_stats(kept, torch.tensor([0, 1, 2, 3, 10]), 1.0)
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), ref_ent, atol=2e-6, rtol=1e-5)
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[:, 3:9] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_gradient_at_minus_inf_logits_is_zero_for_any_weight(backend, monkeypatch):
    """A loss weighting the entropy by more than 1 (here 2) once gave NaN at -inf logits on the
    torch backend; the gradient there is 0, and elsewhere the float64 one."""
    monkeypatch.setenv("FASTRL_BACKEND", backend)
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [0.3, -0.7, float("-inf")]])  # [N, V]
    labels = torch.tensor([0, 1])  # [N]
    logits.requires_grad_()
    stats = ops.token_logprobs(logits, labels)
    (2.0 * stats.entropy.sum() - 3.0 * stats.logprobs.sum()).backward()
    exact = logits.detach().double().clone()
    kept = torch.isfinite(exact)
    z = torch.where(kept, exact, 0.0).requires_grad_()
    logp = torch.log_softmax(z.masked_fill(~kept, float("-inf")), dim=-1)  # [N, V]
    entropy = -(logp.exp() * torch.where(kept, logp, 0.0)).sum(dim=-1)  # [N]
    (2.0 * entropy.sum() - 3.0 * logp.gather(1, labels[:, None]).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad.double(), torch.where(kept, z.grad, 0.0), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0


def test_token_logprobs_never_allocates_full_fp32_logits(monkeypatch):
    n, vocab = 4096, 8192
    full_fp32_bytes = n * vocab * 4
    monkeypatch.setattr(reference, "CHUNK_BYTES", 8 * 2**20)  # chunks of 256 rows
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.bfloat16).requires_grad_()
    labels = make_labels(n, vocab, gen)  # [N]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as forward:
        stats = ops.token_logprobs(logits, labels, control_ids=[7])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as backward:
        (stats.logprobs.sum() + stats.entropy.sum()).backward()
    # an fp32 copy of the logits would be one allocation of `full_fp32_bytes`; the backward's
    # largest allocation is the bf16 gradient itself
    assert 0 < max(event.cpu_memory_usage for event in forward.events()) < full_fp32_bytes // 4
    assert max(event.cpu_memory_usage for event in backward.events()) <= n * vocab * 2
    rows = slice(0, 600)  # spans three chunks
    exact = logits.detach()[rows].double().requires_grad_()
    ref_logp, ref_ent, ref_probs = naive_token_stats(exact, labels[rows], 1.0)
    (ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(stats.logprobs[rows].double(), ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stats.entropy[rows].double(), ref_ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        stats.control_probs[rows].double(), ref_probs[:, [7]], atol=1e-7, rtol=1e-5
    )
    torch.testing.assert_close(logits.grad[rows].double(), exact.grad, atol=1e-3, rtol=1e-2)


def test_token_logprobs_rejects_bad_inputs():
    with pytest.raises(ValueError, match="labels"):
        ops.token_logprobs(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), temperature=0.0)


# --------------------------------------------------------------------------------------------
# Fused LM head
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [4, None])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_fused_linear_matches_float64(chunk_size, with_entropy):
    n, hidden_size, vocab = 13, 24, 101
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(n, hidden_size, generator=gen).requires_grad_()  # [N, H]
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.5).requires_grad_()  # [V, H]
    labels = make_labels(n, vocab, gen, ignore_every=5)  # [N]
    control_ids = torch.tensor([3, 50])

    stats = ops.fused_linear_token_logprobs(
        hidden,
        weight,
        labels,
        temperature=0.7,
        with_entropy=with_entropy,
        control_ids=control_ids,
        chunk_size=chunk_size,
    )

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref_logp, ref_ent, ref_probs = naive_token_stats(h64 @ w64.T, labels, 0.7)
    g_logp = torch.randn(n, generator=gen)  # [N]
    g_ent = torch.randn(n, generator=gen)  # [N]
    loss = (stats.logprobs * g_logp).sum()
    ref_loss = (ref_logp * g_logp.double()).sum()
    if with_entropy:
        torch.testing.assert_close(stats.entropy.double(), ref_ent, atol=2e-5, rtol=1e-5)
        loss = loss + (stats.entropy * g_ent).sum()
        ref_loss = ref_loss + (ref_ent * g_ent.double()).sum()
    else:
        assert stats.entropy is None
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        stats.control_probs.double(), ref_probs[:, [3, 50]], atol=1e-6, rtol=1e-5
    )
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


def test_fused_linear_bf16_matches_unfused():
    n, hidden_size, vocab = 13, 24, 101
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, hidden_size, generator=gen).bfloat16().requires_grad_()  # [N, H]
    weight = torch.randn(vocab, hidden_size, generator=gen).bfloat16().requires_grad_()  # [V, H]
    labels = make_labels(n, vocab, gen)  # [N]
    fused = ops.fused_linear_token_logprobs(hidden, weight, labels, chunk_size=5)
    (fused.logprobs.sum() + fused.entropy.sum()).backward()

    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    unfused = ops.token_logprobs(h2 @ w2.T, labels)  # same bf16-rounded logits
    (unfused.logprobs.sum() + unfused.entropy.sum()).backward()
    torch.testing.assert_close(fused.logprobs, unfused.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.entropy, unfused.entropy, atol=1e-5, rtol=1e-5)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # the fused weight gradient accumulates in fp32, the unfused one in a bf16 matmul
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(weight.grad.float(), w2.grad.float(), atol=5e-2, rtol=2e-2)


def test_fused_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="hidden"):
        ops.fused_linear_token_logprobs(
            torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="chunk_size"):
        ops.fused_linear_token_logprobs(
            torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), chunk_size=0
        )


# --------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------


def naive_policy_loss(
    logp,
    old,
    adv,
    mask,
    ref,
    ent,
    clip_low,
    clip_high,
    dual_clip,
    kl_coef,
    est,
    ent_coef,
    agg,
    norm_len,
):
    """Element-by-element float64 re-implementation of the policy loss."""
    n_rows, n_cols = logp.shape
    rows = []
    for b in range(n_rows):
        terms = []
        for t in range(n_cols):
            if not mask[b, t]:
                continue
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            r = torch.exp(logp[b, t] - old[b, t])
            pg = torch.maximum(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
            if dual_clip is not None and a < 0:
                pg = torch.minimum(pg, -a * dual_clip)
            d = ref[b, t] - logp[b, t]
            kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[est]
            terms.append(pg + kl_coef * kl - ent_coef * ent[b, t])
        rows.append(terms)
    nonempty = [torch.stack(terms) for terms in rows if terms]
    if agg == "token-mean":
        return torch.cat(nonempty).mean()
    if agg == "seq-mean-token-mean":
        return torch.stack([x.mean() for x in nonempty]).mean()
    if agg == "seq-mean-token-sum":
        return torch.stack([x.sum() for x in nonempty]).mean()
    return torch.stack([x.sum() / (norm_len or n_cols) for x in nonempty]).mean()


def policy_inputs(batch: int, length: int, seed: int, per_token_adv: bool):
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    logp = (-torch.rand(batch, length, **kw) * 3 - 0.05).requires_grad_()  # [B, T]
    old = logp.detach() + torch.randn(batch, length, **kw) * 0.4  # [B, T]
    ref = logp.detach() + torch.randn(batch, length, **kw) * 0.3  # [B, T]
    ent = (torch.rand(batch, length, **kw) * 2 + 0.1).requires_grad_()  # [B, T]
    adv_shape = (batch, length) if per_token_adv else (batch,)
    adv = torch.randn(*adv_shape, **kw)
    mask = torch.rand(batch, length, generator=gen) < 0.7  # [B, T]
    mask[2] = False  # an empty row
    mask[0, 0] = True
    return logp, old, adv, mask, ref, ent


@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_float64(agg, per_token_adv, est, dual_clip):
    logp, old, adv, mask, ref, ent = policy_inputs(5, 9, seed=11, per_token_adv=per_token_adv)
    kw = {
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dual_clip": dual_clip,
        "kl_coef": 0.1,
        "kl_estimator": est,
        "entropy_coef": 0.01,
        "loss_agg": agg,
        "norm_len": 12 if agg == "seq-mean-token-sum-norm" else None,
    }
    loss, stats = ops.policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent, **kw)
    expected = naive_policy_loss(
        logp,
        old,
        adv,
        mask,
        ref,
        ent,
        kw["clip_low"],
        kw["clip_high"],
        dual_clip,
        kw["kl_coef"],
        est,
        kw["entropy_coef"],
        agg,
        kw["norm_len"],
    )
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    got = torch.autograd.grad(loss, (logp, ent))
    want = torch.autograd.grad(expected, (logp, ent))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    for key in (
        "clip_frac",
        "clip_frac_low",
        "clip_frac_high",
        "kl",
        "ratio_mean",
        "pg_loss",
        "entropy",
    ):
        assert stats[key].dim() == 0 and not stats[key].requires_grad
    assert ("dual_clip_frac" in stats) == (dual_clip is not None)


def test_policy_loss_hand_example():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 5.0, 9.0]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.0)
    logp = (old + ratios.log()).requires_grad_()  # [1, T]
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the last token is padding
    loss, stats = ops.policy_loss(logp, old, adv, mask, dual_clip=3.0)
    # pg: −A·clip → −1.2; unclipped −0.5; 1.1; clipped low 0.8; max(5, 0.8) then dual clip 3
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 0.5 + 1.1 + 0.8 + 3.0) / 5).double())
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.2).double())
    torch.testing.assert_close(stats["clip_frac_low"], torch.tensor(0.2).double())
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(0.4).double())
    torch.testing.assert_close(stats["dual_clip_frac"], torch.tensor(0.2).double())
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(8.6 / 5).double())
    torch.testing.assert_close(stats["kl"], torch.tensor(0.0).double())
    (grad,) = torch.autograd.grad(loss, logp)
    # only tokens 1 (unclipped, A = 1) and 2 (unclipped, A = −1) carry gradient: −A·r / 5
    expected = torch.tensor([[0.0, -0.5 / 5, 1.1 / 5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
def test_policy_loss_skips_empty_rows(agg):
    logp, old, adv, mask, ref, ent = policy_inputs(5, 9, seed=12, per_token_adv=False)
    kw = {
        "ref_logprobs": ref,
        "entropy": ent,
        "kl_coef": 0.05,
        "entropy_coef": 0.02,
        "loss_agg": agg,
        "norm_len": 9,
    }
    loss, _ = ops.policy_loss(logp, old, adv, mask, **kw)
    keep = torch.tensor([0, 1, 3, 4])
    kept = {k: (v[keep] if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss_kept, _ = ops.policy_loss(logp[keep], old[keep], adv[keep], mask[keep], **kept)
    torch.testing.assert_close(loss, loss_kept, atol=1e-12, rtol=1e-12)


def test_seq_mean_token_sum_norm_counts_only_rows_with_loss_tokens():
    """B in Σℓm / (B · norm_len) is the rows that have a loss token (verl), not every row."""
    logp = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)  # r = 1: pg = -A
    adv = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # row 1 empty
    loss, _ = ops.policy_loss(logp, logp.detach(), adv, mask, loss_agg="seq-mean-token-sum-norm",
                              norm_len=4)  # fmt: skip
    # (-1·2 - 5·3) / (2 rows · 4); dividing by all 3 rows would give -17/12
    assert loss.item() == pytest.approx(-17 / 8)


@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
def test_policy_loss_all_empty_mask(agg):
    logp, old, adv, _, ref, ent = policy_inputs(3, 4, seed=13, per_token_adv=True)
    old = old.clone()
    old[0, 0] = -1e4  # padding garbage must not leak into the loss or its gradient
    mask = torch.zeros(3, 4, dtype=torch.bool)
    loss, stats = ops.policy_loss(
        logp, old, adv, mask, ref_logprobs=ref, entropy=ent, kl_coef=0.1, loss_agg=agg
    )
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.all(grad == 0)
    assert all(torch.isfinite(v) for v in stats.values())


def test_policy_loss_rejects_bad_options():
    logp, old, adv, mask, ref, _ = policy_inputs(3, 4, seed=14, per_token_adv=False)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        ops.policy_loss(logp, old, adv, mask, loss_agg="sum")
    with pytest.raises(ValueError, match="k3"):
        ops.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        ops.policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        ops.policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages"):
        ops.policy_loss(logp, old, adv[:2], mask)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def random_mask(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=gen) < 0.6  # [B, T]
    mask[1] = False
    mask[-1] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_unpack_round_trip(seed):
    mask = random_mask(6, 11, seed)  # [B, T]
    x = torch.randn(6, 11, 3).requires_grad_()  # [B, T, D]
    packed, cu_seqlens = ops.pack(x, mask)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.shape == (7,)
    torch.testing.assert_close(packed, x[mask])
    lengths = mask.sum(dim=1)
    torch.testing.assert_close(cu_seqlens[1:] - cu_seqlens[:-1], lengths.int())
    packed_static, cu_static = ops.pack(x, mask, total=int(mask.sum()))
    torch.testing.assert_close(packed_static, packed)
    torch.testing.assert_close(cu_static, cu_seqlens)

    restored = ops.unpack(packed, cu_seqlens, mask)  # [B, T, D]
    torch.testing.assert_close(restored, x * mask[..., None])
    restored.sum().backward()
    torch.testing.assert_close(x.grad, mask[..., None].float().expand_as(x))


def test_pack_empty_mask():
    mask = torch.zeros(3, 5, dtype=torch.bool)
    x = torch.randn(3, 5)
    packed, cu_seqlens = ops.pack(x, mask)
    assert packed.shape == (0,) and cu_seqlens.tolist() == [0, 0, 0, 0]
    assert torch.all(ops.unpack(packed, cu_seqlens, mask) == 0)


def test_position_ids_and_segment_sum():
    mask = random_mask(5, 8, seed=3)  # [B, T]
    _, cu_seqlens = ops.pack(torch.zeros(5, 8), mask)
    lengths = mask.sum(dim=1).tolist()
    expected = torch.cat([torch.arange(n) for n in lengths])
    torch.testing.assert_close(ops.position_ids(cu_seqlens), expected)
    torch.testing.assert_close(ops.position_ids(cu_seqlens, total=sum(lengths)), expected)

    values = torch.randn(sum(lengths), dtype=torch.float64)  # [total]
    sums = ops.segment_sum(values, cu_seqlens)  # [B]
    expected_sums = torch.stack([chunk.sum() for chunk in values.split(lengths)])
    torch.testing.assert_close(sums, expected_sums)
    assert sums[1] == 0


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def test_dispatch_picks_torch_and_logs_once(monkeypatch, caplog):
    ops._choose.cache_clear()
    monkeypatch.setenv("FASTRL_BACKEND", "auto")
    with caplog.at_level(logging.INFO, logger="fastrl.ops"):
        assert ops.select_backend("token_logprobs", "cpu") == "torch"
        assert ops.select_backend("token_logprobs", "cpu") == "torch"
    assert len([r for r in caplog.records if "token_logprobs" in r.getMessage()]) == 1


def test_dispatch_forced_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("FASTRL_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="FASTRL_BACKEND=triton"):
        ops.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    monkeypatch.setenv("FASTRL_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTRL_BACKEND"):
        ops.select_backend("pack")

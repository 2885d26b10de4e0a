"""Policy-loss registry (ppo, gspo, cispo) and the SFT loss against float64 references."""

from __future__ import annotations

import pytest
import torch

from fastrl import ops
from fastrl.algo import POLICY_LOSSES, get_policy_loss, sft_loss
from fastrl.algo import losses as L
from fastrl.algo.losses import cispo_loss, gspo_loss


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTRL_BACKEND", "torch")


def inputs(seed: int, batch: int = 4, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    logp = (-torch.rand(batch, length, **kw) * 2 - 0.1).requires_grad_()  # [B, T]
    old = logp.detach() + torch.randn(batch, length, **kw) * 0.3  # [B, T]
    adv = torch.randn(batch, **kw)  # [B]
    mask = torch.rand(batch, length, generator=gen) < 0.7  # [B, T]
    mask[:, 0] = True
    mask[1] = False  # an empty row
    return logp, old, adv, mask


def test_registry():
    assert set(POLICY_LOSSES) == {"ppo", "gspo", "cispo"}
    assert get_policy_loss("ppo") is ops.policy_loss
    assert get_policy_loss("gspo") is gspo_loss
    with pytest.raises(ValueError, match="ppo, gspo, cispo"):
        get_policy_loss("dpo")


def test_gspo_on_policy_gradient_is_sequence_mean_reinforce():
    logp, _, adv, mask = inputs(seed=1)
    loss, stats = gspo_loss(logp, logp.detach(), adv, mask, loss_agg="seq-mean-token-mean")
    rows = mask.any(dim=1)
    seq_mean_logp = (logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
    expected = (-adv * seq_mean_logp)[rows].mean()
    torch.testing.assert_close(loss, -adv[rows].mean())
    got = torch.autograd.grad(loss, logp)[0]
    want = torch.autograd.grad(expected, logp)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert stats["clip_frac"] == 0 and stats["ratio_mean"] == 1


def test_gspo_matches_sequence_level_definition():
    logp, old, adv, mask = inputs(seed=2)
    clip_low, clip_high = 0.05, 0.08
    loss, stats = gspo_loss(
        logp,
        old,
        adv,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        loss_agg="seq-mean-token-mean",
    )
    rows = mask.any(dim=1)
    seq_ratio = torch.exp(((logp - old) * mask).sum(1)[rows] / mask.sum(1)[rows])  # [B']
    a = adv[rows]
    clipped = torch.clamp(seq_ratio, 1 - clip_low, 1 + clip_high)
    expected = torch.maximum(-a * seq_ratio, -a * clipped).mean()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
    got = torch.autograd.grad(loss, logp)[0]
    want = torch.autograd.grad(expected, logp)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    active = ((a > 0) & (seq_ratio > 1 + clip_high)) | ((a < 0) & (seq_ratio < 1 - clip_low))
    tokens = mask.sum(1)[rows].double()
    torch.testing.assert_close(stats["clip_frac"], (active * tokens).sum() / tokens.sum())


def test_cispo_gradient_is_clipped_weight_times_score():
    logp, old, _, mask = inputs(seed=3)
    old = old.clone().requires_grad_()
    gen = torch.Generator().manual_seed(4)
    adv = torch.randn(logp.shape, generator=gen, dtype=torch.float64)  # [B, T]
    loss, stats = cispo_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.15)
    grad_logp, grad_old = torch.autograd.grad(loss, (logp, old), allow_unused=True)
    ratio = torch.exp(logp.detach() - old.detach())  # [B, T]
    weight = ratio.clamp(0.9, 1.15)  # [B, T]
    expected = -adv * weight * mask / mask.sum()
    torch.testing.assert_close(grad_logp, expected, atol=1e-12, rtol=1e-12)
    assert grad_old is None  # no gradient through the ratio
    torch.testing.assert_close(loss, (-adv * weight * logp.detach())[mask].mean())
    low = (ratio < 0.9)[mask].double().mean()
    high = (ratio > 1.15)[mask].double().mean()
    assert 0 < low and 0 < high
    torch.testing.assert_close(stats["clip_frac_low"], low)
    torch.testing.assert_close(stats["clip_frac_high"], high)
    with pytest.raises(ValueError, match="dual clip"):
        cispo_loss(logp, old, adv, mask, dual_clip=3.0)


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_kl_and_entropy_terms_are_shared(name):
    logp, old, adv, mask = inputs(seed=5)
    gen = torch.Generator().manual_seed(6)
    ref = logp.detach() + torch.randn(logp.shape, generator=gen, dtype=torch.float64) * 0.2
    entropy = torch.rand(logp.shape, generator=gen, dtype=torch.float64)  # [B, T]
    extra = {
        "ref_logprobs": ref,
        "entropy": entropy,
        "kl_coef": 0.3,
        "entropy_coef": 0.02,
        "kl_estimator": "k2",
        "loss_agg": "seq-mean-token-sum",
    }
    base = {"loss_agg": "seq-mean-token-sum"}

    def regulariser(loss_fn):
        with_terms, stats = loss_fn(logp, old, adv, mask, **extra)
        without, _ = loss_fn(logp, old, adv, mask, **base)
        return with_terms - without, stats["kl"], stats["entropy"]

    got = regulariser(get_policy_loss(name))
    want = regulariser(ops.policy_loss)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_sft_loss():
    logp, _, _, mask = inputs(seed=7)
    torch.testing.assert_close(sft_loss(logp, mask), -logp[mask].mean())
    rows = [(-logp[b][mask[b]]).mean() for b in range(logp.shape[0]) if mask[b].any()]
    torch.testing.assert_close(
        sft_loss(logp, mask.int(), loss_agg="seq-mean-token-mean"), torch.stack(rows).mean()
    )
    empty = sft_loss(logp, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.all(logp.grad == 0)


# --------------------------------------------------------------------------- LUFFY and mixed SFT
def test_luffy_loss_matches_its_formula():
    torch.manual_seed(0)
    logp = (torch.rand(3, 7, dtype=torch.float64) * -3).requires_grad_()
    adv = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    mask = torch.rand(3, 7) > 0.3
    gamma = 0.1
    loss = L.luffy_loss(logp, adv, mask, gamma=gamma, loss_agg="token-mean")
    p = logp.detach().exp()
    expected = (-(adv[:, None] * p / (p + gamma)) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    # d/dlogp of -A p/(p+g) = -A g p / (p+g)^2
    grad = -(adv[:, None] * gamma * p / (p + gamma) ** 2) * mask / mask.sum()
    torch.testing.assert_close(logp.grad, grad)


def test_mixed_sft_weight_schedules():
    assert L.mixed_sft_weight(0.5, 0.0, "constant", 7, 10) == 0.5
    assert L.mixed_sft_weight(0.5, 0.1, "linear", 0, 11) == pytest.approx(0.5)
    assert L.mixed_sft_weight(0.5, 0.1, "linear", 5, 11) == pytest.approx(0.3)
    assert L.mixed_sft_weight(0.5, 0.1, "linear", 10, 11) == pytest.approx(0.1)
    assert L.mixed_sft_weight(0.5, 0.1, "cosine", 5, 11) == pytest.approx(0.3)
    assert L.mixed_sft_weight(0.5, 0.1, "cosine", 10, 11) == pytest.approx(0.1)


def test_chord_phi_weights_tokens_by_p_one_minus_p():
    logp = torch.tensor([[-0.1, -2.0, -0.7]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = L.mixed_sft_loss(logp, mask, chord_phi=True)
    p = logp.detach().exp()
    phi = p * (1 - p)
    assert loss.item() == pytest.approx((-(logp.detach() * phi)[mask]).sum().item() / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-phi[0, 0] / 2, -phi[0, 1] / 2, 0.0]]))

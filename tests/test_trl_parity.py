"""`fastrl.ops.policy_loss` against TRL's own GRPO loss, value and gradients.

TRL's `GRPOTrainer._compute_loss` runs unchanged on an instance built without `__init__` (the
attributes `__init__` would derive from a real `GRPOConfig` are set from one here) and with a stub
model whose forward returns given per-token logprobs and entropies, the outputs TRL reads from its
fused LM head. So the loss, clipping, KL and aggregation code under test is TRL's, not a copy.

The mapping (also in docs/ARCHITECTURE.md): `grpo` = `seq-mean-token-mean`, `bnpo` and `dapo` =
`token-mean`, `dr_grpo` = `seq-mean-token-sum-norm` with `norm_len = max_completion_length`,
TRL's two-sided clip `delta` = `dual_clip`, `beta` = `kl_coef` with `kl_estimator="k3"`, and
TRL's `completion_mask * tool_mask` = fastrl's loss mask (holes where tool output was inserted).
The documented differences are asserted as differences: rows without a loss token (TRL counts
them in `grpo`'s and `dr_grpo`'s row mean, fastrl leaves them out), the entropy bonus (TRL always
takes it as a token mean, fastrl aggregates it with `loss_agg`) and TRL's default KL bias
correction (the k3 term weighted by the ratio, equal to fastrl's only on the first pass over a
batch, where the ratio is 1).
"""

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (the dev extra installs it)")
accelerate = pytest.importorskip("accelerate")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from fastrl import ops  # noqa: E402
from fastrl.ops.reference import aggregate_loss  # noqa: E402

PROMPT_LEN = 3
MAX_COMPLETION = 13  # TRL's max_completion_length: wider than the completion tensors below
TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 2e-6, "atol": 1e-7},
}
# TRL loss_type → fastrl loss_agg (and norm_len).
MAPPING = {
    "grpo": ("seq-mean-token-mean", None),
    "bnpo": ("token-mean", None),
    "dapo": ("token-mean", None),
    "dr_grpo": ("seq-mean-token-sum-norm", MAX_COMPLETION),
}


class StubModel(torch.nn.Module):
    """Returns the given completion logprobs and entropies where TRL's fused LM head would."""

    def __init__(self, logprobs, entropy):
        super().__init__()
        self.logprobs = logprobs  # [B, T]
        self.entropy = entropy  # [B, T]

    def forward(self, input_ids, attention_mask, labels, fused_lm_head):
        assert fused_lm_head and input_ids.shape[0] == self.logprobs.shape[0]
        pad = self.logprobs.new_zeros(
            input_ids.shape[0], input_ids.shape[1] - self.logprobs.shape[1]
        )
        return SimpleNamespace(
            log_probs=torch.cat([pad, self.logprobs], dim=1),  # [B, P + T]
            entropy=torch.cat([pad, self.entropy], dim=1),  # [B, P + T]
        )


def trl_trainer(model, grad_accum=1, **config):
    """A GRPOTrainer with the attributes `_compute_loss` reads, taken from a real GRPOConfig."""
    args = GRPOConfig(
        output_dir="unused", use_cpu=True, bf16=False, report_to=[], **{"beta": 0.0, **config}
    )
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.args = args
    trainer.model = model
    # Built after the config: creating TrainingArguments resets accelerate's shared state.
    trainer.accelerator = accelerate.Accelerator(cpu=True)
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer.loss_type = args.loss_type
    trainer.beta = args.beta
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.max_completion_length = args.max_completion_length
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.use_vllm = args.use_vllm
    trainer.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    trainer._last_world_entropy = float("inf")
    trainer._entropy_window_stats = None
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer


def make_batch(dtype, seed, batch=8, length=10, empty_row=False):
    """Random completions with trailing padding and holes (tool output) inside the completion."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": dtype}
    logp = -torch.rand(batch, length, **kw) * 3 - 0.05  # [B, T]
    old = logp + torch.randn(batch, length, **kw) * 0.5  # [B, T]
    ref = logp + torch.randn(batch, length, **kw) * 0.3  # [B, T]
    entropy = torch.rand(batch, length, **kw) * 2 + 0.1  # [B, T]
    adv = torch.randn(batch, **kw)  # [B]
    lengths = torch.randint(4, length + 1, (batch,), generator=gen)  # [B]
    completion_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # [B, T]
    tool_mask = (torch.rand(batch, length, generator=gen) > 0.3).long()  # [B, T]
    tool_mask[:, 0] = 1
    if empty_row:
        tool_mask[1] = 0
    return {
        "logp": logp,
        "old": old,
        "ref": ref,
        "entropy": entropy,
        "adv": adv,
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
    }


def trl_loss(data, grad_accum=1, num_items=None, **config):
    """TRL's loss and its gradients with respect to the logprobs and entropies."""
    logp = data["logp"].clone().requires_grad_()
    entropy = data["entropy"].clone().requires_grad_()
    batch, length = logp.shape
    inputs = {
        "prompt_ids": torch.ones(batch, PROMPT_LEN, dtype=torch.long),
        "prompt_mask": torch.ones(batch, PROMPT_LEN, dtype=torch.long),
        "completion_ids": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": data["completion_mask"],
        "tool_mask": data["tool_mask"],
        "advantages": data["adv"],
        "old_per_token_logps": data["old"],
        "ref_per_token_logps": data["ref"],
        "num_items_in_batch": torch.tensor(
            float(num_items if num_items is not None else loss_mask(data).sum())
        ),
    }
    trainer = trl_trainer(StubModel(logp, entropy), grad_accum, **config)
    loss = trainer._compute_loss(trainer.model, inputs)
    grads = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss.detach(), grads[0], grads[1] if grads[1] is not None else torch.zeros_like(entropy)


def loss_mask(data):
    return data["completion_mask"] * data["tool_mask"]  # [B, T]


def fastrl_loss(data, **kw):
    logp = data["logp"].clone().requires_grad_()
    entropy = data["entropy"].clone().requires_grad_()
    loss, _ = ops.policy_loss(
        logp,
        data["old"],
        data["adv"],
        loss_mask(data),
        ref_logprobs=data["ref"],
        entropy=entropy,
        **kw,
    )
    grads = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss.detach(), grads[0], grads[1] if grads[1] is not None else torch.zeros_like(entropy)


def assert_parity(got, want, dtype):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])


# --------------------------------------------------------------------------------------------
# Parity: every TRL loss type that maps onto a fastrl aggregation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", list(MAPPING))
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"delta": 1.6},
        {"beta": 0.04, "use_bias_correction_kl": False},
        {"delta": 1.6, "beta": 0.1, "use_bias_correction_kl": False},
    ],
    ids=["clip", "delta", "kl", "delta+kl"],
)
def test_policy_loss_matches_trl(dtype, loss_type, variant):
    data = make_batch(dtype, seed=zlib.crc32(f"{loss_type}{variant}".encode()) % 1000)
    eps_low, eps_high = 0.2, 0.28
    config = {
        "loss_type": loss_type,
        "epsilon": eps_low,
        "epsilon_high": eps_high,
        "max_completion_length": MAX_COMPLETION,
        **variant,
    }
    loss_agg, norm_len = MAPPING[loss_type]
    want = trl_loss(data, **config)
    got = fastrl_loss(
        data,
        clip_low=eps_low,
        clip_high=eps_high,
        dual_clip=variant.get("delta"),
        kl_coef=variant.get("beta", 0.0),
        kl_estimator="k3",
        loss_agg=loss_agg,
        norm_len=norm_len,
    )
    assert_parity(got, want, dtype)
    # Every branch is exercised: both clips and, with a delta, the two-sided clip.
    ratio = (data["logp"] - data["old"]).exp()  # [B, T]
    adv = data["adv"][:, None]  # [B, 1]
    on = loss_mask(data).bool()  # [B, T]
    assert (on & (adv > 0) & (ratio > 1 + eps_high)).any()
    assert (on & (adv < 0) & (ratio < 1 - eps_low)).any()
    assert (on & (adv < 0) & (ratio > 1.6)).any()
    assert want[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dapo_normalises_over_the_generation_batch(dtype):
    """`dapo` over two accumulated micro-batches = fastrl's token mean over the whole batch."""
    data = make_batch(dtype, seed=5, batch=8)
    total_tokens = int(loss_mask(data).sum())
    halves = [{k: v[rows] for k, v in data.items()} for rows in (slice(0, 4), slice(4, 8))]
    config = {"loss_type": "dapo", "steps_per_generation": 2, "beta": 0.05}
    config["use_bias_correction_kl"] = False
    parts = [trl_loss(h, grad_accum=2, num_items=total_tokens, **config) for h in halves]
    want = (
        parts[0][0] + parts[1][0],
        torch.cat([parts[0][1], parts[1][1]]),
        torch.cat([parts[0][2], parts[1][2]]),
    )
    got = fastrl_loss(data, kl_coef=0.05, loss_agg="token-mean")
    assert_parity(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_entropy_bonus_matches_for_token_mean(dtype):
    data = make_batch(dtype, seed=6)
    want = trl_loss(data, loss_type="bnpo", entropy_coef=0.03)
    got = fastrl_loss(data, entropy_coef=0.03, loss_agg="token-mean")
    assert_parity(got, want, dtype)
    assert want[2].abs().sum() > 0


def test_bias_corrected_kl_on_the_first_pass():
    """TRL's default KL term, β·k3·r, has fastrl's value where old = current logprobs (r = 1),
    but its gradient carries the extra β·k3·∇r = β·k3 per token, weighted by the aggregation."""
    beta = 0.1
    data = make_batch(torch.float64, seed=7)
    data["old"] = data["logp"].clone()
    want = trl_loss(data, loss_type="grpo", beta=beta)
    got = fastrl_loss(data, kl_coef=beta, loss_agg="seq-mean-token-mean")
    mask = loss_mask(data).double()  # [B, T]
    weight = mask / mask.sum(-1, keepdim=True) / mask.shape[0]  # [B, T] seq-mean-token-mean
    d = data["ref"] - data["logp"]  # [B, T]
    k3 = torch.expm1(d) - d  # [B, T]
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float64])
    torch.testing.assert_close(got[1] + beta * k3 * weight, want[1], **TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# Documented differences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_rows_without_loss_tokens_differ_by_the_row_count(loss_type):
    """TRL averages over all B rows, fastrl over the rows with a loss token: TRL = fastrl·n/B."""
    data = make_batch(torch.float64, seed=8, empty_row=True)
    loss_agg, norm_len = MAPPING[loss_type]
    want = trl_loss(data, loss_type=loss_type, max_completion_length=MAX_COMPLETION)
    got = fastrl_loss(data, loss_agg=loss_agg, norm_len=norm_len)
    batch = data["logp"].shape[0]
    nonempty = int((loss_mask(data).sum(-1) > 0).sum())
    assert nonempty == batch - 1
    assert not torch.allclose(got[0], want[0])
    scaled = tuple(x * nonempty / batch for x in got)
    assert_parity(scaled, want, torch.float64)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_rows_without_loss_tokens_agree_for_token_means(loss_type):
    data = make_batch(torch.float64, seed=9, empty_row=True)
    want = trl_loss(data, loss_type=loss_type)
    got = fastrl_loss(data, loss_agg="token-mean")
    assert_parity(got, want, torch.float64)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_entropy_bonus_aggregation_differs(loss_type):
    """TRL subtracts coef × token-mean entropy whatever the loss type; fastrl aggregates the
    bonus with the loss (here per row): the policy parts agree, the bonus terms differ."""
    coef = 0.05
    data = make_batch(torch.float64, seed=10)
    loss_agg, norm_len = MAPPING[loss_type]
    mask = loss_mask(data).bool()
    config = {"loss_type": loss_type, "max_completion_length": MAX_COMPLETION}
    want = trl_loss(data, entropy_coef=coef, **config)
    got = fastrl_loss(data, entropy_coef=coef, loss_agg=loss_agg, norm_len=norm_len)
    without = fastrl_loss(data, loss_agg=loss_agg, norm_len=norm_len)
    token_mean = data["entropy"][mask].sum() / mask.sum()
    fastrl_bonus = aggregate_loss(data["entropy"], mask, loss_agg, norm_len)
    torch.testing.assert_close(want[0], without[0] - coef * token_mean, **TOL[torch.float64])
    torch.testing.assert_close(got[0], without[0] - coef * fastrl_bonus, **TOL[torch.float64])
    torch.testing.assert_close(want[0] - got[0], coef * (fastrl_bonus - token_mean))
    assert abs(float(fastrl_bonus - token_mean)) > 1e-3
    torch.testing.assert_close(want[1], got[1], **TOL[torch.float64])  # logprob grads agree
    torch.testing.assert_close(want[2], -coef * mask.double() / mask.sum(), **TOL[torch.float64])
    assert not torch.allclose(want[2], got[2])


def test_bias_corrected_kl_differs_off_policy():
    data = make_batch(torch.float64, seed=11)
    want = trl_loss(data, loss_type="grpo", beta=0.1)
    got = fastrl_loss(data, kl_coef=0.1, loss_agg="seq-mean-token-mean")
    assert not torch.allclose(got[0], want[0])

import copy

import pytest
import torch

from fastrl.algo import supervision as S
from fastrl.config import ConfigError
from fastrl.monitor import metrics as M
from fastrl.rollout.loop import Limits
from fastrl.rollout.types import Trajectory
from fastrl.train import batch as B
from fastrl.train import build, packing


def test_collate_aligns_labels_with_trained_tokens():
    t = Trajectory("t", 0, [10, 11, 12], [20, 21, 30, 31, 22], [1, 1, 0, 0, 1], [-1, -2, 0, 0, -3])
    short = Trajectory("s", 1, [10, 11], [40], [1], [-0.5])
    b = B.collate([t, short], pad_id=0)
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 22], [10, 11, 40, 0, 0, 0, 0, 0]]
    # Position p predicts token p + 1: targets are exactly the sampled response tokens.
    assert b.labels[0][b.target_mask[0]].tolist() == [20, 21, 22]
    assert b.engine_logprobs[0][b.target_mask[0]].tolist() == [-1, -2, -3]
    assert b.labels[1][b.target_mask[1]].tolist() == [40]
    assert b.attention_mask.sum(1).tolist() == [8, 3]
    # Turn starts: the first trained position of each run (two turns in t, one in short).
    assert M.turn_start_rows(b).tolist() == [True, False, True, True]


def test_micro_batches_respect_the_token_budget():
    trajs = [Trajectory(str(i), i, [1] * (5 + 7 * i % 40), [2], [1], [0.0]) for i in range(30)]
    groups = B.micro_batches(trajs, token_budget=100)
    assert sorted(t.task_id for g in groups for t in g) == sorted(t.task_id for t in trajs)
    for g in groups:
        assert len(g) == 1 or len(g) * max(t.num_tokens for t in g) <= 100


@pytest.mark.parametrize("attention", ["fastrl_packed", "sdpa", "eager"])
def test_packed_logprobs_equal_one_by_one(tiny_policy, world, attention):
    """A packed micro-batch gives each sequence the logprobs it gets when run alone.

    Every attention path available here: the varlen implementation (per-sequence SDPA on CPU),
    and transformers' sdpa and eager with a block-diagonal mask.
    """
    model0, tok, _ = tiny_policy
    model = copy.deepcopy(model0).eval()
    if attention == packing.ATTN_IMPLEMENTATION:
        packing.register()
    model.config._attn_implementation = attention
    trajs = S.play_experts(
        tok, world, world.tasks("test", 5), Limits(max_total_tokens=4096), solved_only=True
    )
    assert len({t.num_tokens for t in trajs}) > 1  # different lengths: real padding in the batch
    with torch.no_grad():
        batch = B.collate(trajs, tok.pad_token_id)
        together, _, _ = B.token_stats(model, batch, packed=True)
        for row, t in enumerate(trajs):
            one = B.collate([t], tok.pad_token_id)
            alone, _, _ = B.token_stats(model, one, packed=True)
            n = one.target_mask.shape[1]
            torch.testing.assert_close(together[row, :n], alone[0], rtol=1e-5, atol=1e-5)
            # and against the plain padded HF forward of the full model
            logits = model(input_ids=one.input_ids).logits.float().log_softmax(-1)
            ref = logits[0].gather(-1, one.labels[0].clamp(min=0)[:, None])[:, 0]
            torch.testing.assert_close(
                alone[0][one.target_mask[0]], ref[one.target_mask[0]], rtol=1e-5, atol=1e-5
            )


def test_training_device_and_batches_on_it():
    assert build.training_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert build.training_device("auto").type == "cuda"
    else:
        assert build.training_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="model.device"):
            build.training_device("cuda")
    traj = Trajectory("a", 0, [5, 6, 7], response_ids=[8, 9], loss_mask=[1, 1],
                      engine_logprobs=[-0.5, -0.25])  # fmt: skip
    short = Trajectory("b", 0, [5], response_ids=[8], loss_mask=[1], engine_logprobs=[-1.0])
    batch = B.collate([traj, short], pad_id=0, device="cpu")
    assert (batch.n_real, batch.longest) == (7, 5)  # host counts: packing never syncs
    assert int(batch.attention_mask.sum()) == batch.n_real

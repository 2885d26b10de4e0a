"""torchrun + DeepSpeed ZeRO-2 on 2 CPU processes (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from fastrl.models import load_model  # noqa: E402
from fastrl.train import update as U  # noqa: E402

HERE = Path(__file__).parent


def _torchrun(*args, timeout=900):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize(
    "agg, kind, stage",
    [
        ("token-mean", "adamw", 2),
        ("seq-mean-token-mean", "sgd", 2),
        ("token-mean", "sgd-rollback", 2),
        ("seq-mean-token-mean", "adamw", 3),
        ("token-mean", "sgd-rollback", 3),
    ],
)
def test_two_rank_update_equals_the_single_process_update(tmp_path, world, agg, kind, stage):
    sys.path.insert(0, str(HERE))
    import _dist_update as script

    cache = tmp_path / "models"
    _torchrun(HERE / "_dist_update.py", tmp_path / "ds.pt", cache, agg, kind, stage)
    distributed = torch.load(tmp_path / "ds.pt", weights_only=True)

    model, tok, _ = load_model(
        "tiny", corpus=lambda: world.tokenizer_corpus(n_tasks=300), cache_dir=cache, vocab_size=512
    )
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = script.config(agg)
    opt = script.optimizer(model, cfg, kind)
    trajs = script.batch(tok, world, cache)
    U.policy_update(model, opt, trajs, trajs, cfg.rl.lr, U.step_spec(cfg, tok))
    # AdamW's first step moves each weight by lr * g / (|g| + eps), at most lr = 1e-3. Where |g| is
    # near eps the step follows the summation order of the gradient, which differs between one
    # process and two ranks (1-2 weights in a few matrices, by up to 5e-5): a tenth of lr fails a
    # weight whose step is missing, doubled or of the wrong sign. SGD's step is exact to 2e-5.
    atol = 1e-4 if kind == "adamw" else 2e-5
    moved = 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=atol, msg=name)
        moved += int(not torch.equal(value, before[name]))
    assert moved > 10  # the update changed the weights


def test_torchrun_smoke_deepspeed(tmp_path):
    """The outside check: torchrun --nproc_per_node=2 -m fastrl train --config
    configs/smoke_deepspeed.yaml run_dir=DIR. (Whole ZeRO-3 runs: the resume and vLLM tests.)"""
    run = tmp_path / "run"
    done = _torchrun("-m", "fastrl", "train", "--config", "configs/smoke_deepspeed.yaml",
                     f"run_dir={run}")  # fmt: skip
    assert "rank 1 of 2 (gloo)" in done.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # written once, by rank 0
    assert [r["phase"] for r in rows] == ["sft"] * 3 + ["rl"] * 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"] == "hf" and summary["rl_success"] is not None
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in printed] == [summary]  # one summary line, rank 0's
    assert (run / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_resume_matches_the_uninterrupted_run(tmp_path, stage):
    """A 2-rank run resumed from a checkpoint taken after its first RL step continues exactly as
    the uninterrupted run: weights, AdamW moments (each rank's partition) and RNG states all come
    back. Without the partitions the moments would restart and the final weights would differ."""
    import shutil

    from safetensors.torch import load_file

    args = ["-m", "fastrl", "train", "--config", "configs/smoke_deepspeed.yaml",
            "checkpoint_every=1", "keep_checkpoints=20", "rl.steps=3",
            "eval.splits=[test]", f"distributed.zero_stage={stage}"]  # fmt: skip
    full = tmp_path / "full"
    _torchrun(*args, f"run_dir={full}")
    ckpts = full / "checkpoints"
    assert (ckpts / "step_000004" / "optim_rank1.pt").exists()  # after the first RL step

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("final", "summary.json"))
    for later in ("step_000005", "step_000006"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "checkpoints" / "latest").write_text("step_000004")
    done = _torchrun(*args, f"run_dir={resumed}", "--resume")
    assert "the AdamW moments restart" not in done.stderr

    a, b = _rows(full), _rows(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[4:], b[4:]):
        for key in ("loss", "reward/mean", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa, wb = (
        load_file(full / "final" / "model.safetensors"),
        load_file(resumed / "final" / "model.safetensors"),
    )
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_zero3_with_vllm_engines_stays_in_sync(tmp_path):
    """Each rank's colocated vLLM engine is fed ZeRO-3 partitioned weights one gathered tensor
    at a time; the engine's logprobs of the sampled tokens then match the trainer's."""
    pytest.importorskip("vllm")
    run = tmp_path / "run"
    _torchrun("-m", "fastrl", "train", "--config", "configs/smoke_deepspeed.yaml",
              f"run_dir={run}", "distributed.zero_stage=3", "rollout.engine=vllm",
              "eval.splits=[test]")  # fmt: skip
    rl = [r for r in _rows(run) if r["phase"] == "rl"]
    assert len(rl) == 2
    for row in rl:
        assert row["rollout/logprob_diff_mean"] <= 1e-4, row
    assert json.loads((run / "summary.json").read_text())["engine"] == "vllm"


def test_several_processes_without_deepspeed_name_the_fix(monkeypatch):
    from fastrl.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[deepspeed\]"):
        distributed.setup()

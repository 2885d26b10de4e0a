import dataclasses
import json
import math

import pytest
import torch

from fastrl.train import trainer as T


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_run_trains_on_the_gpu(tmp_path, caplog):
    """The single-process smoke run with the policy on CUDA (HF engine): finite losses, weights
    on the device, a loadable final model."""
    from fastrl.api import train

    with caplog.at_level("INFO", logger="fastrl.train"):
        summary = train("configs/smoke.yaml", [f"run_dir={tmp_path}", "rollout.engine=hf"])
    assert "training device: cuda" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert summary["rl_success"] is not None and (tmp_path / "final" / "config.json").exists()


def test_run_state_round_trips_and_reads_older_checkpoints():
    """The run state saved in `trainer_state.json` comes back equal; a state saved before a field
    existed gets its default, and a key no field knows is ignored."""
    state = T.RunState(plan_index=1, phase_step=3, step=12, rl_step=3, rl_position=24,
                       results={"sft_success": 0.5}, guard={"actions": 1})  # fmt: skip
    saved = json.loads(json.dumps(dataclasses.asdict(state)))
    assert T.RunState.from_dict(saved) == state
    del saved["nonfinite_in_a_row"]
    saved["retired_key"] = 7
    assert T.RunState.from_dict(saved).nonfinite_in_a_row == 0

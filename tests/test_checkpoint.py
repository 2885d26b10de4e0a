import json

import pytest
import torch

from fastrl.train import checkpoint as ck


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # shared storage, as tied LM heads are


def _step(model, opt):
    loss = model.head(model.emb(torch.arange(5))).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, opt)
    ck.save_checkpoint(tmp_path, "step_000001", model, opt, {"step": 1, "position": 9})
    expected_next = torch.rand(3)

    other = Tied()
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    path = ck.latest_checkpoint(tmp_path)
    assert path is not None and path.name == "step_000001"
    state, opt_state = ck.load_checkpoint(path, other)
    other_opt.load_state_dict(opt_state)
    assert state == {"step": 1, "position": 9}
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored to the save point
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert other.head.weight.data_ptr() == other.emb.weight.data_ptr()
    _step(model, opt)
    _step(other, other_opt)
    assert torch.equal(model.emb.weight, other.emb.weight)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = Tied()
    ck.save_checkpoint(tmp_path, "step_000001", model, None, {"step": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, "step_000002", model, None, {"step": 2})
    path = ck.latest_checkpoint(tmp_path)
    assert path.name == "step_000001"
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 1}
    assert not (tmp_path / "checkpoints" / "step_000002").exists()


def test_keeps_only_the_newest(tmp_path):
    model = Tied()
    for step in range(1, 5):
        ck.save_checkpoint(tmp_path, f"step_{step:06d}", model, None, {"step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_000003", "step_000004"]


def test_no_checkpoint(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None


def test_train_state_loads_without_unpickling_objects(tmp_path):
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, opt)
    path = ck.save_checkpoint(tmp_path, "step_000001", model, opt, {"step": 1})
    blob = torch.load(path / "train_state.pt", weights_only=True)
    assert set(blob) == {"optimizer", "rng", "rank_rngs"} and blob["optimizer"]["state"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == {"model.safetensors", "train_state.pt", "trainer_state.json"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_latest_checkpoint_is_skipped_with_a_message(tmp_path, caplog, damage):
    model = Tied()
    for step in (1, 2):
        with torch.no_grad():
            model.emb.weight.fill_(float(step))
        ck.save_checkpoint(tmp_path, f"step_{step:06d}", model, None, {"step": step}, keep=3)
    weights = tmp_path / "checkpoints" / "step_000002" / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        weights.unlink()
    other = Tied()
    with pytest.raises(ck.CorruptCheckpoint):
        ck.load_checkpoint(weights.parent, other)
    with caplog.at_level("ERROR"):
        path, state, _ = ck.resume_checkpoint(tmp_path, other)
    assert path.name == "step_000001" and state == {"step": 1}
    assert torch.all(other.emb.weight == 1.0)
    assert "skipping damaged checkpoint" in caplog.text and "step_000002" in caplog.text


def test_guard_snapshots_are_never_pruned_nor_latest(tmp_path):
    model = Tied()
    ck.save_checkpoint(tmp_path, "healthy", model, None, {"step": 0}, point_latest=False)
    for step in range(1, 4):
        ck.save_checkpoint(tmp_path, f"step_{step:06d}", model, None, {"step": step}, keep=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["healthy", "step_000003"]
    assert ck.latest_checkpoint(tmp_path).name == "step_000003"

import random

import pytest

from fastrl.monitor.control_tokens import SpikeAlarm


def series(n, seed=0, base=0.05, noise=0.005):
    rng = random.Random(seed)
    return [base + rng.uniform(-noise, noise) for _ in range(n)]


def test_alarm_fires_on_a_control_token_spike_and_not_before():
    alarm = SpikeAlarm(threshold=4.0, min_history=5, alpha=0.1)
    im_end, opener = series(30, 1), series(30, 2, base=0.9)
    fired = [alarm.update({"ctrl/p_im_end": a, "ctrl/p_open_json": b})["ctrl/alarm"]
             for a, b in zip(im_end, opener)]  # fmt: skip
    assert fired == [0.0] * 30
    out = alarm.update({"ctrl/p_im_end": 0.6, "ctrl/p_open_json": 0.9})  # <|im_end|> jumps
    assert out["ctrl/alarm"] == 1.0 and out["ctrl/z_im_end"] > 4.0


def test_direction_and_min_history():
    alarm = SpikeAlarm(threshold=3.0, min_history=5)
    for v in series(10, 3, base=0.9):
        alarm.update({"ctrl/p_open_json": v})
    assert alarm.update({"ctrl/p_open_json": 0.99})["ctrl/alarm"] == 0.0  # the healthy side
    assert alarm.update({"ctrl/p_open_json": 0.2})["ctrl/alarm"] == 1.0  # the opener collapses
    young = SpikeAlarm(threshold=3.0, min_history=5)
    for v in [0.05, 0.05, 0.05]:
        young.update({"ctrl/p_tool_call": v})
    assert young.update({"ctrl/p_tool_call": 0.9})["ctrl/alarm"] == 0.0  # too little history


def test_missing_series_and_state_round_trip():
    alarm = SpikeAlarm()
    assert alarm.update({}) == {"ctrl/alarm": 0.0}
    for v in series(8, 4):
        alarm.update({"ctrl/p_tool_call": v})
    copy = SpikeAlarm()
    copy.load_state_dict(alarm.state_dict())
    row = {"ctrl/p_tool_call": 0.07}
    assert copy.update(dict(row)) == pytest.approx(alarm.update(dict(row)))


def test_gradient_split_against_a_loop():
    import torch

    from fastrl.monitor.control_tokens import gradient_split

    g = torch.Generator().manual_seed(0)
    M, ids = 37, [5, 9, 2]
    probs = torch.rand(M, 3, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, 12, (M,), generator=g)
    labels[:6] = torch.tensor([5, 9, 2, 5, 2, 2])  # make sure every control id was sampled
    adv = torch.randn(M, generator=g, dtype=torch.float64)
    got_self, got_other = gradient_split(probs, labels, adv, ids)
    for c, k in enumerate(ids):
        want_self = sum(adv[m] * (1 - probs[m, c]) for m in range(M) if labels[m] == k)
        want_other = sum(-adv[m] * probs[m, c] for m in range(M) if labels[m] != k)
        assert got_self[c].item() == pytest.approx(float(want_self))
        assert got_other[c].item() == pytest.approx(float(want_other))
    # The full push sums to the two parts.
    full = (adv[:, None] * ((labels[:, None] == torch.tensor(ids)).double() - probs)).sum(0)
    torch.testing.assert_close(got_self + got_other, full)


def test_health_drift_alarm_measures_from_the_start_and_only_upwards():
    alarm = SpikeAlarm(health_threshold=0.3, spikes=False)
    alarm.health_start = {"ctrl/health_nll": 0.5, "ctrl/health_nll_all": 1.0}
    out = alarm.update({"ctrl/health_nll": 0.3, "ctrl/health_nll_all": 1.1})  # sharper: healthy
    assert out["ctrl/alarm"] == 0.0
    assert out["ctrl/health_drift"] == pytest.approx(-0.2)
    assert out["ctrl/health_drift_all"] == pytest.approx(0.1)
    assert alarm.update({"ctrl/health_nll": 0.79})["ctrl/alarm"] == 0.0  # drift 0.29
    assert alarm.update({"ctrl/health_nll": 0.81})["ctrl/alarm"] == 1.0  # drift 0.31
    assert alarm.update({})["ctrl/alarm"] == 0.0  # a step without an update has no probe
    assert alarm.update({"ctrl/health_nll_all": 1.31})["ctrl/alarm"] == 1.0  # every token
    copy = SpikeAlarm(health_threshold=0.3, spikes=False)
    copy.load_state_dict(alarm.state_dict())
    assert copy.update({"ctrl/health_nll": 0.9})["ctrl/alarm"] == 1.0  # the start survives
    off = SpikeAlarm(health_threshold=0.0)
    off.health_start = {"ctrl/health_nll": 0.5}
    assert off.update({"ctrl/health_nll": 5.0})["ctrl/alarm"] == 0.0


def test_the_spike_rule_can_be_turned_off():
    on, off = SpikeAlarm(threshold=3.0, min_history=5), SpikeAlarm(threshold=3.0, spikes=False)
    for v in series(10, 5):
        on.update({"ctrl/p_im_end": v})
        off.update({"ctrl/p_im_end": v})
    assert on.update({"ctrl/p_im_end": 0.9})["ctrl/alarm"] == 1.0
    assert off.update({"ctrl/p_im_end": 0.9})["ctrl/alarm"] == 0.0


def test_pollution_drift_alarm_measures_from_the_first_rl_step_and_only_upwards():
    alarm = SpikeAlarm(pollution_threshold=0.25, spikes=False)
    first = alarm.update({"state/pollution": 0.1})  # the RL-start samples set the baseline
    assert first["ctrl/alarm"] == 0.0 and first["ctrl/pollution_drift"] == 0.0
    assert alarm.update({"state/pollution": 0.0})["ctrl/pollution_drift"] == pytest.approx(-0.1)
    assert alarm.update({"state/pollution": 0.34})["ctrl/alarm"] == 0.0  # drift 0.24
    assert alarm.update({"state/pollution": 0.36})["ctrl/alarm"] == 1.0  # drift 0.26
    assert alarm.update({})["ctrl/alarm"] == 0.0  # no samples scored: no verdict
    copy = SpikeAlarm(pollution_threshold=0.25, spikes=False)
    copy.load_state_dict(alarm.state_dict())
    assert copy.update({"state/pollution": 0.4})["ctrl/alarm"] == 1.0  # the start survives
    assert copy.update({"state/pollution": 0.2})["ctrl/alarm"] == 0.0
    off = SpikeAlarm(pollution_threshold=0.0, spikes=False)
    off.update({"state/pollution": 0.0})
    assert off.update({"state/pollution": 1.0})["ctrl/alarm"] == 0.0

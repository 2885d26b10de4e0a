from fastrl.monitor import metrics as M
from fastrl.rollout.types import Trajectory


def test_rollout_metrics_count_groups_without_signal_and_solved_groups():
    def traj(group, success, source="policy"):
        return Trajectory("t", group, [1], reward=float(success), success=success, source=source)

    played = [
        *(traj(0, False) for _ in range(3)),  # all fail: no signal
        traj(1, False),
        traj(1, True),  # mixed and solved
        *(traj(2, False) for _ in range(2)),
        traj(2, True, source="expert"),  # only the expert solves it: signal, not solved
        *(traj(3, True) for _ in range(2)),  # all solved: no signal
    ]
    row = M.rollout_metrics(played)
    assert row["rollout/frac_reward_zero_std"] == 0.5
    assert row["rollout/solved_groups"] == 0.5
    assert row["supervision/expert_success"] == 1.0

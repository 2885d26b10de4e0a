"""The results table and figures of docs/EXPERIMENTS.md, from the runs of run.sh beside it.

    .venv/bin/python configs/experiments/table.py                    # the table (markdown, stdout)
    .venv/bin/python configs/experiments/table.py --figures docs/experiments   # and the figures
    .venv/bin/python configs/experiments/table.py --json             # one JSON object per run

A run is runs/exp/<cell>_s<seed>/ with a summary.json. Per run, on the RL rows (RL steps counted
from 1; the SFT rows of corrective and guard phases are left out):
- fall: the first RL step after the first 3 whose sampled success (`success/mean`) is below half
  of its mean over RL steps 1-3 (none when it never is, or when that mean is 0). The first 3 are
  the baseline, not candidates: one step's 8 tasks can be much harder than the next's;
- alarm: the first RL step with `ctrl/alarm`; lead = fall - alarm (positive: the alarm came first).
  Runs logged before the alarm had its pollution rule (monitor.pollution_threshold) get the rule
  replayed over their logged `state/pollution` by the trainer's own `SpikeAlarm`: without the
  guard the alarm feeds nothing back into training, so the replay is what the run would have
  logged (for runs logged with the rule it changes nothing);
- collapsed: greedy test success after RL below half of the starting checkpoint's (`sft_success`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fastrl.config import MonitorConfig  # noqa: E402
from fastrl.monitor.control_tokens import HEALTH_WATCHED, SpikeAlarm  # noqa: E402
from fastrl.monitor.report_plan import read_metrics  # noqa: E402

HEALTH_THRESHOLD = MonitorConfig().health_threshold  # the defaults the figures mark
POLLUTION_THRESHOLD = MonitorConfig().pollution_threshold

CELLS = (  # table order
    "vanilla_rl", "sft_rl", "sft_rl_high", "guard", "guard_lr",
    "ops", "ops_high", "ops_luffy", "ops_luffy_high", "hbg", "hbg_high",
    "mixed_sft", "mixed_sft_high", "ets", "ets_high", "prs", "prs_high",
)  # fmt: skip


def rl_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("phase") == "rl"]


def fall_step(success: list[float]) -> int | None:
    """First RL step (1-based) after step 3 with sampled success below half its mean over steps
    1-3."""
    if len(success) < 4:
        return None
    base = statistics.fmean(success[:3])
    if base <= 0:
        return None
    return next((i + 1 for i, s in enumerate(success) if i >= 3 and s < 0.5 * base), None)


def pollution_threshold(run_dir: Path) -> float:
    """The run's monitor.pollution_threshold (the default for runs whose config predates it)."""
    path = run_dir / "config.yaml"
    monitor = ((yaml.safe_load(path.read_text()) if path.is_file() else None) or {}).get("monitor")
    monitor = monitor or {}
    return float(monitor.get("pollution_threshold", MonitorConfig().pollution_threshold))


def alarm_steps(rl: list[dict], threshold: float) -> list[int]:
    """RL steps (1-based) with `ctrl/alarm` logged or the pollution rule's verdict on the row."""
    replay = SpikeAlarm(spikes=False, pollution_threshold=threshold)
    steps = []
    for i, r in enumerate(rl):
        polluted = replay.update(r)["ctrl/alarm"] > 0  # fed every row: the first sets the start
        if polluted or (r.get("ctrl/alarm") or 0) > 0:
            steps.append(i + 1)
    return steps


def analyse(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rl = rl_rows(read_metrics(run_dir))
    success = [float(r.get("success/mean", 0.0)) for r in rl]
    alarms = alarm_steps(rl, pollution_threshold(run_dir))
    actions = [(i + 1, r["guard/action"]) for i, r in enumerate(rl) if r.get("guard/action")]
    fall = fall_step(success)
    first = alarms[0] if alarms else None
    # A cell run with eval.before_rl=false takes its start from its seed's SFT run.
    seed = run_dir.name.rsplit("_s", 1)[-1]
    sft_run = run_dir.parent / f"sft_base_s{seed}" / "summary.json"
    if summary.get("sft_success") is None and sft_run.is_file():
        sft = json.loads(sft_run.read_text())
        summary["sft_success"] = sft.get("rl_success")
        for split in ("format_ood", "content_ood"):
            summary[f"sft_{split}_success"] = sft.get(f"{split}_success")
    start, end = summary.get("sft_success"), summary.get("rl_success")
    return {
        "run": run_dir.name,
        "start": start,
        "test": end,
        "teacher": summary.get("teacher_success"),
        "format_ood_start": summary.get("sft_format_ood_success"),
        "format_ood": summary.get("format_ood_success"),
        "content_ood_start": summary.get("sft_content_ood_success"),
        "content_ood": summary.get("content_ood_success"),
        "collapsed": start is not None and end is not None and end < 0.5 * start,
        "fall": fall,
        "alarms": alarms,
        "lead": fall - first if fall is not None and first is not None else None,
        "guard_actions": actions,
        "success": success,
        "minutes": summary.get("minutes"),
    }


@functools.cache
def runs_of(exp: Path, cell: str) -> list[dict]:  # read once per cell: the figures reuse them
    found = []
    for d in sorted(exp.glob(f"{cell}_s*")):
        seed = d.name[len(cell) + 2 :]
        if d.is_dir() and seed.isdigit() and (d / "summary.json").is_file():
            found.append({"seed": int(seed), **analyse(d)})
    return found


def mean_sd(values: list[float | None]) -> str:
    xs = [v for v in values if v is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def before_after(runs: list[dict], key: str) -> str:
    return f"{mean_sd([r[key + '_start'] for r in runs])} → {mean_sd([r[key] for r in runs])}"


def lead_text(r: dict) -> str:
    if r["fall"] is None:
        return f"no fall, alarm {r['alarms'][0]}" if r["alarms"] else "no fall, no alarm"
    if not r["alarms"]:
        return f"fall {r['fall']}, no alarm"
    return f"{r['lead']:+d} (alarm {r['alarms'][0]}, fall {r['fall']})"


def table(exp: Path) -> str:
    head = ("| cell | seeds | test: start → after RL | format_ood | content_ood | teacher | "
            "collapsed | alarm lead (RL steps), per seed | guard actions (RL step), per seed | "
            "minutes |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for cell in CELLS:
        runs = runs_of(exp, cell)
        if not runs:
            continue
        start = mean_sd([r["start"] for r in runs])
        test = mean_sd([r["test"] for r in runs])
        guard = "; ".join(
            ", ".join(f"{s}: {a}" for s, a in r["guard_actions"]) or "none" for r in runs
        )
        lines.append(
            f"| {cell} | {', '.join(str(r['seed']) for r in runs)} | {start} → {test} | "
            f"{before_after(runs, 'format_ood')} | {before_after(runs, 'content_ood')} | "
            f"{mean_sd([r['teacher'] for r in runs])} | "
            f"{sum(r['collapsed'] for r in runs)} of {len(runs)} | "
            f"{'; '.join(lead_text(r) for r in runs)} | {guard} | "
            f"{mean_sd([r['minutes'] for r in runs])} |"
        )
    return "\n".join(lines)


def figures(exp: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def curves(ax, cell, color, label=None):
        runs = runs_of(exp, cell)
        for k, r in enumerate(runs):
            ax.plot(range(1, len(r["success"]) + 1), r["success"], color=color, alpha=0.8,
                    lw=1.2, label=(label or cell) if k == 0 else None)  # fmt: skip
            for step, _ in r["guard_actions"]:
                ax.axvline(step, color=color, ls=":", lw=0.8)
        return runs

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. collapse: sampled success per RL step, every seed, at the two rates.
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for cell, color in (("sft_rl", "tab:green"), ("sft_rl_high", "tab:red")):
        curves(ax, cell, color, f"{cell} (lr {'1e-3' if 'high' in cell else '1e-4'})")
    ax.set(xlabel="RL step", ylabel="sampled success (success/mean)",
           title="Plain GRPO from the SFT checkpoint, every seed")  # fmt: skip
    ax.legend(fontsize=8)
    save(fig, "collapse.png")

    # 3. the guard: the collapsing rate without and with it.
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for cell, color in (("sft_rl_high", "tab:red"), ("guard", "tab:blue"),
                        ("guard_lr", "tab:purple"), ("sft_rl", "tab:green")):  # fmt: skip
        curves(ax, cell, color)
    ax.set(
        xlabel="RL step",
        ylabel="sampled success (success/mean)",
        title="lr 1e-3 without and with the guard (dotted: guard actions); sft_rl at 1e-4",
    )
    ax.legend(fontsize=8)
    save(fig, "guard.png")

    # 4. supervision: mean sampled success over seeds per RL step, each mode at 1e-3.
    fig, ax = plt.subplots(figsize=(8, 3.6))
    palette = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for cell in ("sft_rl_high", "ops_high", "ops_luffy_high", "hbg_high", "mixed_sft_high",
                 "ets_high", "prs_high"):  # fmt: skip
        rs = runs_of(exp, cell)
        if not rs:
            continue
        n = min(len(r["success"]) for r in rs)
        mean = [statistics.fmean(r["success"][i] for r in rs) for i in range(n)]
        ax.plot(range(1, n + 1), mean, color=next(palette), lw=1.2, label=f"{cell} ({len(rs)})")
    ax.set(xlabel="RL step", ylabel="sampled success, mean over seeds",
           title="Supervision at the collapsing rate (seeds in brackets)")  # fmt: skip
    ax.legend(fontsize=7, ncol=2)
    save(fig, "supervision_curves.png")

    # 2. the alarm: its two rules' statistics and sampled success around the fall.
    colors = {"sft_rl": "tab:green", "sft_rl_high": "tab:red", "ops_high": "tab:orange"}
    runs = [(c, r) for c in colors for r in runs_of(exp, c)]
    if runs:
        fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
        for cell, r in runs:
            rows = rl_rows(read_metrics(exp / r["run"]))
            color = colors[cell]
            steps = range(1, len(rows) + 1)
            axes[0].plot(steps, r["success"], color=color, lw=1)
            drift = [(i, max(row.get(k, -1e9) for k in HEALTH_WATCHED))
                     for i, row in enumerate(rows, 1)
                     if any(k in row for k in HEALTH_WATCHED)]  # fmt: skip
            if drift:
                axes[1].plot(*zip(*drift), "o-", color=color, lw=1, ms=3)
            polluted = [row.get("state/pollution", 0.0) for row in rows]
            axes[2].plot(steps, [p - polluted[0] for p in polluted], "o-", color=color, lw=1,
                         ms=3)  # fmt: skip
            for a in r["alarms"][:1]:
                for ax in axes:
                    ax.axvline(a, color=color, ls="--", lw=0.8)
            if r["fall"]:
                axes[0].plot([r["fall"]], [r["success"][r["fall"] - 1]], "v", color="k")
        axes[0].set(ylabel="sampled success", title="sft_rl (green), sft_rl_high (red), ops_high "
                    "(orange): first alarm dashed, fall ▼")  # fmt: skip
        axes[1].axhline(HEALTH_THRESHOLD, color="gray", ls=":", lw=1)
        axes[1].set(
            ylabel="health drift (nats)",
            title="health rule: ctrl/health_drift(_all) after the step's update; dotted: threshold",
        )
        axes[2].axhline(POLLUTION_THRESHOLD, color="gray", ls=":", lw=1)
        axes[2].set(
            xlabel="RL step",
            ylabel="pollution drift",
            title="pollution rule: state/pollution of the step's samples minus RL step 1's",
        )
        save(fig, "alarm_lead.png")

    # 5. every cell: greedy test success after RL, both learning rates.
    cells = [c for c in CELLS if runs_of(exp, c)]
    if cells:
        fig, ax = plt.subplots(figsize=(9, 4))
        for x, cell in enumerate(cells):
            rs = runs_of(exp, cell)
            ax.scatter([x] * len(rs), [r["test"] for r in rs], color="k", s=12, zorder=3)
            high = cell.endswith("high") or cell.startswith("guard")
            ax.bar(x, statistics.fmean(r["test"] for r in rs),
                   color="tab:red" if high else "tab:blue", alpha=0.6)  # fmt: skip
        starts = [r["start"] for c in cells if c != "vanilla_rl" for r in runs_of(exp, c)
                  if r["start"] is not None]  # fmt: skip
        if starts:
            ax.axhline(
                statistics.fmean(starts), color="gray", ls="--", lw=1, label="SFT checkpoint"
            )
        ax.set_xticks(range(len(cells)), cells, rotation=45, ha="right", fontsize=8)
        ax.set(ylabel="greedy test success after RL",
               title="Every cell, every seed (red: collapsing lr)")  # fmt: skip
        ax.legend(fontsize=8)
        save(fig, "supervision.png")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "exp"), help="where the runs are")
    ap.add_argument("--figures", help="write the figures (PNG) into this folder")
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead")
    args = ap.parse_args()
    exp = Path(args.runs)
    if not exp.is_dir():
        print(f"table.py: no runs folder {exp} (run configs/experiments/run.sh first)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    if args.json:
        for cell in CELLS:
            for r in runs_of(exp, cell):
                print(json.dumps({"cell": cell, **r}))
        return
    print(table(exp))
    if args.figures:
        for path in figures(exp, Path(args.figures)):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

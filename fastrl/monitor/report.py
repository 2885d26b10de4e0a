"""Run report: PNG plots and one HTML page from a run directory (`fastrl report RUN_DIR`).

Reads `RUN_DIR/metrics.jsonl` (one row per step, written by `monitor.log.MetricLogger`), the
optional `summary.json` and `config.yaml`, and writes `RUN_DIR/report/*.png` and
`RUN_DIR/report.html`, which links the plots by relative paths:

- `success.png`: `success/mean`, `reward/mean`, and `eval/test_success` as points;
- `control_tokens.png`: the control-token probes (`ctrl/p_*`, `ctrl/turn_p_*`), alarm steps
  (red) and guard actions (black dashed);
- `decision.png`: the decision probe (`ctrl/habit_p_tool_call`, `ctrl/first_p_tool_call`,
  `ctrl/continue_p_tool_call`, `ctrl/answer_p_tool_call`): p(`<tool_call>`) on fixed held-out
  expert trajectories where the expert makes the call a teacher that stops early leaves out,
  its first call after the question (a teacher that guesses answers there), its other calls,
  and where it answers, with the sampled `success/mean`, over the steps the probe was taken on;
- `states.png`: the `state/*` fractions of RL steps, stacked;
- `optimization.png`: `entropy`, `kl`, `clip_frac`, `grad_norm`.

SFT spans are shaded gray on every plot. A value that is missing, null, non-numeric or non-finite
(the logger writes NaN as the string "nan") counts as missing; a plot whose series are all missing
is skipped. matplotlib is imported only when plots are drawn, through its Agg canvas (no pyplot, no
display).
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CTRL = (
    "ctrl/p_open_json",
    "ctrl/p_im_end",
    "ctrl/p_tool_call",
    "ctrl/turn_p_im_end",
    "ctrl/turn_p_tool_call",
    "ctrl/after_call_p_im_end",
)
DECISION = (
    "ctrl/habit_p_tool_call",
    "ctrl/first_p_tool_call",
    "ctrl/continue_p_tool_call",
    "ctrl/answer_p_tool_call",
    "success/mean",
)
STATES = ("state/healthy_call", "state/healthy_text", "state/pollution", "state/collapse")
OPTIM = ("entropy", "kl", "clip_frac", "grad_norm")

Span = tuple[int, int, str, str]
Rows = list[dict[str, Any]]
Xlim = tuple[int, int]


def read_metrics(run_dir: str | Path) -> Rows:
    """The rows of `run_dir/metrics.jsonl`; blank and corrupt lines are skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path} (is {run_dir} a run directory?)")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                log.warning("%s:%d: blank line skipped", path, lineno)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                log.warning("%s:%d: corrupt line skipped (%s)", path, lineno, e)
                continue
            if not isinstance(row, dict):
                log.warning("%s:%d: not a JSON object, skipped", path, lineno)
                continue
            rows.append(row)
    return rows


def _num(value: Any) -> float | None:
    """`value` as a finite float, or None when it is missing, non-numeric or non-finite."""
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _steps(rows: Rows) -> list[int]:
    """The step of each row; a row without a usable `step` gets the previous step + 1."""
    steps, prev = [], 0
    for row in rows:
        step = _num(row.get("step"))
        prev = int(step) if step is not None else prev + 1
        steps.append(prev)
    return steps


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def phase_spans(rows: Rows) -> list[Span]:
    """Maximal runs of consecutive rows with the same (`phase`, `phase/name`).

    Returns (first_step, last_step, phase, name); a missing phase or name is "".
    """
    spans: list[Span] = []
    for step, row in zip(_steps(rows), rows):
        phase, name = _text(row.get("phase")), _text(row.get("phase/name"))
        if spans and spans[-1][2:] == (phase, name):
            spans[-1] = (spans[-1][0], step, phase, name)
        else:
            spans.append((step, step, phase, name))
    return spans


def _series(rows: Rows, steps: list[int], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where `key` holds a finite number."""
    xs, ys = [], []
    for step, row in zip(steps, rows):
        value = _num(row.get(key))
        if value is not None:
            xs.append(step)
            ys.append(value)
    return xs, ys


def _mark_sft(ax: Any, spans: list[Span]) -> None:
    """Shade the SFT spans light gray, labelled with the phase name (or "sft") at the top."""
    for first, last, phase, name in spans:
        if phase != "sft":
            continue
        ax.axvspan(first - 0.5, last + 0.5, color="0.9", zorder=0, lw=0)
        ax.text(
            (first + last) / 2,
            0.98,
            name or "sft",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            color="0.35",
        )


def _figure(nrows: int = 1, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A figure on the Agg canvas with `nrows` axes sharing the x axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _finish(fig: Any, axes: list[Any], spans: list[Span], xlim: Xlim, path: Path) -> None:
    """Shade SFT spans, align the x range, save the PNG."""
    for ax in axes:
        _mark_sft(ax, spans)
        ax.set_xlim(xlim[0] - 0.5, xlim[1] + 0.5)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.savefig(path, dpi=100)


def _plot_success(rows: Rows, steps: list[int], spans: list[Span], xlim: Xlim, path: Path) -> bool:
    series = {k: _series(rows, steps, k) for k in ("success/mean", "reward/mean")}
    evals = _series(rows, steps, "eval/test_success")
    if not evals[0] and not any(xs for xs, _ in series.values()):
        return False
    fig, (ax,) = _figure()
    for key, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, lw=1, label=key)
    if evals[0]:
        ax.plot(*evals, "o", ms=5, color="C3", label="eval/test_success")
    ax.set_title("success and reward")
    ax.legend(loc="best", fontsize=8)
    _finish(fig, [ax], spans, xlim, path)
    return True


def _plot_control(
    rows: Rows,
    steps: list[int],
    spans: list[Span],
    xlim: Xlim,
    alarms: list[int],
    guards: list[int],
    path: Path,
) -> bool:
    series = {k: _series(rows, steps, k) for k in CTRL}
    if not any(xs for xs, _ in series.values()):
        return False
    fig, (ax,) = _figure()
    for key, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, lw=1, label=key.removeprefix("ctrl/"))
    for i, step in enumerate(alarms):
        ax.axvline(step, color="red", lw=0.8, alpha=0.7, label="alarm" if i == 0 else None)
    for i, step in enumerate(guards):
        ax.axvline(step, color="black", ls="--", lw=1.2, label="guard action" if i == 0 else None)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("probability at probe")
    ax.set_title("control-token probabilities")
    ax.legend(loc="best", fontsize=8)
    _finish(fig, [ax], spans, xlim, path)
    return True


def _plot_decision(rows: Rows, steps: list[int], spans: list[Span], xlim: Xlim, path: Path) -> bool:
    series = {k: _series(rows, steps, k) for k in DECISION}
    if not any(series[k][0] for k in DECISION[:4]):
        return False
    fig, (ax,) = _figure()
    labels = {
        "ctrl/habit_p_tool_call": "p(<tool_call>) where a teacher that stops early answers",
        "ctrl/first_p_tool_call": "p(<tool_call>) after the question, where a guesser answers",
        "ctrl/continue_p_tool_call": "p(<tool_call>) where the expert calls again (elsewhere)",
        "ctrl/answer_p_tool_call": "p(<tool_call>) where the expert answers",
        "success/mean": "sampled success",
    }
    for key, (xs, ys) in series.items():
        if xs:
            style = {"ls": ":", "color": "0.4"} if key == "success/mean" else {}
            ax.plot(xs, ys, lw=1.2, label=labels[key], **style)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("probability")
    ax.set_title("call or answer: p(<tool_call>) on held-out expert trajectories")
    ax.legend(loc="best", fontsize=8)
    probed = [x for key in DECISION[:4] for x in series[key][0]]
    _finish(fig, [ax], spans, (min(probed), max(probed)), path)  # the RL steps it was taken on
    return True


def _plot_states(rows: Rows, steps: list[int], spans: list[Span], xlim: Xlim, path: Path) -> bool:
    xs, ys = [], {k: [] for k in STATES}
    for step, row in zip(steps, rows):
        values = {k: _num(row.get(k)) for k in STATES}
        known = row.get("phase") == "rl" and any(v is not None for v in values.values())
        xs.append(step)  # other rows are NaN, leaving gaps in the stack
        for k, v in values.items():
            ys[k].append((v or 0.0) if known else math.nan)
    if all(math.isnan(v) for v in ys[STATES[0]]):
        return False
    fig, (ax,) = _figure()
    colors = ("tab:green", "tab:blue", "tab:orange", "tab:red")
    labels = [k.removeprefix("state/") for k in STATES]
    ax.stackplot(xs, *ys.values(), labels=labels, colors=colors, alpha=0.85)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of messages")
    ax.set_title("structural states (RL steps)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # the stack fills the axes
    _finish(fig, [ax], spans, xlim, path)
    return True


def _plot_optimization(
    rows: Rows, steps: list[int], spans: list[Span], xlim: Xlim, path: Path
) -> bool:
    series = {k: _series(rows, steps, k) for k in OPTIM}
    if not any(xs for xs, _ in series.values()):
        return False
    fig, axes = _figure(len(OPTIM), height=2.0)
    for ax, (key, (xs, ys)) in zip(axes, series.items()):
        if xs:
            ax.plot(xs, ys, lw=1)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_ylabel(key)
    axes[0].set_title("optimization")
    _finish(fig, axes, spans, xlim, path)
    return True


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable, left out of the report (%s)", path, e)
        return {}
    if not isinstance(summary, dict):
        log.warning("%s: not a JSON object, left out of the report", path)
        return {}
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _table(header: list[str], body: list[list[Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    lines = ["<table>", f"<tr>{head}</tr>"]
    for row in body:
        lines.append("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in row) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _html(
    run_dir: Path,
    rows: Rows,
    steps: list[int],
    spans: list[Span],
    summary: dict[str, Any],
    plots: list[Path],
    skipped: list[str],
    alarms: list[int],
    guards: list[tuple[int, str]],
) -> str:
    """The report page: summary, phases, plots, alarms and guard actions, config."""
    esc = html.escape
    title = f"fastrl report: {run_dir.resolve().name}"
    phases = []
    for first, last, phase, name in spans:
        inside = [r for s, r in zip(steps, rows) if first <= s <= last]
        ok = [v for v in (_num(r.get("success/mean")) for r in inside) if v is not None]
        mean = sum(ok) / len(ok) if ok else "–"
        phases.append([name or "–", phase or "–", first, last, mean])
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{max-width:100%;display:block;margin-bottom:1em}"
        "pre{background:#f5f5f5;padding:1em;overflow-x:auto}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(rows)} steps ({steps[0]}–{steps[-1]}) from {esc(str(run_dir))}</p>",
        "<h2>Summary</h2>",
        _table(["key", "value"], [[k, v] for k, v in summary.items()])
        if summary
        else "<p>no summary.json</p>",
        "<h2>Phases</h2>",
        _table(["name", "phase", "first step", "last step", "mean success/mean"], phases),
        "<h2>Plots</h2>",
    ]
    for path in plots:
        parts.append(f'<img src="report/{esc(path.name)}" alt="{esc(path.stem)}">')
    probe = []
    for key in DECISION[:4]:
        xs, ys = _series(rows, steps, key)
        if xs:
            probe.append([key, xs[0], ys[0], xs[-1], ys[-1]])
    if probe:
        parts.append("<h2>Decision probe</h2>")
        parts.append(_table(["series", "first step", "value", "last step", "value"], probe))
    if skipped:
        parts.append(f"<p>Skipped (no data): {esc(', '.join(skipped))}</p>")
    parts.append("<h2>Alarms and guard actions</h2>")
    parts.append(f"<p>Alarm steps: {esc(', '.join(map(str, alarms)) or 'none')}</p>")
    if guards:
        parts.append(_table(["step", "guard action"], [[s, a] for s, a in guards]))
    else:
        parts.append("<p>Guard actions: none</p>")
    config = run_dir / "config.yaml"
    parts.append("<h2>Config</h2>")
    if config.is_file():
        text = config.read_text(encoding="utf-8", errors="replace")
        parts.append(f"<pre>{esc(text)}</pre>")
    else:
        parts.append("<p>no config.yaml</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write `run_dir/report/*.png` and `run_dir/report.html`; return what was written.

    Returns {"html": path, "plots": [paths], "skipped": [plot file names], "alarm_steps": [steps],
    "guard_steps": [steps]}. Raises FileNotFoundError without `metrics.jsonl`, ValueError when it
    holds no rows.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no metric rows")
    steps = _steps(rows)
    spans = phase_spans(rows)
    xlim = (min(steps), max(steps))
    alarms = [s for s, r in zip(steps, rows) if (_num(r.get("ctrl/alarm")) or 0.0) > 0]
    guards = [
        (s, r["guard/action"])
        for s, r in zip(steps, rows)
        if isinstance(r.get("guard/action"), str) and r["guard/action"]
    ]
    guard_steps = [s for s, _ in guards]

    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    drawers = {
        "success.png": lambda p: _plot_success(rows, steps, spans, xlim, p),
        "control_tokens.png": lambda p: _plot_control(
            rows, steps, spans, xlim, alarms, guard_steps, p
        ),
        "decision.png": lambda p: _plot_decision(rows, steps, spans, xlim, p),
        "states.png": lambda p: _plot_states(rows, steps, spans, xlim, p),
        "optimization.png": lambda p: _plot_optimization(rows, steps, spans, xlim, p),
    }
    plots, skipped = [], []
    for name, draw in drawers.items():
        path = out / name
        if draw(path):
            plots.append(path)
        else:
            path.unlink(missing_ok=True)  # a stale plot from an earlier report
            skipped.append(name)

    page = _html(
        run_dir, rows, steps, spans, _read_summary(run_dir), plots, skipped, alarms, guards
    )
    html_path = run_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return {
        "html": str(html_path),
        "plots": [str(p) for p in plots],
        "skipped": skipped,
        "alarm_steps": alarms,
        "guard_steps": guard_steps,
    }

"""Run report: PNG plots and one self-contained HTML page from a run directory
(`fastrl report RUN_DIR`).

Reads `RUN_DIR/metrics.jsonl` (one row per step, written by `monitor.log.MetricLogger`), the
optional `summary.json` and `config.yaml`, and writes `RUN_DIR/report/*.png` and
`RUN_DIR/report.html`, which embeds the same PNGs as base64 data URIs (the page needs no other
file).

A run is a long SFT warm-up and a short RL phase (800 and 45 steps in the demo), so the two get
their own x axes instead of sharing the global step: the *RL axis* counts the RL rows from 1 (RL
step k is the k-th row with `phase: rl`; a row without a phase is RL when it has a reward or a
success), the *SFT axis* counts the warm-up rows (the SFT rows before the first RL row) from 1.
SFT phases that run between RL steps (interleaved `ets1`, `prs1`..., the guard's `guard_sft`) are
corrective: shaded on the RL axis between the RL steps they ran between, and drawn on an axis of
their own. Each axis label says how its steps map to global steps. On the RL axis:

- `rl_success.png`: `success/mean`, `reward/mean` only where it differs from success,
  `eval/test_success` as points, and the summary's test success before RL (`sft_success`, at RL
  step 0) and after it (`rl_success`, at the last RL step);
- `rl_optimization.png`: `loss`, `entropy`, `clip_frac`, `kl`, `grad_norm`, `lr`,
  `rollout/logprob_diff_mean`, one panel each. `kl` is drawn when `rl.kl_coef > 0` in
  `config.yaml` and `clip_frac` when `rl.updates_per_step > 1` (with one update per step the ratio
  is exactly 1); otherwise each is drawn only when it is nonzero somewhere;
- `rl_control_tokens.png`: the control-token probes after `<tool_call>\\n` (`ctrl/p_*`) and at
  turn boundaries (`ctrl/turn_p_*`, `ctrl/after_call_p_im_end`);
- `rl_decision.png`: the decision probe (`ctrl/habit_p_tool_call`, `ctrl/first_p_tool_call`,
  `ctrl/continue_p_tool_call`, `ctrl/answer_p_tool_call`): p(`<tool_call>`) on fixed held-out
  expert trajectories where the expert makes the call a teacher that stops early leaves out, its
  first call after the question (a teacher that guesses answers there), its other calls, and where
  it answers, with the sampled `success/mean`;
- `rl_states.png`: the `state/*` fractions, stacked.

Every RL plot marks alarm steps (`ctrl/alarm`, red) and guard actions (`guard/action`, black
dashed). `sft.png` draws the warm-up's `loss`, `grad_norm` and `lr` on the SFT axis;
`sft_corrective.png` the same for the corrective phases, counted from 1, one colour per run.

What is drawn is decided apart from the drawing (`fastrl.monitor.report_plan`): `plan_report`
turns the rows into `Plot` specs
(panels of series, shaded bands, marks, notes on what was left out and why), `draw` renders one
spec. A value that is missing, null, non-numeric or non-finite (the logger writes NaN as the
string "nan") counts as missing; a panel whose series are all missing is left out, and a plot with
no panel is skipped. matplotlib is imported only in `draw`, through its Agg canvas (no pyplot, no
display).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

from fastrl.monitor.report_plan import (
    ALL_PLOTS,
    DECISION,
    Band,
    Mark,
    Panel,
    Plot,
    Rows,
    Timeline,
    global_steps,
    number,
    phase_spans,
    plan_report,
    read_config,
    read_json,
    read_metrics,
    series_of,
    timeline,
)

__all__ = [
    "ALL_PLOTS",
    "draw",
    "phase_spans",
    "plan_report",
    "read_metrics",
    "timeline",
    "write_report",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- drawing
def draw(plot: Plot) -> bytes:
    """Render `plot` as PNG bytes on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    height = 3.4 if len(plot.panels) == 1 else 2.0
    fig = Figure(figsize=(11, 0.8 + height * len(plot.panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(plot.panels), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, panel) in enumerate(zip(axes, plot.panels)):
        _draw_bands(ax, plot.bands, labelled=i == 0)
        _draw_series(ax, panel)
        _draw_marks(ax, plot.marks, labelled=i == 0)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        ax.set_title(panel.title, loc="left", fontsize=10)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Tick labels that carry their own scale: an offset text ("1e-5") collides with the title.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
        # The top panel's legend also explains the bands and marks of every panel.
        if len(ax.get_legend_handles_labels()[1]) > (0 if i == 0 else 1):
            ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    axes[0].set_xlim(*plot.xlim)
    axes[-1].set_xlabel(plot.xlabel)
    fig.suptitle(plot.title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _draw_bands(ax: Any, bands: list[Band], labelled: bool) -> None:
    for j, band in enumerate(bands):
        label = "SFT between RL steps" if labelled and j == 0 else None
        ax.axvspan(band.first, band.last, color="0.82", lw=0, zorder=0, label=label)
        if labelled:
            ax.text((band.first + band.last) / 2, 0.97, band.label, rotation=90, ha="center",
                    va="top", transform=ax.get_xaxis_transform(), fontsize=7, color="0.2",
                    bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})  # fmt: skip


def _draw_series(ax: Any, panel: Panel) -> None:
    drawn = [s for s in panel.series if s.xs]
    if panel.stacked:
        ax.stackplot(drawn[0].xs, *(s.ys for s in drawn), labels=[s.label for s in drawn],
                     colors=[s.color for s in drawn], alpha=0.85)  # fmt: skip
        return
    # Dash patterns per line, so that a line drawn over another of equal value leaves it visible.
    dashes = ("-", "--", "-.", (0, (6, 2, 1, 2, 1, 2)))
    lines = 0
    for k, s in enumerate(panel.series):
        if not s.xs:
            continue
        color, label = s.color or f"C{k}", s.label or None
        if s.style == "points":
            ax.plot(s.xs, s.ys, ls="", marker=s.marker, ms=6, color=color, label=label, zorder=3)
        elif s.style == "reference":
            ax.plot(s.xs, s.ys, ls="", marker=s.marker, ms=8, mfc="none", mew=1.5, color=color,
                    label=label, zorder=3, clip_on=False)  # fmt: skip
        else:
            dotted = s.style == "dotted"
            ls = ":" if dotted else dashes[lines % len(dashes)]
            lines += not dotted
            ax.plot(s.xs, s.ys, ls=ls, lw=1.4, ms=4,
                    marker="." if len(s.xs) <= 60 else None,  # steps readable on short runs
                    color="0.35" if dotted else color, label=label)  # fmt: skip


def _draw_marks(ax: Any, marks: list[Mark], labelled: bool) -> None:
    styles = {
        "alarm": ("alarm (ctrl/alarm)", {"color": "red", "lw": 1.0, "alpha": 0.8}),
        "guard": ("guard action (guard/action)", {"color": "black", "ls": "--", "lw": 1.3}),
    }
    for kind, (label, style) in styles.items():
        xs = [m.x for m in marks if m.kind == kind]
        for j, x in enumerate(xs):
            ax.axvline(x, label=label if labelled and j == 0 else None, zorder=2, **style)


# --------------------------------------------------------------------------- the page
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
    tl: Timeline,
    summary: dict[str, Any],
    images: list[tuple[Plot, bytes]],
    skipped: list[str],
) -> str:
    """The report page: summary, phases, the plots inline, probe, alarms and guard, config."""
    esc = html.escape
    steps = global_steps(rows)
    title = f"fastrl report: {run_dir.resolve().name}"
    axis_of = {p.step: ("RL", p.x) for p in tl.rl} | {p.step: ("SFT", p.x) for p in tl.warmup}
    axis_of |= {p.step: ("corrective SFT", p.x) for p in tl.corrective}
    phases = []
    for first, last, phase, name in phase_spans(rows):
        inside = [r for s, r in zip(steps, rows) if first <= s <= last]
        ok = [v for v in (number(r.get("success/mean")) for r in inside) if v is not None]
        mean = sum(ok) / len(ok) if ok else "–"
        (what, a), (_, b) = axis_of[first], axis_of[last]
        phases.append([name or "–", phase or "–", first, last, f"{what} {a}–{b}", mean])
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1150px}"
        "table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{max-width:100%;display:block}figure{margin:0 0 1.5em 0}"
        "figcaption{color:#555;font-size:90%}"
        "pre{background:#f5f5f5;padding:1em;overflow-x:auto}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(rows)} steps ({steps[0]}–{steps[-1]}): {len(tl.warmup)} warm-up SFT, "
        f"{len(tl.rl)} RL and {len(tl.corrective)} corrective SFT, from {esc(str(run_dir))}</p>",
        "<h2>Summary</h2>",
        _table(["key", "value"], [[k, v] for k, v in summary.items()])
        if summary
        else "<p>no summary.json</p>",
        "<h2>Phases</h2>",
        _table(
            ["name", "phase", "first step", "last step", "on its axis", "mean success/mean"], phases
        ),
    ]
    for axis, heading in (("rl", "RL"), ("sft", "SFT")):
        shown = [(p, png) for p, png in images if p.axis == axis]
        if shown:
            parts.append(f"<h2>{heading}</h2>")
        for plot, png in shown:
            data = base64.b64encode(png).decode("ascii")
            caption = f"report/{plot.name}" + "".join(f"; {n}" for n in plot.notes)
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" '
                f'alt="{esc(plot.title)}"><figcaption>{esc(caption)}</figcaption>'
                "</figure>"
            )
    if skipped:
        parts.append(f"<p>Skipped (no data): {esc(', '.join(skipped))}</p>")
    probe = []
    for key in DECISION:
        s = series_of(tl.rl, key)
        if s.xs:
            probe.append([key, s.xs[0], s.ys[0], s.xs[-1], s.ys[-1]])
    if probe:
        parts.append("<h2>Decision probe</h2>")
        parts.append(_table(["series", "first RL step", "value", "last RL step", "value"], probe))
    alarms = [[p.step, p.x] for p in tl.alarms()]
    guards = [[p.step, p.x, p.row["guard/action"]] for p in tl.guard_actions()]
    parts.append("<h2>Alarms and guard actions</h2>")
    parts.append(f"<p>Alarm steps: {esc(', '.join(str(s) for s, _ in alarms) or 'none')}</p>")
    if alarms:
        parts.append(_table(["step", "RL step"], alarms))
    if guards:
        parts.append(_table(["step", "RL step", "guard action"], guards))
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

    Returns {"html": path, "plots": [paths], "skipped": [plot file names], "alarm_steps": [global
    steps], "guard_steps": [global steps]}. Raises FileNotFoundError without `metrics.jsonl`,
    ValueError when it holds no rows.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no metric rows")
    summary = read_json(run_dir / "summary.json")
    plots = plan_report(rows, read_config(run_dir / "config.yaml"), summary)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for plot in plots:
        png = draw(plot)
        (out / plot.name).write_bytes(png)
        images.append((plot, png))
    drawn = {p.name for p in plots}
    skipped = [name for name in ALL_PLOTS if name not in drawn]
    for name in skipped:
        (out / name).unlink(missing_ok=True)  # a stale plot from an earlier report
    tl = timeline(rows)
    html_path = run_dir / "report.html"
    html_path.write_text(_html(run_dir, rows, tl, summary, images, skipped), encoding="utf-8")
    return {
        "html": str(html_path),
        "plots": [str(out / p.name) for p in plots],
        "skipped": skipped,
        "alarm_steps": [p.step for p in tl.alarms()],
        "guard_steps": [p.step for p in tl.guard_actions()],
    }

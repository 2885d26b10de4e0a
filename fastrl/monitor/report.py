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

What is drawn is decided apart from the drawing: `plan_report` turns the rows into `Plot` specs
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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROBES = (
    ("after <tool_call>\\n (ctrl/p_*)", ("ctrl/p_open_json", "ctrl/p_im_end", "ctrl/p_tool_call")),
    (
        "at turn boundaries",
        ("ctrl/turn_p_im_end", "ctrl/turn_p_tool_call", "ctrl/after_call_p_im_end"),
    ),
)
DECISION = {  # series -> where the expert trajectory is probed
    "ctrl/habit_p_tool_call": "habit: last call, a teacher stopping early answers",
    "ctrl/first_p_tool_call": "first: first call, a guessing teacher answers",
    "ctrl/continue_p_tool_call": "continue: the expert's other calls",
    "ctrl/answer_p_tool_call": "answer: the expert answers (stays low)",
}
STATES = ("state/healthy_call", "state/healthy_text", "state/pollution", "state/collapse")
STATE_COLORS = ("tab:green", "tab:blue", "tab:orange", "tab:red")
RL_OPTIM = ("loss", "entropy", "clip_frac", "kl", "grad_norm", "lr", "rollout/logprob_diff_mean")
SFT_OPTIM = ("loss", "grad_norm", "lr")
YLABELS = {"rollout/logprob_diff_mean": "|engine − trainer|"}
ALL_PLOTS = (
    "rl_success.png",
    "rl_optimization.png",
    "rl_control_tokens.png",
    "rl_decision.png",
    "rl_states.png",
    "sft.png",
    "sft_corrective.png",
)

Span = tuple[int, int, str, str]
Rows = list[dict[str, Any]]


# --------------------------------------------------------------------------- reading
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


def _read_json(path: Path) -> dict[str, Any]:
    """`path` as a JSON object; {} when it is absent or unreadable (with a warning)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable, left out of the report (%s)", path, e)
        return {}
    if not isinstance(value, dict):
        log.warning("%s: not a JSON object, left out of the report", path)
        return {}
    return value


def _read_config(path: Path) -> dict[str, Any]:
    """The run's resolved `config.yaml` as nested dicts; {} when absent or unreadable."""
    if not path.is_file():
        return {}
    import yaml

    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as e:
        log.warning("%s: unreadable, its settings are not used (%s)", path, e)
        return {}
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    """`value` as a finite float, or None when it is missing, non-numeric or non-finite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _steps(rows: Rows) -> list[int]:
    """The step of each row; a row without a usable `step` gets the previous step + 1."""
    steps, prev = [], 0
    for row in rows:
        step = _num(row.get("step"))
        prev = int(step) if step is not None else prev + 1
        steps.append(prev)
    return steps


def _phase(row: dict[str, Any]) -> str:
    """`rl` or `sft`; a row without a phase is RL when it has a reward or a success."""
    phase = _text(row.get("phase"))
    if phase in ("rl", "sft"):
        return phase
    return "rl" if "reward/mean" in row or "success/mean" in row else "sft"


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


# --------------------------------------------------------------------------- axes
@dataclass
class Point:
    """One row placed on an axis: `x` is its RL (or SFT) step, `step` its global step."""

    x: int
    step: int
    row: dict[str, Any]


@dataclass
class CorrectiveRun:
    """Consecutive corrective SFT rows of one phase, run after RL step `after`."""

    after: int
    name: str
    points: list[Point]


@dataclass
class Timeline:
    """The rows on their axes: RL rows numbered from 1 (the RL axis), the SFT warm-up rows before
    the first RL row numbered from 1 (the SFT axis), and the corrective SFT rows after it numbered
    from 1 (their own axis), grouped in runs."""

    rl: list[Point]
    warmup: list[Point]
    corrective: list[Point]
    runs: list[CorrectiveRun]

    def alarms(self) -> list[Point]:
        """The RL rows that raised `ctrl/alarm`."""
        return [p for p in self.rl if (_num(p.row.get("ctrl/alarm")) or 0.0) > 0]

    def guard_actions(self) -> list[Point]:
        """The RL rows on which the guard acted (`guard/action`)."""
        return [p for p in self.rl if _text(p.row.get("guard/action"))]


def timeline(rows: Rows) -> Timeline:
    """Place every row on its axis (see `Timeline`)."""
    tl = Timeline([], [], [], [])
    for step, row in zip(_steps(rows), rows):
        if _phase(row) == "rl":
            tl.rl.append(Point(len(tl.rl) + 1, step, row))
        elif not tl.rl:
            tl.warmup.append(Point(len(tl.warmup) + 1, step, row))
        else:
            point = Point(len(tl.corrective) + 1, step, row)
            tl.corrective.append(point)
            name = _text(row.get("phase/name")) or "sft"
            run = tl.runs[-1] if tl.runs else None
            if run and run.after == len(tl.rl) and run.name == name:
                run.points.append(point)
            else:
                tl.runs.append(CorrectiveRun(len(tl.rl), name, [point]))
    return tl


def _axis_label(points: list[Point], what: str) -> str:
    """The x label of an axis, with how its steps map to global steps."""
    segments: list[tuple[int, int, int]] = []  # (first x, last x, global step - x)
    for p in points:
        if segments and segments[-1][2] == p.step - p.x:
            segments[-1] = (segments[-1][0], p.x, segments[-1][2])
        else:
            segments.append((p.x, p.x, p.step - p.x))
    base = f"{what} step ({what} rows counted from 1; "
    if len(segments) == 1:
        offset = segments[0][2]
        return base + (
            "= global step)" if offset == 0 else f"global step = {what} step + {offset})"
        )
    if len(segments) > 3:
        return base + "the tables give global steps)"
    parts = [f"+ {off} up to {last}" for _, last, off in segments[:-1]]
    parts.append(f"+ {segments[-1][2]} from {segments[-1][0]}")
    return base + f"global step = {what} step " + ", ".join(parts) + ")"


# --------------------------------------------------------------------------- specs
@dataclass
class Series:
    """One drawn series: `style` is line | dotted | points | reference (a summary value, hollow
    `marker`)."""

    key: str
    label: str
    xs: list[float]
    ys: list[float]
    style: str = "line"
    color: str | None = None
    marker: str = "o"


@dataclass
class Panel:
    """One axes of a plot; `stacked` draws its series as a stack (they share their xs)."""

    title: str
    ylabel: str
    series: list[Series]
    ylim: tuple[float, float] | None = None
    stacked: bool = False


@dataclass
class Band:
    """A shaded span of the x axis: a corrective SFT phase between RL steps."""

    first: float
    last: float
    label: str


@dataclass
class Mark:
    """A vertical line: `kind` is alarm | guard."""

    x: float
    kind: str
    label: str


@dataclass
class Plot:
    """One PNG: panels stacked over a shared x axis (`axis` rl | sft)."""

    name: str
    title: str
    axis: str
    xlabel: str
    xlim: tuple[float, float]
    panels: list[Panel]
    bands: list[Band] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def _series(points: list[Point], key: str, label: str | None = None, **kw: Any) -> Series:
    """The points where `key` holds a finite number."""
    xs, ys = [], []
    for p in points:
        value = _num(p.row.get(key))
        if value is not None:
            xs.append(p.x)
            ys.append(value)
    return Series(key, label if label is not None else key, xs, ys, **kw)


def _same(a: Series, b: Series) -> bool:
    """Whether two series hold the same values at the same steps."""
    return a.xs == b.xs and all(math.isclose(x, y, abs_tol=1e-9) for x, y in zip(a.ys, b.ys))


def _panels(panels: list[Panel]) -> list[Panel]:
    """The panels with at least one drawable point."""
    return [p for p in panels if any(s.xs for s in p.series)]


def _setting(config: dict[str, Any], dotted: str) -> Any:
    """`config` at a dotted key (None when absent)."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _term_on(config: dict[str, Any], key: str) -> tuple[bool | None, str]:
    """Whether the run's config turns the loss term behind `key` on (None: no config says)."""
    if key == "kl":
        coef = _num(_setting(config, "rl.kl_coef"))
        return (None, "") if coef is None else (coef > 0, f"rl.kl_coef = {coef:g}")
    if key == "clip_frac":
        n = _num(_setting(config, "rl.updates_per_step"))
        if n is None:
            return None, ""
        return n > 1, f"rl.updates_per_step = {n:g}: the ratio is exactly 1"
    return True, ""


def _rl_plots(tl: Timeline, config: dict[str, Any], summary: dict[str, Any]) -> list[Plot]:
    pts = tl.rl
    n = len(pts)
    # A band as wide as most of a step, and visible however many steps there are.
    half = max(0.35, 0.004 * n)
    bands = [Band(run.after + 0.5 - half, run.after + 0.5 + half, run.name) for run in tl.runs]
    marks = [Mark(p.x, "alarm", "alarm") for p in tl.alarms()]
    marks += [Mark(p.x, "guard", p.row["guard/action"]) for p in tl.guard_actions()]
    xlabel = _axis_label(pts, "RL")
    lo, hi = 0.5, max(n + 0.5, max((b.last for b in bands), default=0.0) + 0.2)

    def plot(name: str, title: str, panels: list[Panel], notes: list[str] | None = None) -> Plot:
        return Plot(name, title, "rl", xlabel, (lo, hi), panels, bands, marks, notes or [])

    # -- success
    success = _series(pts, "success/mean", "success/mean (sampled, training tasks)")
    reward = _series(pts, "reward/mean", "reward/mean")
    series, notes = [success], []
    if reward.xs and _same(reward, success):
        notes.append("reward/mean equals success/mean at every RL step: drawn once")
    elif reward.xs:
        series.append(reward)
    series.append(
        _series(
            pts,
            "eval/test_success",
            "eval/test_success (greedy, test split)",
            style="points",
            color="C3",
        )
    )
    refs = [("sft_success", 0, "test success before RL (summary)", "D")]
    refs.append(("rl_success", n, "test success after RL (summary)", "s"))
    for key, x, label, marker in refs:
        value = _num(summary.get(key))
        if value is not None and n:
            series.append(Series(key, label, [x], [value], "reference", "k", marker))
    success_plot = plot(
        "rl_success.png",
        "success on the RL steps",
        _panels([Panel("success", "success", series, ylim=(-0.03, 1.03))]),
        notes,
    )
    if any(s.style == "reference" and s.xs == [0] for s in series):
        success_plot.xlim = (-0.5, hi)  # room for the success before RL, at RL step 0
    plots = [success_plot]

    # -- optimization
    panels, notes = [], []
    for key in RL_OPTIM:
        s = _series(pts, key)
        on, why = _term_on(config, key)
        if s.xs and on is False:
            notes.append(f"{key} not drawn: off ({why})")
            continue
        if s.xs and on is None and not any(s.ys):
            notes.append(f"{key} not drawn: zero at every RL step (the term is off)")
            continue
        panels.append(Panel(key, YLABELS.get(key, key), [s]))
    plots.append(
        plot("rl_optimization.png", "optimization on the RL steps", _panels(panels), notes)
    )

    # -- control tokens, decision probe, structural states
    panels = [
        Panel(
            title,
            "probability",
            [_series(pts, k, k.removeprefix("ctrl/")) for k in keys],
            ylim=(-0.02, 1.02),
        )
        for title, keys in PROBES
    ]
    plots.append(
        plot(
            "rl_control_tokens.png",
            "control-token probabilities at probe positions",
            _panels(panels),
        )
    )
    probe = [_series(pts, k, label) for k, label in DECISION.items()]
    if any(s.xs for s in probe):
        probe.append(_series(pts, "success/mean", "sampled success/mean", style="dotted"))
    plots.append(
        plot(
            "rl_decision.png",
            "call or answer: p(<tool_call>) on held-out expert trajectories",
            _panels([Panel("decision probe", "p(<tool_call>)", probe, ylim=(-0.02, 1.02))]),
        )
    )
    xs, stack = [], {k: [] for k in STATES}
    for p in pts:
        values = {k: _num(p.row.get(k)) for k in STATES}
        if any(v is not None for v in values.values()):
            xs.append(p.x)
            for k, v in values.items():
                stack[k].append(v or 0.0)
    states = [
        Series(k, k.removeprefix("state/"), xs, stack[k], color=c)
        for k, c in zip(STATES, STATE_COLORS)
    ]
    plots.append(
        plot(
            "rl_states.png",
            "structural states of the sampled assistant messages",
            _panels([Panel("states", "fraction of messages", states, ylim=(0, 1), stacked=True)]),
        )
    )
    return plots


def _sft_plots(tl: Timeline) -> list[Plot]:
    """Loss, grad norm and lr over the warm-up steps (`sft.png`) and, on their own axis, over the
    corrective SFT phases that ran between RL steps (`sft_corrective.png`, one colour per run)."""
    plots = []
    if tl.warmup:
        by_name: dict[str, list[Point]] = {}
        for p in tl.warmup:
            by_name.setdefault(_text(p.row.get("phase/name")) or "sft", []).append(p)
        panels = [
            Panel(key, key, [_series(points, key, name) for name, points in by_name.items()])
            for key in SFT_OPTIM
        ]
        xlim = (0.5, len(tl.warmup) + 0.5)
        xlabel = _axis_label(tl.warmup, "SFT")
        plots.append(Plot("sft.png", "SFT warm-up", "sft", xlabel, xlim, _panels(panels)))
    if tl.corrective:
        labels = [f"{r.name} after RL step {r.after} (steps {r.points[0].step}–"
                  f"{r.points[-1].step})" for r in tl.runs]  # fmt: skip
        panels = [
            Panel(key, key, [_series(r.points, key, label) for r, label in zip(tl.runs, labels)])
            for key in SFT_OPTIM
        ]
        xlim = (0.5, len(tl.corrective) + 0.5)
        xlabel = "corrective SFT step (SFT rows after RL began, counted from 1)"
        title = "corrective SFT phases between RL steps"
        plots.append(Plot("sft_corrective.png", title, "sft", xlabel, xlim, _panels(panels)))
    return [p for p in plots if p.panels]


def plan_report(
    rows: Rows, config: dict[str, Any] | None = None, summary: dict[str, Any] | None = None
) -> list[Plot]:
    """The plots of a run, in page order (RL plots, then SFT), each with at least one panel.

    `config` is the run's `config.yaml` as nested dicts, `summary` its `summary.json`; either may
    be empty. Nothing is drawn here: `draw` renders a spec.
    """
    tl = timeline(rows)
    plots = _rl_plots(tl, config or {}, summary or {}) if tl.rl else []
    return [p for p in plots if p.panels] + _sft_plots(tl)


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
    steps = _steps(rows)
    title = f"fastrl report: {run_dir.resolve().name}"
    axis_of = {p.step: ("RL", p.x) for p in tl.rl} | {p.step: ("SFT", p.x) for p in tl.warmup}
    axis_of |= {p.step: ("corrective SFT", p.x) for p in tl.corrective}
    phases = []
    for first, last, phase, name in phase_spans(rows):
        inside = [r for s, r in zip(steps, rows) if first <= s <= last]
        ok = [v for v in (_num(r.get("success/mean")) for r in inside) if v is not None]
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
        s = _series(tl.rl, key)
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
    summary = _read_json(run_dir / "summary.json")
    plots = plan_report(rows, _read_config(run_dir / "config.yaml"), summary)
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

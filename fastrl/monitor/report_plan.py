"""What `fastrl report` draws, decided apart from the drawing: `read_metrics` reads a run's rows,
`timeline` puts them on the RL and SFT axes, and `plan_report` turns them into `Plot` specs
(panels of series, shaded bands, marks, notes on what was left out and why). See
`fastrl.monitor.report` for the plots and the page.
"""

from __future__ import annotations

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
HEALTH = ("ctrl/health_drift", "ctrl/health_drift_turn_start", "ctrl/health_drift_all")
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


def read_json(path: Path) -> dict[str, Any]:
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


def read_config(path: Path) -> dict[str, Any]:
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


def number(value: Any) -> float | None:
    """`value` as a finite float, or None when it is missing, non-numeric or non-finite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def global_steps(rows: Rows) -> list[int]:
    """The step of each row; a row without a usable `step` gets the previous step + 1."""
    steps, prev = [], 0
    for row in rows:
        step = number(row.get("step"))
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
    for step, row in zip(global_steps(rows), rows):
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
        return [p for p in self.rl if (number(p.row.get("ctrl/alarm")) or 0.0) > 0]

    def guard_actions(self) -> list[Point]:
        """The RL rows on which the guard acted (`guard/action`)."""
        return [p for p in self.rl if _text(p.row.get("guard/action"))]


def timeline(rows: Rows) -> Timeline:
    """Place every row on its axis (see `Timeline`)."""
    tl = Timeline([], [], [], [])
    for step, row in zip(global_steps(rows), rows):
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


def series_of(points: list[Point], key: str, label: str | None = None, **kw: Any) -> Series:
    """The points where `key` holds a finite number."""
    xs, ys = [], []
    for p in points:
        value = number(p.row.get(key))
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
        coef = number(_setting(config, "rl.kl_coef"))
        return (None, "") if coef is None else (coef > 0, f"rl.kl_coef = {coef:g}")
    if key == "clip_frac":
        n = number(_setting(config, "rl.updates_per_step"))
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
    success = series_of(pts, "success/mean", "success/mean (sampled, training tasks)")
    reward = series_of(pts, "reward/mean", "reward/mean")
    series, notes = [success], []
    if reward.xs and _same(reward, success):
        notes.append("reward/mean equals success/mean at every RL step: drawn once")
    elif reward.xs:
        series.append(reward)
    series.append(
        series_of(
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
        value = number(summary.get(key))
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
        s = series_of(pts, key)
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
            [series_of(pts, k, k.removeprefix("ctrl/")) for k in keys],
            ylim=(-0.02, 1.02),
        )
        for title, keys in PROBES
    ]
    health = [series_of(pts, k, k.removeprefix("ctrl/")) for k in HEALTH]
    if any(s.xs for s in health):  # the look-ahead health probe (its alarm rule, if on)
        panels.append(Panel("health probe: drift from RL start, weights after each update",
                            "nats", health))  # fmt: skip
    plots.append(
        plot(
            "rl_control_tokens.png",
            "control-token probabilities at probe positions",
            _panels(panels),
        )
    )
    probe = [series_of(pts, k, label) for k, label in DECISION.items()]
    if any(s.xs for s in probe):
        probe.append(series_of(pts, "success/mean", "sampled success/mean", style="dotted"))
    plots.append(
        plot(
            "rl_decision.png",
            "call or answer: p(<tool_call>) on held-out expert trajectories",
            _panels([Panel("decision probe", "p(<tool_call>)", probe, ylim=(-0.02, 1.02))]),
        )
    )
    xs, stack = [], {k: [] for k in STATES}
    for p in pts:
        values = {k: number(p.row.get(k)) for k in STATES}
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
            Panel(key, key, [series_of(points, key, name) for name, points in by_name.items()])
            for key in SFT_OPTIM
        ]
        xlim = (0.5, len(tl.warmup) + 0.5)
        xlabel = _axis_label(tl.warmup, "SFT")
        plots.append(Plot("sft.png", "SFT warm-up", "sft", xlabel, xlim, _panels(panels)))
    if tl.corrective:
        labels = [f"{r.name} after RL step {r.after} (steps {r.points[0].step}–"
                  f"{r.points[-1].step})" for r in tl.runs]  # fmt: skip
        panels = [
            Panel(key, key, [series_of(r.points, key, label) for r, label in zip(tl.runs, labels)])
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
